"""HugeTLB vmemmap optimisation (HVO, mm/hugetlb_vmemmap.c): every folio the kernel marks
vmemmap-optimized against how the model says its vmemmap is remapped, and read-only
vmemmap that no such folio explains (``hvo-inconsistent``)."""

from __future__ import annotations

from collections import defaultdict
from typing import Dict, List, Optional, Set, Tuple

from inspect_vmemmap.check.observed import Explained, Observed
from inspect_vmemmap.facts import Assumption
from inspect_vmemmap.findings import Finding
from inspect_vmemmap.intervals import merge
from inspect_vmemmap.model import HvoPrediction, Prediction
from inspect_vmemmap.vmemmap import MappedLeaf


def check_hvo(obs: Observed, explained: Explained,
              hvo_unknown: Optional[Assumption] = None) -> Tuple[List[Finding], dict]:
    """:param hvo_unknown: why the HugeTLB pools could not be read (a filtered dump left
        them out): read-only leaves no folio explains are then ``unreadable``, not
        ``hvo-inconsistent``.
    :return: the findings, and the counts of folios remapped as the model says."""
    page = obs.layout.page_size
    counts = {"optimized_folios": 0, "remapped_ptes": 0, "freed_bytes": 0}
    out: List[Finding] = []
    explained_ro: Set[int] = set()  # vaddrs of read-only leaves the model explains
    # a zone's shared tail page, once set, stays (7.2 mm/hugetlb_vmemmap.c
    # vmemmap_get_tail(): cmpxchg from NULL into zone->vmemmap_tails[]): one an earlier
    # check found stands for the majority a ranged re-check sees too few folios for
    shared_tail = {**_shared_tails(obs.pred, obs.by_va, page), **obs.known_tails}
    obs.shared_tails = shared_tail
    for h in obs.pred.hvo:
        finding = _check_folio(obs, h, shared_tail, explained_ro, explained)
        if finding is not None:
            out.append(finding)
        else:
            counts["optimized_folios"] += 1
            counts["remapped_ptes"] += h.pages - 1
            counts["freed_bytes"] += (h.pages - 1) * page
    out.extend(_unexplained_readonly(obs, explained_ro, explained, hvo_unknown))
    return out, counts


def _check_folio(obs: Observed, h: HvoPrediction, shared_tail: Dict[tuple, int], explained_ro: Set[int],
                 explained: Explained) -> Optional[Finding]:
    """:return: what is wrong with one optimized-marked folio's vmemmap, or None."""
    lay = obs.layout
    page = lay.page_size
    f = h.folio
    h_end = h.start + h.pages * page
    where = dict(section=obs.section_of(h.start), pfn_start=f.head_pfn, pfn_end=f.head_pfn + (1 << f.order) - 1,
                 vaddr=h.start, vaddr_end=h_end)
    folio = f"HugeTLB folio at pfn {f.head_pfn} (order {f.order}) is marked vmemmap-optimized"
    hidden = [(a, b) for a, b in obs.unknown if a < h_end and h.start < b]
    if hidden:
        # the tables that map its vmemmap could not be read: nothing to compare
        explained_ro.update(h.start + k * page for k in range(h.pages))
        return Finding("unreadable", None, f"{folio}; whether its vmemmap is remapped is unknown: the page table "
                                           f"mapping {hidden[0][0]:#x}-{hidden[0][1]:#x} could not be read", **where)
    if h.tail_target == "unsupported":
        # model.hvo_supported(): this kernel cannot optimize; the mark is corrupt
        return Finding("hvo-inconsistent", None,
                       f"{folio}, but {lay.arch} kernels have no HugeTLB vmemmap optimisation", **where)
    by_va = obs.by_va
    bad: List[str] = []
    rw_tails: List[int] = []  # tails still writable
    odd = False  # a tail neither writable nor read-only onto its target
    head = by_va.get(h.start)
    if head is None:
        bad.append("its first vmemmap page is not mapped by a base page (PMD not split)")
    elif not head.writable:
        bad.append("its first vmemmap page is read-only")
    for k in range(1, h.pages):
        va = h.start + k * page
        leaf = by_va.get(va)
        if leaf is None:
            bad.append(f"vmemmap page {k} is not mapped by a base page")
            odd = True
            continue
        if not leaf.writable:
            explained_ro.add(va)  # part of this folio: reported here if wrong, not twice
        if h.tails_writable:
            # PAGE_KERNEL_RO is PAGE_KERNEL on this architecture (model.HvoPrediction): a
            # tail's protection says nothing of the remap, only what it maps does
            if not leaf.writable:
                bad.append(f"vmemmap page {k} is read-only, where this architecture remaps tails writable")
        elif leaf.writable:
            rw_tails.append(k)
            bad.append(f"vmemmap page {k} is writable")
        if h.tail_target == "head":
            want = head.phys if head is not None else None
            what = "the kept page"
        else:
            want = shared_tail.get((f.nid, f.zone, f.order))
            what = "the zone's shared tail page"
            if head is not None and leaf.phys == head.phys:
                want = None
        if want is not None and leaf.phys == want:
            explained.aliases[leaf.phys >> lay.page_shift] += 1
            odd = odd or (leaf.writable and not h.tails_writable)  # writable onto the target: no step of a remap does that
        else:
            bad.append(f"vmemmap page {k} maps {leaf.phys:#x}, not {what}" + (f" {want:#x}" if want is not None else ""))
            odd = odd or not leaf.writable
    if not bad:
        return None
    any_base = any(by_va.get(h.start + k * page) is not None for k in range(1, h.pages))
    note = _hvo_transient(h.pages, head, rw_tails, odd, any_base)
    return Finding("hvo-inconsistent", None,
                   f"{folio} but " + "; ".join(bad[:3]) + (f" (and {len(bad) - 3} more)" if len(bad) > 3 else "") + note,
                   **where, **({"transient": True} if note else {}))


def _unexplained_readonly(obs: Observed, explained_ro: Set[int], explained: Explained,
                          hvo_unknown: Optional[Assumption]) -> List[Finding]:
    """Read-only leaves no optimised folio explains, one finding per run."""
    ro = [leaf for leaf in obs.leaves if not leaf.writable and leaf.vaddr not in explained_ro]
    if hvo_unknown:  # their sharing is as unknown as their folio: no alias finding either
        for leaf in ro:
            explained.aliases[leaf.phys >> obs.layout.page_shift] += 1
    out: List[Finding] = []
    for a, b in merge((leaf.vaddr, leaf.vaddr + leaf.size) for leaf in ro):
        sec, p0, p1 = obs.span(a, b)
        where = dict(section=sec, pfn_start=p0, pfn_end=p1, vaddr=a, vaddr_end=b)
        if hvo_unknown:
            out.append(Finding("unreadable", None,
                               f"{a:#x}-{b:#x} (struct pages of pfn {p0}-{p1}) is mapped read-only; whether a "
                               f"vmemmap-optimized HugeTLB folio explains it is unknown: {hvo_unknown}", **where,
                               **({"excluded_by": hvo_unknown.excluded_by} if hvo_unknown.excluded_by else {})))
        else:
            out.append(Finding("hvo-inconsistent", None,
                               f"{a:#x}-{b:#x} (struct pages of pfn {p0}-{p1}) is mapped read-only but no "
                               f"vmemmap-optimized HugeTLB folio is there", **where))
    return out


def _hvo_transient(pages: int, head: Optional[MappedLeaf], rw_tails: List[int], odd: bool, any_base: bool) -> str:
    """Whether an optimized-marked folio's vmemmap is half remapped the way
    mm/hugetlb_vmemmap.c leaves it between steps: the flag is set before
    vmemmap_remap_free() splits the PMD and remaps the tails in address order onto the
    kept page, and cleared only after vmemmap_remap_alloc() has given every tail its own
    writable page again (also in address order). So a PMD not split yet, or a split PMD
    whose writable tails are a prefix or a suffix of the tails (the rest read-only onto
    their target), is a remap in progress; anything else is not."""
    if head is None and not any_base:
        return (" (transient: the remap had not started: kernels with 'set hugetlb page flag before optimizing "
                "vmemmap' set the flag before vmemmap_remap_free() splits the PMD)")
    if head is None or not head.writable or odd or not rw_tails:
        return ""
    n = len(rw_tails)
    prefix = rw_tails == list(range(1, n + 1))
    suffix = rw_tails == list(range(pages - n, pages))
    if not (prefix or suffix):
        return ""
    if n == pages - 1:
        return (" (transient: PMD split but every tail still writable: a remap in progress, "
                "started by vmemmap_remap_free() or finished by vmemmap_remap_alloc() before the flag is cleared)")
    return f" (transient: {pages - 1 - n} of {pages - 1} tails remapped: a remap in progress)"


def _shared_tails(pred: Prediction, by_va: Dict[int, MappedLeaf], page_size: int) -> Dict[tuple, int]:
    """7.1+ HVO: the page most tails of each (node, zone, order) map, by majority, so
    that one damaged folio is blamed on itself and not on its healthy neighbours."""
    votes: Dict[tuple, Dict[int, int]] = defaultdict(lambda: defaultdict(int))
    for h in pred.hvo:
        if h.tail_target != "shared":
            continue
        key = (h.folio.nid, h.folio.zone, h.folio.order)
        for k in range(1, h.pages):
            leaf = by_va.get(h.start + k * page_size)
            if leaf is not None:
                votes[key][leaf.phys] += 1
    return {key: max(v.items(), key=lambda kv: kv[1])[0] for key, v in votes.items()}
