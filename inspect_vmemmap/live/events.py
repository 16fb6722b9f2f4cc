"""bpftrace's lines (:func:`inspect_vmemmap.live.probes.program`) turned into changes.

bpftrace prints each CPU's lines through that CPU's ring buffer, so lines of different
CPUs come out of order (a task that migrated between entry and return, two CPUs changing
at once). :meth:`Tracker.feed` sorts what it is given by the kernel's timestamp before it
pairs entries with returns per task; the watcher gives it everything read until bpftrace
was quiet for a moment.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Sequence, Tuple

from inspect_vmemmap.live.probes import Probe

_LOST = re.compile(r"Lost (\d+) events")
#: feeds a return without its entry is held for, waiting for the entry, before it is unpaired
HOLD_FEEDS = 3


@dataclass
class Call:
    """One call of a watched function, from entry to return."""

    probe: Probe
    start_ns: int
    tid: int
    pid: int
    comm: str
    fields: Dict[str, int]
    end_ns: Optional[int] = None
    result: Optional[int] = None
    #: what the probe read at the return (Probe.captures), in its order
    captured: Tuple[int, ...] = ()
    parts: List["Call"] = field(default_factory=list)  # watched calls made inside it (flattened)

    @property
    def returned(self) -> bool:
        return self.end_ns is not None


def parse(line: str, probes: Dict[int, Probe]):
    """``("E", ns, tid, Call)``, ``("R", ns, tid, (probe id, retval, captured words))``, ``("lost", n)`` or None."""
    f = line.split()
    if not f:
        return None
    if f[0] == "E" and len(f) >= 5:
        try:
            p = probes[int(f[1])]
            n = len(p.fields)
            ns, tid, pid = int(f[2]), int(f[3]), int(f[4])
            vals = [int(v) for v in f[5:5 + n]]
        except (KeyError, ValueError):
            return None
        if len(vals) != n:
            return None
        comm = " ".join(f[5 + n:])
        return ("E", ns, tid, Call(p, ns, tid, pid, comm, {k: v for (k, _), v in zip(p.fields, vals)}))
    if f[0] == "R" and len(f) >= 5:
        try:
            p = probes.get(int(f[1]))
            n = len(p.captures) if p is not None else 0
            if len(f) != 5 + n:
                return None
            return ("R", int(f[2]), int(f[3]), (int(f[1]), int(f[4]), tuple(int(v) for v in f[5:])))
        except ValueError:
            return None
    m = _LOST.search(line)
    if m:
        return ("lost", int(m.group(1)))
    return None


class Tracker:
    """Pairs entries with returns per task and folds nested calls into their change."""

    def __init__(self, probes: Sequence[Probe]) -> None:
        self.probes = {p.id: p for p in probes}
        self.stacks: Dict[int, List[Call]] = {}
        self.lost = 0  # lines bpftrace could not deliver (its "Lost N events")
        self.unpaired = 0  # returns without their entry (a call under way when the watch began)
        self.held: List[tuple] = []  # (feeds left, return item) whose entry has not come yet
        self.seen: List[Call] = []  # every call that started, for what raced a read

    def feed(self, lines: Sequence[str], final: bool = False) -> List[Call]:
        """:return: the changes that completed with these lines, in order of return.
        ``final``: nothing more will come (bpftrace ended); a return still without its
        entry is unpaired now."""
        items = []
        for line in lines:
            it = parse(line, self.probes)
            if it is None:
                continue
            if it[0] == "lost":
                self.lost += it[1]
            else:
                items.append(it)
        left = {id(it): n for n, it in self.held}
        items += [it for _, it in self.held]
        self.held = []
        # entries before returns at the same nanosecond (a call cannot return before it starts)
        items.sort(key=lambda it: (it[1], 0 if it[0] == "E" else 1))
        done: List[Call] = []
        for item in items:
            kind, ns, tid, what = item
            stack = self.stacks.setdefault(tid, [])
            if kind == "E":
                stack.append(what)
                self.seen.append(what)
                continue
            pid, ret, captured = what
            at = next((i for i in range(len(stack) - 1, -1, -1) if stack[i].probe.id == pid), None)
            if at is None:
                n = left.get(id(item), HOLD_FEEDS)
                if n > 0 and not final:
                    self.held.append((n - 1, item))
                else:
                    self.unpaired += 1
                continue
            call = stack[at]
            del stack[at:]  # whatever it called and did not see return was lost
            call.end_ns, call.result, call.captured = ns, ret, captured
            if call.probe.role == "context":
                continue
            parent = None
            if call.probe.role == "top":
                parent = next((c for c in reversed(stack) if c.probe.role in ("top", "event")), None)
            if parent is not None:
                parent.parts.append(call)
                parent.parts.extend(call.parts)
                call.parts = []
            else:
                done.append(call)
        return done

    def in_flight(self) -> List[Call]:
        return [c for s in self.stacks.values() for c in s]

    def started_between(self, t0: int, t1: int) -> List[Call]:
        """Calls under way at some moment in ``[t0, t1]`` (kernel nanoseconds)."""
        return [c for c in self.seen if c.start_ns <= t1 and (c.end_ns is None or c.end_ns >= t0)]

    def forget_before(self, ns: int) -> None:
        self.seen = [c for c in self.seen if c.end_ns is None or c.end_ns >= ns]
