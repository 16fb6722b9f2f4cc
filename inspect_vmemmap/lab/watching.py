"""``boot --in-guest --watch [--then STEP]...``: ``watch`` runs inside the guest while the
host changes the guest's memory, one step after another, each waited for on the guest's
own account:

- ``hugepages=N`` / ``hugepages-1g=N``: the guest writes N to its 2M (1G) pool's
  ``nr_hugepages`` (sysfs), synchronous: the kernel has grown or shrunk the pool, and
  remapped each folio's vmemmap, when the write returns;
- ``hotplug=SIZE``: a pc-dimm hot-added through QMP (:meth:`~.guest.Guest.hotplug`,
  which waits until the guest onlined every block of it);
- ``unplug``: the guest offlines the blocks of the last hot-added dimm, then QMP
  ``device_del`` and the guest's ACPI eject remove it, waited for until its blocks are
  gone from sysfs.

With ``--json`` the result is one document: ``watch`` (``probes``, ``events`` with each
event's ``check`` folded in, ``end``), the findings of every check, and ``guest`` with
``steps``, the guest's own account after each step.
"""

from __future__ import annotations

import json
import re
import sys
import time
from dataclasses import dataclass
from typing import List, Optional

from . import inguest
from .account import parse_account
from .errors import LabError

_STEP = re.compile(r"(hugepages|hugepages-1g)=(\d+)|hotplug=(\d+(?:\.\d+)?[KMGT]?)|(unplug)", re.I)


@dataclass(frozen=True)
class Step:
    what: str  # 'hugepages' | 'hugepages-1g' | 'hotplug' | 'unplug'
    value: str = ""

    def __str__(self) -> str:
        return f"{self.what}={self.value}" if self.value else self.what


def parse_step(text: str) -> Step:
    m = _STEP.fullmatch(text.strip())
    if not m:
        raise ValueError(f"--then {text!r}: not hugepages=N, hugepages-1g=N, hotplug=SIZE or unplug")
    if m.group(1):
        return Step(m.group(1).lower(), m.group(2))
    if m.group(3):
        return Step("hotplug", m.group(3).upper())
    return Step("unplug")


def hotplug_sizes(steps: List[Step]) -> List[str]:
    return [s.value for s in steps if s.what == "hotplug"]


def account_json(acc) -> dict:
    return {
        "hugepages": {f"{kb}kB": n for kb, n in sorted(acc.nr_hugepages.items())},
        "mem_total_kb": acc.mem_total_kb,
        "memory_blocks": {str(b): st for b, st in sorted(acc.memory_blocks.items())},
    }


def run(o, guest, scratch, progress, steps: List[Step], timeout: float) -> tuple:
    """Watch in the guest through ``steps``; :return: ``(status, watch lines, step accounts,
    watch's stderr)``; raises LabError when the guest or the watch failed."""
    chan = inguest.Channel(inguest.channel_path(scratch))

    def alive() -> None:
        if guest.process is not None and guest.process.poll() is not None:
            raise LabError(f"QEMU exited (status {guest.process.returncode}) while watching; "
                           "last console lines:\n" + "\n".join(guest.console_tail(30)))

    args = (["--json"] if o.as_json else []) + ["--no-debuginfo"]
    accounts: List[dict] = []
    try:
        progress("starting watch inside the guest (bpftrace over the host's root)")
        early = chan.start_watch(args, timeout, alive)
        if early is not None:
            lines = [l for l in early.stderr.splitlines() if l.strip()]
            raise LabError(f"in-guest watch: {(lines[0] if lines else f'exited with status {early.status}').removeprefix('inspect-vmemmap: ')}")
        # the watch's first full check, before anything changes
        if not chan.settle_watch(timeout, alive):
            raise LabError("in-guest watch ended before the first step: " + chan.stop_watch(timeout, alive).stderr.strip())
        for step in steps:
            progress(f"step {step}")
            t0 = time.monotonic()
            if step.what in ("hugepages", "hugepages-1g"):
                kb = 2048 if step.what == "hugepages" else 1 << 20
                res = chan.step("hugepages", [str(kb), step.value], timeout, alive)
                guest.account = parse_account(res.stdout)
                got = guest.account.nr_hugepages.get(kb, 0)
                note = "" if got == int(step.value) else f" (the guest has {got})"
                if res.status:
                    note += f" ({res.stderr.strip() or 'the write failed'})"
                progress(f"{step.what} {got}{note} after {time.monotonic() - t0:.1f}s")
            elif step.what == "hotplug":
                guest.hotplug(step.value, progress=progress)  # its own deadline, scaled to the size
                d = guest.dimms[-1]
                progress(f"pc-dimm {d.id} at {d.addr:#x}-{d.end - 1:#x} online after {time.monotonic() - t0:.1f}s")
            else:
                unplug(guest, chan, timeout, alive, progress)
            if not chan.settle_watch(timeout, alive):
                break  # it ended: its reason comes with its output below
            accounts.append({"step": str(step), **account_json(guest.account)})
        progress("stopping watch (it re-checks what is left and ends)")
        res = chan.stop_watch(timeout, alive)
    finally:
        chan.close()
    return res.status, res.stdout, accounts, res.stderr


def unplug(guest, chan, timeout: float, alive, progress) -> None:
    """Offline the last hot-added dimm's blocks in the guest, then remove it (QMP device_del;
    the guest's ACPI eject), waiting until its blocks are gone from sysfs."""
    if not guest.dimms:
        raise LabError("--then unplug: no hot-added dimm to remove")
    d = guest.dimms[-1]
    bs = guest.account.memory_block_size
    blocks = list(range(d.addr // bs, d.end // bs))
    res = chan.step("offline", [str(b) for b in blocks], timeout, alive)
    acc = parse_account(res.stdout)
    if res.status or any(acc.memory_blocks.get(b) != "offline" for b in blocks):
        raise LabError(f"--then unplug: the guest could not offline {d.id}'s blocks: "
                       f"{res.stderr.strip() or 'states ' + str({b: acc.memory_blocks.get(b) for b in blocks})}")
    guest.qmp("device_del", id=d.id)
    deadline = time.monotonic() + max(120.0, timeout)
    while True:
        res = chan.step("offline", [], timeout, alive)  # no blocks: just the account
        acc = parse_account(res.stdout)
        if not any(b in acc.memory_blocks for b in blocks):
            break
        if time.monotonic() > deadline:
            raise LabError(f"--then unplug: {d.id}'s blocks still in the guest's sysfs after device_del")
        time.sleep(0.5)
    guest.account = acc
    guest.dimms.pop()
    progress(f"pc-dimm {d.id} removed")


def document(lines: str, accounts: List[dict]) -> dict:
    """The watch's JSON lines as one document (``watch.events``)."""
    head: Optional[dict] = None
    events, end = [], None
    findings: List[dict] = []
    for line in lines.splitlines():
        line = line.strip()
        if not line:
            continue
        try:
            obj = json.loads(line)
        except ValueError:
            raise LabError(f"in-guest watch: not a JSON line: {line[:80]!r}") from None
        if "watch" in obj:
            head = obj
        elif "event" in obj:
            events.append({**obj["event"], "check": obj["check"]})
            findings += obj["check"]["findings"]
        elif "end" in obj:
            end = obj["end"]
    if head is None:
        raise LabError("in-guest watch: no header line in its output")
    summary = {"errors": 0, "warnings": 0, "infos": 0}
    for f in findings:
        summary[f["severity"] + "s"] += 1
    return {"schema": head["schema"], "target": head["target"],
            "watch": {"probes": head["watch"]["probes"], "events": events, "end": end},
            "findings": findings, "summary": summary}


def write_text(stdout: str, accounts: List[dict]) -> None:
    sys.stdout.write(stdout if stdout.endswith("\n") else stdout + "\n")
    for a in accounts:
        huge = ", ".join(f"{n} x {k}" for k, n in a["hugepages"].items())
        states: dict = {}
        for st in a["memory_blocks"].values():
            states[st] = states.get(st, 0) + 1
        print(f"after {a['step']}: the guest's own account: hugepages {huge or 'none'}, MemTotal {a['mem_total_kb']} kB, "
              f"memory blocks {', '.join(f'{n} {s}' for s, n in sorted(states.items()))}")
