"""arm64: 4K, 16K and 64K pages, 39- to 52-bit VAs (LPA2), the vmemmap region of
VMCOREINFO, PMD-block vmemmap with 4K pages only, no HVO.

Sources: Debian's 6.1, 6.12 and 7.2 trees, arch/arm64.
"""

from __future__ import annotations

from typing import Dict, Optional, Tuple

from inspect_vmemmap.arch import Arch, KernelLookup, register
from inspect_vmemmap.errors import AnalysisError
from inspect_vmemmap.pgtable.arm64 import VALID_VA_BITS, Arm64Paging, ttbr1_root

#: _PAGE_END(48) (arch/arm64/include/asm/memory.h): the end of a 48-bit linear map, and
#: MODULES_VADDR where VMCOREINFO does not give it
PAGE_END_48 = 0xFFFF800000000000


class Arm64(Arch):
    name = "aarch64"
    drgn_name = "AARCH64"
    elf_machine = 183  # EM_AARCH64
    # arch/arm64/Kconfig selects neither ARCH_WANT_OPTIMIZE_HUGETLB_VMEMMAP (6.1:
    # ARCH_WANT_HUGETLB_PAGE_OPTIMIZE_VMEMMAP) nor ARCH_WANT_OPTIMIZE_DAX_VMEMMAP in 6.1,
    # 6.12 or 7.2, and Debian's arm64 and arm64-16k configs have no
    # CONFIG_HUGETLB_PAGE_OPTIMIZE_VMEMMAP: ``hugetlb_free_vmemmap=on`` is an unknown
    # parameter there and every HugeTLB folio keeps its whole vmemmap
    hugetlb_vmemmap_optimize = False
    dax_vmemmap_optimize = False
    boot_ram_note = "boot RAM: no firmware RAM table read on arm64; all RAM treated as boot memory"
    # arch/arm64/kernel/setup.c request_standard_resources(): every memblock.memory region
    # is a top-level resource, "System RAM", or "reserved" with IORESOURCE_MEM alone where
    # it is nomap (UEFI's runtime regions and, on QEMU's virt, the variable flash at 64M)
    nomap_resource = "reserved"
    root_source = "SYMBOL(swapper_pg_dir) and NUMBER(kimage_voffset)"
    page_sizes = (4096, 16384, 65536)
    # PHYS_MASK_SHIFT 48 or 52 (asm/sparsemem.h MAX_PHYSMEM_BITS), and 6.1's
    # CONFIG_ARM64_PA_BITS choices down to 44 (older configs)
    physmem_bits = (44, 48, 52)
    pgtable_levels = (2, 3, 4, 5)

    def layout_problem(self, layout):
        va_sizes = (0, 36, 39, 42, 47, 48, 52)
        if layout.va_bits not in va_sizes:
            return "VA bits (64 - NUMBER(TCR_EL1_T1SZ))", layout.va_bits, "not an arm64 VA size (36, 39, 42, 47, 48 or 52)"
        if layout.kernel_va_bits not in va_sizes:
            return "NUMBER(VA_BITS)", layout.kernel_va_bits, "not an arm64 VA size (36, 39, 42, 47, 48 or 52)"
        return None

    def layout_fields(self, info, page_size: int, kernel: KernelLookup, mem, notes: Dict[str, str]) -> dict:
        """arm64's paging and vmemmap region from its VMCOREINFO (arch/arm64/kernel/
        vmcore_info.c, crash_core.c before 6.5; the same entries in 6.1, 6.12 and 7.2).

        - VA bits at run time: ``vabits_actual`` = 64 - NUMBER(TCR_EL1_T1SZ); a 52-bit kernel
          (NUMBER(VA_BITS), the compile-time value) runs with 48 (47 with 16K pages) on a CPU
          without LPA2/LVA, folding its top level (asm/pgtable.h pgtable_l5_enabled() ...).
        - PA bits: NUMBER(MAX_PHYSMEM_BITS) = PHYS_MASK_SHIFT, 52 with 4K/16K pages only when
          TCR_EL1.DS (LPA2) is set (6.12+ asm/pgtable-prot.h ``lpa2_is_enabled() ? 52 : 48``).
        - The root: TTBR1 points at swapper_pg_dir (a kernel image address, so its physical
          address is SYMBOL(swapper_pg_dir) - kimage_voffset, asm/memory.h __kimg_to_phys),
          plus TTBR1_BADDR_4852_OFFSET for 64K pages with a 52-bit VA on 48-bit hardware.
        - The vmemmap region: VMEMMAP_START..VMEMMAP_END, except that with 52-bit VA on 48-bit
          hardware the struct pages of the unused bottom of the linear map
          (VMEMMAP_UNUSED_NPAGES, asm/pgtable.h 6.12+) are vmalloc space: the region starts
          at VMEMMAP_START + ((_PAGE_OFFSET(vabits_actual) - PAGE_OFFSET) >> PAGE_SHIFT) *
          sizeof(struct page).
        """
        page_shift = page_size.bit_length() - 1
        kernel_va = info.number("VA_BITS")
        t1sz = info.number("TCR_EL1_T1SZ")
        if kernel_va is None:
            raise AnalysisError("VMCOREINFO lacks NUMBER(VA_BITS); is this an arm64 kernel?")
        if t1sz is not None:
            va_bits = 64 - t1sz
            notes["va_bits"] = f"64 - NUMBER(TCR_EL1_T1SZ) = {va_bits} (compile-time VA_BITS {kernel_va})"
        else:
            va_bits = kernel_va
            notes["va_bits"] = f"NUMBER(VA_BITS) = {kernel_va} (no NUMBER(TCR_EL1_T1SZ): a pre-5.9 kernel)"
        if va_bits not in VALID_VA_BITS.get(page_size, ()):
            raise AnalysisError(f"arm64 with {page_size // 1024}K pages and a {va_bits}-bit VA: not a valid configuration")
        pa_bits = info.number("MAX_PHYSMEM_BITS") or 48
        lpa2 = page_size != 65536 and pa_bits == 52
        try:
            fmt = Arm64Paging(page_size, va_bits, pa_bits, lpa2)
        except ValueError as e:
            raise AnalysisError(f"arm64 paging from VMCOREINFO: {e}") from None
        u64 = (1 << 64) - 1
        phys_offset = (info.number("PHYS_OFFSET") or 0) & u64
        voff = info.number("kimage_voffset")
        pgdir = info.symbol("swapper_pg_dir")
        root = None
        if voff is not None and pgdir is not None:
            root = ttbr1_root((pgdir - voff) & u64, page_size, kernel_va, va_bits)
        start = info.number("VMEMMAP_START")
        end = info.number("VMEMMAP_END")
        sps = info.size("page") or 64
        region_start = region_end = 0
        if start is not None and end is not None:
            # _PAGE_OFFSET(va) = -(1 << va); the linear map below _PAGE_OFFSET(vabits_actual)
            # has no memory, so neither have its struct pages
            unused = ((1 << kernel_va) - (1 << va_bits)) >> page_shift if va_bits < kernel_va else 0
            region_start, region_end = start + unused * sps, end
            if unused:
                notes["vmemmap_region"] = (f"VMEMMAP_START {start:#x} + {unused:#x} unused pages' struct pages "
                                           f"(a {kernel_va}-bit kernel on {va_bits}-bit hardware lends them to vmalloc)")
        return {
            "pgtable_levels": fmt.levels, "max_physmem_bits": pa_bits, "pgtable_root": root, "va_bits": va_bits,
            "kernel_va_bits": kernel_va, "lpa2": lpa2, "phys_offset": phys_offset, "kimage_voffset": (voff or 0) & u64,
            "vmemmap_region_start": region_start, "vmemmap_region_end": region_end,
        }

    def vmemmap_base(self, info, kernel: KernelLookup, mem, fields: dict) -> Tuple[Optional[int], str]:
        """asm/pgtable.h: vmemmap = (struct page *)VMEMMAP_START - (memstart_addr >>
        PAGE_SHIFT), memstart_addr an s64 (NUMBER(PHYS_OFFSET)); 6.12+ also give it as
        SYMBOL(vmemmap), which wins."""
        start, phys_offset = info.number("VMEMMAP_START"), info.number("PHYS_OFFSET")
        if start is None or phys_offset is None:
            return None, ""
        u64 = (1 << 64) - 1
        phys_offset &= u64
        memstart = phys_offset - (1 << 64 if phys_offset >> 63 else 0)
        page_shift = (int(info.get("PAGESIZE") or 4096)).bit_length() - 1
        vmemmap = (start - (memstart >> page_shift) * (info.size("page") or 64)) & u64
        return vmemmap, "VMEMMAP_START - (PHYS_OFFSET >> PAGE_SHIFT) * sizeof(struct page) (VMCOREINFO)"

    def mem_section_is_root_array(self, info, address: int) -> bool:
        # the linear map lies below MODULES_VADDR, the kernel image above (asm/memory.h)
        return address < (info.number("MODULES_VADDR") or PAGE_END_48)

    def paging(self, layout):
        # the VA bits the tables translate at run time, the PA bits the descriptors hold
        return Arm64Paging(layout.page_size, layout.va_bits, layout.max_physmem_bits, layout.lpa2,
                           layout.pgtable_levels)

    def vmemmap_block(self, layout, whole_section: bool) -> int:
        """Rule: vmemmap_populate() (arch/arm64/mm/mmu.c) maps whole-section ranges with
        PMD blocks with 4K pages only: 6.1 its own PMD loop when
        ARM64_KERNEL_USES_PMD_MAPS (asm/kernel-pgtable.h: 4K pages), 6.12 and 7.2
        vmemmap_populate_hugepages() when IS_ENABLED(CONFIG_ARM64_4K_PAGES) and the range
        is a whole section's memmap; 16K and 64K pages always get
        vmemmap_populate_basepages(), PAGE_SIZE PTEs without the contiguous bit (its
        linear-map code notes "CONT blocks are not supported in the vmemmap")."""
        if layout.page_size == 4096 and whole_section:
            return 1 << (2 * layout.page_shift - 3)
        return layout.page_size

    def altmap_block(self, layout, whole_section: bool) -> Optional[int]:
        """Rule: vmemmap_populate() (arch/arm64/mm/mmu.c): with 4K pages a whole
        section's memmap by PMD blocks from the altmap, as on x86_64; otherwise base
        pages, each from the altmap (6.12 and 7.2; 6.1 falls back to base pages when a
        PMD cannot come from it, which the model does not follow)."""
        return self.vmemmap_block(layout, whole_section)


register(Arm64())
