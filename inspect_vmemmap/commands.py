"""What each command computes for an opened :class:`~inspect_vmemmap.source.target.Target`,
as JSON documents plus the objects the text output needs. The CLI prints these; the
fixture recorder runs them on a recording target."""

from __future__ import annotations

import gc
from typing import Callable, List, Optional, Tuple

from inspect_vmemmap import report
from inspect_vmemmap.analysis import explain_pfn, load_map, load_sections
from inspect_vmemmap.mapped import VmemmapMemory
from inspect_vmemmap.source.dumpfile import name_filter
from inspect_vmemmap.source.gather import Reading
from inspect_vmemmap.facts import Assumption
from inspect_vmemmap.findings import Finding
from inspect_vmemmap.truncation import annotate, refuse_if_nothing_readable
from inspect_vmemmap.vmemmap import MappedLeaf, NodeMap, VmemmapMap


class Progress:
    """Progress reporting: ``task(description, total)`` returns ``update(completed)``.
    This one shows nothing; the CLI passes a rich bar on a terminal."""

    def task(self, description: str, total: int):
        return lambda completed: None

    def close(self) -> None:
        pass


class Analysis:
    """One read of a target: sections are read once; the map and the check are computed
    on demand, once."""

    def __init__(self, target, progress: Optional[Progress] = None) -> None:
        self.progress = progress or Progress()
        self.t = target
        self.reading = Reading(target)
        self.nodes = NodeMap(self.reading.node_spans())
        self.sections = load_sections(target.memory, target.layout, self.nodes)
        self._map: Optional[VmemmapMap] = None
        self._leaves: List[MappedLeaf] = []

    def vmemmap(self) -> VmemmapMap:
        if self._map is None:
            t = self.t
            lay = t.layout
            leaves = self._leaves
            last = max(self.sections.sections) if len(self.sections) else 0
            lo, hi = lay.vmemmap_base, lay.pfn_to_page((last + 1) << lay.pfn_section_shift)
            update = self.progress.task("walking the vmemmap page tables", max(hi - lo, 1))

            def on_leaf(l) -> None:
                leaves.append(MappedLeaf.of(l))
                if not len(leaves) & 1023:
                    update(l.vaddr - lo)

            self._map = load_map(t.memory, lay, self.sections, self.nodes, self.reading.ram(), on_leaf=on_leaf)
            update(hi - lo)
        return self._map

    def sections_doc(self) -> Tuple[dict, List[Finding]]:
        findings = list(self.sections.findings)
        name_filter(findings, self.t.dump, self.t.memory)
        return report.document(annotate(self.t.to_json(), self.t), findings, sections=report.sections_json(self.sections)), findings

    def map_doc(self) -> Tuple[dict, List[Finding]]:
        vm = self.vmemmap()
        findings = list(self.sections.findings) + vm.findings
        name_filter(findings, self.t.dump, self.t.memory)
        return report.document(annotate(self.t.to_json(), self.t), findings, vmemmap=vm.to_json()), findings

    def pfn_doc(self, pfn: int) -> Tuple[dict, List[Finding]]:
        info, findings = explain_pfn(self.t.memory, self.t.layout, self.sections, self.nodes, pfn)
        name_filter(findings, self.t.dump, self.t.memory)
        return report.document(annotate(self.t.to_json(), self.t), findings, pfn=info), findings

    def check(self, deep: bool = False):
        """:return: ``(doc, findings, result, inputs, notes)``."""
        from inspect_vmemmap.check import run_check
        from inspect_vmemmap.limits import bound_inputs

        # a verdict on a truncated dump with no section left would claim what it never read
        refuse_if_nothing_readable(self.t, self.sections)
        from inspect_vmemmap.source import gather

        vm = self.vmemmap()
        # struct pages read at the physical addresses this walk found (issue 18: one read, not four)
        mem = VmemmapMemory(self.t.memory, self._leaves)
        notes: List[Assumption] = []
        inputs = gather.gather_inputs(self.reading, notes, mem)
        # a corrupted System RAM end is a finding, not a loop over every section to 2^64
        inputs, cut = bound_inputs(inputs, self.sections)
        # a filtered dump may have left out the struct pages the HugeTLB pool lists run through
        hvo_unknown = next((n for n in notes if n.input == "hugetlb_pools" and n.excluded_by), None)
        # nor can it when the pools could not be read at all (no kallsyms, no types): the
        # read-only leaves are then unknown, not errors (issue 15)
        hvo_unknown = hvo_unknown or next((n for n in notes if n.input in ("hugetlb_pools", "types")), None)
        update = None
        if deep:
            total = sum(b - a for s in self.sections if s.valid for a, b in s.pfn_ranges(self.t.layout))
            update = self.progress.task("reading every struct page (--deep)", max(total, 1))
        res = run_check(inputs, self.sections, self._leaves, gather.buddy_checker(self.t, mem), mem, deep,
                        unknown=vm.unknown(), hvo_unknown=hvo_unknown, progress=update)
        if update is not None:
            update(total)  # offline and device sections have no flags to read: done all the same
        findings = list(self.sections.findings) + vm.findings + cut + res.findings
        filtered = name_filter(findings, self.t.dump, self.t.memory)
        target = annotate(self.t.to_json(), self.t)  # a truncated dump named
        if "dump" in target:
            # how much of the check the dump's filter kept it from doing
            target["dump"]["unreadable_findings"] = filtered
            target["dump"]["unread_inputs"] = [n.text for n in notes if n.excluded_by]
            target["dump"]["complete"] = (not filtered and not target["dump"]["unread_inputs"]
                                          and not target["dump"].get("truncated"))
        doc = report.document(target, findings, sections=report.sections_json(self.sections),
                              vmemmap=vm.to_json(), hvo=res.hvo,
                              device_dedup=res.device_dedup, self_hosted=res.self_hosted)
        doc["assumptions"] = [n.text for n in notes] + [f"{k}: {v}" for k, v in self.t.layout.notes.items()]
        return doc, findings, res, inputs, notes


#: targets whose memory can change while it is read
LIVE_SOURCES = ("live", "qemu")


def _key(f: Finding) -> tuple:
    return (f.kind, f.section, f.pfn_start, f.pfn_end, f.vaddr, f.vaddr_end, f.phys, f.message)


def _errors(findings: List[Finding]) -> dict:
    return {_key(f): f for f in findings if f.severity == "error"}


def _race(f: Finding, seen: List[int], passes: int) -> Finding:
    where = {k: getattr(f, k) for k in ("section", "pfn_start", "pfn_end", "vaddr", "vaddr_end", "phys")}
    said = ", ".join(map(str, seen))
    if seen == [passes]:
        how = f"only the last of {passes} reads found it"
    elif seen[-1] == passes:
        how = f"read {said} of {passes} found it, read {passes - 1} did not"
    else:
        how = f"read {said} of {passes} found it; the last read did not"
    return Finding("race", None, f"the running kernel changed this while it was read: {how}: "
                   f"{f.kind}: {f.message}", was=f.kind, seen_in=seen, **where)


def confirmed_check(target, deep: bool = False, progress: Optional[Progress] = None, passes: int = 3,
                    between: Optional[Callable[[int], None]] = None):
    """``check`` on ``target``; on a running kernel (/proc/kcore, a QEMU guest) every error is
    confirmed by reading everything again.

    A running kernel changes its vmemmap while it is read (memory hotplug, HugeTLB pool
    changes remapping vmemmap pages, onlining), so one read can mix states that never
    existed together. After a read with errors the target's facts are dropped and it is
    read again, up to ``passes`` reads, until two reads in a row find the same errors.
    Errors of the last read that the read before it also found stand; every other error
    seen becomes a ``race`` warning that says which reads saw it. Dumps are read once.
    ``between(n)`` runs after read ``n`` (tests use it to let a guest change).

    :return: ``(analysis, doc, findings, result, inputs, notes)`` of the last read, with
        the race findings added to ``findings`` and ``doc``; ``doc["target"]["reads"]`` is
        the number of reads on a running kernel.
    """
    # The analysis builds many small objects and almost no cycles: the cyclic collector
    # would only cost time (a fifth of it on 4 TiB), so it is off while it runs, as timeit does.
    enabled = gc.isenabled()
    gc.disable()
    try:
        return _confirmed_check(target, deep, progress, passes, between)
    finally:
        if enabled:
            gc.enable()


def _confirmed_check(target, deep, progress, passes, between):
    # earlier reads keep only their errors: one read's analysis of a big machine is enough
    history: List[dict] = []
    while True:
        if history:
            if between is not None:
                between(len(history))
        a = Analysis(target, progress)
        doc, findings, res, inputs, notes = a.check(deep)
        history.append(_errors(findings))
        if target.source not in LIVE_SOURCES or len(history) >= passes:
            break
        if not history[-1] or (len(history) > 1 and history[-1].keys() == history[-2].keys()):
            break
    if target.source not in LIVE_SOURCES:
        return a, doc, findings, res, inputs, notes
    n = len(history)
    last = history[-1]
    before = history[-2] if n > 1 else last
    seen: dict = {}
    for i, errors in enumerate(history, 1):
        for k, f in errors.items():
            seen.setdefault(k, (f, []))[1].append(i)
    races = [_race(f, reads, n) for k, (f, reads) in seen.items() if k not in last or k not in before]
    findings = [f for f in findings if f.severity != "error" or _key(f) in before] + races
    target_doc = dict(doc["target"], reads=n)
    parts = {k: v for k, v in doc.items() if k not in ("schema", "target", "findings", "summary")}
    doc = report.document(target_doc, findings, **parts)
    return a, doc, findings, res, inputs, notes
