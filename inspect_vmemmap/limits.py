"""What a layout may say, and how much work it may ask for (issue 15).

- :func:`layout_problem`: a :class:`KernelLayout`'s values against what the architecture
  allows and against each other (page size per architecture, section size above the
  subsection size and the page size, struct page size, VA bits, MAX_PHYSMEM_BITS, the
  root array's length against NR_SECTION_ROOTS). An impossible value is refused by name.
- :func:`bound_ram`: the System RAM ranges a check feeds the model, cut to what the
  layout and the kernel's mem_section array allow, so a corrupted resource end is one
  finding instead of a loop over every section up to 2^64.
- :data:`MAX_SECTIONS`: the most sections the model predicts, whatever the input says.
"""

from __future__ import annotations

from typing import List, Optional, Sequence, Tuple

from inspect_vmemmap.findings import Finding
from inspect_vmemmap.intervals import merge

#: the model predicts at most this many sections (2^16: 8 TiB of 128 MiB sections,
#: 32 TiB of 512 MiB ones; about 170 MB and 15 s at the limit); more is refused, not allowed
#: to take gigabytes
MAX_SECTIONS = 1 << 16

#: sections above the highest present one within which a System RAM range may end and
#: still be used whole (bound_ram)
SECTION_MARGIN = 64


def layout_problem(lay) -> Optional[Tuple[str, object, str]]:
    """:return: ``(key, value, why)`` for the first value no kernel of the layout's
    architecture can have, or None when the layout is possible."""
    from inspect_vmemmap import arch as arches

    if lay.arch not in arches.names():
        return "arch", lay.arch, f"not an architecture the tool knows ({', '.join(arches.names())})"
    arch = arches.get(lay.arch)
    # the architecture's own first: the VA sizes every vmemmap address is derived from
    problem = arch.layout_problem(lay)
    if problem is not None:
        return problem
    ints = ("page_size", "pgtable_levels", "struct_page_size", "section_size_bits", "max_physmem_bits",
            "section_map_last_bit", "nr_section_roots", "sections_per_root", "mem_section_size", "usage_offset",
            "subsection_map_offset", "subsection_shift", "vmemmap_base", "mem_section_addr", "pgtable_root",
            "sme_mask", "va_bits", "kernel_va_bits", "phys_offset", "kimage_voffset", "vmemmap_region_start",
            "vmemmap_region_end")
    for k in ints:
        v = getattr(lay, k)
        if type(v) is not int:
            return _KEYS.get(k, k), v, "not an integer"
        if v < 0 or v >= 1 << 64:
            return _KEYS.get(k, k), v, "not a 64-bit unsigned value"
    if lay.page_size not in arch.page_sizes:
        return "PAGESIZE", lay.page_size, f"{arch.name} pages are {' or '.join(map(str, arch.page_sizes))} bytes"
    if lay.max_physmem_bits not in arch.physmem_bits:
        return ("NUMBER(MAX_PHYSMEM_BITS)", lay.max_physmem_bits,
                f"{arch.name} has {' or '.join(map(str, arch.physmem_bits))}")
    if lay.pgtable_levels not in arch.pgtable_levels:
        return "pgtable_levels", lay.pgtable_levels, (f"{arch.name} has {', '.join(map(str, arch.pgtable_levels))} "
                                                      "paging levels")
    if not 12 <= lay.subsection_shift <= 40:
        return "SUBSECTION_SHIFT", lay.subsection_shift, "not a subsection size"
    # include/linux/mmzone.h: "#error Subsection size exceeds section size" and
    # SECTION_SIZE_BITS must hold MAX_PAGE_ORDER pages; the section is under the PA space
    if not lay.subsection_shift <= lay.section_size_bits < lay.max_physmem_bits:
        return ("NUMBER(SECTION_SIZE_BITS)", lay.section_size_bits,
                f"a section must be at least a subsection (2^{lay.subsection_shift}) and below "
                f"MAX_PHYSMEM_BITS ({lay.max_physmem_bits})")
    if lay.section_size_bits - lay.page_shift > 40 or lay.section_size_bits < lay.page_shift:
        return "NUMBER(SECTION_SIZE_BITS)", lay.section_size_bits, f"not a section size for {lay.page_size}-byte pages"
    # struct page: at least flags, _refcount, _mapcount and a list head; never more than a
    # few cache lines (mm_types.h); a whole number of words
    if not 32 <= lay.struct_page_size <= 256 or lay.struct_page_size % 8:
        return "SIZE(page)", lay.struct_page_size, "not the size of a struct page (32-256 bytes, a multiple of 8)"
    if not 1 <= lay.mem_section_size <= 4096:
        return "SIZE(mem_section)", lay.mem_section_size, "not the size of a struct mem_section"
    if not 1 <= lay.section_map_last_bit <= lay.page_shift:
        return "SECTION_MAP_LAST_BIT", lay.section_map_last_bit, "the section flags must fit below the mem_map alignment"
    for name, bit in lay.section_flags.items():
        if type(bit) is not int or not 0 <= bit < lay.section_map_last_bit:
            return f"section flag {name}", bit, f"not a bit below SECTION_MAP_LAST_BIT ({lay.section_map_last_bit})"
    nr_sections = 1 << (lay.max_physmem_bits - lay.section_size_bits)
    if lay.sections_per_root < 1 or lay.sections_per_root > nr_sections:
        return "SECTIONS_PER_ROOT", lay.sections_per_root, f"not between 1 and NR_MEM_SECTIONS ({nr_sections})"
    # kernel/vmcore_info.c VMCOREINFO_LENGTH(mem_section, NR_SECTION_ROOTS); more than
    # NR_SECTION_ROOTS is read up to it and named by the section reader (sections.py)
    if lay.nr_section_roots < 1:
        return "LENGTH(mem_section)", lay.nr_section_roots, "a kernel has at least one mem_section root"
    return None


#: KernelLayout fields by the VMCOREINFO entries they come from, for messages
_KEYS = {"page_size": "PAGESIZE", "struct_page_size": "SIZE(page)", "section_size_bits": "NUMBER(SECTION_SIZE_BITS)",
         "max_physmem_bits": "NUMBER(MAX_PHYSMEM_BITS)", "nr_section_roots": "LENGTH(mem_section)",
         "mem_section_size": "SIZE(mem_section)", "kernel_va_bits": "NUMBER(VA_BITS)",
         "va_bits": "VA bits (64 - NUMBER(TCR_EL1_T1SZ))", "vmemmap_base": "SYMBOL(vmemmap)",
         "mem_section_addr": "SYMBOL(mem_section)"}


def ram_sections(lay, ranges: Sequence[Tuple[int, int]]) -> int:
    """How many sections ``ranges`` (physical bytes) touch."""
    bits = lay.section_size_bits
    return sum(((b - 1) >> bits) - (a >> bits) + 1 for a, b in merge(ranges))


def bound_ram(lay, ram: Sequence[Tuple[int, int]], present: Sequence[int]) -> Tuple[List[Tuple[int, int]], List[Finding]]:
    """System RAM as the model may use it in a check: below 2^MAX_PHYSMEM_BITS, and no
    further than the section after the highest present one (mm/sparse.c memblocks_present()
    marks every section that holds memory present: RAM above the last present section is a
    corrupted resource or a hot-add that has not marked its sections present yet: a range
    that ends more than :data:`SECTION_MARGIN` sections above it is cut there, one finding
    instead of one per section). What is cut is one ``section-flags`` finding
    per range, with the pfns it claims.

    :param present: the numbers of the present sections read from mem_section.
    :return: ``(ram, findings)``.
    """
    limit = 1 << lay.max_physmem_bits
    top = (max(present) + 1) << lay.section_size_bits if present else 0
    # a range that ends within SECTION_MARGIN sections of the last present one is kept
    # whole (the sections it claims are reported one by one: a damaged section, a hot-add
    # in progress); one that runs further is cut where the present sections end
    near = top + (SECTION_MARGIN << lay.section_size_bits)
    shift = lay.page_shift
    out: List[Tuple[int, int]] = []
    findings: List[Finding] = []
    for a, b in ram:
        if b <= a:
            continue
        keep = min(b, limit) if b <= near else min(b, limit, max(top, a))
        if keep > a:
            out.append((a, keep))
        if b > keep:
            x = max(a, keep)
            why = (f"beyond MAX_PHYSMEM_BITS ({lay.max_physmem_bits})" if x >= limit
                   else f"above every present section (the highest is {max(present)})" if present
                   else "where no section is present")
            p0 = x >> shift
            findings.append(Finding(
                "section-flags", None,
                (f"System RAM {a:#x}-{b - 1:#x} claims pfn {p0}-{(min(b, 1 << 64) - 1) >> shift}, {why}: "
                 f"{_CAUSES}; the model uses only {a:#x}-{keep - 1:#x}" if keep > a else
                 f"System RAM {a:#x}-{b - 1:#x} lies {why}: {_CAUSES}; the model does not use it"),
                section=p0 >> lay.pfn_section_shift,
                pfn_start=p0, pfn_end=(min(b, 1 << 64) - 1) >> shift, phys=x))
    return out, findings


_CAUSES = ("the resource is corrupt, mem_section lost those sections, or a hot-add in progress has not "
           "marked them present yet (add_memory_resource() registers the resource first)")


def bound_inputs(inputs, sections):
    """:func:`bound_ram` on a check's model inputs (System RAM and boot RAM), against
    the present sections of ``sections``.

    :return: ``(inputs, findings)``: a copy with the bounded ranges, and what was cut.
    """
    import dataclasses

    present = [s.nr for s in sections if s.present]
    ram, findings = bound_ram(inputs.layout, inputs.ram, present)
    changes = {}
    if findings:
        changes["ram"] = ram
    if inputs.boot_ram is not None:
        boot, cut = bound_ram(inputs.layout, inputs.boot_ram, present)
        if cut:
            changes["boot_ram"] = boot
    return (dataclasses.replace(inputs, **changes) if changes else inputs), findings
