"""The reference model: an executable statement of the kernel's sparsemem/vmemmap rules.

Pure Python, no drgn. From a plain, JSON-serialisable :class:`Inputs` (layout constants,
RAM ranges, nodes, HugeTLB folios) it predicts what the kernel must have built:
which sections are present with which flags, which struct pages must be mapped, what may
be mapped besides, on which node, and how HugeTLB vmemmap optimisation (HVO) reshaped it.

Each rule cites the kernel source it states; sources read are Debian's linux-source 6.1,
6.12 and 7.2.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Dict, List, Optional, Sequence, Tuple

from inspect_vmemmap.layout import KernelLayout

Interval = Tuple[int, int]  # [start, end)


@dataclass
class Folio:
    """One HugeTLB folio (mm/hugetlb.c hstate free and active lists)."""

    head_pfn: int
    order: int
    optimized: bool  # HPG_vmemmap_optimized in the head's (folio's) ->private
    nid: Optional[int] = None
    zone: Optional[int] = None


@dataclass
class Inputs:
    """What the model needs, from sources independent of what is checked."""

    layout: KernelLayout
    #: "System RAM" resources (kernel/resource.c), physical byte ranges, boot and hot-added
    ram: List[Interval]
    #: RAM the firmware reported at boot (x86: e820_table; else None: all RAM is boot RAM)
    boot_ram: Optional[List[Interval]] = None
    #: (nid, start_pfn, end_pfn) from pglist_data
    nodes: List[Tuple[int, int, int]] = field(default_factory=list)
    folios: List[Folio] = field(default_factory=list)
    #: 7.1+: HVO tails map a per-zone shared page (struct zone::vmemmap_tails)
    hvo_shared_tails: bool = False
    #: memory block pfn ranges that are offline (sysfs state), for SECTION_IS_ONLINE
    offline_blocks: List[Interval] = field(default_factory=list)
    #: (nid, start_pfn, end_pfn, zone index) of every populated zone span (struct zone)
    zones: List[Tuple[int, int, int, int]] = field(default_factory=list)
    #: page->flags layout: {"nodes_shift": NODES_PGSHIFT, "nodes_width": .., "zones_shift": .., "zones_width": ..}
    page_flags: Optional[Dict[str, int]] = None

    def to_json(self) -> dict:
        return {
            "layout": self.layout.to_json(),
            "ram": [[hex(a), hex(b)] for a, b in self.ram],
            "boot_ram": None if self.boot_ram is None else [[hex(a), hex(b)] for a, b in self.boot_ram],
            "nodes": [list(n) for n in self.nodes],
            "folios": [{"head_pfn": f.head_pfn, "order": f.order, "optimized": f.optimized, "nid": f.nid, "zone": f.zone}
                       for f in self.folios],
            "hvo_shared_tails": self.hvo_shared_tails,
            "offline_blocks": [list(b) for b in self.offline_blocks],
            "zones": [list(z) for z in self.zones],
            "page_flags": self.page_flags,
        }

    @classmethod
    def from_json(cls, d: dict) -> "Inputs":
        def rng(lst):
            return [(int(a, 0) if isinstance(a, str) else a, int(b, 0) if isinstance(b, str) else b) for a, b in lst]

        return cls(
            layout=KernelLayout.from_json(d["layout"]),
            ram=rng(d.get("ram", [])),
            boot_ram=None if d.get("boot_ram") is None else rng(d["boot_ram"]),
            nodes=[tuple(n) for n in d.get("nodes", [])],
            folios=[Folio(**f) for f in d.get("folios", [])],
            hvo_shared_tails=bool(d.get("hvo_shared_tails", False)),
            offline_blocks=[tuple(b) for b in d.get("offline_blocks", [])],
            zones=[tuple(z) for z in d.get("zones", [])],
            page_flags=d.get("page_flags"),
        )


@dataclass
class SectionPrediction:
    nr: int
    early: bool
    online: bool
    #: pfn runs whose struct pages must be mapped (pfn_valid)
    valid: List[Interval]
    nid: Optional[int]

    @property
    def flags(self) -> List[str]:
        f = ["present", "has_mem_map"]
        if self.online:
            f.append("online")
        if self.early:
            f.append("early")
        return f


@dataclass
class HvoPrediction:
    """The vmemmap of one optimised folio: ``pages`` vmemmap pages from ``start``; the
    first stays writable, the rest are read-only aliases of ``tail_target``."""

    folio: Folio
    start: int  # virtual address of the head's struct page
    pages: int
    #: "head": tails map the first vmemmap page (6.1, 6.12); "shared": a per-zone page (7.1+);
    #: "unsupported": the folio is marked optimized on a kernel without HVO (arm64)
    tail_target: str


@dataclass
class Prediction:
    sections: Dict[int, SectionPrediction]
    #: virtual ranges that must be mapped (struct pages of valid pfns), merged
    required: List[Interval]
    #: virtual ranges that may be mapped (required, rounded to population granularity)
    allowed: List[Interval]
    hvo: List[HvoPrediction]

    def to_json(self) -> dict:
        return {
            "sections": [{"nr": s.nr, "flags": s.flags, "valid_pfns": [list(v) for v in s.valid], "nid": s.nid}
                         for s in sorted(self.sections.values(), key=lambda s: s.nr)],
            "required": [[hex(a), hex(b)] for a, b in self.required],
            "allowed": [[hex(a), hex(b)] for a, b in self.allowed],
            "hvo": [{"head_pfn": h.folio.head_pfn, "order": h.folio.order, "vmemmap": hex(h.start),
                     "pages": h.pages, "readonly": h.pages - 1, "tails_map": h.tail_target} for h in self.hvo],
        }


def merge(intervals: Sequence[Interval]) -> List[Interval]:
    """Sort and merge overlapping or touching intervals."""
    out: List[List[int]] = []
    for a, b in sorted(i for i in intervals if i[1] > i[0]):
        if out and a <= out[-1][1]:
            out[-1][1] = max(out[-1][1], b)
        else:
            out.append([a, b])
    return [(a, b) for a, b in out]


def subtract(a: Sequence[Interval], b: Sequence[Interval]) -> List[Interval]:
    """``a`` minus ``b``; both merged and sorted."""
    out: List[Interval] = []
    j = 0
    for s, e in a:
        cur = s
        while j < len(b) and b[j][1] <= cur:
            j += 1
        k = j
        while k < len(b) and b[k][0] < e:
            if b[k][0] > cur:
                out.append((cur, b[k][0]))
            cur = max(cur, b[k][1])
            k += 1
        if cur < e:
            out.append((cur, e))
    return out


def _node_of(nodes, pfn_start: int, pfn_end: int) -> Optional[int]:
    """The node of a pfn range: of its first pfn, else of the first span it overlaps.
    Node spans can nest (a node's span grows over another's when memory is hot-added
    above it), so among the spans holding a pfn the innermost, latest-starting one wins."""
    inner = [(s, nid) for nid, s, e in nodes if s <= pfn_start < e]
    if inner:
        return max(inner)[1]
    for nid, s, e in nodes:
        if s < pfn_end and pfn_start < e:
            return nid
    return None


def predict(inp: Inputs) -> Prediction:
    """Everything the kernel should have built for ``inp``.

    :return: a :class:`Prediction`.
    """
    lay = inp.layout
    shift = lay.page_shift
    pps = lay.pages_per_section
    sub = lay.pages_per_subsection
    sps = lay.struct_page_size
    ram_pfns = merge([(a >> shift, (b + (1 << shift) - 1) >> shift) for a, b in inp.ram])
    boot_pfns = ram_pfns if inp.boot_ram is None else merge(
        [(a >> shift, (b + (1 << shift) - 1) >> shift) for a, b in inp.boot_ram])
    offline = merge(inp.offline_blocks)

    sections: Dict[int, SectionPrediction] = {}
    # Rule: a section is present if any memory overlaps it. Boot: mm/sparse.c
    # memblocks_present() -> memory_present() for every memblock.memory range. Hot-add:
    # mm/memory_hotplug.c __add_pages() -> sparse_add_section() -> section_mark_present().
    for a, b in ram_pfns:
        for nr in range(a // pps, (b - 1) // pps + 1):
            s0 = nr * pps
            lo, hi = max(a, s0), min(b, s0 + pps)
            sp = sections.get(nr)
            if sp is None:
                sp = sections[nr] = SectionPrediction(nr, False, True, [], None)
            # Rule: sections present at boot are SECTION_IS_EARLY (sparse_init_nid ->
            # sparse_init_one_section(..., SECTION_IS_EARLY)); hot-added ones are not
            # (sparse_add_section passes flags 0).
            if subtract([(lo, hi)], boot_pfns) != [(lo, hi)]:
                sp.early = True
            # Rule: hot-added memory is valid per subsection: section_activate() ->
            # subsection_mask_set() over [pfn, pfn + nr_pages), subsection-aligned.
            sp.valid.append((lo // sub * sub, (hi + sub - 1) // sub * sub))
    for sp in sections.values():
        s0 = sp.nr * pps
        if sp.early:
            # Rule: an early section's memmap covers the whole section: sparse_init_nid()
            # -> __populate_section_memmap(pfn, PAGES_PER_SECTION, ...), and pfn_valid()
            # is true throughout (early_section() in include/linux/mmzone.h).
            sp.valid = [(s0, s0 + pps)]
        else:
            sp.valid = merge(sp.valid)
            # Rule: SECTION_IS_ONLINE is set by online_mem_sections() when all of the
            # section's memory is onlined (mm/sparse.c), cleared by offline_mem_sections().
            sp.online = subtract([(s0, s0 + pps)], offline) == [(s0, s0 + pps)]
        sp.nid = _node_of(inp.nodes, s0, s0 + pps)

    required = merge([(lay.pfn_to_page(a), lay.pfn_to_page(b)) for sp in sections.values() for a, b in sp.valid])

    # Rule: population granularity. x86_64 vmemmap_populate() (arch/x86/mm/init_64.c)
    # uses vmemmap_populate_hugepages() (PMD blocks) for ranges of at least a section's
    # memmap, vmemmap_populate_basepages() (PAGE_SIZE) for sub-section ranges; either
    # way whole pages of struct pages are mapped, and a PMD block maps the PMD around it.
    # arm64 vmemmap_populate() (arch/arm64/mm/mmu.c) does the same with 4K pages only:
    # 6.1 its own PMD loop when ARM64_KERNEL_USES_PMD_MAPS (asm/kernel-pgtable.h: 4K
    # pages) and the range is a whole section's memmap, 6.12 and 7.2
    # vmemmap_populate_hugepages() when IS_ENABLED(CONFIG_ARM64_4K_PAGES) and the same
    # length test; 16K and 64K pages always get vmemmap_populate_basepages(), PAGE_SIZE
    # PTEs without the contiguous bit (its linear-map code notes "CONT blocks are not
    # supported in the vmemmap"). A PMD block is possible only with 4K pages on both.
    pmd = 1 << (lay.page_shift + lay.page_shift - 3) if lay.page_size == 4096 else lay.page_size
    page = lay.page_size
    section_bytes = pps * sps
    allowed = []
    for a, b in required:
        gran = pmd if b - a >= section_bytes else page
        allowed.append((a // gran * gran, (b + gran - 1) // gran * gran))
    allowed = merge(allowed)

    # Rule: HVO (mm/hugetlb_vmemmap.c). An optimised folio keeps
    # HUGETLB_VMEMMAP_RESERVE_SIZE (one page) of its vmemmap; the PMD covering it is split
    # (vmemmap_split_pmd) and the other pages are remapped read-only
    # (vmemmap_remap_pte with PAGE_KERNEL_RO) onto the kept page (6.1 keeps the head's
    # original, 6.12 a copy: both are what PTE 0 maps), or, since 7.1, onto the zone's
    # shared zone->vmemmap_tails[] page. Only where the architecture has HVO
    # (hvo_supported): elsewhere a folio marked optimized is itself inconsistent.
    hvo = []
    for f in inp.folios:
        if not f.optimized:
            continue
        pages = ((1 << f.order) * sps) // page
        target = ("shared" if inp.hvo_shared_tails else "head") if hvo_supported(lay) else "unsupported"
        hvo.append(HvoPrediction(f, lay.pfn_to_page(f.head_pfn), pages, target))
    return Prediction(sections, required, allowed, hvo)


def hvo_supported(lay: KernelLayout) -> bool:
    """Whether the kernel can have HugeTLB vmemmap optimisation (or DAX vmemmap dedup).

    Rule: HUGETLB_PAGE_OPTIMIZE_VMEMMAP (fs/Kconfig) depends on the architecture selecting
    ARCH_WANT_HUGETLB_PAGE_OPTIMIZE_VMEMMAP (6.1) / ARCH_WANT_OPTIMIZE_HUGETLB_VMEMMAP
    (6.12, 7.2; mm/Kconfig). arch/x86/Kconfig selects it for X86_64; arch/arm64/Kconfig
    selects neither in 6.1, 6.12 or 7.2 (nor ARCH_WANT_OPTIMIZE_DAX_VMEMMAP), and
    Debian's arm64 and arm64-16k configs have no CONFIG_HUGETLB_PAGE_OPTIMIZE_VMEMMAP: on
    arm64 ``hugetlb_free_vmemmap=on`` is an unknown parameter and every HugeTLB folio
    keeps its whole vmemmap.
    """
    return lay.arch != "aarch64"


def page_flags_layout(max_numnodes: int, max_nr_zones: int, word_bits: int = 64) -> Dict[str, int]:
    """Where page->flags keeps the node and zone (include/linux/page-flags-layout.h,
    include/linux/mmzone.h): from the top, | SECTION | NODE | ZONE | ...; SECTIONS_WIDTH
    is 0 with SPARSEMEM_VMEMMAP; NODES_WIDTH is NODES_SHIFT (log2 MAX_NUMNODES);
    ZONES_SHIFT is 0, 1, 2 or 3 for MAX_NR_ZONES < 2, <= 2, <= 4, <= 8.

    :return: {"nodes_shift", "nodes_width", "zones_shift", "zones_width"}.
    """
    nodes_width = max(max_numnodes - 1, 0).bit_length()
    zones_width = 0 if max_nr_zones < 2 else 1 if max_nr_zones <= 2 else 2 if max_nr_zones <= 4 else 3
    nodes_shift = word_bits - nodes_width
    return {"nodes_shift": nodes_shift, "nodes_width": nodes_width,
            "zones_shift": nodes_shift - zones_width, "zones_width": zones_width}
