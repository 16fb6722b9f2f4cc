"""`watch --interval` catches what no probe sees, and a ranged re-check equals the whole
check, on a real kernel (Debian 6.12, x86_64, HVO): one boot.

The guest's RAM is a file shared with the host (memory-backend-file, share=on), so the
host can write into the running guest's page tables. `watch --json --interval` runs in
the guest (the host's Python and bpftrace over 9p, as `boot --in-guest --watch`). Then:

1. the guest grows its 2M pool: every HVO remap is an event whose re-check read only the
   sections it touched (``check.sections``), and is clean;
2. with the guest stopped, from the host through QMP, the re-check of each section (and of
   a run of them) gives what the whole check gives there (live.recheck.restrict);
3. the host writes a PMD into the guest's vmemmap page table where no section needs one,
   mapping the struct pages of the section above the top of RAM onto the memory of the
   highest section's that one 2M PMD maps: no probe sees a store from the host; the next periodic check must find
   it there, as an ``alias`` error at that section and pfn range (and its
   ``stray-mapping`` warning), and no other error.

The fault is chosen to be harmless to the guest: nothing in the kernel touches struct
pages of pfns it has no memory for. Where the entry is, and what it must be, comes from a
walk of the guest's page tables by hand (tests/kernel/independent.py: drgn with the guest's
debug info for init_top_pgt and vmemmap_base, one physical read per level, nothing of
inspect_vmemmap.pgtable), and the fault is written into the RAM file at that entry.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
import time
from dataclasses import replace
from pathlib import Path

import pytest

from inspect_vmemmap.lab import inguest
from inspect_vmemmap.lab.guest import GuestSpec, boot_guest

pytestmark = pytest.mark.kernel

MEM_MIB = 1024
INTERVAL = "20"  # seconds between the watch's periodic full checks
PSE = 1 << 7  # x86_64 PS: a PMD that maps 2M (SDM vol. 3, 4.5)


def _lines(text: str) -> list:
    return [json.loads(l) for l in text.splitlines() if l.strip()]


class Watched:
    def __init__(self, guest, chan, ram: Path) -> None:
        self.guest, self.chan, self.ram = guest, chan, ram

    def alive(self) -> None:
        if self.guest.process is not None and self.guest.process.poll() is not None:
            raise AssertionError("QEMU exited:\n" + "\n".join(self.guest.console_tail(30)))

    def peek(self) -> list:
        return _lines(self.chan.peek_watch(600, self.alive).stdout)

    def read_u64(self, phys: int) -> int:
        with open(self.ram, "rb") as f:
            f.seek(phys)
            return int.from_bytes(f.read(8), "little")

    def write_u64(self, phys: int, value: int) -> None:
        fd = os.open(self.ram, os.O_RDWR)
        try:
            os.pwrite(fd, value.to_bytes(8, "little"), phys)
        finally:
            os.close(fd)


@pytest.fixture(scope="module")
def watched(tmp_path_factory):
    work = tmp_path_factory.mktemp("watch-fault")
    scratch = Path(tempfile.mkdtemp(prefix="ivm-wf-", dir="/tmp"))  # short: holds a socket
    ram = work / "ram"
    chan_path = inguest.channel_path(scratch)
    spec = GuestSpec(debian="6.12", mem=f"{MEM_MIB}M", hugepages=4, hvo=True,
                     init_extra=inguest.init_script("x86_64"),
                     qemu_args=tuple(inguest.qemu_args("x86_64", chan_path)) + (
                         "-object", f"memory-backend-file,id=ivm-ram,size={MEM_MIB}M,mem-path={ram},share=on",
                         "-machine", "memory-backend=ivm-ram"))
    from inspect_vmemmap.lab.debian import fetch_debian_kernel

    kernel = fetch_debian_kernel("6.12", "x86_64")
    spec = replace(spec, extra_modules=tuple(inguest.modules_for("x86_64", kernel.modules_dep())))
    try:
        with boot_guest(spec, workdir=work / "guest", kernel=kernel) as guest:
            chan = inguest.Channel(chan_path)
            w = Watched(guest, chan, ram)
            try:
                early = chan.start_watch(["--json", "--no-debuginfo", "--interval", INTERVAL], 900, w.alive)
                assert early is None, early
                assert chan.settle_watch(900, w.alive)
                yield w
            finally:
                chan.close()
    finally:
        shutil.rmtree(scratch, ignore_errors=True)


def _qmp_target(guest):
    from inspect_vmemmap.source.target import open_target

    return open_target(qemu=str(guest.qmp_socket), vmlinux=str(guest.kernel.vmlinux))


def test_watch_recheck_range_and_a_host_written_fault(watched):
    from inspect_vmemmap.commands import Analysis
    from inspect_vmemmap.live.recheck import read_window, restrict
    from tests.kernel import independent

    w = watched
    # 1. the pool grows by 4: four HVO remaps, each re-checked over its sections alone
    res = w.chan.step("hugepages", ["2048", "8"], 900, w.alive)
    assert res.status == 0, res.stderr
    assert w.chan.settle_watch(900, w.alive)
    before = w.peek()
    events = [l for l in before if "event" in l and l["event"]["kind"] == "hvo-optimize"]
    assert len(events) == 4
    for l in events:
        s0, s1 = l["event"]["sections"]
        assert l["check"]["sections"][0] <= s0 <= s1 <= l["check"]["sections"][1], l
        assert l["check"]["errors"] == 0 and l["check"]["warnings"] == 0, l
    periodic = [l for l in before if "event" in l and l["event"]["kind"] == "periodic"]
    assert periodic and all(l["check"]["errors"] == 0 for l in periodic), periodic

    # 2. from the host, the guest stopped: each section's re-check against the whole check
    w.guest.qmp("stop")
    try:
        t = _qmp_target(w.guest)
        lay = t.layout
        a = Analysis(t)
        _doc, full, fres, _inputs, _notes = a.check()
        assert [f.to_json() for f in full if f.severity == "error"] == []
        present = sorted(s.nr for s in a.sections if s.present)
        for win in [(nr, nr) for nr in present] + [(present[0], present[-1])]:
            wr = read_window(t, win, fres.shared_tails)
            key = lambda f: (f.kind, f.severity, f.section, f.pfn_start, f.pfn_end)  # noqa: E731
            assert sorted(map(key, wr.findings)) == sorted(map(key, restrict(full, lay, wr.window))), win
        # 3. where to write: the PMD entries, found by hand (independent.py, drgn)
        prog = t.program
        base = independent.vmemmap_base(prog)
        pmd = independent.levels(prog) - 2
        shift, sps = independent.pfn_section_shift(prog), prog.type("struct page").size
        sec_va = lambda nr: base + (nr << shift) * sps  # noqa: E731
        # the PMD past the last present section (none there) takes a copy of the highest
        # section's 2M PMD leaf (a section whose PMD a HugeTLB folio split has none)
        fault = present[-1] + 1
        dst_addr, dst = independent.entry_addr(prog, sec_va(fault), pmd)
        src_nr = next(nr for nr in reversed(present) if independent.entry_addr(prog, sec_va(nr), pmd)[1] & PSE)
        src_addr, src = independent.entry_addr(prog, sec_va(src_nr), pmd)
        del t, a, prog
    finally:
        w.guest.qmp("cont")
    assert src & 1 and src & PSE and dst == 0, (hex(src), hex(dst))
    assert w.read_u64(src_addr) == src and w.read_u64(dst_addr) == 0  # the RAM file is the guest's RAM

    # a PMD where no section needs one, onto a present section's struct pages' memory
    seen = len(w.peek())
    w.write_u64(dst_addr, src)
    try:
        # follow the watch until two periodic checks ended after the write: the second
        # began after it
        deadline = time.monotonic() + 1800
        while True:
            after = [l for l in w.peek()[seen:] if "event" in l and l["event"]["kind"] == "periodic"]
            if len(after) >= 2:
                break
            assert time.monotonic() < deadline, "no two periodic checks within 30 minutes"
            time.sleep(5)
    finally:
        w.write_u64(dst_addr, 0)
    out = w.chan.stop_watch(900, w.alive)
    assert out.status == 1, out.stderr  # an error was seen
    chk = after[1]["check"]
    pfns = (fault << lay.pfn_section_shift, ((fault + 1) << lay.pfn_section_shift) - 1)
    errs = [f for f in chk["findings"] if f["severity"] == "error"]
    assert [(f["kind"], f["section"], f["pfn_start"], f["pfn_end"]) for f in errs] == [("alias", fault, *pfns)], errs
    warns = [(f["kind"], f["section"], f["pfn_start"], f["pfn_end"]) for f in chk["findings"] if f["severity"] == "warning"]
    assert warns == [("stray-mapping", fault, *pfns)], warns
    # no probe saw it: no event between the write and the periodic checks
    assert not [l for l in _lines(out.stdout)[seen:] if "event" in l and l["event"]["kind"] != "periodic"]
