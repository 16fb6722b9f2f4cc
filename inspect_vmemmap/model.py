"""The reference model: an executable statement of the kernel's sparsemem/vmemmap rules.

Pure Python, no drgn. From a plain, JSON-serialisable :class:`Inputs` (layout constants,
RAM ranges, nodes, HugeTLB folios, ZONE_DEVICE page maps, memmap_on_memory blocks) it
predicts what the kernel must have built: which sections are present with which flags,
which struct pages must be mapped, what may be mapped besides, on which node, how
HugeTLB vmemmap optimisation (HVO) and ZONE_DEVICE compound-page dedup reshaped it, and
which vmemmap an altmap backs (memmap_on_memory, device memory with its memmap on itself).

Each rule cites the kernel source it states; sources read are Debian's linux-source 6.1,
6.12 and 7.2.
"""

from __future__ import annotations

from bisect import bisect_right
from dataclasses import dataclass, field
from typing import Dict, FrozenSet, List, Optional, Tuple

from inspect_vmemmap.arch import for_layout
from inspect_vmemmap.layout import KernelLayout, flag_json_names

from inspect_vmemmap.facts import Altmap, DeviceMap, Folio, HostedBlock, Inputs
from inspect_vmemmap.intervals import Interval, merge, subtract


@dataclass
class SectionPrediction:
    nr: int
    early: bool
    online: bool
    #: pfn runs whose struct pages must be mapped (pfn_valid)
    valid: List[Interval]
    nid: Optional[int]
    #: SECTION_TAINT_ZONE_DEVICE: device memory starts or ends inside the section
    zone_device: bool = False
    #: the section holds device memory (ZONE_DEVICE), and RAM only if ``ram``
    device: bool = False
    ram: bool = True

    @property
    def flags(self) -> FrozenSet[str]:
        """The flags the section must have, by our names (layout.SECTION_FLAGS)."""
        return frozenset(["PRESENT", "HAS_MEM_MAP"] + ["ONLINE"] * self.online + ["EARLY"] * self.early
                         + ["ZONE_DEVICE"] * self.zone_device)

    def flag_names(self) -> List[str]:
        """:return: the flags by their JSON names, in the table's order (as Section's)."""
        return list(flag_json_names(self.flags))


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
    #: the tails are remapped writable: the architecture has no PAGE_KERNEL_RO of its own
    #: (Arch.hvo_tails_readonly)
    tails_writable: bool = False


@dataclass
class Hosted:
    """vmemmap ``[start, end)`` that an altmap backs: it must map physical memory from
    ``phys`` on, contiguously."""

    start: int
    end: int
    phys: int
    what: str


@dataclass
class DevicePrediction:
    """What memremap_pages() builds for one ZONE_DEVICE page map."""

    map: DeviceMap
    #: True: the tail vmemmap of its compound pages is deduplicated; False: every struct
    #: page has its own memory; None: either, the kernel's data cannot tell (dax_dedup())
    dedup: Optional[bool]
    why: str
    #: compound pages whose vmemmap the dedup builds (a head page and one tail page each)
    compound_pages: int = 0
    #: the dedup, one entry per populated chunk, in address order: ``(start, end, period,
    #: target)``. With a period: from ``start`` on, every ``period`` bytes of vmemmap are
    #: one compound page's: its first two pages its own, the others mapping the second's
    #: page. Without (0): every page in [start, end) maps the page that maps ``target``.
    #: PAGE_KERNEL, writable. Compact: one entry per section, not per compound page.
    segments: List[Tuple[int, int, int, int]] = field(default_factory=list)
    #: vmemmap allocated from the device's altmap
    hosted: List[Hosted] = field(default_factory=list)
    #: the vmemmap pages that map another's page (PTEs onto shared tail pages)
    shared_ptes: int = 0
    page_size: int = 4096

    def target_of(self, va: int) -> Optional[int]:
        """:return: the vaddr of the vmemmap page whose page ``va``'s must be; None for a
        page of its own (a head page, a compound's second page) or outside the dedup."""
        i = bisect_right(self._starts, va) - 1
        if i < 0:
            return None
        s, e, period, target = self.segments[i]
        if va >= e:
            return None
        if not period:
            return target
        off = (va - s) % period
        return None if off < 2 * self.page_size else va - off + self.page_size

    def tails(self, target: int) -> int:
        """:return: how many vmemmap pages must map ``target``'s page."""
        n = self._extra.get(target, 0)
        i = bisect_right(self._starts, target) - 1
        if i >= 0:
            s, e, period, _ = self.segments[i]
            head = target - self.page_size
            if period and head < e and (head - s) % period == 0:
                n += max(0, min(head + period, e) - (head + 2 * self.page_size)) // self.page_size
        return n

    def runs(self):
        """``(start, end, target)`` per compound page (merged over sections), for small
        layouts (tests): every page in [start, end) maps ``target``'s page."""
        cur = None
        for s, e, period, target in self.segments:
            if not period:
                if cur is not None and cur[1] == s and cur[2] == target:
                    cur = (cur[0], e, target)
                    continue
                if cur is not None:
                    yield cur
                cur = (s, e, target)
                continue
            for b in range(s, e, period):
                if cur is not None:
                    yield cur
                cur = (b + 2 * self.page_size, min(b + period, e), b + self.page_size)
                if cur[1] <= cur[0]:
                    cur = None
        if cur is not None:
            yield cur

    def _index(self) -> None:
        self.segments.sort()
        self._starts = [seg[0] for seg in self.segments]
        self._extra: Dict[int, int] = {}
        for s, e, period, target in self.segments:
            if not period:
                self._extra[target] = self._extra.get(target, 0) + (e - s) // self.page_size


@dataclass
class BlockPrediction:
    """A memmap_on_memory memory block: its vmemmap on its own first pages."""

    block: HostedBlock
    #: the vmemmap pages the kernel's rule reserves at the block's start (None: unknown)
    reserved_pages: Optional[int]
    #: the vmemmap pages the population takes from the altmap
    used_pages: int
    hosted: List[Hosted]


@dataclass
class Prediction:
    sections: Dict[int, SectionPrediction]
    #: virtual ranges that must be mapped (struct pages of valid pfns), merged
    required: List[Interval]
    #: virtual ranges that may be mapped (required, rounded to population granularity)
    allowed: List[Interval]
    hvo: List[HvoPrediction]
    device: List[DevicePrediction] = field(default_factory=list)
    blocks: List[BlockPrediction] = field(default_factory=list)

    @property
    def hosted(self) -> List[Hosted]:
        """Every altmap-backed vmemmap range (memmap_on_memory blocks, device altmaps)."""
        return sorted([h for b in self.blocks for h in b.hosted] + [h for d in self.device for h in d.hosted],
                      key=lambda h: h.start)

    def to_json(self) -> dict:
        return {
            "sections": [{"nr": s.nr, "flags": s.flag_names(), "valid_pfns": [list(v) for v in s.valid], "nid": s.nid}
                         for s in sorted(self.sections.values(), key=lambda s: s.nr)],
            "required": [[hex(a), hex(b)] for a, b in self.required],
            "allowed": [[hex(a), hex(b)] for a, b in self.allowed],
            "hvo": [{"head_pfn": h.folio.head_pfn, "order": h.folio.order, "vmemmap": hex(h.start),
                     "pages": h.pages, "readonly": 0 if h.tails_writable else h.pages - 1, "tails_map": h.tail_target} for h in self.hvo],
            "device": [{"ranges": [[hex(a), hex(b)] for a, b in d.map.ranges], "type": d.map.type,
                        "vmemmap_shift": d.map.vmemmap_shift, "altmap": d.map.altmap is not None,
                        "dedup": d.dedup, "why": d.why, "compound_pages": d.compound_pages,
                        "shared_ptes": d.shared_ptes,
                        "hosted": [[hex(h.start), hex(h.end), hex(h.phys)] for h in d.hosted]} for d in self.device],
            "memmap_on_memory": [{"start_pfn": b.block.start_pfn, "end_pfn": b.block.end_pfn,
                                  "reserved_pages": b.reserved_pages, "recorded_pages": b.block.recorded_pages,
                                  "used_pages": b.used_pages,
                                  "hosted": [[hex(h.start), hex(h.end), hex(h.phys)] for h in b.hosted]}
                                 for b in self.blocks],
        }




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


def _bounded(inp: Inputs) -> None:
    """Every loop below runs over the sections the RAM and device ranges touch: refuse
    inputs past the layout's own limits (MAX_PHYSMEM_BITS) or past limits.MAX_SECTIONS,
    whatever they say, instead of iterating up to 2^64."""
    from inspect_vmemmap.errors import AnalysisError
    from inspect_vmemmap.limits import MAX_SECTIONS, ram_sections

    lay = inp.layout
    top = 1 << lay.max_physmem_bits
    ranges = (list(inp.ram) + list(inp.boot_ram or ()) + list(inp.nomap)
              + [r for m in inp.device_maps or () for r in m.ranges])
    for a, b in ranges:
        if not 0 <= a <= b <= top:
            raise AnalysisError(f"model input: range {a:#x}-{b:#x} is outside the {lay.max_physmem_bits}-bit "
                                f"physical address space (MAX_PHYSMEM_BITS)")
    n = ram_sections(lay, ranges)
    if n > MAX_SECTIONS:
        raise AnalysisError(f"model input: RAM and device ranges span {n} sections, more than the model predicts "
                            f"({MAX_SECTIONS})")


def predict(inp: Inputs) -> Prediction:
    """Everything the kernel should have built for ``inp``.

    :return: a :class:`Prediction`.
    """
    lay = inp.layout
    _bounded(inp)
    shift = lay.page_shift
    pps = lay.pages_per_section
    sub = lay.pages_per_subsection
    sps = lay.struct_page_size
    # Rule: memblock.memory is RAM and, where the architecture keeps some out of its linear
    # map, nomap memory (arm64: mm/memblock.c memblock_mark_nomap(), from the EFI memory map
    # in drivers/firmware/efi/efi-init.c reserve_regions()); memblocks_present() walks it all
    def pfns(ranges) -> List[Interval]:  # every pfn a byte range touches
        return [(a >> shift, (b + (1 << shift) - 1) >> shift) for a, b in ranges]

    nomap = pfns(inp.nomap)
    ram_pfns = merge(pfns(inp.ram) + nomap)
    boot_pfns = ram_pfns if inp.boot_ram is None else merge(pfns(inp.boot_ram) + nomap)
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
    # Rule: ZONE_DEVICE memory is hot-added like RAM (mm/memremap.c pagemap_range():
    # arch_add_memory() or, for MEMORY_DEVICE_PRIVATE, add_pages(), both __add_pages() ->
    # sparse_add_section() per section, valid per subsection) but never onlined: no
    # online_pages(), so no SECTION_IS_ONLINE. move_pfn_range_to_zone() taints only the
    # sections where a range starts or ends off a section boundary, the ones it can share
    # with other memory, with SECTION_TAINT_ZONE_DEVICE (section_taint_zone_device() in
    # mm/memory_hotplug.c, read by pfn_to_online_page()); a section-aligned range's
    # sections carry no mark of ZONE_DEVICE at all.
    for dm in inp.device_maps or ():
        for ra, rb in dm.ranges:
            a, b = ra >> shift, (rb + (1 << shift) - 1) >> shift
            if b <= a:
                continue
            for nr in range(a // pps, (b - 1) // pps + 1):
                s0 = nr * pps
                lo, hi = max(a, s0), min(b, s0 + pps)
                sp = sections.get(nr)
                if sp is None:
                    sp = sections[nr] = SectionPrediction(nr, False, False, [], None, ram=False)
                sp.device = True
                sp.valid.append((lo // sub * sub, (hi + sub - 1) // sub * sub))
            if a % pps:
                sections[a // pps].zone_device = True
            if b % pps:
                sections[b // pps].zone_device = True
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
            sp.online = sp.ram and subtract([(s0, s0 + pps)], offline) == [(s0, s0 + pps)]
        sp.nid = _node_of(inp.nodes, s0, s0 + pps)

    required = merge([(lay.pfn_to_page(a), lay.pfn_to_page(b)) for sp in sections.values() for a, b in sp.valid])

    # Rule: population granularity (each architecture's vmemmap_populate(): its
    # Arch.vmemmap_block). Whole pages of struct pages are mapped, and a PMD block maps
    # the PMD around it.
    arch = for_layout(lay)
    section_bytes = pps * sps
    allowed = []
    for a, b in required:
        gran = arch.vmemmap_block(lay, b - a >= section_bytes)
        allowed.append((a // gran * gran, (b + gran - 1) // gran * gran))
    allowed = merge(allowed)

    # Rule: HVO (mm/hugetlb_vmemmap.c). An optimised folio keeps
    # HUGETLB_VMEMMAP_RESERVE_SIZE (one page) of its vmemmap; the PMD covering it is split
    # (vmemmap_split_pmd) and the other pages are remapped read-only
    # (vmemmap_remap_pte with PAGE_KERNEL_RO; writable where the architecture leaves
    # PAGE_KERNEL_RO to include/linux/pgtable.h's PAGE_KERNEL: Arch.hvo_tails_readonly)
    # onto the kept page (6.1 keeps the head's
    # original, 6.12 a copy: both are what PTE 0 maps), or, since 7.1, onto the zone's
    # shared zone->vmemmap_tails[] page. Only where the architecture has HVO
    # (hvo_supported): elsewhere a folio marked optimized is itself inconsistent.
    hvo = []
    for f in inp.folios:
        if not f.optimized:
            continue
        pages = ((1 << f.order) * sps) // lay.page_size
        target = ("shared" if inp.hvo_shared_tails else "head") if hvo_supported(lay) else "unsupported"
        hvo.append(HvoPrediction(f, lay.pfn_to_page(f.head_pfn), pages, target, not arch.hvo_tails_readonly))
    device = [predict_device(lay, dm) for dm in inp.device_maps or ()]
    blocks = [predict_block(inp, hb) for hb in inp.hosted_blocks or ()]
    return Prediction(sections, required, allowed, hvo, device, blocks)


def dax_dedup(lay: KernelLayout, vmemmap_shift: int, altmap: bool) -> Tuple[Optional[bool], str]:
    """Whether memremap_pages() deduplicates the tail vmemmap of a page map's compound
    pages, and why.

    Rule, 6.1 (mm/sparse-vmemmap.c __populate_section_memmap()): on every architecture,
    when ``is_power_of_2(sizeof(struct page)) && pgmap_vmemmap_nr(pgmap) > 1 && !altmap``.
    Rule, 6.12 and 7.2 (vmemmap_can_optimize(), include/linux/mm.h, from upstream's
    "mm/vmemmap/devdax: fix kernel crash when probing devdax devices"): only where the
    architecture selects ARCH_WANT_OPTIMIZE_DAX_VMEMMAP (arch/x86/Kconfig for X86_64;
    arm64 does not), with no altmap, a power-of-2 struct page and more than
    VMEMMAP_RESERVE_NR (2) vmemmap pages per compound page. Where the two rules disagree
    (arm64; x86_64 compound pages of 2..127 base pages, which device-dax's 4K/2M/1G
    alignments never make) nothing in the kernel's data tells the eras apart: None.

    :return: ``(True | False | None, reason)``.
    """
    if altmap:
        return False, "the memmap is on the device (altmap)"
    if not vmemmap_shift:
        return False, "no compound pages (vmemmap_shift 0)"
    sps = lay.struct_page_size
    if sps & (sps - 1):
        return False, f"sizeof(struct page) {sps} is not a power of 2"
    vmemmap_pages = ((1 << vmemmap_shift) * sps) // lay.page_size
    new = for_layout(lay).dax_vmemmap_optimize and vmemmap_pages > 2
    if new:
        return True, f"compound pages of {1 << vmemmap_shift} pages, {vmemmap_pages} vmemmap pages each"
    return None, (f"{lay.arch} compound pages of {1 << vmemmap_shift} pages: deduplicated before "
                  f"vmemmap_can_optimize() (6.1), not since (6.12, 7.2)")


def _add_chunks(lay: KernelLayout, a: int, b: int) -> List[Tuple[int, int]]:
    """``(pfn, nr_pages)`` of each sparse_add_section() call for pfns [a, b): __add_pages()
    (mm/memory_hotplug.c) goes section by section."""
    pps = lay.pages_per_section
    out = []
    while a < b:
        n = min(b - a, (a // pps + 1) * pps - a)
        out.append((a, n))
        a += n
    return out


def _compound_segments(lay: KernelLayout, a: int, b: int, shift: int,
                       segs: List[Tuple[int, int, int, int]]) -> Tuple[int, int]:
    """Rule: vmemmap_populate_compound_pages() (mm/sparse-vmemmap.c, the same in 6.1,
    6.12 and 7.2) for each section chunk of pfns [a, b) of one range: compound pages
    start at the range's start; for each, vmemmap page 0 (the head's) and page 1 get
    pages of their own and pages 2.. map page 1's page (PAGE_KERNEL, writable;
    Documentation/mm/vmemmap_dedup.rst "Device DAX": "Deduplicated tail pages are not
    mapped read-only"). A chunk that starts inside a compound page larger than a
    subsection (1G ones over 128M sections, reuse_compound_section()) maps all its pages
    onto what the vmemmap page before it maps (compound_section_tail_page()).

    Appends to ``segs`` (see DevicePrediction.segments).

    :return: ``(compound pages begun, vmemmap pages mapping another's page)``.
    """
    page = lay.page_size
    sps = lay.struct_page_size
    nr = 1 << shift
    heads = shared = 0
    for pfn, n in _add_chunks(lay, a, b):
        start, end = lay.pfn_to_page(pfn), lay.pfn_to_page(pfn + n)
        last = segs[-1] if segs else None
        if (pfn - a) % nr and nr > lay.pages_per_subsection:
            prev = start - page
            target = prev
            if last is not None and last[0] <= prev < last[1]:
                s, e, period, t = last
                if not period:
                    target = t
                elif (prev - s) % period >= 2 * page:
                    target = prev - (prev - s) % period + page
            shared += (end - start) // page
            if last is not None and last[1] == start and not last[2] and last[3] == target:
                segs[-1] = (last[0], end, 0, target)
            else:
                segs.append((start, end, 0, target))
            continue
        # the kernel steps by min(chunk, compound) and populates up to addr + size; ranges
        # are compound-aligned (device-dax sizes are multiples of its alignment), so that
        # stays within the chunk
        period = min(end - start, nr * sps)
        full, rest = divmod(end - start, period)
        heads += full + (1 if rest else 0)
        shared += full * max(0, period // page - 2) + max(0, rest // page - 2)
        if last is not None and last[1] == start and last[2] == period and (start - last[0]) % period == 0:
            segs[-1] = (last[0], end, period, 0)
        else:
            segs.append((start, end, period, 0))
    return heads, shared


def _altmap_alloc(lay: KernelLayout, chunks: List[Tuple[int, int]], altmap: Altmap, what: str) -> Tuple[List[Hosted], int]:
    """Rule: the vmemmap allocations a hot-add makes from an altmap (mm/sparse-vmemmap.c
    altmap_alloc_block_buf(): the next pfn after base_pfn + reserve + alloc + align,
    aligned to the allocation's lowest set bit, as long as ``free`` lasts; the same in
    6.1, 6.12 and 7.2), section chunk by section chunk in address order:

    each block as the architecture's vmemmap_populate() allocates it from an altmap
    (its Arch.altmap_block: x86_64 PMD blocks for whole sections and nothing for partial
    ones, arm64 PMD blocks with 4K pages and base pages otherwise).

    :return: the altmap-backed vmemmap ranges, and the pages allocated.
    """
    arch = for_layout(lay)
    shift = lay.page_shift
    alloc = align = 0
    out: List[Hosted] = []
    for pfn, n in chunks:
        start, end = lay.pfn_to_page(pfn), lay.pfn_to_page(pfn + n)
        block = arch.altmap_block(lay, end - start >= lay.pages_per_section * lay.struct_page_size)
        if block is None:
            continue  # this part's memmap comes from ordinary RAM
        addr = start // block * block
        blocks = (end - addr + block - 1) // block
        nr_pfns = block >> shift
        # the first allocation aligns (to nr_pfns' lowest set bit); the rest follow it
        nxt = altmap.base_pfn + altmap.reserve + alloc + align
        nr_align = -nxt % (nr_pfns & -nr_pfns)
        room = altmap.free - (alloc + align) if altmap.free > alloc + align else 0
        fits = min(blocks, (room - nr_align) // nr_pfns) if room >= nr_align else 0
        if fits:
            alloc += fits * nr_pfns
            align += nr_align
            phys = (nxt + nr_align) << shift
            if out and out[-1].end == addr and out[-1].phys + (out[-1].end - out[-1].start) == phys:
                out[-1].end = addr + fits * block
            else:
                out.append(Hosted(addr, addr + fits * block, phys, what))
        if fits < blocks:
            return out, alloc  # -ENOMEM: the hot-add fails here
    return out, alloc


def predict_device(lay: KernelLayout, dm: DeviceMap) -> DevicePrediction:
    """The vmemmap of one ZONE_DEVICE page map (see dax_dedup(), _compound_segments() and
    _altmap_alloc()). Rule: only the first range may have an altmap (mm/memremap.c
    pagemap_range() refuses an altmap with range_id > 0)."""
    shift = lay.page_shift
    dedup, why = dax_dedup(lay, dm.vmemmap_shift, dm.altmap is not None)
    pred = DevicePrediction(dm, dedup, why, page_size=lay.page_size)
    for i, (ra, rb) in enumerate(dm.ranges):
        a, b = ra >> shift, (rb + (1 << shift) - 1) >> shift
        if dedup is not False:
            heads, shared = _compound_segments(lay, a, b, dm.vmemmap_shift, pred.segments)
            pred.compound_pages += heads
            pred.shared_ptes += shared
        elif dm.altmap is not None and i == 0:
            hosted, _ = _altmap_alloc(lay, _add_chunks(lay, a, b), dm.altmap,
                                      f"the altmap of device memory {ra:#x}-{rb - 1:#x}")
            pred.hosted.extend(hosted)
    pred._index()
    return pred


def memmap_on_memory_pages(lay: KernelLayout, block_pages: int, mode: Optional[str],
                           pageblock_order: Optional[int]) -> Optional[int]:
    """Rule, 6.12 and 7.2 (mm/memory_hotplug.c memory_block_memmap_on_memory_pages()): a block
    reserves PFN_UP(its memmap's size), rounded up to whole pageblocks in "force" mode
    (pageblock_align()). None where the mode is unknown."""
    n = -(-block_pages * lay.struct_page_size // lay.page_size)
    if mode == "force":
        if pageblock_order is None:
            return None
        pb = 1 << pageblock_order
        n = -(-n // pb) * pb
    elif mode is None:
        return None
    return n


def predict_block(inp: Inputs, hb: HostedBlock) -> BlockPrediction:
    """Rule: a memory block hot-added with memmap_on_memory has its memmap allocated from
    its own first pages (mm/memory_hotplug.c; the altmap starts at the block, reserve 0):
    in 6.12 and 7.2 one altmap per block (upstream "mm/memory_hotplug: split
    memmap_on_memory requests across memblocks"), created by create_altmaps_and_memory_blocks() with
    ``free`` = memory_block_memmap_on_memory_pages(), which is what the block reserves;
    in 6.1 one altmap for the one-block hot-add (mhp_supports_memmap_on_memory(size)
    requires size == memory_block_size_bytes()) with the whole block free, and the block
    reserves what the population used (create_memory_block_devices(start, size,
    mhp_altmap.alloc, ...))."""
    lay = inp.layout
    b = hb
    hosted, used = _altmap_alloc(lay, _add_chunks(lay, b.start_pfn, b.end_pfn), b.altmap,
                                 f"memory block {b.start_pfn << lay.page_shift:#x}'s first pages (memmap_on_memory)")
    if b.altmap.free >= b.end_pfn - b.start_pfn:  # 6.1: the whole block free, the use reserved
        reserved: Optional[int] = used
    else:
        reserved = memmap_on_memory_pages(lay, b.end_pfn - b.start_pfn, inp.memmap_on_memory, inp.pageblock_order)
    return BlockPrediction(b, reserved, used, hosted)


def hvo_supported(lay: KernelLayout) -> bool:
    """Whether the kernel can have HugeTLB vmemmap optimisation.

    Rule: HUGETLB_PAGE_OPTIMIZE_VMEMMAP (fs/Kconfig) depends on the architecture selecting
    ARCH_WANT_HUGETLB_PAGE_OPTIMIZE_VMEMMAP (6.1) / ARCH_WANT_OPTIMIZE_HUGETLB_VMEMMAP
    (6.12, 7.2; mm/Kconfig): each architecture's Arch.hugetlb_vmemmap_optimize says.
    """
    return for_layout(lay).hugetlb_vmemmap_optimize


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
