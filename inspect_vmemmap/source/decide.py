"""The layout decision: every :class:`~inspect_vmemmap.layout.KernelLayout` constant, from
VMCOREINFO first (it is in every dump and every live kernel, and it is what makedumpfile
trusts) and type information (DWARF or BTF) second, for what is common to every
architecture; what is particular to one comes from its :mod:`inspect_vmemmap.arch` module.
No drgn here: the adapter hands in a :class:`~inspect_vmemmap.arch.KernelLookup`."""

from __future__ import annotations

from dataclasses import replace
from typing import Dict

from inspect_vmemmap import arch as arches
from inspect_vmemmap.arch import Arch, KernelLookup, need, sane
from inspect_vmemmap.btf import BtfError
from inspect_vmemmap.errors import AnalysisError
from inspect_vmemmap.layout import HISTORICAL_SECTION_FLAGS, HISTORICAL_SECTION_MAP_LAST_BIT, KernelLayout, \
    flag_bits_from_enumerators
from inspect_vmemmap.memory import Memory
from inspect_vmemmap.source.vmcoreinfo import VmcoreInfo


def decide_layout(arch: Arch, info: VmcoreInfo, kernel: KernelLookup, mem: Memory, types=None) -> KernelLayout:
    """Every layout constant of the kernel ``info`` describes.

    :param types: DWARF or BTF type information (None: VMCOREINFO and per-era defaults).
    :raises AnalysisError: for kernels out of scope (not SPARSEMEM_VMEMMAP) or impossible values.
    """
    notes: Dict[str, str] = {}
    has_dwarf = kernel.has_dwarf
    release = info.get("OSRELEASE") or ""
    page_size = int(info.get("PAGESIZE") or 4096)

    mem_section = info.symbol("mem_section")
    nr_roots = info.length("mem_section")
    ms_size = info.size("mem_section")
    if mem_section is None and has_dwarf:
        if kernel.is_pointer("mem_section") is None:
            raise AnalysisError("this kernel has no mem_section: it is not SPARSEMEM (FLATMEM is out of scope)")
        mem_section = kernel.value("mem_section") if kernel.is_pointer("mem_section") \
            else kernel.address("mem_section")
    need(mem_section, "SYMBOL(mem_section)")
    if has_dwarf:
        ms_size = ms_size or types.sizeof("struct mem_section")
        # SPARSEMEM_EXTREME: mem_section is a pointer to the root array
        extreme = bool(kernel.is_pointer("mem_section"))
        if not extreme and nr_roots is None:
            nr_roots = kernel.length("mem_section")
        usage_off = _offsetof(types, "struct mem_section", "usage", 8)
        sub_off = _offsetof(types, "struct mem_section_usage", "subsection_map", 16)
    else:
        extreme = arch.mem_section_is_root_array(info, mem_section)
        usage_off, sub_off = 8, 16
        if types is not None:
            try:
                usage_off = types.offsetof("struct mem_section", "usage")
                sub_off = types.offsetof("struct mem_section_usage", "subsection_map")
            except KeyError:
                notes["mem_section_usage"] = "assumed usage at offset 8, subsection_map at 16 (not in BTF)"
        else:
            notes["mem_section_usage"] = "assumed usage at offset 8, subsection_map at 16 (no type information)"
    need(ms_size, "SIZE(mem_section)")
    sane(ms_size, "SIZE(mem_section)", 8, 4096, pow2=True)
    need(nr_roots, "LENGTH(mem_section)")
    spr = page_size // ms_size if extreme else None
    section_size_bits = sane(need(info.number("SECTION_SIZE_BITS"), "NUMBER(SECTION_SIZE_BITS)"),
                             "NUMBER(SECTION_SIZE_BITS)", 16, 40)

    fields = arch.layout_fields(info, page_size, kernel, mem, notes)
    max_phys = fields["max_physmem_bits"]
    if spr is None:
        spr = (1 << (max_phys - section_size_bits)) // nr_roots

    struct_page = info.size("page")
    if struct_page is None and has_dwarf:
        struct_page = types.sizeof("struct page")
    need(struct_page, "SIZE(page)")
    sane(struct_page, "SIZE(page)", 32, 512)
    sane(max_phys, "NUMBER(MAX_PHYSMEM_BITS)", section_size_bits + 1, 57)

    flags, type_source = _section_flags(types, notes)

    # The vmemmap base: SYMBOL(vmemmap) since 6.12's generic vmcoreinfo, else the
    # architecture's own (x86 KASLR's vmemmap_base, arm64's VMEMMAP_START arithmetic),
    # else the coded mem_map of a valid section.
    vmemmap = info.symbol("vmemmap")
    if vmemmap is not None:
        notes["vmemmap_base"] = "VMCOREINFO SYMBOL(vmemmap)"
    else:
        vmemmap, where = arch.vmemmap_base(info, kernel, mem, fields)
        if vmemmap is not None:
            notes["vmemmap_base"] = where
    need(fields["pgtable_root"], arch.root_source)

    layout = KernelLayout(
        arch=arch.name, page_size=page_size, vmemmap_base=vmemmap or 0, struct_page_size=struct_page,
        section_size_bits=section_size_bits, section_flags=flags[0], section_map_last_bit=flags[1],
        mem_section_addr=mem_section, sparsemem_extreme=extreme, nr_section_roots=nr_roots, sections_per_root=spr,
        mem_section_size=ms_size, usage_offset=usage_off, subsection_map_offset=sub_off, kernel_release=release,
        type_source=type_source, notes=notes, **fields,
    )
    if vmemmap is None:
        notes["vmemmap_base"] = "decoded from the first valid section's coded mem_map"
        layout = replace(layout, vmemmap_base=_vmemmap_from_sections(mem, layout))
    return layout


def arch_for(drgn_name: str) -> Arch:
    """:return: the architecture drgn calls ``drgn_name``.
    :raises AnalysisError: for one this tool does not support."""
    a = arches.by_drgn_name(drgn_name)
    if a is None:
        raise AnalysisError(f"architecture {drgn_name} is not supported ({' and '.join(arches.names())} only)")
    return a


def _section_flags(types, notes: Dict[str, str]):
    """Section flag bits: the kernel's anonymous enum since v6.0 (commit ed7802dd48f7,
    "mm: memory_hotplug: enumerate all supported section flags"), #defines before.

    :return: ``((flags, last bit), type source)``.
    """
    flags = None
    source = "vmcoreinfo"
    if types is not None and types.source == "dwarf":
        source = "dwarf"
        try:
            flags = flag_bits_from_enumerators(types.enumerators(containing="SECTION_MARKED_PRESENT_BIT"))
        except KeyError:
            flags = (dict(HISTORICAL_SECTION_FLAGS), HISTORICAL_SECTION_MAP_LAST_BIT)
            notes["section_flags"] = "pre-6.0 kernel: historical #define values"
    elif types is not None:
        source = "btf"
        try:
            enums = types.enumerators(containing="SECTION_MARKED_PRESENT_BIT")
        except (KeyError, BtfError):
            enums = {}
        flags = flag_bits_from_enumerators(enums)
    if flags is None:
        flags = (dict(HISTORICAL_SECTION_FLAGS), HISTORICAL_SECTION_MAP_LAST_BIT)
        notes["section_flags"] = "assumed the v5.12-v6.x values P=0 M=1 O=2 E=3 D=4, last bit 5 (no type information)"
    return flags, source


def _offsetof(types, struct: str, member: str, default: int) -> int:
    try:
        return types.offsetof(struct, member)
    except KeyError:
        return default


def _vmemmap_from_sections(mem: Memory, layout: KernelLayout) -> int:
    from inspect_vmemmap.sections import read_sections

    for s in read_sections(mem, layout, read_usage=False):
        if s.valid:
            return s.coded_mem_map
    raise AnalysisError("cannot find the vmemmap base: no SYMBOL(vmemmap), no debug info and no valid section")

