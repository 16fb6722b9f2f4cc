"""`inspect-vmemmap boot`: the real CLI boots Debian kernels under QEMU (TCG) and checks them,
from the host through QMP, inside the guest (--in-guest), after hotplug, and through a dump.

Ground truth besides the tool itself: the guest's own account (`guest`: /proc/meminfo, memory
block states, nodes) and the kernel command line each scenario implies. One boot per test
(about 10 s each; the in-guest one about 30 s).
"""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from tests.kernel.conftest import cli_json, errors

pytestmark = pytest.mark.kernel

SECTION = 128 << 20
HVO_6_12 = ("--debian", "6.12", "--mem", "1G", "--hugepages", "4", "--hvo")


def cli(*args: str, timeout: float = 900):
    return subprocess.run([sys.executable, "-m", "inspect_vmemmap", *args], capture_output=True, text=True,
                          timeout=timeout)


def boot_json(*args: str) -> dict:
    p = cli("boot", *args, "--json")
    assert "Traceback" not in p.stderr, p.stderr
    assert p.returncode == 0, f"boot {' '.join(args)} exited {p.returncode}: {p.stderr}"
    # progress: one deliberate line per step on stderr, nothing on stdout but the document
    assert all(line.startswith("[boot] ") for line in p.stderr.splitlines()), p.stderr
    return cli_json(p.stdout, "boot")


def section_view(doc: dict) -> list:
    return [(s["nr"], s["start_pfn"], tuple(s["flags"]), s["nid"]) for s in doc["sections"]["list"]]


@pytest.fixture(scope="module")
def outside():
    """`boot --debian 6.12 --mem 1G --hugepages 4 --hvo --json`, checked from the host."""
    return boot_json(*HVO_6_12)


def test_boot_checks_from_outside(outside):
    doc = outside
    assert doc["schema"] == "inspect-vmemmap/1"
    assert doc["target"]["source"] == "qemu"
    assert doc["target"]["kernel_release"].startswith("6.12.")
    assert doc["findings"] == [] and doc["summary"]["errors"] == 0
    assert doc["sections"]["present"] == 8 and doc["sections"]["early"] == 8
    assert doc["hvo"]["optimized_folios"] == 4
    g = doc["guest"]
    assert g["check"] == "qemu"
    assert g["hugepages_total"] == 4 and g["hugepage_size_kb"] == 2048
    assert g["nodes"] == [0]  # one node, as booted
    assert 900_000 < g["mem_total_kb"] < 1 << 20
    assert g["memory_block_size"] == SECTION
    assert g["memory_blocks"] == {str(b): "online" for b in range(8)}
    assert "hugetlb_free_vmemmap=on" in g["cmdline"] and "hugepages=4" in g["cmdline"]


def test_in_guest_agrees_with_outside(outside):
    """The tool run inside the guest on its own /proc/kcore (host Python over 9p) finds what
    the check from the host found in the same scenario."""
    doc = boot_json(*HVO_6_12, "--in-guest")
    assert doc["target"]["source"] == "live"
    assert doc["target"]["type_source"] == "btf"
    assert doc["guest"]["check"] == "in-guest"
    assert doc["guest"]["hugepages_total"] == 4
    assert doc["findings"] == outside["findings"] == []
    for key in ("present", "has_mem_map", "online", "early", "zone_device"):
        assert doc["sections"][key] == outside["sections"][key], key
    assert section_view(doc) == section_view(outside)
    # Two boots: where the 4 HugeTLB folios land differs, and with it how many PMDs HVO
    # split (one per 128M of RAM holding a folio, 1 to 4). What does not differ: every
    # split PMD is 512 PTEs, the same vmemmap is mapped, the same PTEs are read-only.
    for d in (doc, outside):
        v = d["vmemmap"]
        assert 1 <= v["split_pmds"] <= 4 and v["leaves"]["4K"] == 512 * v["split_pmds"], v
    def pmds(d):
        return d["vmemmap"]["leaves"]["2M"] + d["vmemmap"]["split_pmds"]
    assert pmds(doc) == pmds(outside)
    assert doc["vmemmap"]["leaves"]["1G"] == outside["vmemmap"]["leaves"]["1G"]
    assert doc["vmemmap"]["readonly_ptes"] == outside["vmemmap"]["readonly_ptes"]
    assert doc["hvo"] == outside["hvo"]
    assert doc["summary"] == outside["summary"]


def test_hotplug_memmap_on_memory():
    doc = boot_json("--debian", "6.12", "--hotplug", "1G", "--memmap-on-memory")
    assert doc["findings"] == []
    (dimm,) = doc["guest"]["dimms"]
    addr, size = int(dimm["addr"], 16), dimm["size"]
    assert size == 1 << 30
    hot = range(addr // SECTION, (addr + size) // SECTION)
    by_nr = {s["nr"]: s for s in doc["sections"]["list"]}
    for nr in hot:
        assert set(by_nr[nr]["flags"]) == {"present", "has_mem_map", "online"}, by_nr[nr]  # not early
        assert doc["guest"]["memory_blocks"][str(nr * SECTION // doc["guest"]["memory_block_size"])] == "online"
    boot = [s for nr, s in by_nr.items() if nr not in hot]
    assert len(boot) == 8 and all("early" in s["flags"] for s in boot)
    assert doc["sections"]["present"] == 8 + len(hot)
    assert doc["sections"]["online"] == 8 + len(hot)
    assert doc["sections"]["early"] == 8
    assert "memory_hotplug.memmap_on_memory=1" in doc["guest"]["cmdline"]


def test_two_guests_booting_at_once():
    """Two guests boot and hot-add memory side by side on this 2-core machine, each slowed by
    the other: boot waits on each guest's own state (its sysfs memory block states, on its
    state port), within deadlines scaled to what was asked, and says what it waits for."""
    runs = [("--debian", "6.12", "--hotplug", "1G", "--memmap-on-memory"),
            ("--debian", "7.2", "--hugepages", "4", "--hotplug", "512M")]
    procs = [subprocess.Popen([sys.executable, "-m", "inspect_vmemmap", "boot", *args, "--json"],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for args in runs]
    outs = [p.communicate(timeout=1200) for p in procs]
    for args, p, (out, err) in zip(runs, procs, outs):
        assert p.returncode == 0, f"boot {' '.join(args)} exited {p.returncode}: {err}"
        assert "waiting up to" in err and "for its /init to report ready" in err, err
        assert "for the guest's sysfs to show memory" in err, err
        doc = cli_json(out, "boot")
        assert errors(doc) == [], doc["findings"]
        g = doc["guest"]
        (dimm,) = g["dimms"]
        addr, size = int(dimm["addr"], 16), dimm["size"]
        assert size == (1 << 30 if "1G" in args else 512 << 20)
        blocks = range(addr // g["memory_block_size"], (addr + size) // g["memory_block_size"])
        assert [g["memory_blocks"][str(b)] for b in blocks] == ["online"] * len(blocks)
        hot = range(addr // SECTION, (addr + size) // SECTION)
        by_nr = {s["nr"]: s for s in doc["sections"]["list"]}
        assert all("online" in by_nr[nr]["flags"] for nr in hot)
        # memmap_on_memory: every hot-added block hosts its own memmap, as the model predicts
        assert doc["self_hosted"]["memory_blocks"] == (len(blocks) if "--memmap-on-memory" in args else 0)
    assert outs[1][0] and cli_json(outs[1][0], "boot")["guest"]["hugepages_total"] == 4


def test_dump_agrees_with_check_core(tmp_path):
    """--dump writes an ELF vmcore that `check --core` reads to the same result; the scenario
    (7.2, one HVO-optimised 1G hugepage) also gets enough memory by default for the 1G page."""
    core = tmp_path / "vmcore"
    doc = boot_json("--debian", "7.2", "--hugepages-1g", "1", "--hvo", "--dump", str(core))
    assert doc["guest"]["hugepages"]["1048576kB"] == 1
    assert doc["hvo"]["optimized_folios"] == 1
    assert doc["findings"] == []
    p = cli("check", "--core", str(core), "--json")
    assert p.returncode == 0, p.stderr
    dumped = cli_json(p.stdout, "check")
    assert dumped["target"]["source"] == "vmcore"
    assert dumped["target"]["vmemmap_base"] == doc["target"]["vmemmap_base"]
    for key in ("sections", "vmemmap", "hvo", "summary"):
        assert dumped[key] == doc[key], key


@pytest.mark.parametrize("args, words", [
    (("--kernel", "/nonexistent"), ("/nonexistent", "no such file")),
    ((), ("--debian", "--kernel")),
    (("--debian", "6.12", "--mem", "2G", "--hugepages-1g", "1"), ("too small", "3G")),
    (("--debian", "6.12", "--memmap-on-memory"), ("--hotplug",)),
    (("--debian", "9.9"), ("--debian",)),
])
def test_errors_are_one_line(args, words):
    p = cli("boot", *args, timeout=60)
    assert p.returncode == 2, (p.returncode, p.stdout, p.stderr)
    lines = p.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("inspect-vmemmap: "), p.stderr
    assert all(w in lines[0] for w in words), lines[0]
    assert p.stdout == ""


def test_guest_that_does_not_come_up():
    """The reason first, on one line; then the guest's last console lines, indented."""
    p = cli("boot", "--debian", "6.12", "--cmdline", "rdinit=/nonexistent", "-q", timeout=300)
    assert p.returncode == 2, (p.returncode, p.stderr)
    first, *tail = p.stderr.rstrip("\n").split("\n")
    assert first.startswith("inspect-vmemmap: QEMU exited") and "kernel panic: VFS" in first, first
    assert tail and all(line.startswith("    ") for line in tail), p.stderr
    assert any("Kernel panic - not syncing" in line for line in tail), p.stderr
    assert p.stdout == ""


def test_in_guest_under_kernel_lockdown():
    """Live trouble: kernel lockdown denies /proc/kcore; one line naming it, exit 2."""
    p = subprocess.run([sys.executable, "-m", "inspect_vmemmap", "boot", "--debian", "6.12", "--in-guest", "-q",
                        "--cmdline", "lockdown=confidentiality"], capture_output=True, text=True, timeout=600)
    assert p.returncode == 2, (p.returncode, p.stdout, p.stderr)
    lines = [l for l in p.stderr.splitlines() if l.strip()]
    assert len(lines) == 1 and "/proc/kcore" in lines[0] and "lockdown" in lines[0], p.stderr
    assert "Traceback" not in p.stderr
