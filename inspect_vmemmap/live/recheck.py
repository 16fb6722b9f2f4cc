"""A re-check of exactly what a change touched: its sections, the vmemmap page tables over
their struct pages, and the model's prediction for them.

``watch`` re-checks every change once it has returned. Reading the whole kernel for each
one (``check``: every section, every page table, a sample of every online section's struct
pages, the buddy allocator for every leaf) takes seconds under emulation, so changes would
pile up. :func:`check_window` reads instead only the mem_section entries of the sections
the change touched (their root pointers and entries), walks only the page tables that map
those sections' struct pages, and compares them with the part of the model's prediction
that is about them; :func:`read_window` does that on a running kernel.

The model's inputs are re-read for each re-check (they are what changed): the HugeTLB
pools, memory blocks, node and zone spans, ZONE_DEVICE page maps. The kernel keeps those in
lists and xarrays with no index by pfn (hstate free and active lists, ``memory_blocks``,
``pgmap_array``), so they are read whole; their cost grows with the number of folios and
blocks, not with memory. The prediction is computed for everything and then cut to the
window (:func:`restrict_prediction`).

The window grows until the model's objects in it are whole (:func:`widen`): a HugeTLB
folio (a 1G folio's vmemmap spans 8 sections), a ZONE_DEVICE page map (its compound
pages' tails map pages of earlier sections: mm/sparse-vmemmap.c
compound_section_tail_page()), a memmap_on_memory block (its altmap allocations run on
from section to section), and every page-table leaf that maps part of it (a 1G leaf).

What it gives equals what the whole ``check`` gives in the window (:func:`restrict`:
findings that touch the window's pfns or struct pages, their ``pfn_start``/``pfn_end``,
``vaddr``/``vaddr_end`` and ``section`` cut to it; ``message`` and ``phys`` stay the run's),
tests/unit/test_recheck.py proves it on simulated kernels. One thing it cannot see: an
``alias`` whose other mapping lies outside the window (the page tables there are not
walked); the periodic full check (``watch --interval``) sees those. On 7.1+ HVO the zone's
shared tail page is told by majority over the folios a check sees; the window's few
folios take the page an earlier full check found (it never changes once set:
``known_tails``, see check.hvo).
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Sequence, Tuple

from inspect_vmemmap.analysis import load_sections, paging_format
from inspect_vmemmap.findings import Finding
from inspect_vmemmap.intervals import merge
from inspect_vmemmap.memory import PhysRanges
from inspect_vmemmap.model import Prediction, predict
from inspect_vmemmap.sections import SectionTable
from inspect_vmemmap.vmemmap import MappedLeaf, NodeMap, map_vmemmap

#: a window: (first section, last section), both included
Window = Tuple[int, int]


def window_of(lay, pfns: Tuple[int, int]) -> Window:
    """The sections of a pfn range (first, last pfn)."""
    return pfns[0] >> lay.pfn_section_shift, pfns[1] >> lay.pfn_section_shift


def window_pfns(lay, w: Window) -> Tuple[int, int]:
    """:return: the window's first and last pfn."""
    return w[0] << lay.pfn_section_shift, ((w[1] + 1) << lay.pfn_section_shift) - 1


def window_vaddrs(lay, w: Window) -> Tuple[int, int]:
    """:return: ``[start, end)`` of the window's struct pages."""
    a, b = window_pfns(lay, w)
    return lay.pfn_to_page(a), lay.pfn_to_page(b + 1)


def _pfn_window(lay, a: int, b: int) -> Window:
    """Sections of pfns ``[a, b)``."""
    return a >> lay.pfn_section_shift, (max(a, b - 1)) >> lay.pfn_section_shift


def _objects(pred: Prediction, lay) -> List[Window]:
    """The sections of each object of the prediction that a window must hold whole."""
    shift = lay.page_shift
    out = [_pfn_window(lay, h.folio.head_pfn, h.folio.head_pfn + (1 << h.folio.order)) for h in pred.hvo]
    for d in pred.device:
        ranges = [(a >> shift, (b + (1 << shift) - 1) >> shift) for a, b in d.map.ranges if b > a]
        if ranges:
            out.append((min(a for a, _ in ranges) >> lay.pfn_section_shift,
                        (max(b for _, b in ranges) - 1) >> lay.pfn_section_shift))
    for b in pred.blocks:
        out.append(_pfn_window(lay, b.block.start_pfn, b.block.end_pfn))
    return out


def widen(pred: Prediction, lay, w: Window) -> Window:
    """The window grown until every HugeTLB folio, ZONE_DEVICE page map and
    memmap_on_memory block of the prediction that overlaps it lies in it whole."""
    objs = _objects(pred, lay)
    s0, s1 = w
    grown = True
    while grown:
        grown = False
        for a, b in objs:
            if a <= s1 and b >= s0 and (a < s0 or b > s1):
                s0, s1 = min(s0, a), max(s1, b)
                grown = True
    return s0, s1


def restrict_prediction(pred: Prediction, lay, w: Window) -> Prediction:
    """The part of ``pred`` about the window's sections: their section predictions, the
    vmemmap that must and may be mapped over their struct pages, the folios, page maps and
    memmap_on_memory blocks in them (whole: see :func:`widen`)."""
    va0, va1 = window_vaddrs(lay, w)

    def cut(iv):
        return [(max(a, va0), min(b, va1)) for a, b in iv if a < va1 and b > va0]

    shift = lay.page_shift
    p0, p1 = window_pfns(lay, w)

    def inside(a: int, b: int) -> bool:  # pfns [a, b)
        return a <= p1 and b > p0

    return Prediction(
        sections={nr: sp for nr, sp in pred.sections.items() if w[0] <= nr <= w[1]},
        required=cut(pred.required), allowed=cut(pred.allowed),
        hvo=[h for h in pred.hvo if inside(h.folio.head_pfn, h.folio.head_pfn + (1 << h.folio.order))],
        device=[d for d in pred.device if any(inside(a >> shift, b >> shift) for a, b in d.map.ranges)],
        blocks=[b for b in pred.blocks if inside(b.block.start_pfn, b.block.end_pfn)])


def _in_vmemmap(lay, va: int) -> bool:
    return lay.vmemmap_start <= va < lay.vmemmap_end


def restrict(findings: Sequence[Finding], lay, w: Window) -> List[Finding]:
    """Findings about the window: those whose pfns or struct pages (vmemmap addresses)
    overlap it, with their place cut to it, and those about no place at all (they say
    something of the whole kernel: mem_section NULL, no RAM known). The same for a full
    check and a ranged one."""
    p0, p1 = window_pfns(lay, w)
    va0, va1 = window_vaddrs(lay, w)
    out = []
    for f in findings:
        kw = {}
        if f.pfn_start is not None:
            b = f.pfn_end if f.pfn_end is not None else f.pfn_start
            if f.pfn_start > p1 or b < p0:
                continue
            kw["pfn_start"] = max(f.pfn_start, p0)
            if f.pfn_end is not None:
                kw["pfn_end"] = min(f.pfn_end, p1)
            kw["section"] = kw["pfn_start"] >> lay.pfn_section_shift
        elif f.vaddr is not None and _in_vmemmap(lay, f.vaddr):
            end = f.vaddr_end if f.vaddr_end is not None else f.vaddr + 1
            if f.vaddr >= va1 or end <= va0:
                continue
        elif f.section is not None:
            if not w[0] <= f.section <= w[1]:
                continue
        elif f.vaddr is not None:
            continue  # about a place outside the vmemmap that names no section: not the window's
        if f.vaddr is not None and _in_vmemmap(lay, f.vaddr):
            kw["vaddr"] = max(f.vaddr, va0)
            if f.vaddr_end is not None:
                kw["vaddr_end"] = min(f.vaddr_end, va1)
        if not kw:
            out.append(f)
            continue
        where = {k: getattr(f, k) for k in ("section", "pfn_start", "pfn_end", "vaddr", "vaddr_end", "phys")}
        where.update(kw)
        out.append(Finding(f.kind, f.severity, f.message, **where, **f.extra))
    return out


@dataclass
class WindowCheck:
    """What a ranged re-check read and found."""

    window: Window
    findings: List[Finding]
    sections: SectionTable
    leaves: List[MappedLeaf]
    shared_tails: Dict[tuple, int] = field(default_factory=dict)
    walks: int = 1


def check_window(mem, lay, inputs, nodes: NodeMap, w: Window, ram: Optional[PhysRanges] = None,
                 backing_free=None, hvo_unknown=None, known_tails: Optional[dict] = None,
                 pred: Optional[Prediction] = None) -> WindowCheck:
    """``check`` over the sections of ``w`` alone (widened, see :func:`widen`): their
    mem_section entries, the page tables over their struct pages, the model's prediction
    cut to them, the struct pages' node and zone sampled as ``check`` does.

    :param ram: physical RAM (table pages must lie below its end, as load_map); None: any.
    :return: a :class:`WindowCheck` whose findings are :func:`restrict`-ed to the window.
    """
    from inspect_vmemmap.check import run_check

    pred = predict(inputs) if pred is None else pred
    w = widen(pred, lay, w)
    fmt = paging_format(lay)
    phys_ok = None
    if ram:
        top = ram.end
        phys_ok = lambda p: p < top  # noqa: E731 (as analysis.load_map)
    walks = 0
    while True:
        walks += 1
        sections = load_sections(mem, lay, nodes, only=w)
        va0, va1 = window_vaddrs(lay, w)
        leaves: List[MappedLeaf] = []
        vm = map_vmemmap(mem, fmt, lay, sections, nodes, phys_ok, va0, va1,
                         on_leaf=lambda l: leaves.append(MappedLeaf.of(l)))
        # a leaf that maps struct pages outside the window too (a 1G leaf): the window
        # takes its sections, so that what is said of the leaf is said of all of it
        lo = min([l.vaddr for l in leaves] + [va0])
        hi = max([l.vaddr + l.size for l in leaves] + [va1])
        if (lo, hi) == (va0, va1) or walks == 3:
            break
        w = widen(pred, lay, (min(w[0], lay.page_to_pfn(lo) >> lay.pfn_section_shift),
                              max(w[1], lay.page_to_pfn(hi - 1) >> lay.pfn_section_shift)))
    res = run_check(inputs, sections, leaves, backing_free, mem, unknown=vm.unknown(), hvo_unknown=hvo_unknown,
                    prediction=restrict_prediction(pred, lay, w), known_tails=known_tails)
    found = restrict(list(sections.findings) + vm.findings + res.findings, lay, w)
    return WindowCheck(w, found, sections, leaves, res.shared_tails, walks)


# --- on a running kernel ---------------------------------------------------------------


@dataclass
class WindowRead:
    """One ranged read of a running kernel (as live.watch.Read)."""

    window: Window
    findings: List[Finding]
    inputs: object
    sections: SectionTable
    nodes: NodeMap
    shared_tails: Dict[tuple, int]
    start_ns: int
    end_ns: int
    seconds: float


def read_window(target, w: Window, known_tails: Optional[dict] = None) -> WindowRead:
    """:func:`check_window` on a target: its model inputs read afresh (a new Reading)."""
    from inspect_vmemmap.source import gather
    from inspect_vmemmap.source.gather import Reading

    t0, w0 = time.monotonic_ns(), time.monotonic()
    reading = Reading(target)
    nodes = NodeMap(reading.node_spans())
    notes: list = []
    inputs = gather.gather_inputs(reading, notes)
    # as Analysis.check: pools that could not be read leave read-only leaves unknown
    hvo_unknown = next((n for n in notes if n.input in ("hugetlb_pools", "types")), None)
    wc = check_window(target.memory, target.layout, inputs, nodes, w, reading.ram(), gather.buddy_checker(target),
                      hvo_unknown, known_tails)
    return WindowRead(wc.window, wc.findings, inputs, wc.sections, nodes, wc.shared_tails, t0, time.monotonic_ns(),
                      time.monotonic() - w0)


def merge_windows(windows: Sequence[Window]) -> List[Window]:
    """Overlapping or adjacent windows as one."""
    return [(a, b - 1) for a, b in merge((a, b + 1) for a, b in windows)]
