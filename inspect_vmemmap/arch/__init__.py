"""What is particular to each architecture, one module each, found through a registry.

An architecture module defines a subclass of :class:`Arch` and registers an instance
with :func:`register`: its name (``KernelLayout.arch``), drgn's name for it, its layout
rules from VMCOREINFO (paging mode, physical address bits, the page-table root, where
``vmemmap`` points), its page-table format (a :class:`~inspect_vmemmap.pgtable.PagingFormat`
from its ``pgtable/`` module) and the population rules the model states for it (PMD
blocks or base pages, what an altmap backs, whether HVO and DAX vmemmap dedup exist).
Every module in this package is imported on first use, so adding an architecture is
adding its module; nothing here imports drgn.
"""

from __future__ import annotations

import importlib
import pkgutil
from typing import Dict, List, Optional, Tuple

from inspect_vmemmap.errors import AnalysisError

_REGISTRY: Dict[str, "Arch"] = {}
_loaded = False


class KernelLookup:
    """What an architecture's layout rules may ask of the kernel besides VMCOREINFO: the
    adapter (:mod:`inspect_vmemmap.source.drgn`) implements it over drgn; the default
    answers nothing, as a kernel without debug info or symbols would."""

    #: whether DWARF debug info is loaded (then :meth:`value` and friends answer)
    has_dwarf = False

    def symbol(self, name: str) -> Optional[int]:
        """:return: a symbol's address (ELF symbols or kallsyms), or None."""
        return None

    def value(self, name: str) -> Optional[int]:
        """:return: a variable's or enumerator's integer value from DWARF, or None."""
        return None

    def is_pointer(self, name: str) -> Optional[bool]:
        """:return: whether a variable is a pointer (DWARF), or None where unknown."""
        return None

    def length(self, name: str) -> Optional[int]:
        """:return: an array variable's length (DWARF), or None."""
        return None

    def kernel_phys(self, address: int) -> Optional[int]:
        """:return: the physical address of a kernel virtual address, translated through
        init_mm's page tables by the debugger (DWARF), or None."""
        return None


class Arch:
    """One architecture. Subclasses set the class attributes and implement the methods."""

    #: our name, KernelLayout.arch ("x86_64", "aarch64", ...)
    name = ""
    #: drgn.Architecture's member name for it ("X86_64", "AARCH64")
    drgn_name = ""
    #: ELF e_machine (include/uapi/linux/elf-em.h)
    elf_machine = 0
    #: the architecture selects ARCH_WANT_OPTIMIZE_HUGETLB_VMEMMAP (6.12+; 6.1:
    #: ARCH_WANT_HUGETLB_PAGE_OPTIMIZE_VMEMMAP): HVO can exist
    hugetlb_vmemmap_optimize = False
    #: the architecture selects ARCH_WANT_OPTIMIZE_DAX_VMEMMAP (vmemmap_can_optimize())
    dax_vmemmap_optimize = False
    #: HVO's tails are read-only: mm/hugetlb_vmemmap.c vmemmap_remap_pte() maps them with
    #: PAGE_KERNEL_RO, which include/linux/pgtable.h makes PAGE_KERNEL (writable) where
    #: the architecture does not define it (riscv64)
    hvo_tails_readonly = True
    #: the iomem name of boot memory kept out of the linear map (memblock nomap), a top-level
    #: resource of flags IORESOURCE_MEM alone; None: the architecture names none
    nomap_resource: Optional[str] = None
    #: where the model's boot-RAM input comes from, for the note when it cannot be read
    boot_ram_note = "boot RAM: no firmware RAM table read; all RAM treated as boot memory"
    #: what the page-table root is decided from, for the error when it cannot be
    root_source = ""
    #: the values a kernel of the architecture can have (limits.layout_problem)
    page_sizes: Tuple[int, ...] = (4096,)
    physmem_bits: Tuple[int, ...] = ()
    pgtable_levels: Tuple[int, ...] = ()

    def layout_problem(self, layout) -> Optional[Tuple[str, object, str]]:
        """:return: ``(key, value, why)`` for a value of the architecture's own that no
        kernel of it can have (checked before anything is derived from it), or None."""
        return None

    def layout_fields(self, info, page_size: int, kernel: KernelLookup, mem, notes: Dict[str, str]) -> dict:
        """The layout constants particular to this architecture, from VMCOREINFO
        (``info``, a :class:`~inspect_vmemmap.source.vmcoreinfo.VmcoreInfo`) first.

        :return: ``pgtable_levels``, ``max_physmem_bits`` and ``pgtable_root`` (None
            where unknown), plus any KernelLayout field of this architecture's own
            (x86_64: ``sme_mask``; arm64: ``va_bits``, ``lpa2``, ...).
        :raises AnalysisError: for a configuration the architecture cannot have.
        """
        raise NotImplementedError

    def vmemmap_base(self, info, kernel: KernelLookup, mem, fields: dict) -> Tuple[Optional[int], str]:
        """Where pfn 0's struct page is, for kernels whose VMCOREINFO lacks
        SYMBOL(vmemmap) (added for every architecture in 6.12's generic vmcoreinfo).

        :return: ``(address, where it came from)``, address None where unknown.
        """
        return None, ""

    def mem_section_is_root_array(self, info, address: int) -> bool:
        """Without debug info: whether SYMBOL(mem_section) is SPARSEMEM_EXTREME's root
        array (a memblock allocation in the direct map, mm/sparse.c sparse_index_alloc)
        rather than a static array in the kernel image."""
        raise NotImplementedError

    def paging(self, layout):
        """:return: the :class:`~inspect_vmemmap.pgtable.PagingFormat` of ``layout``."""
        raise NotImplementedError

    def vmemmap_block(self, layout, whole_section: bool) -> int:
        """Rule: the granularity vmemmap_populate() maps a range of struct pages with:
        PMD_SIZE blocks where the architecture uses them, else PAGE_SIZE."""
        raise NotImplementedError

    def altmap_block(self, layout, whole_section: bool) -> Optional[int]:
        """Rule: the block size vmemmap_populate() allocates from an altmap for a range
        of struct pages, or None where that range's memmap comes from ordinary RAM."""
        raise NotImplementedError

    def kernel_address_space(self, info, read_phys, static: bool = False) -> list:
        """For an architecture the debugger cannot translate kernel virtual addresses of
        (drgn has no riscv64 page-table walker): ``[(start, size, read(address, size))]``
        segments of the kernel's address space over ``read_phys(address, size)``, later
        ones taking precedence; [] where the debugger translates them itself.

        :param static: the target does not change (a dump), so translations may be kept.
        """
        return []


def register(arch: Arch) -> Arch:
    """Make ``arch`` known by its name; an architecture module calls this once."""
    _REGISTRY[arch.name] = arch
    return arch


def _load() -> None:
    global _loaded
    if not _loaded:
        _loaded = True
        for m in pkgutil.iter_modules(__path__):
            importlib.import_module(f"{__name__}.{m.name}")


def names() -> List[str]:
    """:return: the names of the supported architectures, sorted."""
    _load()
    return sorted(_REGISTRY)


def get(name: str) -> Arch:
    """:return: the architecture called ``name`` (KernelLayout.arch).
    :raises AnalysisError: for one this tool does not support."""
    _load()
    try:
        return _REGISTRY[name]
    except KeyError:
        raise AnalysisError(f"architecture {name} is not supported ({' and '.join(names())} only)") from None


def by_drgn_name(drgn_name: str) -> Optional[Arch]:
    """:return: the architecture drgn calls ``drgn_name``, or None."""
    _load()
    return next((a for a in _REGISTRY.values() if a.drgn_name == drgn_name), None)


def for_layout(layout) -> Arch:
    """:return: the architecture of a :class:`~inspect_vmemmap.layout.KernelLayout`."""
    return get(layout.arch)


def sane(value: Optional[int], what: str, lo: int, hi: int, pow2: bool = False) -> Optional[int]:
    """A VMCOREINFO value that later arithmetic divides or shifts by: in range or a
    one-line reason (a corrupt note, or not a kernel this tool knows)."""
    if value is not None and (not lo <= value <= hi or (pow2 and value & (value - 1))):
        raise AnalysisError(f"VMCOREINFO {what}={value} is impossible (expected {lo}..{hi}"
                            f"{', a power of two' if pow2 else ''})")
    return value


def need(value, what: str):
    """A value the layout cannot do without: itself, or a one-line reason."""
    if value is None:
        raise AnalysisError(f"VMCOREINFO lacks {what}; is this a SPARSEMEM_VMEMMAP kernel?")
    return value

