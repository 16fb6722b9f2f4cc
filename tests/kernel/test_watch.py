"""`watch` (eBPF) on real kernels: `boot --in-guest --watch --then ...` grows the HugeTLB
pool with HVO on, shrinks it and hot-adds a pc-dimm while watch runs inside the guest.

Truth from outside the code under test: the guest's own account after each step
(nr_hugepages, its memory blocks in sysfs) and QEMU's placement of the DIMM
(query-memory-devices). Every change must be reported exactly once, as many as the guest's
counts say, each with a clean re-check of its range.
"""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from tests.kernel.conftest import cli_json

pytestmark = pytest.mark.kernel

SECTION_PAGES = (128 << 20) >> 12
FOLIO_PAGES = 512


def watch_boot(series: str) -> tuple:
    args = ["boot", "--debian", series, "--mem", "1G", "--hugepages", "4", "--hvo", "--in-guest", "--watch",
            "--then", "hugepages=12", "--then", "hugepages=6", "--then", "hotplug=1G", "--json", "-q"]
    p = subprocess.run([sys.executable, "-m", "inspect_vmemmap", *args], capture_output=True, text=True, timeout=1800)
    assert p.returncode == 0, p.stderr
    return cli_json(p.stdout, "boot_watch"), p.stderr


@pytest.fixture(scope="module", params=["6.12", "7.2", "6.1"])
def watched(request):
    return watch_boot(request.param)


def by_kind(doc: dict, kind: str) -> list:
    return [e for e in doc["watch"]["events"] if e["kind"] == kind]


def test_every_change_once_with_a_clean_recheck(watched):
    doc, _ = watched
    steps = {s["step"]: s for s in doc["guest"]["steps"]}
    pool = [4] + [steps[s]["hugepages"]["2048kB"] for s in ("hugepages=12", "hugepages=6")]
    assert pool == [4, 12, 6]  # the guest's own count (the lab booted with 4)

    optimized, restored = by_kind(doc, "hvo-optimize"), by_kind(doc, "hvo-restore")
    assert len(optimized) == pool[1] - pool[0] and len(restored) == pool[1] - pool[2]
    for e in optimized + restored:
        assert e["order"] == 9 and e["pfn_start"] % FOLIO_PAGES == 0
        assert e["pfn_end"] - e["pfn_start"] + 1 == FOLIO_PAGES
    assert len({e["pfn_start"] for e in optimized}) == len(optimized)
    # each folio the pool gave back was one the pool had grown by (the newest go first)
    assert {e["pfn_start"] for e in restored} <= {e["pfn_start"] for e in optimized}
    for e in optimized:  # re-checked before the pool shrank: in the pool, optimized
        assert e["check"]["after"] == {**e["check"]["after"], "in_pool": True, "optimized": True}
    for e in restored:
        assert e["check"]["after"]["in_pool"] is False

    (add,) = by_kind(doc, "section-add")
    (dimm,) = doc["guest"]["dimms"]
    first, size = int(dimm["addr"], 16) >> 12, dimm["size"] >> 12
    assert (add["pfn_start"], add["pfn_end"]) == (first, first + size - 1)
    s0, s1 = add["sections"]
    assert s1 - s0 + 1 == size // SECTION_PAGES == 8
    new_blocks = set(steps["hotplug=1G"]["memory_blocks"]) - set(steps["hugepages=6"]["memory_blocks"])
    assert len(new_blocks) == 8 and all(steps["hotplug=1G"]["memory_blocks"][b] == "online" for b in new_blocks)
    assert add["check"]["after"]["sections_online"] == 8

    for e in doc["watch"]["events"]:
        assert e["check"]["errors"] == 0 and e["check"]["warnings"] == 0, e
    assert doc["summary"]["errors"] == 0
    end = doc["watch"]["end"]
    assert end["lost"] == 0 and end["unpaired"] == 0
    assert end["by_kind"] == {"hvo-optimize": 8, "hvo-restore": 6, "section-add": 1}


def test_probes_chosen_by_what_the_kernel_has(watched):
    doc, _ = watched
    probes = {p["function"]: p for p in doc["watch"]["probes"]}
    attached = {f for f, p in probes.items() if p["attached"]}
    # one per-folio HVO function each way, whichever this kernel has
    assert len(attached & {"__hugetlb_vmemmap_optimize_folio", "hugetlb_vmemmap_optimize_folio",
                           "hugetlb_vmemmap_optimize"}) == 1
    assert len(attached & {"__hugetlb_vmemmap_restore_folio", "hugetlb_vmemmap_restore_folio",
                           "hugetlb_vmemmap_restore"}) == 1
    assert "add_memory_resource" in attached
    assert all(p["why"] for p in probes.values() if not p["attached"])


# --- race-exact live check: check inside a guest whose HugeTLB pool churns ----------------------

# (gently: Debian 6.12.117 under TCG reports "Bad page state" and leaks pages while its HVO
# pool churns, with or without this tool; a faster churn runs a 1.5G guest out of memory
# before the check ends)
CHURN = ("( while :; do for n in 4 0; do echo $n > /proc/sys/vm/nr_hugepages; "
         "echo IVM-HP $(cat /proc/sys/vm/nr_hugepages); sleep 1; done; done ) &")


@pytest.fixture(scope="module")
def churning(tmp_path_factory):
    from inspect_vmemmap.lab import GuestSpec, boot_guest, inguest
    from inspect_vmemmap.lab.debian import fetch_debian_kernel

    kernel = fetch_debian_kernel("6.12", "x86_64")
    wd = tmp_path_factory.mktemp("churn")
    chan = inguest.channel_path(wd)
    spec = GuestSpec(debian="6.12", mem="2G", hvo=True, la57=False,
                     extra_modules=tuple(inguest.modules_for("x86_64", kernel.modules_dep())),
                     init_extra=inguest.init_script("x86_64") + CHURN,
                     qemu_args=tuple(inguest.qemu_args("x86_64", chan)))
    with boot_guest(spec, workdir=wd, kernel=kernel) as guest:
        c = inguest.Channel(chan)
        try:
            yield guest, c
        finally:
            c.close()


def test_live_check_under_churn_tells_races_by_their_events(churning):
    import re

    guest, chan = churning
    before = len(re.findall(r"IVM-HP \d+", guest.console_text()))
    res = chan.run_check(["--json", "--no-debuginfo"], timeout=900)
    changes = len(re.findall(r"IVM-HP \d+", guest.console_text())) - before
    assert res.status == 0, res.stderr
    doc = cli_json(res.stdout, "check")
    assert doc["target"]["race_detection"] == "ebpf" and doc["target"]["reads"] == 1
    assert changes >= 2, "the pool did not change during the check"  # the guest's own count
    assert doc["target"]["changes_during_read"] > 0
    assert [f for f in doc["findings"] if f["severity"] == "error"] == []
    for f in doc["findings"]:
        if f["kind"] == "race":
            ev = f["event"]
            assert ev["kind"] in ("hvo-optimize", "hvo-restore") and ev["task"]
            if "pfn_start" in f:  # the race is in the range of the change it names
                assert f["pfn_start"] <= ev["pfn_end"] and f.get("pfn_end", f["pfn_start"]) >= ev["pfn_start"]
