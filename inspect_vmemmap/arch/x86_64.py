"""x86_64: 4- or 5-level paging (LA57), KASLR's vmemmap_base, PMD-block vmemmap.

Sources: Debian's 6.1, 6.12 and 7.2 trees, arch/x86.
"""

from __future__ import annotations

import struct
from typing import Dict, Optional, Tuple

from inspect_vmemmap.arch import Arch, KernelLookup, register
from inspect_vmemmap.memory import FaultError

#: __START_KERNEL_map (arch/x86/include/asm/page_64_types.h): the kernel image's mapping
START_KERNEL_MAP = 0xFFFFFFFF80000000


class X86_64(Arch):
    name = "x86_64"
    drgn_name = "X86_64"
    elf_machine = 62  # EM_X86_64
    # arch/x86/Kconfig selects ARCH_WANT_OPTIMIZE_HUGETLB_VMEMMAP for X86_64 (6.1:
    # ARCH_WANT_HUGETLB_PAGE_OPTIMIZE_VMEMMAP) and, in 6.12 and 7.2,
    # ARCH_WANT_OPTIMIZE_DAX_VMEMMAP (upstream "mm/vmemmap/devdax: fix kernel crash when
    # probing devdax devices")
    hugetlb_vmemmap_optimize = True
    dax_vmemmap_optimize = True
    boot_ram_note = "boot RAM: no e820 table; all RAM treated as boot memory"
    root_source = "SYMBOL(init_top_pgt) and NUMBER(phys_base)"
    page_sizes = (4096,)
    # MAX_PHYSMEM_BITS 46 (4-level) or 52 (5-level, arch/x86/include/asm/sparsemem.h)
    physmem_bits = (46, 52)
    pgtable_levels = (4, 5)

    def layout_fields(self, info, page_size: int, kernel: KernelLookup, mem, notes: Dict[str, str]) -> dict:
        """Paging mode: NUMBER(pgtable_l5_enabled) (arch/x86/kernel/vmcore_info_64.c;
        crash_core_64.c before 6.5), else the DWARF variable (__pgtable_l5_enabled;
        pgtable_l5_enabled in older kernels). MAX_PHYSMEM_BITS: NUMBER(MAX_PHYSMEM_BITS), else 52
        with 5 levels and 46 with 4 (asm/sparsemem.h). The root: init_top_pgt, a kernel
        image symbol, at ``init_top_pgt - __START_KERNEL_map + phys_base`` (asm/page_64.h
        __phys_addr_symbol), else translated by the debugger."""
        l5 = info.number("pgtable_l5_enabled")
        if l5 is None and kernel.has_dwarf:
            for var in ("__pgtable_l5_enabled", "pgtable_l5_enabled"):
                l5 = kernel.value(var)
                if l5 is not None:
                    break
        levels = 5 if l5 else 4
        max_phys = info.number("MAX_PHYSMEM_BITS") or (52 if levels == 5 else 46)
        root = None
        top, phys_base = info.symbol("init_top_pgt"), info.number("phys_base")
        if top is not None and phys_base is not None:
            root = top - START_KERNEL_MAP + phys_base
        elif kernel.has_dwarf:
            # init_top_pgt is defined in assembly (head_64.S): a symbol without DWARF
            addr = kernel.symbol("init_top_pgt")
            root = kernel.kernel_phys(addr) if addr is not None else None
        return {"pgtable_levels": levels, "max_physmem_bits": max_phys, "pgtable_root": root,
                "sme_mask": info.number("sme_mask") or 0}

    def vmemmap_base(self, info, kernel: KernelLookup, mem, fields: dict) -> Tuple[Optional[int], str]:
        """KASLR's vmemmap_base (arch/x86/mm/kaslr.c): from DWARF, else read at its
        kallsyms address."""
        if kernel.has_dwarf:
            value = kernel.value("vmemmap_base")
            return value, "vmemmap_base (debug info)"
        addr = kernel.symbol("vmemmap_base")
        if addr is None:
            return None, ""
        try:
            return struct.unpack("<Q", mem.read(addr, 8))[0], "vmemmap_base (kallsyms)"
        except FaultError:
            return None, ""

    def mem_section_is_root_array(self, info, address: int) -> bool:
        # static arrays live in the kernel image, at and above __START_KERNEL_map
        return address < START_KERNEL_MAP

    def paging(self, layout):
        from inspect_vmemmap.pgtable.x86_64 import X86_64Paging

        return X86_64Paging(layout.pgtable_levels, layout.max_physmem_bits, layout.sme_mask)

    def vmemmap_block(self, layout, whole_section: bool) -> int:
        """Rule: vmemmap_populate() (arch/x86/mm/init_64.c) uses
        vmemmap_populate_hugepages() (PMD blocks) for ranges of at least a section's
        memmap, vmemmap_populate_basepages() (PAGE_SIZE) for sub-section ranges."""
        return 1 << (2 * layout.page_shift - 3) if whole_section else layout.page_size

    def altmap_block(self, layout, whole_section: bool) -> Optional[int]:
        """Rule: vmemmap_populate() (arch/x86/mm/init_64.c): a whole section's memmap by
        vmemmap_populate_hugepages(), one PMD_SIZE block per PMD from the altmap, no
        fallback when it runs out; a partial section's by vmemmap_populate_basepages()
        with a NULL altmap, so from ordinary RAM."""
        return 1 << (2 * layout.page_shift - 3) if whole_section else None


register(X86_64())
