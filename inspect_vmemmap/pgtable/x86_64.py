"""x86_64 page tables: 4-level (48-bit VA) and 5-level (LA57, 57-bit VA).

Entry bits from arch/x86/include/asm/pgtable_types.h. Leaves are possible at the PUD
(1G, with PSE), PMD (2M, with PSE) and PTE (4K) levels; PSE at the PGD or P4D level is
reserved and faults in hardware.

Effective permissions (Intel SDM vol. 3, 4.6 "Access rights"; AMD APM vol. 2, 5.6): a
write is allowed only if R/W is set at every level, a user-mode access only if U/S is
set at every level, and an instruction fetch is refused if NX is set at any level. The
kernel's own table entries are ``_PAGE_TABLE`` (present, RW, USER, accessed, dirty:
pmd/pud/p4d/pgd_populate() in arch/x86/include/asm/pgalloc.h, which the generic vmemmap
code in mm/sparse-vmemmap.c calls) or ``_KERNPG_TABLE`` (the same without USER), so a
kernel mapping's U/S and NX are decided by its leaf (PAGE_KERNEL: no USER, NX when the
CPU has it, ``__supported_pte_mask``), and a table entry without RW is never the kernel's.
"""

from __future__ import annotations

from typing import Tuple

from inspect_vmemmap.pgtable import (BAD, DENY_EXEC, DENY_USER, DENY_WRITE, GRANT_EXEC, GRANT_UEXEC, GRANT_USER,
                                     GRANT_WRITE, LEAF, NONE, TABLE, PagingFormat)

_PAGE_PRESENT = 1 << 0
_PAGE_RW = 1 << 1
_PAGE_USER = 1 << 2
_PAGE_PSE = 1 << 7
_PAGE_GLOBAL = 1 << 8
_PAGE_NX = 1 << 63
_INFO_BITS = _PAGE_RW | _PAGE_USER | _PAGE_GLOBAL | _PAGE_NX  # the bits leaf_info reads
# PTE_PFN_MASK with __PHYSICAL_MASK_SHIFT = 52 (arch/x86/include/asm/page_types.h)
_PFN_MASK = ((1 << 52) - 1) & ~0xFFF


class X86_64Paging(PagingFormat):
    """x86_64 paging with ``levels`` 4 or 5.

    :param max_phys_bits: MAX_PHYSMEM_BITS (46 with 4 levels, 52 with 5); address bits
        at or above it in an entry are reported as reserved.
    :param sme_mask: the AMD SME/SEV C-bit (vmcoreinfo NUMBER(sme_mask)), stripped from
        addresses.
    """

    arch = "x86_64"
    page_shift = 12

    def __init__(self, levels: int = 4, max_phys_bits: int = 0, sme_mask: int = 0) -> None:
        if levels not in (4, 5):
            raise ValueError(f"x86_64 has 4 or 5 paging levels, not {levels}")
        self.levels = levels
        if levels == 5:
            self.shifts = (48, 39, 30, 21, 12)
            self.names = ("pgd", "p4d", "pud", "pmd", "pte")
            self.va_bits = 57
        else:
            self.shifts = (39, 30, 21, 12)
            self.names = ("pgd", "pud", "pmd", "pte")
            self.va_bits = 48
        self.max_phys_bits = max_phys_bits or (52 if levels == 5 else 46)
        self.sme_mask = sme_mask
        self.addr_mask = _PFN_MASK & ~sme_mask
        # Address bits the CPU/kernel can never use: from MAX_PHYSMEM_BITS up to bit 51.
        self.reserved_mask = (_PFN_MASK & ~((1 << self.max_phys_bits) - 1)) & ~sme_mask
        self._pud_depth = self.levels - 3
        self._pmd_depth = self.levels - 2
        self._pte_depth = self.levels - 1
        self._leaf_infos: dict = {}

    def decode(self, entry: int, depth: int) -> Tuple[int, int, str]:
        if not entry & _PAGE_PRESENT:
            # Not present: the rest of the bits are the kernel's business (swap, PROT_NONE);
            # in the vmemmap a non-present non-zero entry means nothing is mapped there.
            return NONE, 0, ""
        if entry & self.reserved_mask:
            return BAD, 0, f"reserved address bits set (above MAX_PHYSMEM_BITS {self.max_phys_bits})"
        if depth == self._pte_depth:
            return LEAF, entry & self.addr_mask, ""
        if entry & _PAGE_PSE:
            if depth == self._pmd_depth:
                # bits 13-20 are reserved in a 2M leaf (bit 12 is PAT)
                if entry & 0x1FE000:
                    return BAD, 0, "reserved bits 13-20 set in a 2M leaf"
                return LEAF, entry & self.addr_mask & ~0x1FFFFF, ""
            if depth == self._pud_depth:
                if entry & 0x3FFFE000:
                    return BAD, 0, "reserved bits 13-29 set in a 1G leaf"
                return LEAF, entry & self.addr_mask & ~0x3FFFFFFF, ""
            return BAD, 0, f"huge (PSE) bit set at the {self.names[depth]} level, where no leaf can be"
        return TABLE, entry & self.addr_mask, ""

    #: without NX (EFER.NXE clear, or noexec=off) no kernel mapping has the bit
    exec_protection_optional = True

    def leaf_info(self, entry: int, depth: int, inherited: int = 0) -> Tuple[bool, Tuple[str, ...]]:
        # a function of four bits, the level and what the tables above take away: each
        # combination worked out once (a 1 TiB vmemmap split by HVO has 40000 leaves)
        key = (entry & _INFO_BITS, depth, inherited)
        got = self._leaf_infos.get(key)
        if got is None:
            got = self._leaf_infos[key] = self._leaf_info(entry, depth, inherited)
        return got

    def _leaf_info(self, entry: int, depth: int, inherited: int) -> Tuple[bool, Tuple[str, ...]]:
        attrs = []
        if entry & _PAGE_USER and not inherited & DENY_USER:
            attrs.append("USR")
        if depth != self._pte_depth:
            attrs.append("PSE")
        if entry & _PAGE_GLOBAL:
            attrs.append("GLB")
        if entry & _PAGE_NX or inherited & DENY_EXEC:
            attrs.append("NX")
        return bool(entry & _PAGE_RW) and not inherited & DENY_WRITE, tuple(attrs)

    def leaf_writable(self, entry: int, depth: int) -> bool:
        return bool(entry & _PAGE_RW)

    def table_restrict(self, entry: int, depth: int) -> int:
        r = 0
        if not entry & _PAGE_RW:
            r |= DENY_WRITE
        if not entry & _PAGE_USER:
            r |= DENY_USER
        if entry & _PAGE_NX:
            r |= DENY_EXEC
        return r

    def grants(self, entry: int, inherited: int = 0) -> int:
        g = 0
        if entry & _PAGE_RW and not inherited & DENY_WRITE:
            g |= GRANT_WRITE
        user = entry & _PAGE_USER and not inherited & DENY_USER
        if user:
            g |= GRANT_USER
        if not entry & _PAGE_NX and not inherited & DENY_EXEC:
            g |= GRANT_EXEC | (GRANT_UEXEC if user else 0)
        return g

    def write_bit(self) -> str:
        return "R/W clear"

    def suspect(self, entry: int) -> bool:
        """Whether a leaf's own bits may grant what PAGE_KERNEL does not (USER, no NX)."""
        return bool(entry & _PAGE_USER) or not entry & _PAGE_NX

    def can_be_leaf(self, depth: int) -> bool:
        return depth >= self._pud_depth

    def pmd_blocks(self, layout) -> bool:
        # arch/x86/mm/init_64.c vmemmap_populate(): PMD blocks for whole sections when
        # the CPU has PSE (every x86_64 CPU does).
        return True
