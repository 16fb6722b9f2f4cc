"""Synthetic memory for the unit tests: sparse physical pages and one linear map."""

from __future__ import annotations

from typing import Dict

from inspect_vmemmap.memory import FaultError


class SyntheticMemory:
    """Sparse physical memory made of 4 KiB-or-larger pages, for tests.

    Virtual reads go through one linear mapping (``virt_base + phys``), like the
    kernel's direct map; that is all the section decoder needs.
    """

    def __init__(self, page_size: int = 4096, virt_base: int = 0xFFFF888000000000) -> None:
        self.page_size = page_size
        self.virt_base = virt_base
        self.pages: Dict[int, bytearray] = {}

    def page(self, phys: int) -> bytearray:
        base = phys - phys % self.page_size
        page = self.pages.get(base)
        if page is None:
            page = self.pages[base] = bytearray(self.page_size)
        return page

    def write(self, address: int, data: bytes, physical: bool = True) -> None:
        phys = address if physical else address - self.virt_base
        while data:
            page = self.page(phys)
            off = phys % self.page_size
            n = min(len(data), self.page_size - off)
            page[off : off + n] = data[:n]
            data = data[n:]
            phys += n

    def write_u64(self, address: int, value: int, physical: bool = True) -> None:
        self.write(address, (value & (2**64 - 1)).to_bytes(8, "little"), physical)

    def remove(self, phys: int) -> None:
        self.pages.pop(phys - phys % self.page_size, None)

    def read(self, address: int, size: int, physical: bool = False) -> bytes:
        phys = address if physical else address - self.virt_base
        if not physical and not 0 <= phys < 1 << 52:
            raise FaultError(address, physical, "outside the synthetic direct map")
        out = bytearray()
        while size > 0:
            base = phys - phys % self.page_size
            page = self.pages.get(base)
            if page is None:
                raise FaultError(address, physical)
            off = phys - base
            n = min(size, self.page_size - off)
            out += page[off : off + n]
            size -= n
            phys += n
        return bytes(out)
