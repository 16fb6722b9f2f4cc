"""The small memory interface that the decoders and walkers work on.

Everything below the drgn adapter reads target memory through :class:`Memory`: one
method, ``read(address, size, physical)``. Production passes a drgn program (whose
``Program.read`` has exactly this signature); unit tests pass :class:`SyntheticMemory`.
"""

from __future__ import annotations

from typing import Dict, Iterable, Optional, Protocol, Tuple


class FaultError(Exception):
    """Memory that could not be read (not in the dump, filtered, not RAM)."""

    def __init__(self, address: int, physical: bool, reason: str = "", excluded_by: Optional[str] = None) -> None:
        self.address = address
        self.physical = physical
        #: the dump filter that left this memory out (makedumpfile's level), where one did
        self.excluded_by = excluded_by
        kind = "physical" if physical else "virtual"
        super().__init__(f"could not read {kind} address {address:#x}" + (f": {reason}" if reason else ""))


class Memory(Protocol):
    def read(self, address: int, size: int, physical: bool = False) -> bytes:
        """Return ``size`` bytes at ``address``; raise :class:`FaultError` if unreadable."""
        ...


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


class PhysRanges:
    """A sorted set of physical address ranges ``[start, end)`` with fast lookup."""

    def __init__(self, ranges: Iterable[Tuple[int, int]] = ()) -> None:
        from inspect_vmemmap.intervals import merge

        self.ranges = merge(ranges)
        self._starts = [s for s, _ in self.ranges]

    def __contains__(self, addr: int) -> bool:
        return self.find(addr) is not None

    def __bool__(self) -> bool:
        return bool(self.ranges)

    def find(self, addr: int) -> Optional[Tuple[int, int]]:
        from bisect import bisect_right

        i = bisect_right(self._starts, addr) - 1
        if i >= 0 and addr < self.ranges[i][1]:
            return self.ranges[i]
        return None

    def covers(self, start: int, end: int) -> bool:
        r = self.find(start)
        return r is not None and end <= r[1]

    @property
    def end(self) -> int:
        return self.ranges[-1][1] if self.ranges else 0
