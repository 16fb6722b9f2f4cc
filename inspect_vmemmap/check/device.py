"""Where the model says exactly which memory backs the vmemmap: the tails of ZONE_DEVICE
compound pages (model._compound_segments()) and altmap-backed vmemmap (memmap_on_memory
blocks, device memory with its memmap on the device; model._altmap_alloc()). Pages that
map what the model says are explained sharing; others are ``backing-misplaced``, and
their sharing is not reported again as ``alias``."""

from __future__ import annotations

from collections import defaultdict
from typing import Dict, List, Tuple

from inspect_vmemmap.check.observed import Explained, Observed
from inspect_vmemmap.findings import Finding
from inspect_vmemmap.intervals import coalesce
from inspect_vmemmap.model import DevicePrediction, Hosted
from inspect_vmemmap.vmemmap import size_label


def check_device(obs: Observed, explained: Explained) -> Tuple[List[Finding], dict, dict]:
    """:return: the findings; the ZONE_DEVICE compound pages whose tail vmemmap is
    deduplicated as the model says; the vmemmap backed by an altmap where the model says."""
    dedup = {"compound_pages": 0, "remapped_ptes": 0, "saved_bytes": 0}
    self_hosted = {"memory_blocks": 0, "device_maps": 0, "bytes": 0}
    if not obs.pred.device and not obs.pred.blocks:
        return [], dedup, self_hosted
    out = _compound_tails(obs, explained, dedup)
    for what, hosted_sets in (("memory_blocks", [b.hosted for b in obs.pred.blocks]),
                              ("device_maps", [d.hosted for d in obs.pred.device])):
        for hosted in hosted_sets:
            good, nbytes = _altmap_backed(obs, hosted, explained, out)
            if good and hosted:
                self_hosted[what] += 1
                self_hosted["bytes"] += nbytes
    return out, dedup, self_hosted


def _deduplicated(obs: Observed, d: DevicePrediction) -> bool:
    """Either era's layout is right (model.dax_dedup()): deduplicated if its tails map
    their target."""
    page = obs.layout.page_size
    by_va = obs.by_va
    for s, _, period, _ in d.segments[:64]:
        va = s + 2 * page if period else s
        t = d.target_of(va)
        if t is not None and va in by_va and t in by_va and by_va[va].phys == by_va[t].phys:
            return True
    return False


def _compound_tails(obs: Observed, explained: Explained, counts: Dict[str, int]) -> List[Finding]:
    """device-dax compound page dedup: every leaf in a dedup segment against its target."""
    lay = obs.layout
    page = lay.page_size
    shift = lay.page_shift
    by_va = obs.by_va
    # (va, page, phys found, phys wanted, head pfn, leaf size), one per misplaced page
    bad: List[tuple] = []
    for d in obs.pred.device:
        if d.dedup is False or not d.segments:
            continue
        if d.dedup is None and not _deduplicated(obs, d):
            continue
        matched: Dict[int, int] = defaultdict(int)
        for s, e, _, _ in d.segments:
            for leaf in obs.leaves_over(s, e):
                for va in range(max(leaf.vaddr, s), min(leaf.vaddr + leaf.size, e), page):
                    t = d.target_of(va)
                    if t is None:
                        continue  # a page of its own
                    phys = leaf.phys + (va - leaf.vaddr)
                    target = by_va.get(t)
                    want = target.phys if target is not None else None
                    if leaf.size == page and phys == want:
                        explained.aliases[want >> shift] += 1
                        matched[t] += 1
                    else:
                        explained.aliases[phys >> shift] += 1  # reported here, not again as an alias
                        bad.append((va, page, phys, want, lay.page_to_pfn(t - page), leaf.size))
        for t, n in matched.items():
            if n == d.tails(t):
                counts["compound_pages"] += 1
            counts["remapped_ptes"] += n
            counts["saved_bytes"] += n * page
    out: List[Finding] = []
    for va, n, phys, want, head, size in coalesce(bad, _same_compound_page):
        end = va + n
        sec, p0, p1 = obs.span(va, end)
        how = (f"maps phys {phys:#x}" if size == page else f"is mapped by a {size_label(size)} block (phys {phys:#x})")
        target = (f"the compound page's second vmemmap page, phys {want:#x}" if want is not None
                  else "the compound page's second vmemmap page, which is not mapped by a base page")
        out.append(Finding("backing-misplaced", None,
                           f"vmemmap {va:#x}-{end:#x} (struct pages of pfn {p0}-{p1}, tails of the ZONE_DEVICE "
                           f"compound page at pfn {head}) {how}; memremap_pages() maps them onto {target}",
                           section=sec, pfn_start=p0, pfn_end=p1, vaddr=va, vaddr_end=end, phys=phys))
    return out


def _same_compound_page(run, item) -> bool:
    """Misplaced tail pages join one finding while they are one compound page's (the same
    target and head), whatever their own backing."""
    return run[3] == item[3] and run[4] == item[4]


def _altmap_backed(obs: Observed, hosted: List[Hosted], explained: Explained, out: List[Finding]) -> Tuple[bool, int]:
    """Every leaf over altmap-backed vmemmap against the memory the altmap gives it.

    :return: whether all of it is where the kernel allocates it, and how many bytes.
    """
    shift = obs.layout.page_shift
    good = True
    nbytes = 0
    for h in hosted:
        for leaf in obs.leaves_over(h.start, h.end):
            va, size, phys = leaf.vaddr, leaf.size, leaf.phys
            if va + size <= h.start:
                continue
            if phys == h.phys + (va - h.start) and va >= h.start and va + size <= h.end:
                explained.placed.add(va)
                nbytes += size
                continue
            good = False
            for p in range(phys >> shift, (phys + size) >> shift):
                explained.aliases[p] += 1  # reported here, not again as an alias
            a, b = max(va, h.start), min(va + size, h.end)
            sec, p0, p1 = obs.span(a, b)
            out.append(Finding("backing-misplaced", None,
                               f"vmemmap {a:#x}-{b:#x} (struct pages of pfn {p0}-{p1}) is backed by phys "
                               f"{phys + (a - va):#x}; the kernel allocates it from {h.what}, phys "
                               f"{h.phys + (a - h.start):#x}", section=sec, pfn_start=p0, pfn_end=p1,
                               vaddr=a, vaddr_end=b, phys=phys + (a - va)))
    return good, nbytes
