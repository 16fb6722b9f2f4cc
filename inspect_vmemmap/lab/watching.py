"""``boot --in-guest --watch [--then STEP]...``: ``watch`` runs inside the guest while the
host changes the guest's memory, one step after another, each waited for on the guest's
own account:

- ``hugepages=N`` / ``hugepages-1g=N``: the guest writes N to its 2M (1G) pool's
  ``nr_hugepages`` (sysfs), synchronous: the kernel has grown or shrunk the pool, and
  remapped each folio's vmemmap, when the write returns. Where it could not (a 1G page
  needs a free or movable, 1G-aligned GiB: mm/hugetlb.c alloc_gigantic_folio() ->
  alloc_contig_pages()), the step says so in words (``short``);
- ``hotplug=SIZE``: a pc-dimm hot-added through QMP (:meth:`~.guest.Guest.hotplug`,
  which waits until the guest onlined every block of it); in an arm64 guest SIZE more of
  its virtio-mem device (:mod:`.virtiomem`: Debian's arm64 kernels cannot take a pc-dimm);
- ``devdax=SIZE`` (x86_64, aarch64): an NVDIMM of SIZE, cold-plugged and left raw at boot, made
  device-dax in the guest through sysfs (2M alignment, memmap in RAM; :func:`devdax`):
  ZONE_DEVICE memory, one ``__add_pages()`` and one ``memmap_init_zone_device()``;
- ``unplug``: the guest offlines the blocks of the last hot-added dimm, then QMP
  ``device_del`` and the guest's ACPI eject remove it (virtio-mem: the device's requested
  size lowered, and its driver removes them), waited for until its blocks are
  gone from sysfs. Where the kernel does not let it go, the step says why (``short``) and
  the watch goes on. (``boot`` onlines hot-added memory to ZONE_MOVABLE when an unplug
  step follows: a ZONE_NORMAL block soon holds a page offline_pages() cannot migrate.)

With ``--json`` the result is one document: ``watch`` (``probes``, ``events`` with each
event's ``check`` folded in, ``end``), the findings of every check, and ``guest`` with
``steps``, the guest's own account after each step (with the DIMM a hotplug or unplug
step added or removed).
"""

from __future__ import annotations

import json
import re
import sys
import time
from dataclasses import dataclass
from typing import List, Optional, Tuple

from . import inguest
from .account import parse_account
from .errors import LabError
from .guest import DEVDAX_ALIGNS, DEVDAX_LOCATIONS, parse_devdax

_STEP = re.compile(r"(hugepages|hugepages-1g)=(\d+)|(hotplug|devdax)=(\d+(?:\.\d+)?[KMGT]?)|(unplug)", re.I)
#: a devdax step's NVDIMM (guest.Nvdimm's devdax_align; its location stays "mem": memmap in RAM)
DEVDAX_STEP_ALIGN = "2M"


@dataclass(frozen=True)
class Step:
    what: str  # 'hugepages' | 'hugepages-1g' | 'hotplug' | 'devdax' | 'unplug'
    value: str = ""

    def __str__(self) -> str:
        return f"{self.what}={self.value}" if self.value else self.what


def parse_step(text: str) -> Step:
    m = _STEP.fullmatch(text.strip())
    if not m:
        raise ValueError(f"--then {text!r}: not hugepages=N, hugepages-1g=N, hotplug=SIZE, devdax=SIZE or unplug")
    if m.group(1):
        return Step(m.group(1).lower(), m.group(2))
    if m.group(3):
        return Step(m.group(3).lower(), m.group(4).upper())
    return Step("unplug")


def hotplug_sizes(steps: List[Step]) -> List[str]:
    return [s.value for s in steps if s.what == "hotplug"]


def devdax_sizes(steps: List[Step]) -> List[str]:
    """The NVDIMMs ``devdax=SIZE`` steps need, in order: QEMU cold-plugs each, left raw."""
    return [s.value for s in steps if s.what == "devdax"]


def account_json(acc) -> dict:
    out = {
        "hugepages": {f"{kb}kB": n for kb, n in sorted(acc.nr_hugepages.items())},
        "mem_total_kb": acc.mem_total_kb,
        "memory_blocks": {str(b): st for b, st in sorted(acc.memory_blocks.items())},
    }
    if acc.tainted is not None:
        out["tainted"] = acc.tainted
    return out


def run(o, guest, scratch, progress, steps: List[Step], timeout: float) -> tuple:
    """Watch in the guest through ``steps``; :return: ``(status, watch lines, step accounts,
    watch's stderr)``; raises LabError when the guest or the watch failed."""
    chan = inguest.Channel(inguest.channel_path(scratch))

    def alive() -> None:
        if guest.process is not None and guest.process.poll() is not None:
            raise LabError(f"QEMU exited (status {guest.process.returncode}) while watching; "
                           "last console lines:\n" + "\n".join(guest.console_tail(30)))

    # bpftrace may attach for as long as the lab waits for the watch (minutes under TCG in an arm64 guest)
    args = (["--json"] if o.as_json else []) + ["--no-debuginfo", "--attach-timeout", str(int(timeout))]
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
            extra: dict = {}
            if step.what in ("hugepages", "hugepages-1g"):
                kb = 2048 if step.what == "hugepages" else 1 << 20
                before = guest.account.nr_hugepages.get(kb) if guest.account is not None else None
                res = chan.step("hugepages", [str(kb), step.value], timeout, alive)
                guest.account = parse_account(res.stdout)
                short = shortfall(step, kb, before, guest.account.nr_hugepages.get(kb), res.status, res.stderr)
                if short:
                    extra["short"] = short
                got = guest.account.nr_hugepages.get(kb, 0)
                progress(f"{step.what} {got} after {time.monotonic() - t0:.1f}s" + (f": {short}" if short else ""))
            elif step.what == "hotplug":
                total_before = guest.account.mem_total_kb if guest.account is not None else None
                guest.hotplug(step.value, progress=progress)  # its own deadline, scaled to the size
                # a fresh account: the state line hotplug() waited for may have read MemTotal
                # before the last block's online_pages() counted its pages
                guest.account = parse_account(chan.step("offline", [], timeout, alive).stdout)
                d = guest.dimms[-1]
                extra = {"dimm": dimm_json(d), "memmap_on_memory": guest.spec.memmap_on_memory}
                short = memmap_in_ram(guest.spec.memmap_on_memory, d.size, total_before, guest.account.mem_total_kb)
                if short:
                    extra["short"] = short
                    progress(f"{d.device} {d.id}: {short}")
                progress(f"{d.device} {d.id} at {d.addr:#x}-{d.end - 1:#x} {guest.spec.hotplug_online or 'added'}"
                         f"{' (memmap_on_memory=1)' if guest.spec.memmap_on_memory else ''} after {time.monotonic() - t0:.1f}s")
            elif step.what == "devdax":
                extra = devdax(guest, chan, sum(1 for a in accounts if a["step"].startswith("devdax=")), timeout, alive)
                dax = extra.get("devdax")
                progress(extra["short"] if dax is None else
                         f"{dax['device']} at {dax['data_start']} ({dax['data_size']} bytes, align {dax['align'] >> 20}M, "
                         f"memmap {'in RAM' if dax['mode'] == 'ram' else 'on the device'}) after {time.monotonic() - t0:.1f}s")
            else:
                d, short = unplug(guest, chan, timeout, alive, progress)
                extra = {"dimm": dimm_json(d), **({"short": short} if short else {})}
                if short:
                    progress(f"unplug {d.id}: {short}")
            if not chan.settle_watch(timeout, alive):
                break  # it ended: its reason comes with its output below
            accounts.append({"step": str(step), **account_json(guest.account), **extra})
        progress("stopping watch (it re-checks what is left and ends)")
        res = chan.stop_watch(timeout, alive)
    finally:
        chan.close()
    return res.status, res.stdout, accounts, res.stderr


def devdax(guest, chan, nth: int, timeout: float, alive) -> dict:
    """``devdax=SIZE``: the ``nth`` NVDIMM boot left raw (``Nvdimm.deferred``) made device-dax
    in the guest, as ndctl create-namespace -m devdax does through sysfs
    (guest.devdax_script): drivers/dax/pmem.c dax_pmem_probe() -> devm_memremap_pages()
    (mm/memremap.c pagemap_range(): arch_add_memory(), then memmap_init_zone_device()).

    :return: the step's JSON: ``nvdimm`` (where QEMU placed it), ``devdax`` (the guest's own
    sysfs account of the device), or ``short`` where the kernel refused (in its words)."""
    spots = [i for i, n in enumerate(guest.spec.nvdimms) if n.deferred]
    if nth >= len(spots):
        raise LabError("--then devdax: no NVDIMM left raw for it (boot gives one per devdax step)")
    i = spots[nth]
    n = guest.spec.nvdimms[i]  # made as devdax_script would make it at boot
    res = chan.devdax(i, DEVDAX_ALIGNS[n.devdax_align], DEVDAX_LOCATIONS[n.location], timeout, alive)
    guest.account = parse_account(res.stdout)
    out: dict = {"nvdimm": dimm_json(guest.nvdimms[i])} if i < len(guest.nvdimms) else {}
    made = parse_devdax(res.stdout)
    if res.status or not made:
        err = [l for l in res.stderr.strip().splitlines() if l.strip()]
        return {**out, "short": "the guest did not make it device-dax: " + (err[-1].removeprefix("devdax: ") if err else
                                                                              f"status {res.status}, no device")}
    guest.devdax.append(made[0])
    return {**out, "devdax": devdax_json(made[0])}


def devdax_json(d) -> dict:
    return {"device": d.device, "region": d.region, "align": d.align, "mode": d.mode,
            "namespace_start": hex(d.namespace_start), "namespace_size": d.namespace_size,
            "data_start": hex(d.data_start), "data_size": d.data_size}


def dimm_json(d) -> dict:
    return {"id": d.id, "addr": hex(d.addr), "size": d.size, "node": d.node, "device": d.device}


def shortfall(step: Step, kb: int, before: Optional[int], got: Optional[int], status: int, stderr: str) -> str:
    """What the kernel did not do of a ``hugepages``/``hugepages-1g`` step, in words ('' if it
    did all). The write returns once the kernel gave up (mm/hugetlb.c set_max_huge_pages():
    it allocates until the count is met or an allocation fails), so nothing here waits."""
    size = "2M" if kb == 2048 else "1G"
    if got is None:
        # hugetlb_add_hstate(): x86_64 registers the 1G size only with CONFIG_CONTIG_ALLOC and a
        # CPU with gbpages (arch/x86/mm/hugetlbpage.c gigantic_pages_init())
        return f"the kernel has no {size} hugepage pool (no hugepages-{kb}kB in /sys/kernel/mm/hugepages)"
    want = int(step.value)
    if got == want:
        return ""
    if status:
        return f"the kernel refused the write ({stderr.strip() or f'status {status}'}); the pool has {got}"
    if want > got:
        # alloc_pool_huge_folio(); a 1G page: alloc_gigantic_folio(), from hugetlb_cma if reserved, else
        # alloc_contig_pages(), which needs 1 GiB of free or movable, 1G-aligned memory in one zone
        why = (" (the kernel found no free or movable, 1G-aligned GiB: alloc_gigantic_folio)" if kb != 2048 else
               " (the kernel found no more free 2M)")
        return f"the kernel allocated {got - (before or 0)} of the {want - (before or 0)} {size} pages asked for{why}; the pool has {got}"
    return f"the kernel freed the pool to {got}, not {want} (pages in use stay)"


def memmap_in_ram(memmap_on_memory: bool, size: int, total_before: Optional[int], total_after: int) -> str:
    """A hot-add with memory_hotplug.memmap_on_memory=1 whose memmap the kernel put in RAM
    instead, in words ('' otherwise), from the guest's own MemTotal: the struct pages a block
    hosts are not managed memory (mm/memory_hotplug.c mhp_init_memmap_on_memory() puts them in
    the zone as present, never in the buddy), so a DIMM that hosts its memmap grows MemTotal by
    less than its size, and one whose memmap is in RAM by all of it. The kernel decides per
    request (mhp_supports_memmap_on_memory(): in 6.1 only a request of exactly one memory block,
    since upstream 6b8f0798b85a "mm/memory_hotplug: split memmap_on_memory requests across
    memblocks" each block of any whole number of them)."""
    if not memmap_on_memory or total_before is None or total_after - total_before != size >> 10:
        return ""
    return (f"the kernel put the DIMM's memmap in RAM, not on the DIMM (MemTotal grew by all of its {size >> 10} kB; "
            "mhp_supports_memmap_on_memory() refused a request of this size)")


def unplug(guest, chan, timeout: float, alive, progress) -> Tuple[object, str]:
    """Offline the last hot-added dimm's blocks in the guest, then remove it (QMP device_del;
    the guest's ACPI eject), waiting until its blocks are gone from sysfs.

    :return: ``(the dimm, '')``, or ``(the dimm, why)`` where the kernel did not let it go
    (a block it could not offline, an eject it refused): the watch goes on, the step says so.
    """
    if not guest.dimms:
        raise LabError("--then unplug: no hot-added dimm to remove")
    d = guest.dimms[-1]
    bs = guest.account.memory_block_size
    blocks = list(range(d.addr // bs, d.end // bs))
    mark = len(guest.console_text())
    res = chan.step("offline", [str(b) for b in blocks], timeout, alive)
    acc = parse_account(res.stdout)
    guest.account = acc
    left = [b for b in blocks if acc.memory_blocks.get(b) != "offline"]
    if res.status or left:
        # mm/memory_hotplug.c offline_pages(): -EBUSY once a page of the range cannot be
        # migrated (an unmovable allocation in a ZONE_NORMAL block)
        err = res.stderr.strip().splitlines()
        return d, (f"the kernel did not offline memory{left[0] if left else blocks[0]}"
                   f"{f' ({len(left)} of {len(blocks)} blocks)' if len(left) > 1 else ''}: "
                   f"{err[-1].removeprefix('sh: ') if err else 'state ' + str(acc.memory_blocks.get(left[0]))}"
                   f"{_kernel_said(guest, mark)}")
    # the offline events re-checked while the blocks are offline but still there
    if not chan.settle_watch(timeout, alive):
        return d, "the watch ended while the blocks were offline"
    guest.remove_request(d)  # device_del of a pc-dimm; a virtio-mem device's requested size lowered
    t_del = time.monotonic()
    deadline = time.monotonic() + max(120.0, timeout)
    while True:
        res = chan.step("offline", [], timeout, alive)  # no blocks: just the account
        acc = parse_account(res.stdout)
        if not any(b in acc.memory_blocks for b in blocks):
            break
        if time.monotonic() > deadline:
            guest.account = acc
            how = (f"after its requested size was lowered (the virtio-mem driver did not give the memory back)"
                   if d.device == "virtio-mem" else f"after device_del ({ospm_said(guest, d.id)})")
            return d, (f"{d.id}'s blocks still in the guest's sysfs {max(120.0, timeout):.0f}s {how}"
                       f"{_kernel_said(guest, mark)}")
        time.sleep(0.5)
    guest.account = acc
    guest.dimms.pop()
    progress(f"{d.device} {d.id} removed {time.monotonic() - t_del:.1f}s after its removal was asked for")
    return d, ""


#: ACPI _OST status codes for an eject (ACPI 6.x, 6.3.5 _OST; drivers/acpi/scan.c reports them)
_OST_STATUS = {0: "success", 1: "non-specific failure", 2: "unrecognized notify code", 0x80: "device ejection not supported",
               0x81: "device in use by an application", 0x82: "device busy", 0x83: "ejection dependency is busy or not supported",
               0x84: "ejection in progress (pending)"}


def ospm_said(guest, dimm_id: str) -> str:
    """What the guest's OSPM last told QEMU about ``dimm_id`` (QMP query-acpi-ospm-status:
    its _OST source and status), in words: the kernel's own answer to the eject request."""
    try:
        infos = guest.qmp("query-acpi-ospm-status") or []
    except LabError as e:
        return f"the ACPI eject did not remove the memory; query-acpi-ospm-status: {e}"
    mine = [i for i in infos if i.get("device") == dimm_id]
    if not mine or (mine[0].get("source"), mine[0].get("status")) == (0, 0):
        return "the guest's OSPM never answered the eject request (no _OST for the DIMM)"
    src, st = mine[0].get("source"), mine[0].get("status")
    return (f"the guest's last _OST for the DIMM: source {src:#x}, status {st:#x} "
            f"({_OST_STATUS.get(st, 'unknown')}); the ACPI eject did not remove the memory")


def _kernel_said(guest, mark: int) -> str:
    """The kernel's last console line since ``mark`` (its own reason), as '; the kernel: ...'."""
    lines = [l.strip() for l in guest.console_text()[mark:].replace("\r", "").split("\n")
             if re.match(r"\s*\[\s*\d+\.\d+\]", l)]
    return f"; the kernel: {lines[-1]}" if lines else ""


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
              f"memory blocks {', '.join(f'{n} {s}' for s, n in sorted(states.items()))}"
              + (f"; not done: {a['short']}" if a.get("short") else ""))
