"""Ground truth that does not come from inspect_vmemmap's code.

A deliberately naive x86_64 page-table walk (one drgn read per entry, recursion, no
shared code with inspect_vmemmap.pgtable), and drgn's own sparsemem helpers.
"""

from __future__ import annotations

from collections import Counter
from typing import Dict, List, Tuple

import drgn
from drgn.helpers.linux.mm import follow_phys
from drgn.helpers.linux.mmzone import decode_section_flags, for_each_present_section, section_mem_map_addr

START_KERNEL_MAP = 0xFFFFFFFF80000000
ADDR = 0x000FFFFFFFFFF000


def open_dump(core: str, vmlinux: str) -> drgn.Program:
    prog = drgn.Program()
    prog.set_core_dump(core)
    prog.load_debug_info([vmlinux], main=True)
    return prog


def drgn_sections(prog: drgn.Program) -> Dict[int, Tuple[str, int]]:
    """nr -> (flags as drgn decodes them, coded mem_map) for every present section."""
    out = {}
    for nr, sec in for_each_present_section(prog):
        out[nr] = (decode_section_flags(sec), section_mem_map_addr(sec).value_())
    return out


def vmemmap_base(prog: drgn.Program) -> int:
    return prog["vmemmap"].value_()


def levels(prog: drgn.Program) -> int:
    return 5 if prog["__pgtable_l5_enabled"].value_() else 4


def naive_walk(prog: drgn.Program, start: int, end: int) -> List[Tuple[int, int, int, bool]]:
    """Every leaf (vaddr, size, phys, writable) in [start, end)."""
    n = levels(prog)
    shifts = [48, 39, 30, 21, 12][5 - n:]
    root = follow(prog, prog.symbol("init_top_pgt").address)
    leaves = []

    def canon(va: int) -> int:
        bits = 57 if n == 5 else 48
        va &= (1 << bits) - 1
        return va | (((1 << 64) - 1) ^ ((1 << bits) - 1)) if va >> (bits - 1) else va

    def visit(table: int, depth: int, base: int) -> None:
        shift = shifts[depth]
        for i in range(512):
            va = canon(base + (i << shift)) if depth == 0 else base + (i << shift)
            if va + (1 << shift) <= start or va >= end:
                continue
            e = prog.read_u64(table + 8 * i, True)
            if not e & 1:
                continue
            if depth == len(shifts) - 1 or (e & 0x80 and depth >= len(shifts) - 3):
                size = 1 << shift
                mask = ADDR & ~(size - 1)
                leaves.append((va, size, e & mask, bool(e & 2)))
            else:
                visit(e & ADDR, depth + 1, va)

    visit(root, 0, 0)
    return leaves


def summarize(leaves, pmd_shift: int = 21) -> dict:
    sizes = Counter({4096: "4K", 1 << 21: "2M", 1 << 30: "1G"}[s] for _, s, _, _ in leaves)
    return {
        "leaves": {k: sizes.get(k, 0) for k in ("1G", "2M", "4K")},
        "split_pmds": len({va >> pmd_shift for va, s, _, _ in leaves if s == 4096}),
        "readonly_ptes": sum(1 for _, _, _, w in leaves if not w),
        "bytes_mapped": sum(s for _, s, _, _ in leaves),
    }


def follow(prog: drgn.Program, vaddr: int) -> int:
    return int(follow_phys(prog["init_mm"].address_of_(), vaddr))


def entry_addr(prog: drgn.Program, vaddr: int, depth: int) -> Tuple[int, int]:
    """Physical address and value of the page-table entry for ``vaddr`` at ``depth``
    (0 = top level), walking by hand."""
    n = levels(prog)
    shifts = [48, 39, 30, 21, 12][5 - n:]
    table = follow(prog, prog.symbol("init_top_pgt").address)
    for d in range(depth + 1):
        addr = table + ((vaddr >> shifts[d]) & 511) * 8
        e = prog.read_u64(addr, True)
        if d == depth:
            return addr, e
        table = e & ADDR
    raise AssertionError("unreachable")


class ElfCore:
    """Patch guest-physical memory in an ELF vmcore in place, remembering what to restore."""

    def __init__(self, path: str) -> None:
        import struct

        self.path = path
        self.loads = []
        with open(path, "rb") as f:
            ehdr = f.read(64)
            phoff, = struct.unpack_from("<Q", ehdr, 32)
            phentsize, phnum = struct.unpack_from("<HH", ehdr, 54)
            f.seek(phoff)
            for _ in range(phnum):
                p_type, _flags, off, _va, pa, filesz, _memsz, _align = struct.unpack("<IIQQQQQQ", f.read(phentsize)[:56])
                if p_type == 1:
                    self.loads.append((pa, filesz, off))
        self.saved = []

    def offset(self, phys: int) -> int:
        for pa, size, off in self.loads:
            if pa <= phys < pa + size:
                return off + phys - pa
        raise KeyError(hex(phys))

    def write_u64(self, phys: int, value: int) -> None:
        off = self.offset(phys)
        with open(self.path, "r+b") as f:
            f.seek(off)
            self.saved.append((off, f.read(8)))
            f.seek(off)
            f.write(value.to_bytes(8, "little"))

    def restore(self) -> None:
        with open(self.path, "r+b") as f:
            for off, old in reversed(self.saved):
                f.seek(off)
                f.write(old)
        self.saved.clear()
