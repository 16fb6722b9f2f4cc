"""What the commands compute, on plain data (no drgn): sections with their nodes and
cross-checks, the vmemmap map, and one pfn explained."""

from __future__ import annotations

from typing import List, Optional, Tuple

from inspect_vmemmap.arch import for_layout
from inspect_vmemmap.findings import Finding
from inspect_vmemmap.layout import KernelLayout
from inspect_vmemmap.memory import Memory, PhysRanges
from inspect_vmemmap.pgtable import PagingFormat, effective, translate
from inspect_vmemmap.sections import SectionTable, read_sections
from inspect_vmemmap.vmemmap import NodeMap, VmemmapMap, map_vmemmap, size_label


def paging_format(layout: KernelLayout) -> PagingFormat:
    """:return: the page-table format of the layout's architecture and paging mode."""
    return for_layout(layout).paging(layout)


def load_sections(mem: Memory, layout: KernelLayout, nodes: NodeMap,
                  only: Optional[Tuple[int, int]] = None) -> SectionTable:
    """Read mem_section, give each section the node whose span holds its start, and check
    every valid section's coded mem_map against the vmemmap base.

    mm/sparse.c ``sparse_encode_mem_map``: section_mem_map holds ``mem_map - start_pfn``
    (in struct pages), which with SPARSEMEM_VMEMMAP is ``vmemmap`` for every section
    (``__populate_section_memmap`` returns ``pfn_to_page(pfn)``).

    :param only: ``(first, last)``: read those sections alone (a ranged re-check).
    """
    table = read_sections(mem, layout, only=only)
    for s in table:
        s.nid = nodes.nid_of_range(s.start_pfn(layout), s.start_pfn(layout) + layout.pages_per_section)
        if s.valid and s.coded_mem_map != layout.vmemmap_base:
            start = s.start_pfn(layout)
            table.findings.append(Finding(
                "mem-map-mismatch", None,
                f"section {s.nr}: coded mem_map {s.coded_mem_map:#x} is not the vmemmap base {layout.vmemmap_base:#x} "
                f"(its struct pages would be at {s.mem_map(layout):#x} instead of {layout.pfn_to_page(start):#x})",
                section=s.nr, pfn_start=start, pfn_end=start + layout.pages_per_section - 1, vaddr=s.addr))
    return table


def load_map(mem: Memory, layout: KernelLayout, sections: SectionTable, nodes: NodeMap, ram: Optional[PhysRanges],
             on_leaf=None) -> VmemmapMap:
    """Walk the vmemmap page tables: only the region that can hold struct pages (on arm64
    not what a 52-bit kernel on 48-bit hardware lends to vmalloc below it), and only up to
    the end of the highest section's struct pages, rounded up to the largest leaf."""
    fmt = paging_format(layout)
    phys_ok = None
    if ram:
        # Table pages are RAM; allow anything below the top of RAM so that a table in a
        # hole between RAM ranges (reserved, ACPI) is still read and judged by the checks.
        top = ram.end
        phys_ok = lambda p: p < top
    start = layout.vmemmap_start
    end = layout.vmemmap_end
    if len(sections):
        last = max(sections.sections)
        end = min(end, layout.pfn_to_page((last + 1) << layout.pfn_section_shift))
        # round up to the largest leaf the format can have (x86_64 and arm64 4K: a PUD)
        gran = max(1 << s for d, s in enumerate(fmt.shifts) if fmt.can_be_leaf(d))
        end = min(layout.vmemmap_end, (end + gran - 1) // gran * gran)
    return map_vmemmap(mem, fmt, layout, sections, nodes, phys_ok, start, max(start, end), on_leaf)


def explain_pfn(mem: Memory, layout: KernelLayout, sections: SectionTable, nodes: NodeMap, pfn: int) -> Tuple[dict, List[Finding]]:
    """One pfn: its section, its struct page, every page-table level on the way to it.

    :return: ``(json, findings)``.
    """
    fmt = paging_format(layout)
    findings: List[Finding] = []
    nr = pfn >> layout.pfn_section_shift
    sec = sections.get(nr)
    page = layout.pfn_to_page(pfn)
    sub = (pfn & (layout.pages_per_section - 1)) // layout.pages_per_subsection
    valid = bool(sec and sec.valid and sec.valid_subsections(layout) >> sub & 1)
    steps = translate(mem, fmt, layout.pgtable_root, page)
    out: dict = {
        "pfn": pfn, "phys": hex(pfn << layout.page_shift), "section": nr,
        "section_flags": sec.flag_names() if sec else [], "state": sec.letters() if sec else "",
        "subsection": sub, "valid": valid, "struct_page": hex(page),
        "walk": [{"level": s.level, "table_phys": hex(s.table_phys), "index": s.index, "entry": hex(s.entry),
                  "kind": s.kind, **({"next": hex(s.phys)} if s.kind == "table" else {}),
                  **({"reason": s.reason} if s.reason else {})} for s in steps],
        "nid": nodes.nid(pfn),
    }
    if sec is not None:
        out["coded_mem_map"] = hex(sec.coded_mem_map)
        out["mem_map"] = hex(sec.mem_map(layout))
    last = steps[-1] if steps else None
    if last is not None and last.kind == "leaf":
        off = page & (last.size - 1)
        writable, attrs = effective(fmt, steps)
        out["backing"] = {
            "level": last.level, "page_size": last.size, "size": size_label(last.size), "phys": hex(last.phys),
            "writable": writable, "attrs": list(attrs), "nid": nodes.nid(last.phys >> layout.page_shift),
        }
        out["struct_page_phys"] = hex(last.phys + off)
    elif valid:
        kind = "bad-entry" if last is not None and last.kind == "bad" else "unreadable" if last is not None and last.kind == "unreadable" else "memmap-unmapped"
        findings.append(Finding(
            kind, None,
            f"struct page of valid pfn {pfn} at {page:#x} is not mapped: {last.level if last else 'pgd'} entry "
            f"{last.entry if last else 0:#x} ({last.kind if last else 'none'}{': ' + last.reason if last and last.reason else ''})",
            section=nr, pfn_start=pfn, pfn_end=pfn, vaddr=page,
            **({"phys": last.table_phys} if kind == "unreadable" else {})))
    return out, findings
