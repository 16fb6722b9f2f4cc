"""``inspect-vmemmap watch``: every change to a running kernel's vmemmap, re-checked.

bpftrace (the Debian package ``bpftrace``) attaches fentry/fexit programs through the
kernel's own BTF to the functions of :mod:`.probes`, so it needs no compiler and no kernel
headers on the target. Each change is one event once it has returned, and once no change
that was under way when it returned still is (a HugeTLB batch frees the old vmemmap pages
after its last folio: :meth:`Watcher.due`) the watcher reads the kernel again, only the sections the events touched
(:mod:`.recheck`; a full ``check`` through :class:`inspect_vmemmap.commands.Analysis` for an
event without a range and for the periodic checks), and gives each event the findings in
the sections it touched, with what it left there (the folio's optimisation state, its
sections).

Races: an error in an event's range that another change was making while it was read is
not judged: the range is read again once that change has returned (up to three reads, then
a ``race`` warning naming the change). An error in a range nothing was changing is read a
second time; what both reads saw stands, what only the first saw is a ``race`` warning (the
kernel changed it after the function returned, as hugetlb's enqueue after the remap).
``--interval S`` adds a full check every S seconds, for what no probe sees.
"""

from __future__ import annotations

import signal
import sys
import time
from dataclasses import dataclass
from typing import Callable, Dict, List, Optional, Sequence, Tuple

from inspect_vmemmap.check.heads import captured_fake_heads, fake_head_finding, fake_heads
from inspect_vmemmap.findings import Finding, summarize
from inspect_vmemmap.live.bpftrace import WatchError, attach, choose_probes, environment_problem, kernel_btf
from inspect_vmemmap.live.events import Call, Tracker
from inspect_vmemmap.live.probes import probes_json, with_restore_capture
from inspect_vmemmap.live.recheck import merge_windows, read_window, window_of, window_pfns

MASK64 = (1 << 64) - 1
#: errors in a range another change was making are read again, up to this many reads
MAX_READS = 3
#: changes after which the running kernel is opened again before it is read (Watcher.reopen)
HOTPLUG_KINDS = ("section-add", "section-remove", "online", "offline")


def call_range(call: Call, lay) -> Optional[Tuple[int, int]]:
    """The pfns a change is about (first, last), from its arguments."""
    f = call.fields
    if "page" in f:
        pfn = lay.page_to_pfn(f["page"] & MASK64)
        order = f.get("order")
        return pfn, pfn + (1 << order) - 1 if order is not None and 0 <= order < 40 else pfn
    if "res_start" in f and "res_end" in f:
        return (f["res_start"] & MASK64) >> lay.page_shift, (f["res_end"] & MASK64) >> lay.page_shift
    if "pfn" in f and "nr_pages" in f and f["nr_pages"] > 0:
        return f["pfn"], f["pfn"] + f["nr_pages"] - 1
    if "vstart" in f and "vend" in f and f["vend"] & MASK64 > f["vstart"] & MASK64:
        return lay.page_to_pfn(f["vstart"] & MASK64), lay.page_to_pfn((f["vend"] & MASK64) - 1)
    return None


def touches(f: Finding, rng: Tuple[int, int], lay) -> bool:
    p0, p1 = rng
    if f.pfn_start is not None:
        b = f.pfn_end if f.pfn_end is not None else f.pfn_start
        return f.pfn_start <= p1 and b >= p0
    if f.vaddr is not None:
        end = f.vaddr_end if f.vaddr_end is not None else f.vaddr + 1
        return f.vaddr < lay.pfn_to_page(p1 + 1) and end > lay.pfn_to_page(p0)
    if f.section is not None:
        return p0 >> lay.pfn_section_shift <= f.section <= p1 >> lay.pfn_section_shift
    return False


def _key(f: Finding) -> tuple:
    return (f.kind, f.section, f.pfn_start, f.pfn_end, f.vaddr, f.vaddr_end, f.phys, f.message)


@dataclass
class Read:
    """One read of the kernel, with when it was made: the whole of it (``window`` None) or
    a window of sections (live.recheck)."""

    findings: List[Finding]
    inputs: object
    sections: object
    nodes: object
    start_ns: int
    end_ns: int
    seconds: float
    window: Optional[Tuple[int, int]] = None


class Watcher:
    def __init__(self, target, emit: Callable[[dict, str], None], interval: Optional[float] = None,
                 duration: Optional[float] = None, count: Optional[int] = None, ready_timeout: float = 300.0,
                 binary: str = "bpftrace", ranged: bool = True,
                 reopen: Optional[Callable[[], object]] = None) -> None:
        self.t = target
        #: re-check an event's sections alone (live.recheck); False: the whole kernel each time
        self.ranged = ranged
        #: 7.1+ HVO: each zone's shared tail page, as the last full check found it
        self.known_tails: dict = {}
        #: opens the running kernel again: after memory hotplug the open /proc/kcore's segments
        #: (read once, when it was opened; fs/proc/kcore.c rebuilds its list on open after a
        #: MEM_ONLINE/MEM_OFFLINE) miss the new memory, and a memmap_on_memory block's
        #: struct pages on it cannot be read
        self.reopen = reopen
        self.stale = False
        self.lay = target.layout
        self.emit = emit
        self.interval = interval
        self.duration = duration
        self.count = count
        self.ready_timeout = ready_timeout
        self.binary = binary
        self.stopping = False
        self.settle_asked = self.settled = 0  # SIGUSR1 requests, and how many were answered
        self.seq = 0
        self.errors_seen = 0
        self.by_kind: Dict[str, int] = {}
        self.start_ns = 0

    # -- reading the kernel -------------------------------------------------------------

    def read(self, window: Optional[Tuple[int, int]] = None) -> Read:
        """Read the whole kernel, or (``window``) only those sections (live.recheck)."""
        from inspect_vmemmap.commands import Analysis

        # a change that returned before this read began cannot have raced it
        self.tracker.forget_before(time.monotonic_ns())
        if self.stale and self.reopen is not None:
            self.t, self.stale = self.reopen(), False
        if window is not None and self.ranged:
            wr = read_window(self.t, window, self.known_tails)
            self.known_tails.update(wr.shared_tails)
            return Read(wr.findings, wr.inputs, wr.sections, wr.nodes, wr.start_ns, wr.end_ns, wr.seconds, wr.window)
        t0, w0 = time.monotonic_ns(), time.monotonic()
        a = Analysis(self.t)  # a fresh Reading of the running kernel
        _doc, findings, res, inputs, _notes = a.check()
        self.known_tails = dict(res.shared_tails)
        return Read(findings, inputs, a.sections, a.nodes, t0, time.monotonic_ns(), time.monotonic() - w0)

    def raced(self, r: Read, exclude: Sequence[Call] = ()) -> Tuple[List[Tuple[Call, Tuple[int, int]]], List[Call]]:
        """Changes under way while ``r`` read: (with a range, without one)."""
        ids = {id(c) for c in exclude}
        ranged, bare = [], []
        for c in self.tracker.started_between(r.start_ns, r.end_ns):
            if id(c) in ids:
                continue
            rng = call_range(c, self.lay)
            (ranged.append((c, rng)) if rng is not None else bare.append(c))
        return ranged, bare

    def pump(self, timeout: float = 0.0) -> None:
        done = self.tracker.feed(self.bt.lines(timeout))
        if any(c.probe.kind in HOTPLUG_KINDS for c in done):
            self.stale = True
        self.pending.extend(done)

    # -- output -------------------------------------------------------------------------

    def t_of(self, ns: int) -> float:
        return round((ns - self.start_ns) / 1e9, 6)

    def task(self, c: Call) -> str:
        return f"{c.comm}/{c.pid}"

    def event_json(self, c: Call, nodes) -> dict:
        lay = self.lay
        rng = call_range(c, lay)
        ev: dict = {"seq": self.seq, "t": self.t_of(c.end_ns), "kind": c.probe.kind, "function": c.probe.function}
        if rng is not None:
            ev["pfn_start"], ev["pfn_end"] = rng
            ev["sections"] = [rng[0] >> lay.pfn_section_shift, rng[1] >> lay.pfn_section_shift]
        nid = c.fields.get("nid")
        if nid is None and rng is not None:
            nid = nodes.nid(rng[0])
        ev["nid"] = nid
        if "order" in c.fields:
            ev["order"] = c.fields["order"]
        ev["task"] = self.task(c)
        ev["duration_us"] = round((c.end_ns - c.start_ns) / 1e3, 1)
        if c.probe.returns:
            ev["result"] = c.result
        if c.parts:
            parts: Dict[str, int] = {}
            for p in c.parts:
                parts[p.probe.function] = parts.get(p.probe.function, 0) + 1
            ev["parts"] = parts
        return ev

    def after(self, c: Call, r: Read) -> dict:
        """What the change left in its range, as the read saw it."""
        lay = self.lay
        rng = call_range(c, lay)
        if rng is None:
            return {}
        out: dict = {}
        if c.probe.kind.startswith("hvo-"):
            folio = next((f for f in r.inputs.folios if f.head_pfn == rng[0]), None)
            out["in_pool"] = folio is not None
            if folio is not None:
                out["optimized"] = folio.optimized
        secs = [r.sections.get(n) for n in range(rng[0] >> lay.pfn_section_shift,
                                                         (rng[1] >> lay.pfn_section_shift) + 1)]
        out["sections_present"] = sum(1 for s in secs if s is not None and s.present)
        out["sections_online"] = sum(1 for s in secs if s is not None and "O" in s.letters())
        if c.probe.kind.startswith("section-") or c.probe.kind in ("online", "offline"):
            # memmap_on_memory: the blocks of the range whose memmap the kernel records on their own
            # first pages (the check's backing-misplaced says whether the page tables agree)
            hosted = [b for b in (r.inputs.hosted_blocks or ()) if b.start_pfn <= rng[1] and b.end_pfn > rng[0]]
            out["memmap_on_memory_blocks"] = len(hosted)
            out["memmap_on_memory_pages"] = sum(b.recorded_pages for b in hosted)
        if c.probe.kind == "device-memmap":
            # the ZONE_DEVICE page maps the read found over the range (mm/memremap.c
            # pagemap_range() stores the map in pgmap_array before arch_add_memory() and
            # memmap_init_zone_device())
            lo, hi = rng[0] << lay.page_shift, (rng[1] + 1) << lay.page_shift
            out["device_maps"] = sum(1 for m in (r.inputs.device_maps or ())
                                     if any(a < hi and b > lo for a, b in m.ranges))
        return out

    def verdict(self, c: Optional[Call], ev: dict, findings: List[Finding], check: dict) -> None:
        s = summarize(findings)
        self.errors_seen += s["errors"]
        check.update(errors=s["errors"], warnings=s["warnings"], findings=[f.to_json() for f in findings])
        if c is not None:  # bpftrace's nsecs and time.monotonic_ns() are both CLOCK_MONOTONIC
            ev["latency_ms"] = round(max(time.monotonic_ns() - c.end_ns, 0) / 1e6, 3)
        self.emit({"event": ev, "check": check}, "event")
        if c is not None:
            self.by_kind[ev["kind"]] = self.by_kind.get(ev["kind"], 0) + 1

    # -- re-checking events --------------------------------------------------------------

    def due(self) -> bool:
        """Whether the pending events are re-checked now: once no change that was under way
        when one of them returned is under way any more (the HugeTLB batch a folio was
        remapped in flushes the TLB and frees the old vmemmap pages after its last folio:
        mm/hugetlb_vmemmap.c hugetlb_vmemmap_optimize_folios()). A change that began after
        them does not hold them back: what it touches while they are read is a race, told
        as for any read (:meth:`recheck_group`)."""
        if not self.pending:
            return False
        last = max(c.end_ns for c in self.pending)
        return not any(c.start_ns <= last for c in self.tracker.in_flight())

    def recheck(self) -> None:
        """Read the kernel for the pending events (nothing watched is under way): each run
        of sections the events touched alone (live.recheck), the whole kernel for an event
        without a range."""
        todo: List[Tuple[Call, int]] = [(c, 0) for c in self.pending]
        self.pending = []
        while todo:
            later: List[Tuple[Call, int]] = []
            for window, items in self.groups(todo):
                later += self.recheck_group(window, items)
            todo = later
            if later:
                self.wait_quiet()

    def scope(self, c: Call) -> Optional[Tuple[int, int]]:
        """The pfns of the sections a change touched (first, last), or None."""
        rng = call_range(c, self.lay)
        return None if rng is None else window_pfns(self.lay, window_of(self.lay, rng))

    def groups(self, todo: List[Tuple[Call, int]]) -> List[Tuple[Optional[Tuple[int, int]], List[Tuple[Call, int]]]]:
        """The events by the window of sections one read covers (None: the whole kernel)."""
        lay = self.lay
        bare = [it for it in todo if call_range(it[0], lay) is None]
        ranged = [it for it in todo if call_range(it[0], lay) is not None]
        if not self.ranged:
            return [(None, todo)] if todo else []
        out: list = [(None, bare)] if bare else []
        wins = {id(it[0]): window_of(lay, call_range(it[0], lay)) for it in ranged}
        for w in merge_windows(list(wins.values())):
            out.append((w, [it for it in ranged if w[0] <= wins[id(it[0])][0] <= w[1]]))
        return out

    def recheck_group(self, window: Optional[Tuple[int, int]], todo: List[Tuple[Call, int]]) -> List[Tuple[Call, int]]:
        """One read for these events: :return: those to read again (a change raced it)."""
        r = self.read(window)
        self.pump()
        mine = [c for c, _ in todo]
        ranged, bare = self.raced(r, mine)
        later: List[Tuple[Call, int]] = []
        confirm: List[Tuple[Call, List[Finding]]] = []
        for c, tries in todo:
            rng = self.scope(c)
            found = [f for f in r.findings if rng is not None and touches(f, rng, self.lay)]
            errs = [f for f in found if f.severity == "error"]
            racing = [o for o, orng in ranged if rng is not None and orng[0] <= rng[1] and orng[1] >= rng[0]]
            if c.probe.kind.startswith("hvo-"):
                racing += [o for o in bare if o.probe.kind.startswith("hvo-")]
            if errs and racing and tries + 1 < MAX_READS:
                later.append((c, tries + 1))
                continue
            if errs and racing:
                o = racing[0]
                found = [self.race(f, f"{o.probe.function} by {self.task(o)} was changing it while it was read")
                         if f.severity == "error" else f for f in found]
                self.report(c, r, found, tries + 1)
            elif errs:
                confirm.append((c, found))
            else:
                self.report(c, r, found, tries + 1)
        if confirm:
            r2 = self.read(window)
            self.pump()
            for c, found in confirm:
                rng = self.scope(c)
                again = {_key(f) for f in r2.findings if f.severity == "error" and touches(f, rng, self.lay)}
                found = [f if f.severity != "error" or _key(f) in again else
                         self.race(f, "the second read did not find it: the kernel was still changing the range "
                                      "after the function returned") for f in found]
                self.report(c, r2, found, 2)
        return later

    def wait_quiet(self, limit: float = 5.0) -> None:
        deadline = time.monotonic() + limit
        while self.tracker.in_flight() and time.monotonic() < deadline:
            self.pump(0.05)

    def race(self, f: Finding, why: str) -> Finding:
        where = {k: getattr(f, k) for k in ("section", "pfn_start", "pfn_end", "vaddr", "vaddr_end", "phys")}
        return Finding("race", "warning", f"{why}: {f.kind}: {f.message}", was=f.kind, **where)

    def restored_heads(self, c: Call, r: Read) -> List[Finding]:
        """An ``hvo-restore``: the struct pages its vmemmap restore wrote, read for copies of
        the head left in place (check.heads: the folio may be freed already, so no pool
        holds it any more)."""
        rng = call_range(c, self.lay)
        bit = (r.inputs.page_flags or {}).get("head_bit")
        if not c.probe.kind == "hvo-restore" or rng is None or bit is None:
            return []
        if c.captured:  # what the restore left, read by the probe at its return, before the free
            found = captured_fake_heads(self.lay, bit, rng[0], c.captured)
            fd = fake_head_finding(self.lay, found, f"the folio at pfn {rng[0]} as this restore returned it "
                                                    f"(the first {len(c.captured) // 2} after the head's)")
            return [fd] if fd is not None else []
        skip = [(f.head_pfn, f.head_pfn + (1 << f.order)) for f in r.inputs.folios if f.optimized]
        found = fake_heads(self.t.memory, self.lay, bit, (rng[0] + 1, rng[1]), skip)
        t1 = time.monotonic_ns()
        fd = fake_head_finding(self.lay, found, f"the folio at pfn {rng[0]} this restore returned")
        if fd is None:
            return []
        # an optimized folio's tails show fake heads by design: one allocated there since the
        # read began (a loop that grows the pool again) makes this a race, not an error
        self.pump()
        since = [o for o in self.tracker.started_between(r.start_ns, t1) if o is not c
                 and o.probe.kind.startswith("hvo-") and (call_range(o, self.lay) is None
                                                         or touches(fd, call_range(o, self.lay), self.lay))]
        if since:
            o = since[0]
            return [self.race(fd, f"{o.probe.function} by {self.task(o)} changed the range after the read began")]
        return [fd]

    def report(self, c: Call, r: Read, found: List[Finding], reads: int) -> None:
        found = found + [f for f in self.restored_heads(c, r) if _key(f) not in {_key(g) for g in found}]
        ev = self.event_json(c, r.nodes)
        self.seq += 1
        check = {"reads": reads, "seconds": round(r.seconds, 3), "after": self.after(c, r)}
        if r.window is not None:
            check["sections"] = list(r.window)
        self.verdict(c, ev, found, check)

    def periodic(self, reason: str) -> None:
        for attempt in range(MAX_READS):
            r = self.read()
            self.pump()
            ranged, bare = self.raced(r)
            errs = [f for f in r.findings if f.severity == "error"]
            if not (errs and (ranged or bare)) or attempt + 1 == MAX_READS:
                break
            self.wait_quiet()
        found = []
        for f in r.findings:
            o = next((o for o, rng in ranged if touches(f, rng, self.lay)), None)
            if f.severity == "error" and o is None and bare:
                o = bare[0]
            found.append(self.race(f, f"{o.probe.function} by {self.task(o)} was changing it while it was read")
                         if f.severity == "error" and o is not None else f)
        ev = {"seq": self.seq, "t": self.t_of(r.end_ns), "kind": "periodic", "reason": reason}
        self.seq += 1
        self.verdict(None, ev, found, {"reads": attempt + 1, "seconds": round(r.seconds, 3)})

    # -- the loop -------------------------------------------------------------------------

    def run(self) -> int:
        probes, absent = choose_probes(kernel_btf(self.t))
        probes = with_restore_capture(probes, self.lay.page_size, self.lay.struct_page_size)
        if not probes:
            raise WatchError("this kernel has none of the functions watch probes (see watch.probes)")
        old = {s: signal.signal(s, self._stop) for s in (signal.SIGINT, signal.SIGTERM)}
        old[signal.SIGUSR1] = signal.signal(signal.SIGUSR1, self._settle)
        self.bt = None
        try:
            self.bt, probes, absent = attach(probes, absent, self.ready_timeout, self.binary)
            self.tracker = Tracker(probes)
            self.pending: List[Call] = []
            self.emit({"watch": {"probes": probes_json(probes, absent)}}, "start")
            self.start_ns = time.monotonic_ns()
            # (the lab's in-guest runner waits for these words: inspect_vmemmap.lab.inguest.WATCH_READY)
            print(f"inspect-vmemmap: watching, {len(probes)} probes attached; Ctrl-C ends", file=sys.stderr, flush=True)
            self.periodic("start")
            started = time.monotonic()
            next_periodic = started + self.interval if self.interval else None
            while not self.stopping:
                now = time.monotonic()
                if self.duration is not None and now - started >= self.duration:
                    break
                if self.count is not None and self.by_kind_total() >= self.count:
                    break
                wait = 0.5
                if next_periodic is not None:
                    wait = min(wait, max(next_periodic - now, 0))
                self.pump(wait)
                if not self.bt.alive():
                    self.pump()
                    raise WatchError(f"bpftrace ended: {self.bt.reason()}")
                if self.due():
                    self.recheck()
                if self.settle_asked > self.settled:
                    self.settle()
                if next_periodic is not None and time.monotonic() >= next_periodic and not self.tracker.in_flight():
                    self.periodic("interval")
                    next_periodic = time.monotonic() + self.interval
            self.pending.extend(self.tracker.feed(self.bt.stop(), final=True))
            if self.pending:
                self.recheck()
        finally:
            if self.bt is not None and self.bt.alive():
                self.bt.stop()
            for s, h in old.items():
                signal.signal(s, h)
        self.emit({"end": {"events": sum(self.by_kind.values()), "by_kind": dict(sorted(self.by_kind.items())),
                           "lost": self.tracker.lost, "unpaired": self.tracker.unpaired,
                           "seconds": round((time.monotonic_ns() - self.start_ns) / 1e9, 3),
                           "errors": self.errors_seen}}, "end")
        return 1 if self.errors_seen else 0

    def settle(self) -> None:
        """SIGUSR1 asked: once whatever changed until now has returned and been re-checked,
        say so on stderr (the lab waits for it between its steps: "settled N")."""
        asked = self.settle_asked
        self.pump(0.3)
        self.wait_quiet(30.0)
        if self.pending:
            self.recheck()
        self.settled = asked
        print(f"inspect-vmemmap: settled {asked}", file=sys.stderr, flush=True)

    def _settle(self, signum, frame) -> None:
        self.settle_asked += 1

    def by_kind_total(self) -> int:
        return sum(self.by_kind.values())

    def _stop(self, signum, frame) -> None:
        self.stopping = True


def command(tgt: dict, as_json: bool, interval: Optional[float], duration: Optional[float], count: Optional[int],
            open_target: Callable[[dict], object], console_factory: Callable[[], object],
            fail: Callable[[str], None], attach_timeout: float = 300.0) -> int:
    """The ``watch`` command (cli.py): checks what it needs, opens the running kernel, watches."""
    from inspect_vmemmap.live.output import json_emitter, text_emitter
    from inspect_vmemmap.report import SCHEMA

    if tgt.get("core") or tgt.get("qemu"):
        fail("watch needs the running kernel (eBPF): --core and --qemu reach none")
    problem = environment_problem()
    if problem:
        fail(problem)
    t = open_target(tgt)
    if as_json:
        emit = json_emitter(t.to_json(), SCHEMA)
    else:
        emit = text_emitter(console_factory(), t.to_json(), t.layout)
    try:
        from inspect_vmemmap.source.target import reopened

        return Watcher(t, emit, interval=interval, duration=duration, count=count, ready_timeout=attach_timeout,
                       reopen=lambda: reopened(t)).run()
    except WatchError as e:
        fail(str(e))
    return 2
