"""riscv64: Sv39, Sv48 and Sv57 (4K pages), the vmemmap offset by the first RAM pfn,
PMD-block vmemmap, HVO and DAX vmemmap dedup.

Sources: Debian's 6.12 tree (linux-source-6.12 6.12.117-1), arch/riscv and mm/:

- The paging mode, arch/riscv/mm/init.c ``set_satp_mode()``: the kernel is built for Sv57
  (CONFIG_PGTABLE_LEVELS 5) and falls back to Sv48 (``disable_pgtable_l5``) and Sv39
  (``disable_pgtable_l4``) when the hart refuses the mode in satp, or when the command
  line says ``no5lvl``/``no4lvl`` (``__pi_set_satp_mode_from_cmdline``). VMCOREINFO's
  NUMBER(VA_BITS) is the mode in effect (asm/pgtable.h ``VA_BITS``: 57, 48 or 39 from
  ``pgtable_l5_enabled``/``pgtable_l4_enabled``; arch/riscv/kernel/vmcore_info.c).
- The root: satp points at ``swapper_pg_dir`` (mm/init.c ``setup_vm_final``:
  ``csr_write(CSR_SATP, PFN_DOWN(__pa_symbol(swapper_pg_dir)) | satp_mode)``), a kernel
  image address, so its physical address is SYMBOL(swapper_pg_dir) -
  NUMBER(va_kernel_pa_offset) (asm/page.h ``kernel_mapping_va_to_pa``).
- The vmemmap, asm/pgtable.h: ``vmemmap = (struct page *)VMEMMAP_START -
  vmemmap_start_pfn`` with ``vmemmap_start_pfn = round_down(phys_ram_base,
  VMEMMAP_ADDR_ALIGN) >> PAGE_SHIFT`` (mm/init.c ``setup_bootmem``). 6.12's
  VMEMMAP_ADDR_ALIGN is a section (1 << SECTION_SIZE_BITS): VMEMMAP_START holds the struct
  page of the first RAM section (pfn 0x80000 on QEMU virt); 7.2's is at least
  ``PFN_PHYS(MAX_FOLIO_VMEMMAP_ALIGN / sizeof(struct page))`` (include/linux/mmzone.h: a
  16 GiB folio's, for HVO's naturally aligned head struct pages), which rounds QEMU virt's
  2 GiB down to 0. So the variable is read, not recomputed. Kernels without it defined
  ``vmemmap`` as ``(struct page *)VMEMMAP_START``. 6.12 and 7.2 also export
  SYMBOL(vmemmap), which wins.
  The region: VMEMMAP_START..VMEMMAP_END (NUMBER()s in VMCOREINFO), VMEMMAP_END being
  VMALLOC_START and VMEMMAP_SIZE ``BIT(VA_BITS - PAGE_SHIFT - 1 + STRUCT_PAGE_MAX_SHIFT)``.
- The linear map and the kernel image, asm/page.h: ``linear_mapping_pa_to_va(x) = x +
  va_pa_offset`` with ``va_pa_offset = PAGE_OFFSET - phys_ram_base`` (mm/init.c
  ``setup_bootmem``), ``KERN_VIRT_SIZE`` = (PTRS_PER_PGD / 2 * PGDIR_SIZE) / 2 long
  (asm/pgtable.h); the kernel image from KERNEL_LINK_ADDR at ``va_kernel_pa_offset``.
  VMCOREINFO gives NUMBER(PAGE_OFFSET), NUMBER(phys_ram_base), NUMBER(KERNEL_LINK_ADDR)
  and NUMBER(va_kernel_pa_offset); drgn has no riscv page-table walker, so
  :meth:`Riscv64.kernel_address_space` lends it these translations and a walk of
  swapper_pg_dir for the rest (vmalloc, modules, vmemmap).
- Population, mm/init.c ``vmemmap_populate()``: always ``vmemmap_populate_hugepages()``
  (mm/sparse-vmemmap.c): a PMD block per PMD of struct pages, base pages where the block
  cannot be allocated, and with an altmap PMD blocks from it with no fallback; also for
  sub-section ranges (riscv has no basepages branch, unlike x86_64).
- HVO and DAX: arch/riscv/Kconfig selects ARCH_WANT_OPTIMIZE_HUGETLB_VMEMMAP and
  ARCH_WANT_OPTIMIZE_DAX_VMEMMAP; Debian's config has CONFIG_HUGETLB_PAGE_OPTIMIZE_VMEMMAP
  (default off: ``hugetlb_free_vmemmap=on`` turns it on).
- MAX_PHYSMEM_BITS 56, SECTION_SIZE_BITS 27 (asm/sparsemem.h), both in VMCOREINFO.
"""

from __future__ import annotations

import struct
from typing import Callable, Dict, List, Optional, Tuple

from inspect_vmemmap.arch import Arch, KernelLookup, register
from inspect_vmemmap.errors import AnalysisError
from inspect_vmemmap.memory import FaultError
from inspect_vmemmap.pgtable import translate
from inspect_vmemmap.pgtable.riscv64 import RiscvPaging

U64 = (1 << 64) - 1
#: VA_BITS -> paging levels (asm/pgtable.h VA_BITS_SV39/48/57)
LEVELS = {39: 3, 48: 4, 57: 5}
#: KERNEL_LINK_ADDR of 64-bit kernels (asm/pgtable.h: ADDRESS_SPACE_END - SZ_2G + 1)
KERNEL_LINK_ADDR = 0xFFFFFFFF80000000

ReadPhys = Callable[[int, int], bytes]


class _PhysOnly:
    """A :class:`~inspect_vmemmap.memory.Memory` over a physical reader (for the walker)."""

    def __init__(self, read_phys: ReadPhys) -> None:
        self._read = read_phys

    def read(self, address: int, size: int, physical: bool = False) -> bytes:
        if not physical:
            raise FaultError(address, physical, "virtual read in a page-table walk")
        return self._read(address, size)


class PageTableReader:
    """Reads kernel virtual memory by walking swapper_pg_dir (one :func:`translate` per
    leaf; with ``cache`` the last leaf is kept, for targets that do not change)."""

    def __init__(self, read_phys: ReadPhys, fmt: RiscvPaging, root: int, cache: bool = False) -> None:
        self.read_phys = read_phys
        self.mem = _PhysOnly(read_phys)
        self.fmt = fmt
        self.root = root
        self.cache = cache
        self._leaf: Optional[Tuple[int, int, int]] = None  # (vaddr, size, phys)

    def _leaf_of(self, va: int) -> Tuple[int, int, int]:
        leaf = self._leaf
        if leaf is not None and leaf[0] <= va < leaf[0] + leaf[1]:
            return leaf
        steps = translate(self.mem, self.fmt, self.root, va)
        last = steps[-1]
        if last.kind != "leaf":
            raise FaultError(va, False, f"not mapped: {last.level} entry {last.entry:#x} ({last.kind}"
                                        f"{': ' + last.reason if last.reason else ''})")
        leaf = (va & ~(last.size - 1), last.size, last.phys)
        if self.cache:
            self._leaf = leaf
        return leaf

    def read(self, address: int, size: int) -> bytes:
        out = []
        while size > 0:
            base, lsize, phys = self._leaf_of(address)
            n = min(size, base + lsize - address)
            out.append(self.read_phys(phys + address - base, n))
            address += n
            size -= n
        return b"".join(out)


class Riscv64(Arch):
    name = "riscv64"
    drgn_name = "RISCV64"
    elf_machine = 243  # EM_RISCV
    hugetlb_vmemmap_optimize = True
    dax_vmemmap_optimize = True
    # arch/riscv/include/asm/pgtable.h defines PAGE_KERNEL_READ, not PAGE_KERNEL_RO, so
    # include/linux/pgtable.h's "#ifndef PAGE_KERNEL_RO / # define PAGE_KERNEL_RO
    # PAGE_KERNEL" applies: HVO's tails (mm/hugetlb_vmemmap.c vmemmap_remap_pte) are
    # writable aliases of the kept page
    hvo_tails_readonly = False
    boot_ram_note = "boot RAM: no firmware RAM table read on riscv64; all RAM treated as boot memory"
    root_source = "SYMBOL(swapper_pg_dir) and NUMBER(va_kernel_pa_offset)"
    page_sizes = (4096,)
    # MAX_PHYSMEM_BITS 56 (arch/riscv/include/asm/sparsemem.h, 64-bit)
    physmem_bits = (56,)
    # Sv39, Sv48, Sv57
    pgtable_levels = (3, 4, 5)

    def layout_fields(self, info, page_size: int, kernel: KernelLookup, mem, notes: Dict[str, str]) -> dict:
        """Sv39/Sv48/Sv57 from NUMBER(VA_BITS), the root from swapper_pg_dir, the vmemmap
        region from NUMBER(VMEMMAP_START) and NUMBER(VMEMMAP_END) (module docstring)."""
        if page_size != 4096:
            raise AnalysisError(f"riscv64 with {page_size // 1024}K pages: not a configuration Linux has (4K only)")
        va_bits = info.number("VA_BITS")
        if va_bits is None:
            raise AnalysisError("VMCOREINFO lacks NUMBER(VA_BITS); is this a riscv64 kernel with an MMU?")
        if va_bits not in LEVELS:
            raise AnalysisError(f"riscv64 with a {va_bits}-bit VA: not Sv39, Sv48 or Sv57")
        notes["va_bits"] = f"NUMBER(VA_BITS) = {va_bits}: Sv{va_bits}"
        pa_bits = info.number("MAX_PHYSMEM_BITS") or 56
        pgdir = info.symbol("swapper_pg_dir")
        off = info.number("va_kernel_pa_offset")
        root = (pgdir - off) & U64 if pgdir is not None and off is not None else None
        if root is None and pgdir is not None:
            root = kernel.kernel_phys(pgdir)
        start, end = info.number("VMEMMAP_START"), info.number("VMEMMAP_END")
        return {
            "pgtable_levels": LEVELS[va_bits], "max_physmem_bits": pa_bits, "pgtable_root": root, "va_bits": va_bits,
            "vmemmap_region_start": (start or 0) & U64, "vmemmap_region_end": (end or 0) & U64,
        }

    def vmemmap_base(self, info, kernel: KernelLookup, mem, fields: dict) -> Tuple[Optional[int], str]:
        """asm/pgtable.h: ``(struct page *)VMEMMAP_START - vmemmap_start_pfn`` where the
        kernel has the variable (its value from DWARF, else read at its kallsyms address),
        else ``(struct page *)VMEMMAP_START``."""
        start = info.number("VMEMMAP_START")
        if start is None:
            return None, ""
        first = kernel.value("vmemmap_start_pfn")
        where = "vmemmap_start_pfn (debug info)"
        if first is None:
            addr = kernel.symbol("vmemmap_start_pfn")
            if addr is None:
                if kernel.symbol("swapper_pg_dir") is None:
                    return None, ""  # no symbols to tell the definitions apart: decoded from the sections
                return start & U64, "VMEMMAP_START (a kernel without vmemmap_start_pfn: pfn 0 at VMEMMAP_START)"
            try:
                first = struct.unpack("<Q", mem.read(addr, 8))[0]
            except FaultError:
                return None, ""
            where = "vmemmap_start_pfn (kallsyms)"
        sps = info.size("page") or 64
        return (start - first * sps) & U64, f"VMEMMAP_START - {where} * sizeof(struct page)"

    def mem_section_is_root_array(self, info, address: int) -> bool:
        # SPARSEMEM_EXTREME's roots are memblock allocations in the linear map, which lies
        # below the kernel image at KERNEL_LINK_ADDR (asm/pgtable.h)
        return address < (info.number("KERNEL_LINK_ADDR") or KERNEL_LINK_ADDR)

    def paging(self, layout):
        return RiscvPaging(layout.pgtable_levels, layout.max_physmem_bits)

    def vmemmap_block(self, layout, whole_section: bool) -> int:
        """Rule: vmemmap_populate() (arch/riscv/mm/init.c) is vmemmap_populate_hugepages()
        for every range, whole sections or not: PMD_SIZE blocks (base pages only where a
        block could not be allocated, which the model does not predict)."""
        return 1 << (2 * layout.page_shift - 3)

    def altmap_block(self, layout, whole_section: bool) -> Optional[int]:
        """Rule: vmemmap_populate_hugepages() with an altmap takes every PMD block from it
        and has no fallback (mm/sparse-vmemmap.c: ``else if (altmap) return -ENOMEM``)."""
        return 1 << (2 * layout.page_shift - 3)

    def kernel_address_space(self, info, read_phys: ReadPhys, static: bool = False
                             ) -> List[Tuple[int, int, Callable[[int, int], bytes]]]:
        """How to read kernel virtual addresses, for a debugger that cannot translate them
        (drgn has no riscv page-table walker): ``[(start, size, read(address, size))]``, later
        entries taking precedence: swapper_pg_dir walked for the whole kernel half, then
        the linear map and the kernel image by their offsets (module docstring).

        :param static: the target does not change (a dump): the walk may keep its last leaf.
        """
        va_bits = info.number("VA_BITS")
        if va_bits not in LEVELS:
            return []
        out: List[Tuple[int, int, Callable[[int, int], bytes]]] = []
        pgdir, koff = info.symbol("swapper_pg_dir"), info.number("va_kernel_pa_offset")
        if pgdir is not None and koff is not None:
            pa_bits = info.number("MAX_PHYSMEM_BITS") or 56
            walker = PageTableReader(read_phys, RiscvPaging(LEVELS[va_bits], pa_bits), (pgdir - koff) & U64, static)
            low = U64 + 1 - (1 << (va_bits - 1))  # the kernel half of the address space
            out.append((low, (1 << (va_bits - 1)), walker.read))
        page_offset, ram_base = info.number("PAGE_OFFSET"), info.number("phys_ram_base")
        if page_offset is not None and ram_base is not None:
            page_offset &= U64
            out.append((page_offset, 1 << (va_bits - 2),
                        lambda a, n: read_phys(a - page_offset + ram_base, n)))
        link = info.number("KERNEL_LINK_ADDR")
        if link is not None and koff is not None:
            link &= U64
            out.append((link, U64 + 1 - link, lambda a, n: read_phys((a - koff) & U64, n)))
        return out


register(Riscv64())
