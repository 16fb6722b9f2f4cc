"""``check``: compare what the kernel built (sections, page-table leaves) with what the
reference model predicts, and check what backs the vmemmap. No drgn here."""

from __future__ import annotations

from bisect import bisect_right
from collections import defaultdict
from typing import Callable, Dict, Iterable, List, Optional, Sequence, Tuple

from inspect_vmemmap.findings import Finding
from inspect_vmemmap.layout import KernelLayout
from inspect_vmemmap.memory import PhysRanges
from inspect_vmemmap.model import Inputs, Prediction, merge, predict, subtract
from inspect_vmemmap.sections import SectionTable
from inspect_vmemmap.vmemmap import NodeMap, size_label

#: (vaddr, size, phys, writable) of one vmemmap leaf
LeafTuple = Tuple[int, int, int, bool]


class CheckResult:
    def __init__(self) -> None:
        self.findings: List[Finding] = []
        self.hvo = {"optimized_folios": 0, "remapped_ptes": 0, "freed_bytes": 0}
        self.prediction: Optional[Prediction] = None
        self.fallback_pmds = 0  # whole-section memmap mapped by base pages (allowed)


def _pfn_span(lay: KernelLayout, a: int, b: int) -> Tuple[int, int, int]:
    """:return: (section, first pfn, last pfn) of the struct pages in virtual [a, b)."""
    p0 = lay.page_to_pfn(a)
    p1 = lay.page_to_pfn(b - 1)
    return p0 >> lay.pfn_section_shift, p0, p1


def run_check(inputs: Inputs, sections: SectionTable, leaves: Sequence[LeafTuple],
              backing_free: Optional[Callable[[int], bool]] = None) -> CheckResult:
    """Compare sections and leaves with the model's prediction for ``inputs``.

    :param leaves: every vmemmap leaf, in address order.
    :param backing_free: returns whether a physical pfn is free in the buddy allocator
        (None: that check is skipped).
    :return: a :class:`CheckResult` with findings merged per range.
    """
    lay = inputs.layout
    res = CheckResult()
    pred = res.prediction = predict(inputs)
    nodes = NodeMap(inputs.nodes)
    ram = PhysRanges(inputs.ram)
    out = res.findings
    shift = lay.page_shift

    # -- sections ------------------------------------------------------------------
    for nr, sp in sorted(pred.sections.items()):
        s = sections.get(nr)
        start = nr << lay.pfn_section_shift
        where = dict(section=nr, pfn_start=start, pfn_end=start + lay.pages_per_section - 1)
        if s is None or not s.present:
            out.append(Finding("section-flags", "error",
                               f"section {nr} holds RAM (pfn {max(start, sp.valid[0][0])}-{sp.valid[-1][1] - 1}) but is not present", **where))
            continue
        have = set(s.flag_names()) - {"zone_device", "vmemmap_preinit"}
        want = set(sp.flags)
        if have != want:
            out.append(Finding("section-flags", "error",
                               f"section {nr}: flags {s.letters() or '-'} where the model expects "
                               f"{'+'.join(sorted(want))} ({'boot memory' if sp.early else 'hot-added memory'})", **where))
    for s in sections:
        if s.present and s.nr not in pred.sections and "ZONE_DEVICE" not in s.flags:
            start = s.start_pfn(lay)
            out.append(Finding("section-flags", "error", f"section {s.nr} is present but no RAM lies in it",
                               section=s.nr, pfn_start=start, pfn_end=start + lay.pages_per_section - 1))

    # -- what is mapped against what must be ----------------------------------------
    mapped = merge([(va, va + size) for va, size, _, _ in leaves])
    for a, b in subtract(pred.required, mapped):
        sec, p0, p1 = _pfn_span(lay, a, b)
        out.append(Finding("memmap-unmapped", "error",
                           f"struct pages of pfn {p0}-{p1} (section {sec}) at {a:#x}-{b:#x} are not mapped",
                           section=sec, pfn_start=p0, pfn_end=p1, vaddr=a, vaddr_end=b))
    for a, b in subtract(mapped, pred.allowed):
        sec, p0, p1 = _pfn_span(lay, a, b)
        out.append(Finding("stray-mapping", "warning",
                           f"{a:#x}-{b:#x} ({size_label(b - a)}) is mapped but holds struct pages of pfn {p0}-{p1}, "
                           f"which no section needs", section=sec, pfn_start=p0, pfn_end=p1, vaddr=a, vaddr_end=b))

    # -- HVO --------------------------------------------------------------------------
    by_va: Dict[int, LeafTuple] = {va: l for l in leaves for va in [l[0]] if l[1] == lay.page_size}
    explained_ro = set()  # vaddrs of read-only leaves the model explains
    alias_ok: Dict[int, int] = defaultdict(int)  # phys page -> extra mappings explained
    shared_tail: Dict[Tuple[Optional[int], Optional[int], int], int] = {}
    for h in pred.hvo:
        f = h.folio
        bad = []
        head = by_va.get(h.start)
        if head is None:
            bad.append("its first vmemmap page is not mapped by a base page (PMD not split)")
        elif not head[3]:
            bad.append("its first vmemmap page is read-only")
        for k in range(1, h.pages):
            va = h.start + k * lay.page_size
            l = by_va.get(va)
            if l is None:
                bad.append(f"vmemmap page {k} is not mapped by a base page")
                continue
            if not l[3]:
                explained_ro.add(va)  # part of this folio: reported here if wrong, not twice
            else:
                bad.append(f"vmemmap page {k} is writable")
            if h.tail_target == "head":
                want = head[2] if head is not None else None
                what = "the kept page"
            else:
                want = shared_tail.setdefault((f.nid, f.zone, f.order), l[2])
                what = "the zone's shared tail page"
                if head is not None and l[2] == head[2]:
                    want = None
            if want is not None and l[2] == want:
                alias_ok[l[2] >> shift] += 1
            else:
                bad.append(f"vmemmap page {k} maps {l[2]:#x}, not {what}" + (f" {want:#x}" if want is not None else ""))
        sec, p0, _ = _pfn_span(lay, h.start, h.start + 1)
        if bad:
            out.append(Finding("hvo-inconsistent", "error",
                               f"HugeTLB folio at pfn {f.head_pfn} (order {f.order}) is marked vmemmap-optimized but "
                               + "; ".join(bad[:3]) + (f" (and {len(bad) - 3} more)" if len(bad) > 3 else ""), section=sec, pfn_start=f.head_pfn, pfn_end=f.head_pfn + (1 << f.order) - 1,
                               vaddr=h.start, vaddr_end=h.start + h.pages * lay.page_size))
        else:
            res.hvo["optimized_folios"] += 1
            res.hvo["remapped_ptes"] += h.pages - 1
            res.hvo["freed_bytes"] += (h.pages - 1) * lay.page_size
    # read-only leaves no optimised folio explains
    ro_runs = merge([(va, va + size) for va, size, _, w in leaves if not w and va not in explained_ro])
    for a, b in ro_runs:
        sec, p0, p1 = _pfn_span(lay, a, b)
        out.append(Finding("hvo-inconsistent", "error",
                           f"{a:#x}-{b:#x} (struct pages of pfn {p0}-{p1}) is mapped read-only but no "
                           f"vmemmap-optimized HugeTLB folio is there", section=sec, pfn_start=p0, pfn_end=p1,
                           vaddr=a, vaddr_end=b))

    # -- backing: RAM, aliases, node, buddy -----------------------------------------------
    owners: Dict[int, List[int]] = defaultdict(list)
    outside: List[Tuple[int, int]] = []
    offnode: List[Tuple[int, int, int, int]] = []
    free: List[Tuple[int, int]] = []
    pmd_size = 1 << (2 * shift - 3)
    for va, size, phys, w in leaves:
        if not ram.covers(phys, phys + size):
            outside.append((va, phys))
            continue
        for k in range(0, size, lay.page_size):
            owners[(phys + k) >> shift].append(va + k)
        sec = lay.page_to_pfn(va) >> lay.pfn_section_shift
        sp = pred.sections.get(sec)
        bn = nodes.nid(phys >> shift)
        if sp is not None and sp.nid is not None and bn is not None and bn != sp.nid:
            offnode.append((va, size, sp.nid, bn))
        if backing_free is not None and backing_free(phys >> shift):
            free.append((va, phys))
    for va, phys in outside:
        sec, p0, p1 = _pfn_span(lay, va, va + lay.page_size)
        out.append(Finding("backing-outside-ram", "error",
                           f"vmemmap at {va:#x} (struct pages of pfn {p0}-) is backed by phys {phys:#x}, which is not System RAM",
                           section=sec, pfn_start=p0, vaddr=va, phys=phys))
    for va, phys in free:
        sec, p0, _ = _pfn_span(lay, va, va + 1)
        out.append(Finding("backing-free", "error",
                           f"vmemmap at {va:#x} is backed by pfn {phys >> shift}, which is free in the buddy allocator",
                           section=sec, pfn_start=p0, vaddr=va, phys=phys))
    for pfn, vas in sorted(owners.items()):
        if len(vas) - alias_ok.get(pfn, 0) > 1:
            vas = sorted(vas)
            sec, p0, _ = _pfn_span(lay, vas[1], vas[1] + 1)
            out.append(Finding("alias", "error",
                               f"phys page {pfn << shift:#x} backs {len(vas)} vmemmap pages "
                               f"({', '.join(hex(v) for v in vas[:4])}{', ...' if len(vas) > 4 else ''}) and no HVO explains it",
                               section=sec, pfn_start=p0, vaddr=vas[1], phys=pfn << shift))
    for (va, size, want, got) in _merge_offnode(offnode):
        sec, p0, p1 = _pfn_span(lay, va, va + size)
        out.append(Finding("offnode-memmap", "warning",
                           f"struct pages of pfn {p0}-{p1} (node {want}) live in memory of node {got}",
                           section=sec, pfn_start=p0, pfn_end=p1, vaddr=va, vaddr_end=va + size))
    return res


def _merge_offnode(items):
    out = []
    for va, size, want, got in items:
        if out and out[-1][0] + out[-1][1] == va and out[-1][2:] == (want, got):
            out[-1] = (out[-1][0], out[-1][1] + size, want, got)
        else:
            out.append((va, size, want, got))
    return out
