"""The sparsemem ``mem_section`` array, decoded from raw memory.

Works on a :class:`~inspect_vmemmap.memory.Memory` and a
:class:`~inspect_vmemmap.layout.KernelLayout`; no drgn. Semantics from
include/linux/mmzone.h (``__nr_to_section``, ``SECTION_*``) and mm/sparse.c
(``sparse_init_one_section``, ``sparse_encode_mem_map``).
"""

from __future__ import annotations

import struct
from typing import Dict, Iterator, List, Optional, Tuple

from inspect_vmemmap.findings import Finding
from inspect_vmemmap.layout import SECTION_FLAG, KernelLayout, flag_json_names, flag_letters
from inspect_vmemmap.memory import FaultError, Memory


class Section:
    """One non-empty ``struct mem_section``."""

    __slots__ = ("nr", "addr", "section_mem_map", "usage", "flags", "unknown_flags", "coded_mem_map",
                 "subsection_map", "nid", "_ranges")

    def __init__(self, nr: int, addr: int, section_mem_map: int, usage: int, layout: KernelLayout) -> None:
        self.nr = nr
        self.addr = addr
        self.section_mem_map = section_mem_map
        self.usage = usage
        self.flags, self.unknown_flags = layout.decode_section_flags(
            section_mem_map & ((1 << layout.section_map_last_bit) - 1))
        self.coded_mem_map = section_mem_map & layout.section_map_mask
        self.subsection_map: Optional[int] = None  # bitmap, None where not read
        self.nid: Optional[int] = None
        self._ranges: Optional[List[Tuple[int, int]]] = None

    @property
    def present(self) -> bool:
        return "PRESENT" in self.flags

    @property
    def valid(self) -> bool:
        """valid_section(): has a mem_map."""
        return "HAS_MEM_MAP" in self.flags

    @property
    def early(self) -> bool:
        return "EARLY" in self.flags

    def start_pfn(self, layout: KernelLayout) -> int:
        return self.nr << layout.pfn_section_shift

    def mem_map(self, layout: KernelLayout) -> int:
        """sparse_decode_mem_map(): the address of the section's first struct page."""
        return (self.coded_mem_map + self.start_pfn(layout) * layout.struct_page_size) & (2**64 - 1)

    def letters(self) -> str:
        """crash's ``kmem -n`` STATE column."""
        return flag_letters(self.flags)

    def flag_names(self) -> List[str]:
        return list(flag_json_names(self.flags))

    def valid_subsections(self, layout: KernelLayout) -> int:
        """Bitmap of subsections whose pfns are valid (pfn_valid(): early sections are
        valid throughout, others per usage->subsection_map)."""
        if not self.valid:
            return 0
        full = (1 << layout.subsections_per_section) - 1
        if self.early or self.subsection_map is None:
            return full
        return self.subsection_map & full

    def pfn_ranges(self, layout: KernelLayout) -> List[Tuple[int, int]]:
        """Runs ``[start, end)`` of valid pfns in this section (computed once)."""
        if self._ranges is None:
            self._ranges = self._pfn_ranges(layout)
        return self._ranges

    def _pfn_ranges(self, layout: KernelLayout) -> List[Tuple[int, int]]:
        bits = self.valid_subsections(layout)
        pps = layout.pages_per_subsection
        base = self.start_pfn(layout)
        if bits == (1 << layout.subsections_per_section) - 1:
            return [(base, base + layout.pages_per_section)]
        out: List[Tuple[int, int]] = []
        i = 0
        n = layout.subsections_per_section
        while i < n:
            if bits >> i & 1:
                j = i
                while j < n and bits >> j & 1:
                    j += 1
                out.append((base + i * pps, base + j * pps))
                i = j
            else:
                i += 1
        return out


class SectionTable:
    """All non-empty sections, with what could not be read."""

    def __init__(self, layout: KernelLayout) -> None:
        self.layout = layout
        self.sections: Dict[int, Section] = {}
        self.findings: List[Finding] = []

    def __iter__(self) -> Iterator[Section]:
        return iter(self.sections[nr] for nr in sorted(self.sections))

    def __len__(self) -> int:
        return len(self.sections)

    def get(self, nr: int) -> Optional[Section]:
        return self.sections.get(nr)

    def counts(self) -> Dict[str, int]:
        c = {"present": 0, "has_mem_map": 0, "online": 0, "early": 0, "zone_device": 0}
        for s in self.sections.values():
            for f in s.flags:
                name = SECTION_FLAG[f].json
                if name in c:
                    c[name] += 1
        return c


def read_sections(mem: Memory, layout: KernelLayout, read_usage: bool = True,
                  only: Optional[Tuple[int, int]] = None) -> SectionTable:
    """Read every non-empty ``struct mem_section`` (``only=(first, last)``: those sections
    alone, reading just their root pointers and entries: a ranged re-check).

    SPARSEMEM_EXTREME: ``mem_section`` points to NR_SECTION_ROOTS root pointers, each to
    one page of SECTIONS_PER_ROOT sections, NULL for roots with no sections
    (mm/sparse.c ``sparse_index_init``); ``layout.mem_section_addr`` is that pointer's
    value, as VMCOREINFO's SYMBOL(mem_section) gives it. Static: it is the address of the
    2-D array itself.

    :return: a :class:`SectionTable`; unreadable memory and impossible flag
        combinations are in its ``findings``.
    """
    table = SectionTable(layout)
    spr = layout.sections_per_root
    size = layout.mem_section_size
    nroots = layout.nr_section_roots
    # NR_SECTION_ROOTS is DIV_ROUND_UP(NR_MEM_SECTIONS, SECTIONS_PER_ROOT): a larger count
    # (a damaged LENGTH(mem_section)) would only make the decoder read garbage for long
    most = -(-(1 << max(0, layout.max_physmem_bits - layout.section_size_bits)) // max(spr, 1))
    if nroots > most:
        table.findings.append(Finding(
            "unreadable", None,
            f"mem_section has {nroots} roots by LENGTH(mem_section), more than the {most} that MAX_PHYSMEM_BITS "
            f"{layout.max_physmem_bits} and SECTION_SIZE_BITS {layout.section_size_bits} allow: roots {most}- not read"))
        nroots = most
    mask64 = 2**64 - 1
    roots: List[Tuple[int, int]] = []  # (root index, address of its sections)
    if layout.sparsemem_extreme:
        base = layout.mem_section_addr
        if not base:
            table.findings.append(Finding("section-flags", None, "mem_section is NULL: sparse_init never ran or the pointer was overwritten"))
            return table
        r0, r1 = (0, nroots) if only is None else (min(only[0] // spr, nroots), min(only[1] // spr + 1, nroots))
        for i, p in _read_roots(table, mem, base, r1, spr, r0):
            if p:
                roots.append((i, p))
    else:
        roots = [(i, layout.mem_section_addr + i * spr * size) for i in range(nroots)]
        if only is not None:
            roots = roots[only[0] // spr:only[1] // spr + 1]

    fmt = struct.Struct("<QQ")
    for ri, addr in roots:
        # with ``only``: the entries of the root that lie in it
        j0 = 0 if only is None else max(only[0] - ri * spr, 0)
        j1 = spr if only is None else min(only[1] - ri * spr + 1, spr)
        try:
            raw = bytes(j0 * size) + mem.read(addr + j0 * size, (j1 - j0) * size)
        except FaultError:
            table.findings.append(Finding(
                "unreadable", None,
                f"mem_section root {ri} at {addr:#x} could not be read: sections {ri * spr}-{ri * spr + spr - 1} unknown",
                vaddr=addr, section=ri * spr))
            continue
        for j in range(j0, j1):
            smm, usage = fmt.unpack_from(raw, j * size + 0)
            if layout.usage_offset != 8:
                (usage,) = struct.unpack_from("<Q", raw, j * size + layout.usage_offset)
            if not smm and not usage:
                continue
            nr = ri * spr + j
            table.sections[nr] = Section(nr, addr + j * size, smm & mask64, usage, layout)

    # every section's subsection map at once: early sections' usage lies side by side
    # (sparse_usage_init() allocates one node's in one block, mm/sparse.c)
    from inspect_vmemmap.bulkread import read_many

    want = [s for s in table.sections.values() if read_usage and s.usage and s.valid]
    maps = dict(zip((s.nr for s in want), read_many(mem, [(s.usage + layout.subsection_map_offset, 8) for s in want])))
    for s in table.sections.values():
        _check_flags(table, s)
        if read_usage and s.usage and s.valid:
            raw = maps[s.nr]
            if raw is not None:
                (s.subsection_map,) = struct.unpack("<Q", raw)
            else:
                if not s.early:
                    table.findings.append(Finding(
                        "unreadable", None,
                        f"section {s.nr}: usage at {s.usage:#x} could not be read; its subsection map is unknown",
                        section=s.nr, vaddr=s.usage))
    return table


def _read_roots(table: SectionTable, mem: Memory, base: int, nroots: int, spr: int,
                first: int = 0) -> List[Tuple[int, int]]:
    """The SPARSEMEM_EXTREME root pointers: in one read, or page by page when that fails
    (a truncated or filtered dump), so that the readable roots are still used; each run
    of unreadable pages becomes one ``unreadable`` finding naming its roots and sections.

    :param first: the first root to read (roots ``first`` to ``nroots - 1``).
    :return: ``[(root index, pointer)]`` of the roots that could be read.
    """
    try:
        return list(enumerate(struct.unpack(f"<{nroots - first}Q", mem.read(base + first * 8, (nroots - first) * 8)),
                              first))
    except FaultError:
        pass
    out: List[Tuple[int, int]] = []
    chunk = 512  # roots per 4 KiB, read at 4 KiB boundaries
    bad: List[List[int]] = []  # [first root, end root) runs that could not be read
    i = first
    while i < nroots:
        n = min(nroots - i, chunk - (((base + i * 8) & 4095) >> 3)) or chunk
        try:
            raw = mem.read(base + i * 8, n * 8)
        except FaultError:
            if bad and bad[-1][1] == i:
                bad[-1][1] = i + n
            else:
                bad.append([i, i + n])
        else:
            out.extend(zip(range(i, i + n), struct.unpack(f"<{n}Q", raw)))
        i += n
    for a, b in bad:
        table.findings.append(Finding(
            "unreadable", None,
            f"mem_section root pointers {a}-{b - 1} at {base + a * 8:#x}-{base + b * 8:#x} could not be read: "
            f"sections {a * spr}-{b * spr - 1} unknown", vaddr=base + a * 8, vaddr_end=base + b * 8, section=a * spr))
    return out


def _check_flags(table: SectionTable, s: Section) -> None:
    layout = table.layout
    start = s.start_pfn(layout)
    end = start + layout.pages_per_section - 1
    where = dict(section=s.nr, pfn_start=start, pfn_end=end, vaddr=s.addr)
    if s.unknown_flags:
        table.findings.append(Finding("section-flags", None,
                                      f"section {s.nr}: unknown flag bits {s.unknown_flags:#x} in section_mem_map {s.section_mem_map:#x}", **where))
    if s.valid and not s.present:
        table.findings.append(Finding("section-flags", None,
                                      f"section {s.nr}: has a mem_map but is not present (section_mem_map {s.section_mem_map:#x})", **where))
    # ZONE_DEVICE-tainted and online at once is not impossible: the taint marks the
    # sections device memory shares with other memory, online RAM among it
    # (mm/memory_hotplug.c section_taint_zone_device(), pfn_to_online_page()); the model
    # says which sections must carry it (model.predict()).
    if s.early and not s.valid and s.present:
        table.findings.append(Finding("section-flags", None,
                                      f"section {s.nr}: early but without a mem_map", **where))
    if not s.present and s.section_mem_map and not s.flags and not s.unknown_flags:
        table.findings.append(Finding("section-flags", None,
                                      f"section {s.nr}: section_mem_map {s.section_mem_map:#x} is set on a section that is not present", **where))
