"""``check`` on the running kernel with the probes of ``watch`` running while it reads.

A running kernel changes its vmemmap while it is read, so one read can mix states that
never existed together. With eBPF the check knows what changed during its read: an error
in a range a change touched while the kernel was read (or in a HugeTLB batch under way
then) is a ``race`` warning that names the change; an error in a range nothing touched
stands after the one read. Without eBPF (``--qemu``: QMP reaches none; not root, no
bpftrace, BPF denied, lockdown) :func:`inspect_vmemmap.commands.confirmed_check` reads again
until two reads agree. ``target.race_detection`` says which: ``"ebpf"`` or ``"reread"``.
"""

from __future__ import annotations

import gc
import time
from typing import List, Optional, Tuple

from inspect_vmemmap.findings import Finding
from inspect_vmemmap.live.events import Call, Tracker
from inspect_vmemmap.live.watch import (WatchError, attach, call_range, choose_probes, environment_problem, kernel_btf,
                                        touches)

#: how long to wait for bpftrace to attach before falling back to re-reads
READY_TIMEOUT = 120.0


class Probing:
    """bpftrace running the watch probes, for one check."""

    def __init__(self, target) -> None:
        problem = environment_problem()
        if problem:
            raise WatchError(problem)
        probes, absent = choose_probes(kernel_btf(target))
        if not probes:
            raise WatchError("this kernel has none of the functions the probes need")
        self.t = target
        self.bt, probes, _absent = attach(probes, absent, READY_TIMEOUT)
        self.tracker = Tracker(probes)

    def stop(self) -> None:
        self.bt.stop()

    def changes_during(self, t0: int, t1: int) -> List[Tuple[Call, Tuple[int, int]]]:
        """Every change under way at some moment of ``[t0, t1]``, with its range; a HugeTLB
        batch under way stands for every folio it remapped (it splits their PMDs first)."""
        self.tracker.feed(self.bt.lines(0.3))
        deadline = time.monotonic() + 10
        while self.tracker.in_flight() and time.monotonic() < deadline:
            self.tracker.feed(self.bt.lines(0.1))
        hits = self.tracker.started_between(t0, t1)
        for c in list(hits):
            if c.probe.role == "context":
                end = c.end_ns if c.end_ns is not None else 1 << 63
                hits += [o for o in self.tracker.seen if o.tid == c.tid and c.start_ns <= o.start_ns <= end]
        out, seen = [], set()
        for c in hits:
            rng = call_range(c, self.t.layout)
            if rng is not None and id(c) not in seen:
                seen.add(id(c))
                out.append((c, rng))
        return out


def race(f: Finding, c: Call, rng: Tuple[int, int]) -> Finding:
    where = {k: getattr(f, k) for k in ("section", "pfn_start", "pfn_end", "vaddr", "vaddr_end", "phys")}
    event = {"kind": c.probe.kind, "function": c.probe.function, "task": f"{c.comm}/{c.pid}",
             "pfn_start": rng[0], "pfn_end": rng[1]}
    return Finding("race", "warning", f"the running kernel changed this while it was read ({c.probe.function} by "
                   f"{c.comm}/{c.pid}, pfns {rng[0]:#x}-{rng[1]:#x}): {f.kind}: {f.message}",
                   was=f.kind, event=event, **where)


def probed_check(p: Probing, deep: bool, progress):
    from inspect_vmemmap import report
    from inspect_vmemmap.commands import Analysis

    t0 = time.monotonic_ns()
    a = Analysis(p.t, progress)
    doc, findings, res, inputs, notes = a.check(deep)
    t1 = time.monotonic_ns()
    changes = p.changes_during(t0, t1)
    out = []
    for f in findings:
        hit = next(((c, rng) for c, rng in changes if touches(f, rng, p.t.layout)), None) if f.severity == "error" else None
        out.append(race(f, *hit) if hit else f)
    target_doc = dict(doc["target"], reads=1, race_detection="ebpf", changes_during_read=len(changes))
    parts = {k: v for k, v in doc.items() if k not in ("schema", "target", "findings", "summary")}
    return a, report.document(target_doc, out, **parts), out, res, inputs, notes


def check_running(target, deep: bool = False, progress=None, passes: int = 3):
    """``check`` for any target: probed on the running kernel where eBPF is there, else as
    :func:`~inspect_vmemmap.commands.confirmed_check`. :return: as confirmed_check."""
    from inspect_vmemmap.commands import LIVE_SOURCES, confirmed_check

    why: Optional[str] = None
    if target.source == "live":
        try:
            p = Probing(target)
        except WatchError as e:
            why = str(e)
        else:
            enabled = gc.isenabled()
            gc.disable()
            try:
                return probed_check(p, deep, progress)
            finally:
                p.stop()
                if enabled:
                    gc.enable()
    a, doc, findings, res, inputs, notes = confirmed_check(target, deep, progress, passes)
    if target.source in LIVE_SOURCES:
        doc["target"]["race_detection"] = "reread"
        if why:
            doc.setdefault("assumptions", []).append(f"races told by re-reading: no eBPF ({why})")
    return a, doc, findings, res, inputs, notes
