"""riscv64 page tables: Sv39, Sv48 and Sv57 (4K pages, 3, 4 or 5 levels).

Sources (Debian 6.12 tree, arch/riscv, and the RISC-V privileged architecture's "Sv39"
virtual-memory system with its Sv48/Sv57 extensions, Svnapot and Svpbmt):

- Geometry, include/asm/pgtable-64.h: ``PGDIR_SHIFT`` is 48 (Sv57, ``pgtable_l5_enabled``),
  39 (Sv48, ``pgtable_l4_enabled``) or 30 (Sv39); P4D_SHIFT 39, PUD_SHIFT 30, PMD_SHIFT 21;
  every table has 512 entries (``PTRS_PER_*`` = PAGE_SIZE / 8). The kernel folds the p4d
  into the pgd with Sv48 and p4d and pud with Sv39, so the top table is the "pgd" in
  every mode (the kernel's names are used: Sv39 pgd, pmd, pte).
- Entry bits, include/asm/pgtable-bits.h and the rv64 PTE format in pgtable-64.h:
  ``| 63 N | 62-61 MT (Svpbmt PBMT) | 60-54 reserved | 53-10 PPN | 9-8 RSW | D A G U X W R V |``.
  ``_PAGE_PFN_MASK`` is GENMASK(53, 10) and ``__page_val_to_pfn`` shifts it down by
  ``_PAGE_PFN_SHIFT`` 10, so a physical address has 56 bits (asm/sparsemem.h
  MAX_PHYSMEM_BITS 56).
- What is a leaf: "when all of R/W/X are zero, the PTE is a pointer to the next level of
  the page table; otherwise, it is a leaf PTE" (``_PAGE_LEAF``; ``pmd_leaf``, ``pud_leaf``
  in asm/pgtable.h and pgtable-64.h). The architecture allows a leaf at every level
  (4K, 2M, 1G, 512G, 256T); a pointer at the last level is a page fault.
- What the hardware refuses (page fault: the privileged spec's address-translation step
  2 and 6): V clear; W without R; bits 60-54 set; PBMT 3 (reserved); in a pointer, any of
  D, A, U, N or PBMT (reserved in non-leaf PTEs); a superpage whose low PPN bits are not
  zero (misaligned); N set anywhere but in a last-level leaf, or with a PPN that does not
  end in binary 1000 (Svnapot defines only the 64K size, pgtable-64.h
  ``NAPOT_CONT64KB_ORDER`` 4).
- Svnapot: the 16 PTEs of a 64K range all hold the same entry, whose PPN has bit 3 set
  and bits 2-0 clear (``pte_mknapot``); ``pte_pfn`` clears that lowest set bit to get the
  range's first pfn. A complete, consistent group is one leaf of 64K here.
- Svpbmt (bits 62-61): 0 PMA, 1 NC (``_PAGE_NOCACHE_SVPBMT``), 2 IO (``_PAGE_IO_SVPBMT``).
  T-Head's C9xx cores use bits 63-59 for their own memory types instead
  (``_PAGE_MTMASK_THEAD``); with ``thead=True`` those bits are attributes, not reserved.
- Attributes as arch/riscv/mm/ptdump.c ``pte_bits`` names them: D A G U X (W and R are
  :attr:`Leaf.writable` and readability), plus NAPOT and the memory type (NC, IO).
"""

from __future__ import annotations

from typing import Tuple

from inspect_vmemmap.pgtable import BAD, GRANT_EXEC, GRANT_UEXEC, GRANT_USER, GRANT_WRITE, LEAF, NONE, TABLE, PagingFormat

__all__ = ["RiscvPaging", "MODES", "SATP_MODES"]

_PAGE_PRESENT = 1 << 0
_PAGE_READ = 1 << 1
_PAGE_WRITE = 1 << 2
_PAGE_EXEC = 1 << 3
_PAGE_USER = 1 << 4
_PAGE_GLOBAL = 1 << 5
_PAGE_ACCESSED = 1 << 6
_PAGE_DIRTY = 1 << 7
_PAGE_LEAF = _PAGE_READ | _PAGE_WRITE | _PAGE_EXEC
_PAGE_PFN_SHIFT = 10
_PAGE_PFN_MASK = ((1 << 54) - 1) & ~((1 << 10) - 1)  # GENMASK(53, 10)
_PAGE_NAPOT = 1 << 63
_PBMT_SHIFT = 61
_PBMT_MASK = 3 << _PBMT_SHIFT
_RESERVED = ((1 << 61) - 1) & ~((1 << 54) - 1)  # bits 60-54
_THEAD_MTMASK = ((1 << 64) - 1) & ~((1 << 59) - 1)  # bits 63-59
#: NAPOT_CONT64KB_ORDER: 16 PTEs, the PPN ending in binary 1000
NAPOT_ORDER = 4

#: paging mode -> levels
MODES = {"sv39": 3, "sv48": 4, "sv57": 5}
#: satp.MODE values (asm/csr.h SATP_MODE_39/48/57 >> 60)
SATP_MODES = {8: "sv39", 9: "sv48", 10: "sv57"}

_SHIFTS = {3: (30, 21, 12), 4: (39, 30, 21, 12), 5: (48, 39, 30, 21, 12)}
_NAMES = {3: ("pgd", "pmd", "pte"), 4: ("pgd", "pud", "pmd", "pte"), 5: ("pgd", "p4d", "pud", "pmd", "pte")}
_PBMT_NAMES = {1: "NC", 2: "IO"}


def _label(size: int) -> str:
    for unit, suffix in ((1 << 40, "T"), (1 << 30, "G"), (1 << 20, "M"), (1 << 10, "K")):
        if size >= unit:
            return f"{size // unit}{suffix}"
    return f"{size}B"


class RiscvPaging(PagingFormat):
    """The kernel's (swapper_pg_dir) page tables in Sv39, Sv48 or Sv57.

    :param levels: 3 (Sv39), 4 (Sv48) or 5 (Sv57).
    :param pa_bits: physical address bits an entry may point at (MAX_PHYSMEM_BITS, 56);
        addresses at or above are reported as malformed entries.
    :param thead: T-Head memory-type bits 63-59 (ERRATA_THEAD_MAE) instead of Svnapot and
        Svpbmt.
    """

    arch = "riscv64"
    page_shift = 12

    def __init__(self, levels: int = 5, pa_bits: int = 56, thead: bool = False) -> None:
        if levels not in _SHIFTS:
            raise ValueError(f"riscv64 has 3 (Sv39), 4 (Sv48) or 5 (Sv57) paging levels, not {levels}")
        if not 32 <= pa_bits <= 56:
            raise ValueError(f"riscv64 physical addresses have 32 to 56 bits, not {pa_bits}")
        self.levels = levels
        self.mode = f"sv{(39, 48, 57)[levels - 3]}"
        self.shifts = _SHIFTS[levels]
        self.names = _NAMES[levels]
        self.va_bits = self.shifts[0] + 9
        self.pa_bits = pa_bits
        self.thead = thead
        self._last = levels - 1
        self._reserved = _RESERVED & ~_THEAD_MTMASK if thead else _RESERVED

    def decode(self, entry: int, depth: int) -> Tuple[int, int, str]:
        if not entry & _PAGE_PRESENT:
            # Invalid: the rest is the kernel's (swap entries, PROT_NONE with G set); in the
            # vmemmap it means nothing is mapped there.
            return NONE, 0, ""
        if entry & self._reserved:
            return BAD, 0, f"reserved bits 60-54 set ({(entry & _RESERVED) >> 54:#x})"
        ppn = (entry & _PAGE_PFN_MASK) >> _PAGE_PFN_SHIFT
        phys = ppn << 12
        if phys >> self.pa_bits:
            return BAD, 0, f"address {phys:#x} is above the {self.pa_bits}-bit physical address space"
        pbmt = 0 if self.thead else (entry & _PBMT_MASK) >> _PBMT_SHIFT
        napot = not self.thead and entry & _PAGE_NAPOT
        if not entry & _PAGE_LEAF:
            # a pointer to the next level: D, A, U, N and PBMT are reserved in it
            bad = [n for bit, n in ((_PAGE_DIRTY, "D"), (_PAGE_ACCESSED, "A"), (_PAGE_USER, "U")) if entry & bit]
            if napot:
                bad.append("N")
            if pbmt:
                bad.append("PBMT")
            if self.thead and entry & _THEAD_MTMASK:
                bad.append("memory type")
            if bad:
                return BAD, 0, f"{'/'.join(bad)} set in a pointer to the next level (reserved in non-leaf entries)"
            return TABLE, phys, ""
        if entry & (_PAGE_READ | _PAGE_WRITE) == _PAGE_WRITE:
            return BAD, 0, "writable but not readable (W without R is reserved)"
        if pbmt == 3:
            return BAD, 0, "memory type (PBMT) 3 is reserved"
        size = 1 << self.shifts[depth]
        if depth != self._last:
            if napot:
                return BAD, 0, f"NAPOT bit set in a {_label(size)} leaf (Svnapot is for last-level entries only)"
            if phys & (size - 1):
                return BAD, 0, f"misaligned {_label(size)} superpage: address {phys:#x} has low bits set"
            return LEAF, phys, ""
        if napot:
            if ppn & ((1 << NAPOT_ORDER) - 1) != 1 << (NAPOT_ORDER - 1):
                return BAD, 0, (f"NAPOT entry whose PPN ends in {ppn & 0xF:04b}, not 1000 "
                                "(Svnapot defines only 64K ranges)")
            return LEAF, phys & ~((1 << (12 + NAPOT_ORDER)) - 1), ""
        return LEAF, phys, ""

    def contiguous_span(self, entry: int, depth: int) -> int:
        """How many consecutive entries of one table make up the leaf ``entry`` (a valid
        leaf per :meth:`decode`): 16 for a NAPOT PTE, 1 otherwise."""
        if depth == self._last and not self.thead and entry & _PAGE_NAPOT:
            return 1 << NAPOT_ORDER
        return 1

    def grants(self, entry: int, inherited: int = 0) -> int:
        """What a leaf grants beyond read: W writes; U user access, and with X user
        execution (S-mode never executes a U page, riscv-privileged "Memory Privilege");
        X without U kernel execution. Non-leaf PTEs carry no permissions (D, A, U are
        reserved there), so nothing is inherited."""
        g = GRANT_WRITE if entry & _PAGE_WRITE else 0
        if entry & _PAGE_USER:
            g |= GRANT_USER | (GRANT_UEXEC if entry & _PAGE_EXEC else 0)
        elif entry & _PAGE_EXEC:
            g |= GRANT_EXEC
        return g

    def suspect(self, entry: int) -> bool:
        return bool(entry & (_PAGE_USER | _PAGE_EXEC))

    def leaf_info(self, entry: int, depth: int, inherited: int = 0) -> Tuple[bool, Tuple[str, ...]]:
        """``writable`` is W; attrs in ptdump's order (D A G U X; R is implied), then
        NAPOT, the Svpbmt memory type (NC, IO) or T-Head's memory-type bits (MT=...)."""
        attrs = []
        for bit, name in ((_PAGE_DIRTY, "D"), (_PAGE_ACCESSED, "A"), (_PAGE_GLOBAL, "G"),
                          (_PAGE_USER, "U"), (_PAGE_EXEC, "X")):
            if entry & bit:
                attrs.append(name)
        if self.thead:
            if entry & _THEAD_MTMASK:
                attrs.append(f"MT={entry >> 59:#x}")
        else:
            if entry & _PAGE_NAPOT and depth == self._last:
                attrs.append("NAPOT")
            mt = _PBMT_NAMES.get((entry & _PBMT_MASK) >> _PBMT_SHIFT)
            if mt:
                attrs.append(mt)
        return bool(entry & _PAGE_WRITE), tuple(attrs)

    def can_be_leaf(self, depth: int) -> bool:
        # The kernel makes leaves at the PTE, PMD and PUD levels (pmd_leaf, pud_leaf;
        # the vmemmap itself has PMD blocks and PTEs: mm/init.c vmemmap_populate ->
        # vmemmap_populate_hugepages). :meth:`decode` still takes a 512G or 256T leaf,
        # which the architecture allows, as a leaf.
        return self.shifts[depth] <= 30

    def pmd_blocks(self, layout) -> bool:
        # arch/riscv/mm/init.c vmemmap_populate(): vmemmap_populate_hugepages() always
        # (PMD blocks for whole sections, base pages where a block cannot be allocated).
        return True

    def describe(self) -> str:
        return f"{self.mode.capitalize()}, {self.levels} levels, {self.pa_bits}-bit PA"
