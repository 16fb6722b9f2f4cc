"""Ground truth that does not come from inspect_vmemmap's code.

Deliberately naive x86_64 and arm64 page-table walks (tests/naivewalk.py on one drgn read
per entry: recursion, no shared code with inspect_vmemmap.pgtable), and drgn's own
sparsemem helpers.
"""

from __future__ import annotations

from collections import Counter
from typing import Dict, List, Tuple

import drgn
from drgn.helpers.linux.mm import follow_phys
from drgn.helpers.linux.mmzone import decode_section_flags, for_each_present_section, section_mem_map_addr

from tests import naivewalk as nw

START_KERNEL_MAP = 0xFFFFFFFF80000000
ADDR = nw.X86_ADDR


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


def is_arm64(prog: drgn.Program) -> bool:
    return prog.platform.arch == drgn.Architecture.AARCH64


def vmcoreinfo_number(prog: drgn.Program, key: str) -> int:
    """A ``NUMBER(x)=value`` line of the kernel's VMCOREINFO text (hex when written with
    0x, decimal otherwise)."""
    for line in prog["VMCOREINFO"].string_().decode().splitlines():
        k, _, v = line.partition("=")
        if k == key:
            return int(v, 0)
    raise KeyError(key)


def page_shift(prog: drgn.Program) -> int:
    return prog["PAGE_SHIFT"].value_()


def pfn_section_shift(prog: drgn.Program) -> int:
    """PFN_SECTION_SHIFT: 15 with 4K pages, 13 with 16K (SECTION_SIZE_BITS 27)."""
    return vmcoreinfo_number(prog, "NUMBER(SECTION_SIZE_BITS)") - page_shift(prog)


def levels(prog: drgn.Program) -> int:
    if is_arm64(prog):
        return len(arm64_geometry(prog)[3])
    return 5 if prog["__pgtable_l5_enabled"].value_() else 4


def naive_walk(prog: drgn.Program, start: int, end: int) -> List[Tuple[int, int, int, bool]]:
    """Every leaf (vaddr, size, phys, writable) in [start, end), by tests/naivewalk.py on
    drgn's physical reads."""
    def u64(phys: int) -> int:
        return prog.read_u64(phys, True)

    if is_arm64(prog):
        return nw.arm64_leaves(u64, arm64_root(prog), arm64_geometry(prog), start, end)
    return nw.x86_leaves(u64, follow(prog, prog.symbol("init_top_pgt").address), levels(prog), start, end)


def arm64_geometry(prog: drgn.Program) -> nw.Arm64Geometry:
    """(page shift, VA bits in use, LPA2, the VA shift of each level from the top)."""
    return nw.arm64_geometry(page_shift(prog), vmcoreinfo_number(prog, "NUMBER(TCR_EL1_T1SZ)"),
                             vmcoreinfo_number(prog, "NUMBER(MAX_PHYSMEM_BITS)"))


def arm64_oa(prog: drgn.Program, e: int) -> int:
    """The output address of an arm64 descriptor."""
    return nw.arm64_oa(arm64_geometry(prog), e)


def arm64_root(prog: drgn.Program) -> int:
    return follow(prog, prog.symbol("swapper_pg_dir").address)


def addr_mask(prog: drgn.Program) -> int:
    """The bits of a leaf entry that hold its output address (to replace it)."""
    return nw.arm64_addr_mask(arm64_geometry(prog)) if is_arm64(prog) else ADDR


def with_addr(prog: drgn.Program, e: int, phys: int) -> int:
    """Entry ``e`` pointing at ``phys`` instead."""
    if not is_arm64(prog):
        return (e & ~ADDR) | phys
    ps, _, lpa2, _ = arm64_geometry(prog)
    enc = phys & ((1 << (50 if lpa2 else 48)) - 1)
    if lpa2:
        enc |= (phys >> 50 & 3) << 8
    return (e & ~addr_mask(prog)) | enc


def leaf_phys(prog: drgn.Program, e: int) -> int:
    return arm64_oa(prog, e) if is_arm64(prog) else e & ADDR


def is_block(prog: drgn.Program, e: int) -> bool:
    """A present PMD-level entry that maps memory itself (x86 PSE, arm64 block)."""
    return bool(e & 1 and (not e & 2 if is_arm64(prog) else e & 0x80))


def writable_bit(prog: drgn.Program) -> Tuple[int, bool]:
    """(bit, set means writable): x86 RW (bit 1), arm64 AP[2] (bit 7, set means read-only)."""
    return (1 << 7, False) if is_arm64(prog) else (1 << 1, True)


def nodes_pgshift(prog: drgn.Program) -> int:
    """NODES_PGSHIFT: 64 - NODES_SHIFT (Debian amd64 CONFIG_NODES_SHIFT 10, arm64 4)."""
    return 60 if is_arm64(prog) else 54


def summarize(leaves, pmd_shift: int = 21) -> dict:
    labels = {4096: "4K", 1 << 14: "16K", 1 << 21: "2M", 1 << 25: "32M", 1 << 30: "1G", 1 << 36: "64G",
              1 << 39: "512G"}
    sizes = Counter(labels[s] for _, s, _, _ in leaves)
    keys = sorted(set(sizes) | {"1G", "2M", "4K"}, key=lambda k: -next(s for s, l in labels.items() if l == k))
    return {
        "leaves": {k: sizes.get(k, 0) for k in keys},
        "split_pmds": len({va >> pmd_shift for va, s, _, _ in leaves if s == 4096}),
        "readonly_ptes": sum(1 for _, _, _, w in leaves if not w),
        "bytes_mapped": sum(s for _, s, _, _ in leaves),
    }


def follow(prog: drgn.Program, vaddr: int) -> int:
    return int(follow_phys(prog["init_mm"].address_of_(), vaddr))


def entry_addr(prog: drgn.Program, vaddr: int, depth: int) -> Tuple[int, int]:
    """Physical address and value of the page-table entry for ``vaddr`` at ``depth``
    (0 = top level), walking by hand."""
    if is_arm64(prog):
        ps, va_bits, _, shifts = arm64_geometry(prog)
        table = arm64_root(prog)
        for d in range(depth + 1):
            n = (1 << (va_bits - shifts[d])) if d == 0 else 1 << (ps - 3)
            addr = table + ((vaddr >> shifts[d]) & (n - 1)) * 8
            e = prog.read_u64(addr, True)
            if d == depth:
                return addr, e
            table = arm64_oa(prog, e)
        raise AssertionError("unreachable")
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

    def write(self, phys: int, data: bytes) -> None:
        """``data`` at ``phys`` (within one PT_LOAD segment)."""
        off = self.offset(phys)
        assert self.offset(phys + len(data) - 1) == off + len(data) - 1, "across segments"
        with open(self.path, "r+b") as f:
            f.seek(off)
            self.saved.append((off, f.read(len(data))))
            f.seek(off)
            f.write(data)

    def restore(self) -> None:
        with open(self.path, "r+b") as f:
            for off, old in reversed(self.saved):
                f.seek(off)
                f.write(old)
        self.saved.clear()
