"""arm64 (AArch64 stage 1, TTBR1) translation tables: 4K, 16K and 64K granules.

Sources (Debian 6.1, 6.12 and 7.2 trees, arch/arm64):

- Geometry, include/asm/pgtable-hwdef.h: ``ARM64_HW_PGTABLE_LEVELS(va_bits) =
  (va_bits - 4) / (PAGE_SHIFT - 3)``, ``ARM64_HW_PGTABLE_LEVEL_SHIFT(n) = (PAGE_SHIFT - 3)
  * (4 - n) + 3`` and ``PTRS_PER_PGD = 1 << (VA_BITS - PGDIR_SHIFT)``: the top level holds
  only what is left of the VA bits (4K/39-bit 512 entries, 16K/48-bit 2, 64K/48-bit 64,
  4K/52-bit 16, 16K/52-bit 32, 64K/52-bit 1024).
- Descriptors, the same file: bit 0 valid (PTE_VALID), bits[1:0] 11 table (or page at
  level 3, PTE_TYPE_PAGE), 01 block (PMD_TYPE_SECT/PUD_TYPE_SECT); PTE_USER bit 6,
  PTE_RDONLY bit 7 (AP[2]), PTE_SHARED bits 8-9, PTE_AF 10, PTE_NG 11, PTE_GP 50, PTE_DBM 51,
  PTE_CONT 52, PTE_PXN 53, PTE_UXN 54, AttrIndx bits 2-4.
- Output address, include/asm/pgtable.h ``__pte_to_phys`` (used for every level through
  ``__pmd_to_phys`` ... ``__pgd_to_phys``): bits [47:PAGE_SHIFT] (6.1 ``PTE_ADDR_LOW``);
  with 52-bit PA and 64K pages PA[51:48] is in bits [15:12] (``PTE_ADDR_HIGH`` 0xf << 12,
  shift 36); with LPA2 (4K/16K, 6.12+) bits [49:PAGE_SHIFT] are direct and PA[51:50] is
  in bits [9:8] (``PTE_ADDR_HIGH`` 0x3 << 8, shift 42), which are then no longer SH bits
  (``PTE_MAYBE_SHARED`` in pgtable-prot.h is 0 when ``lpa2_is_enabled()``).
- Which levels can hold a block: the architecture's AArch64.BlockDescSupported() (as
  QEMU's target/arm/ptw.c ``lpae_block_desc_valid`` implements it): 4K levels 1 and 2,
  and level 0 with LPA2 (DS); 16K level 2, and level 1 with LPA2; 64K level 2, and level 1
  with a 52-bit PA. Level -1 (the 5th level) holds tables only, and bits[1:0] 01 at level
  3 is reserved. The kernel itself makes blocks only at level 2, and at level 1 with 4K
  pages (``pud_sect_supported()``).
- Attributes, arch/arm64/mm/ptdump.c ``pte_bits``: USR, NX (PXN), SHD, AF, NG, CON, BLK,
  UXN, GP and the memory type; ro/RW is :attr:`Leaf.writable`.
- Hierarchical permissions, the Arm ARM (D8.4.2 "Hierarchical control of data access
  permissions", D8.4.3 "... of instruction execution"): a table descriptor's APTable
  (bits 62:61, ``S1_TABLE_AP`` in pgtable-hwdef.h) takes away writes at every EL (bit 62)
  and EL0 access (bit 61) below it, PXNTable (bit 59) and UXNTable (bit 60) execution at
  EL1 and EL0. Linux never sets TCR_EL1.HPD1 (arch/arm64/mm/mmu.c: "assumes FEAT_HPDS is
  not used"), so they apply. The kernel's own tables are TYPE_TABLE | TABLE_UXN
  (pmd_populate_kernel() and __pud/__p4d/__pgd_populate() for init_mm in
  asm/pgalloc.h; 7.2 adds TABLE_AF), its vmemmap leaves PAGE_KERNEL (pgtable-prot.h
  PROT_NORMAL: PXN, UXN, AP[1] clear) or PAGE_KERNEL_RO for HVO tails. With FEAT_S1PIE
  (6.12+ enables it where the CPU has it) the leaf's permissions come from PIR_EL1 through
  ``pte_pi_index()`` (the Arm ARM then treats HPD as 1); for the kernel's PAGE_KERNEL
  and PAGE_KERNEL_RO that gives the rights the classic bits give, which is how the
  walker reads every descriptor. A table entry with APTable set is not the kernel's
  either way.
"""

from __future__ import annotations

from typing import Tuple

from inspect_vmemmap.pgtable import (BAD, DENY_EXEC, DENY_UEXEC, DENY_USER, DENY_WRITE, GRANT_EXEC, GRANT_UEXEC,
                                     GRANT_USER, GRANT_WRITE, LEAF, NONE, TABLE, PagingFormat)

__all__ = ["Arm64Paging", "ttbr1_root", "VALID_VA_BITS"]

PTE_VALID = 1 << 0
PTE_TABLE_BIT = 1 << 1  # bits[1:0] 11: table (levels < 3) or page (level 3); 01: block
PTE_USER = 1 << 6  # AP[1]
PTE_RDONLY = 1 << 7  # AP[2]
PTE_SHARED = 3 << 8  # SH[1:0]; PA[51:50] with LPA2
PTE_AF = 1 << 10
PTE_NG = 1 << 11
PTE_NT = 1 << 16  # nT in a block descriptor (FEAT_BBM)
PTE_GP = 1 << 50
PTE_DBM = 1 << 51  # the kernel's PTE_WRITE
PTE_CONT = 1 << 52
PTE_PXN = 1 << 53
PTE_UXN = 1 << 54
PTE_ATTRINDX_MASK = 7 << 2
# table descriptors (pgtable-hwdef.h *_TABLE_PXN, *_TABLE_UXN, S1_TABLE_AP)
PXNTABLE = 1 << 59
UXNTABLE = 1 << 60
APTABLE_NO_EL0 = 1 << 61  # APTable[0]
APTABLE_RO = 1 << 62  # APTable[1]

# arch/arm64/include/asm/memory.h MT_* (the same in 6.1, 6.12 and 7.2) with ptdump's names
MEMORY_TYPES = {0: "MEM/NORMAL", 1: "MEM/NORMAL-TAGGED", 2: "MEM/NORMAL-NC", 3: "DEVICE/nGnRnE", 4: "DEVICE/nGnRE"}

#: CONFIG_ARM64_VA_BITS choices per page size (arch/arm64/Kconfig), plus the run-time
#: fallbacks VA_BITS_MIN (48 for 4K/64K, 47 for 16K: asm/memory.h)
VALID_VA_BITS = {4096: (39, 48, 52), 16384: (36, 47, 48, 52), 65536: (42, 48, 52)}

_NAMES = {2: ("pgd", "pte"), 3: ("pgd", "pmd", "pte"), 4: ("pgd", "pud", "pmd", "pte"),
          5: ("pgd", "p4d", "pud", "pmd", "pte")}


def _label(size: int) -> str:
    for unit, suffix in ((1 << 40, "T"), (1 << 30, "G"), (1 << 20, "M"), (1 << 10, "K")):
        if size >= unit:
            return f"{size // unit}{suffix}"
    return f"{size}B"


def _genmask(hi: int, lo: int) -> int:
    return ((1 << (hi + 1)) - 1) & ~((1 << lo) - 1)


class Arm64Paging(PagingFormat):
    """The kernel's (TTBR1) translation tables.

    :param page_size: the granule, 4096, 16384 or 65536 (VMCOREINFO PAGESIZE).
    :param va_bits: the VA bits the tables translate at run time, ``vabits_actual`` =
        64 - NUMBER(TCR_EL1_T1SZ). A 52-bit kernel on 48-bit hardware folds its top level
        at run time (``pgtable_l5_enabled()``/``pgtable_l4_enabled()`` in asm/pgtable.h:
        the pgd page is used as the next level's table), so 48 (47 for 16K) is right for
        it; with 64K pages see :func:`ttbr1_root`. The number of levels follows from it:
        ``ARM64_HW_PGTABLE_LEVELS``.
    :param pa_bits: the physical address bits the descriptors can hold: NUMBER
        (MAX_PHYSMEM_BITS), which is PHYS_MASK_SHIFT (6.12+: 52 only when LPA2 is enabled,
        otherwise 48; 6.1: CONFIG_ARM64_PA_BITS). Addresses at or above it are reported as
        malformed entries.
    :param lpa2: whether TCR_EL1.DS is set (FEAT_LPA2, 4K/16K only): PA[51:50] in bits
        [9:8] and level 0 (4K) / level 1 (16K) blocks. Default: 4K/16K with 52-bit PA
        (the kernel enables DS exactly when it uses 52-bit VAs, arch/arm64/kernel/pi/
        map_kernel.c and mm/proc.S, and PHYS_MASK_SHIFT is 52 exactly then).
    :param levels: if given, must agree with ``va_bits`` (a check on the caller's layout).
    """

    arch = "aarch64"

    def __init__(self, page_size: int = 4096, va_bits: int = 48, pa_bits: int = 48, lpa2=None, levels=None) -> None:
        if page_size not in VALID_VA_BITS:
            raise ValueError(f"arm64 has 4K, 16K or 64K pages, not {page_size}")
        if va_bits not in VALID_VA_BITS[page_size]:
            raise ValueError(f"arm64 with {page_size // 1024}K pages has no {va_bits}-bit VA "
                             f"(one of {', '.join(map(str, VALID_VA_BITS[page_size]))})")
        if not 32 <= pa_bits <= 52:
            raise ValueError(f"arm64 physical addresses have 32 to 52 bits, not {pa_bits}")
        self.page_size = page_size
        self.page_shift = page_shift = page_size.bit_length() - 1
        self.granule = f"{page_size // 1024}K"
        if lpa2 is None:
            lpa2 = page_size != 65536 and pa_bits == 52
        if lpa2 and page_size == 65536:
            raise ValueError("LPA2 is for 4K and 16K pages; 64K pages use FEAT_LPA for 52-bit PA")
        if lpa2 and pa_bits != 52:
            raise ValueError("LPA2 means 52-bit physical addresses")
        if page_size != 65536 and not lpa2:
            if pa_bits > 48:
                raise ValueError(f"{self.granule} pages hold more than 48 PA bits only with LPA2")
            if va_bits > 48:
                raise ValueError(f"{self.granule} pages translate 52-bit VAs only with LPA2")
        self.lpa2 = bool(lpa2)
        self.va_bits = va_bits
        self.pa_bits = pa_bits
        stride = page_shift - 3
        self.levels = (va_bits - 4) // stride  # ARM64_HW_PGTABLE_LEVELS
        if levels is not None and levels != self.levels:
            raise ValueError(f"{self.granule} pages with {va_bits}-bit VA have {self.levels} levels, not {levels}")
        first = 4 - self.levels  # the hardware level of the top table (-1 with 5 levels)
        #: hardware level (-1..3) of each depth
        self.hw_levels = tuple(range(first, 4))
        self.shifts = tuple(stride * (4 - n) + 3 for n in self.hw_levels)  # ARM64_HW_PGTABLE_LEVEL_SHIFT
        self.names = _NAMES[self.levels]
        self._top_entries = 1 << (va_bits - self.shifts[0])  # PTRS_PER_PGD
        self._last = self.levels - 1
        self._blocks = tuple(self._block_ok(n) for n in self.hw_levels)
        # Output address decoding (__pte_to_phys)
        self._low_mask = _genmask(49 if self.lpa2 else 47, page_shift)
        self._lpa = page_size == 65536 and pa_bits == 52  # FEAT_LPA: PA[51:48] in bits [15:12]

    def _block_ok(self, level: int) -> bool:
        # AArch64.BlockDescSupported()
        if level == 2:
            return True
        if level == 1:
            return self.page_size == 4096 or self.lpa2 or (self.page_size == 65536 and self.pa_bits == 52)
        if level == 0:
            return self.page_size == 4096 and self.lpa2
        return False

    def table_entries(self, depth: int) -> int:
        return self._top_entries if depth == 0 else self.entries

    def canonical(self, vaddr: int) -> int:
        """A TTBR1 (kernel) address: every bit above :attr:`va_bits` is set."""
        return (vaddr & ((1 << self.va_bits) - 1)) | (((1 << 64) - 1) ^ ((1 << self.va_bits) - 1))

    def output_address(self, entry: int) -> Tuple[int, str]:
        """The output address (next table, page or block) of a valid descriptor.

        :return: ``(address, reason)``; reason is not empty when the address bits are
            malformed (bits the hardware cannot take, or above :attr:`pa_bits`).
        """
        if self.lpa2:
            addr = (entry & self._low_mask) | ((entry & PTE_SHARED) << 42)
        else:
            addr = entry & self._low_mask
            high = entry & (3 << 48)  # RES0 without LPA2; 6.12+ __pte_to_phys reads them as PA[49:48]
            if self._lpa:
                addr |= (entry & 0xF000) << 36
                # 6.12+ __phys_to_pte_val leaves PA[49:48] in bits [49:48] too (PTE_ADDR_LOW is
                # bits [49:16]); 6.1 clears them. Anything else is corrupt.
                if high and high != addr & (3 << 48):
                    return addr, f"bits 49:48 ({high >> 48:#x}) disagree with PA[49:48] from bits 13:12"
            elif high:
                return addr | high, f"bits 49:48 set ({high >> 48:#x}), which are not address bits without " + (
                    "FEAT_LPA2" if self.page_size != 65536 else "a 52-bit PA")
        if addr >> self.pa_bits:
            return addr, f"output address {addr:#x} is above the {self.pa_bits}-bit physical address space"
        return addr, ""

    def decode(self, entry: int, depth: int) -> Tuple[int, int, str]:
        if not entry & PTE_VALID:
            # Invalid: the rest is the kernel's business (swap entries, present-invalid
            # PROT_NONE); in the vmemmap it means nothing is mapped there.
            return NONE, 0, ""
        addr, reason = self.output_address(entry)
        if reason:
            return BAD, 0, reason
        level = self.hw_levels[depth]
        if depth == self._last:
            if not entry & PTE_TABLE_BIT:
                return BAD, 0, "reserved descriptor at level 3: bits[1:0] = 01 (a page needs 11)"
            return LEAF, addr, ""
        if entry & PTE_TABLE_BIT:
            return TABLE, addr, ""
        if not self._blocks[depth]:
            return BAD, 0, (f"block descriptor at level {level} ({self.names[depth]}), where the {self.granule} "
                            f"granule{' with LPA2' if self.lpa2 else ''} cannot have one")
        size = 1 << self.shifts[depth]
        if addr & (size - 1) & ~PTE_NT:
            return BAD, 0, f"address bits below the block size set in a {_label(size)} block ({addr:#x} is not aligned)"
        return LEAF, addr & ~(size - 1), ""

    def table_restrict(self, entry: int, depth: int) -> int:
        r = 0
        if entry & APTABLE_RO:
            r |= DENY_WRITE
        if entry & APTABLE_NO_EL0:
            r |= DENY_USER
        if entry & PXNTABLE:
            r |= DENY_EXEC
        if entry & UXNTABLE:
            r |= DENY_UEXEC
        return r

    def grants(self, entry: int, inherited: int = 0) -> int:
        g = 0
        if not entry & PTE_RDONLY and not inherited & DENY_WRITE:
            g |= GRANT_WRITE
        if entry & PTE_USER and not inherited & DENY_USER:
            g |= GRANT_USER
        # a location writable at EL0 is never executable at EL1 (the Arm ARM's
        # "privileged execute-never for EL0-writable memory")
        if not entry & PTE_PXN and not inherited & DENY_EXEC and not (g & GRANT_USER and g & GRANT_WRITE):
            g |= GRANT_EXEC
        if not entry & PTE_UXN and not inherited & DENY_UEXEC:
            g |= GRANT_UEXEC
        return g

    def write_bit(self) -> str:
        return "APTable[1] set"

    def suspect(self, entry: int) -> bool:
        return bool(entry & PTE_USER) or entry & (PTE_PXN | PTE_UXN) != PTE_PXN | PTE_UXN

    def leaf_writable(self, entry: int, depth: int) -> bool:
        return not entry & PTE_RDONLY

    def leaf_info(self, entry: int, depth: int, inherited: int = 0) -> Tuple[bool, Tuple[str, ...]]:
        """``writable`` is AP[2] (PTE_RDONLY) clear: PAGE_KERNEL has it clear, PAGE_KERNEL_RO
        set. attrs in ptdump's order (USR, NX for PXN, SHD, AF, NG, CON, BLK, UXN, GP,
        memory type), plus DBM when a read-only entry has the DBM bit (hardware dirty
        management makes it writable on the first write: writable-clean)."""
        attrs = []
        if entry & PTE_USER and not inherited & DENY_USER:
            attrs.append("USR")
        if entry & PTE_PXN or inherited & DENY_EXEC:
            attrs.append("NX")
        if not self.lpa2 and entry & PTE_SHARED == PTE_SHARED:
            attrs.append("SHD")
        if entry & PTE_AF:
            attrs.append("AF")
        if entry & PTE_NG:
            attrs.append("NG")
        if entry & PTE_CONT:
            attrs.append("CON")
        if depth != self._last:
            attrs.append("BLK")
        if entry & PTE_UXN or inherited & DENY_UEXEC:
            attrs.append("UXN")
        if entry & PTE_GP:
            attrs.append("GP")
        mt = MEMORY_TYPES.get((entry & PTE_ATTRINDX_MASK) >> 2)
        if mt:
            attrs.append(mt)
        readonly = bool(entry & PTE_RDONLY)
        if readonly and entry & PTE_DBM:
            attrs.append("DBM")
        return not readonly and not inherited & DENY_WRITE, tuple(attrs)

    def can_be_leaf(self, depth: int) -> bool:
        return depth == self._last or self._blocks[depth]

    def pmd_blocks(self, layout) -> bool:
        # arch/arm64/mm/mmu.c vmemmap_populate(): PMD blocks for whole sections only with
        # 4K pages (6.1: ARM64_KERNEL_USES_PMD_MAPS, asm/kernel-pgtable.h; 6.12/7.2:
        # IS_ENABLED(CONFIG_ARM64_4K_PAGES)); 16K/64K always use base pages.
        return self.page_size == 4096

    def describe(self) -> str:
        return (f"{self.granule} pages, {self.va_bits}-bit VA, {self.levels} levels, {self.pa_bits}-bit PA"
                f"{' (LPA2)' if self.lpa2 else ''}")


def ttbr1_root(swapper_pg_dir_phys: int, page_size: int, kernel_va_bits: int, va_bits: int) -> int:
    """The physical address of the top-level table that :class:`Arm64Paging` with
    ``va_bits`` walks, from the physical address of ``swapper_pg_dir``.

    A 64K-page kernel built for 52-bit VAs (CONFIG_ARM64_VA_BITS_52 without LPA2) that runs
    with 48-bit VAs points TTBR1 ``TTBR1_BADDR_4852_OFFSET`` bytes into swapper_pg_dir
    (asm/assembler.h ``offset_ttbr1``; asm/pgtable-hwdef.h: ``(PTRS_PER_PGD_52_VA -
    PTRS_PER_PGD_48_VA) << 3``): the last 64 of its 1024 entries are the 48-bit top level.
    With LPA2 (4K/16K) the top level is folded instead and the root stays swapper_pg_dir.
    """
    if page_size == 65536 and kernel_va_bits == 52 and va_bits < 52:
        pgdir_shift = 42  # ARM64_HW_PGTABLE_LEVEL_SHIFT(1) with 64K pages
        return swapper_pg_dir_phys + (((1 << (52 - pgdir_shift)) - (1 << (va_bits - pgdir_shift))) << 3)
    return swapper_pg_dir_phys
