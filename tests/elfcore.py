"""Write a minimal ELF vmcore: a VMCOREINFO note and PT_LOAD segments of physical memory.

Used to make the small fixture dumps (only the pages the tool reads) that drgn opens
like any QEMU or kdump ELF vmcore."""

from __future__ import annotations

import struct
from typing import BinaryIO, Dict, Iterable, List, Tuple

from inspect_vmemmap.arch import get as get_arch



def _note(name: bytes, ntype: int, desc: bytes) -> bytes:
    name += b"\0"
    pad = lambda b: b + b"\0" * (-len(b) % 4)  # noqa: E731
    return struct.pack("<III", len(name), len(desc), ntype) + pad(name) + pad(desc)


def runs(pages: Iterable[int], page_size: int) -> List[Tuple[int, int]]:
    """Physical ``(start, size)`` runs of whole pages given by page frame numbers."""
    out: List[List[int]] = []
    for p in sorted(set(pages)):
        if out and out[-1][0] + out[-1][1] == p * page_size:
            out[-1][1] += page_size
        else:
            out.append([p * page_size, page_size])
    return [(a, b) for a, b in out]


def write_elf_core(f: BinaryIO, arch: str, vmcoreinfo: bytes, memory: Dict[int, bytes], page_size: int = 4096) -> None:
    """Write ``memory`` (pfn -> one page of bytes) and the VMCOREINFO note to ``f``."""
    segs = runs(memory, page_size)
    note = _note(b"VMCOREINFO", 0, vmcoreinfo)
    phnum = 1 + len(segs)
    off = 64 + 56 * phnum
    f.write(b"\x7fELF" + bytes([2, 1, 1, 0]) + bytes(8))
    f.write(struct.pack("<HHIQQQIHHHHHH", 4, get_arch(arch).elf_machine, 1, 0, 64, 0, 0, 64, 56, phnum, 0, 0, 0))
    f.write(struct.pack("<IIQQQQQQ", 4, 0, off, 0, 0, len(note), len(note), 0))
    data_off = off + len(note)
    for start, size in segs:
        f.write(struct.pack("<IIQQQQQQ", 1, 7, data_off, start, start, size, size, 0))
        data_off += size
    f.write(note)
    for start, size in segs:
        for pfn in range(start // page_size, (start + size) // page_size):
            f.write(memory[pfn])
