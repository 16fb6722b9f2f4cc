"""Issue 19 on real kernels: Debian 6.12 riscv64 guests in Sv57, Sv48 and Sv39.

One boot and one dump per paging mode serve every test here. The truth is not the tool's:
drgn's own mmzone helpers and a naive page-table walk written below on drgn's physical
reads (drgn cannot translate riscv64 virtual addresses, so the test lends it the two
linear translations the kernel itself exports, and walks the tables itself).
"""

from __future__ import annotations

import json
import mmap
import os
import struct
import subprocess
import sys
import threading
from dataclasses import dataclass
from pathlib import Path

import drgn
import pytest
from drgn.helpers.linux.mmzone import decode_section_flags, for_each_present_section, section_mem_map_addr

from inspect_vmemmap.lab import GuestSpec, boot_guest, inguest
from inspect_vmemmap.lab.debian import fetch_debian_kernel

pytestmark = pytest.mark.kernel

U64 = (1 << 64) - 1

#: scenario -> the guest. The kernel picks Sv57 on QEMU's rv64 CPU, no5lvl/no4lvl lower it
#: (arch/riscv/mm/init.c set_satp_mode; the lab checks the guest's cpuinfo "mmu");
#: QEMU 7.2 has no satp-mode CPU properties
MODES = {
    "6.12-sv57": GuestSpec(debian="6.12", arch="riscv64", mem="1G", hugepages=8, hvo=True, paging="sv57"),
    "6.12-sv48": GuestSpec(debian="6.12", arch="riscv64", mem="1G", numa=2, paging="sv48"),
    "6.12-sv39": GuestSpec(debian="6.12", arch="riscv64", mem="1G", hugepages=4, hvo=True, paging="sv39"),
    # 7.2 caps the mode by the device tree's cpu "mmu-type" (arch/riscv/kernel/pi/fdt_early.c
    # set_satp_mode_from_fdt, arch/riscv/mm/init.c set_satp_mode), which QEMU 7.2's virt
    # board gives as riscv,sv48: Sv48 without being asked (6.12 probes satp and takes Sv57)
    "7.2-sv48": GuestSpec(debian="7.2", arch="riscv64", mem="1G", hugepages=8, hvo=True, paging="sv48"),
}
#: the dump faults are injected into
FAULTY = "6.12-sv39"
#: the scenarios whose boot also runs check inside the guest (issue 19's --in-guest, on a
#: Debian trixie riscv64 userland: lab/userland.py), started right after the dump so that
#: it runs while the tests read the dump. Not the NUMA one: that 2-CPU guest hung at its
#: first 9p mount (the console stops after "9p: Installing v9fs"; not understood yet)
IN_GUEST = ("6.12-sv57", "6.12-sv39", "7.2-sv48")
#: python3 under TCG riscv64 with a cold byte-code cache, BTF parsed in Python: minutes
IN_GUEST_TIMEOUT = 1500


def vmcoreinfo_in(core: Path) -> bytes:
    """The VMCOREINFO text in the dump's memory (QEMU's riscv virt takes no -device vmcoreinfo)."""
    with open(core, "rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as m:
        at = m.find(b"OSRELEASE=")
        while at >= 0:
            text = m[at:m.find(b"\0", at)]
            if b"\nNUMBER(va_kernel_pa_offset)=" in text:
                return bytes(text)
            at = m.find(b"OSRELEASE=", at + 1)
    raise AssertionError(f"no VMCOREINFO text in {core}")


def number(text: bytes, key: str) -> int:
    for line in text.decode().splitlines():
        k, _, v = line.partition("=")
        if k == f"NUMBER({key})":
            return int(v, 0)
    raise KeyError(key)


@dataclass
class Guest:
    name: str
    spec: GuestSpec
    guest: object
    core: Path
    vmlinux: Path
    prog: drgn.Program
    live: bool = True  # the guest still runs (QMP)
    in_guest: list = None  # [InGuestResult or LabError] once the in-guest check answered
    in_guest_thread: threading.Thread = None

    @property
    def mode(self) -> str:
        return self.spec.paging

    def run(self, *args: str, target: str = "core") -> tuple:
        assert target == "core" or self.live, f"{self.name} no longer runs"
        tgt = ["--core", str(self.core)] if target == "core" else ["--qemu", str(self.guest.qmp_socket)]
        cmd = [sys.executable, "-m", "inspect_vmemmap", *args, *tgt, "--vmlinux", str(self.vmlinux), "--json"]
        p = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
        assert p.returncode in (0, 1), f"{cmd} exited {p.returncode}: {p.stderr}"
        return p.returncode, json.loads(p.stdout)

    # -- the independent truth ------------------------------------------------------------

    def u64(self, phys: int) -> int:
        return struct.unpack("<Q", self.prog.read(phys, 8, True))[0]

    def levels(self) -> int:
        l5, l4 = self.prog["pgtable_l5_enabled"].value_(), self.prog["pgtable_l4_enabled"].value_()
        return 5 if l5 else 4 if l4 else 3

    def root(self) -> int:
        return (self.prog["swapper_pg_dir"].address_ - self.prog["kernel_map"].va_kernel_pa_offset.value_()) & U64

    def entry(self, va: int, depth: int) -> tuple:
        """(physical address, value) of the entry for ``va`` at ``depth`` (0: the top)."""
        shifts = [48, 39, 30, 21, 12][5 - self.levels():]
        table = self.root()
        for d in range(depth + 1):
            addr = table + ((va >> shifts[d]) & 511) * 8
            e = self.u64(addr)
            table = (e >> 10 & ((1 << 44) - 1)) << 12
        return addr, e

    def walk(self, start: int, end: int) -> list:
        """Every leaf (vaddr, size, phys, writable) in [start, end), one 4K step at a time:
        the privileged spec's walk (V clear: nothing; any of R/W/X: a leaf; else the next
        table at PPN << 12), from satp's swapper_pg_dir."""
        shifts = [48, 39, 30, 21, 12][5 - self.levels():]
        root = self.root()
        leaves = []
        va = start
        while va < end:
            table = root & U64
            for shift in shifts:
                e = self.u64(table + ((va >> shift) & 511) * 8)
                if not e & 1:
                    va = (va | ((1 << shift) - 1)) + 1
                    break
                if e & 0b1110:
                    size = 1 << shift
                    leaves.append((va & ~(size - 1), size, (e >> 10 & ((1 << 44) - 1)) << 12, bool(e & 4)))
                    va = (va & ~(size - 1)) + size
                    break
                table = (e >> 10 & ((1 << 44) - 1)) << 12
        return leaves


def open_truth(core: Path, vmlinux: Path) -> drgn.Program:
    text = vmcoreinfo_in(core)
    prog = drgn.Program(vmcoreinfo=text)
    prog.set_core_dump(str(core))
    # asm/page.h: the linear map is pa + (PAGE_OFFSET - phys_ram_base), the kernel image
    # va - va_kernel_pa_offset; both in VMCOREINFO (arch/riscv/kernel/vmcore_info.c)
    po, base = number(text, "PAGE_OFFSET"), number(text, "phys_ram_base")
    link, koff = number(text, "KERNEL_LINK_ADDR"), number(text, "va_kernel_pa_offset")
    prog.add_memory_segment(po, 1 << 40, lambda a, n, o, p: prog.read(a - po + base, n, True))
    prog.add_memory_segment(link, U64 + 1 - link, lambda a, n, o, p: prog.read((a - koff) & U64, n, True))
    prog.load_debug_info([str(vmlinux)], main=True)
    return prog


class Lab:
    """The scenarios' guests, booted on first use, one running at a time (the previous one
    is shut down; its dump and drgn program stay for the tests that read only the dump)."""

    def __init__(self, tmp_path_factory) -> None:
        self.tmp = tmp_path_factory
        self.done = {}
        self.running = None  # (name, context manager)

    def get(self, name: str, live: bool = True) -> "Guest":
        """The scenario's guest; with ``live`` still running (booted again if it was stopped)."""
        old = self.done.get(name)
        if old is not None and (old.live or not live):
            return old
        self.stop()
        if old is not None:
            os.unlink(old.core)
        spec = boot_spec = MODES[name]
        work = self.tmp.mktemp(f"riscv64-{name}")
        chan = inguest.channel_path(work)
        if name in IN_GUEST:
            boot_spec = inguest.with_in_guest(spec, fetch_debian_kernel(spec.debian, spec.arch), chan)
        cm = boot_guest(boot_spec, workdir=work, timeout=600)
        guest = cm.__enter__()
        self.running = (name, cm)
        core = guest.dump(work / "vmcore")
        g = self.done[name] = Guest(name, spec, guest, core, guest.kernel.vmlinux, open_truth(core, guest.kernel.vmlinux))
        if name in IN_GUEST:
            g.in_guest = []
            g.in_guest_thread = threading.Thread(target=_check_in_guest, args=(chan, g.in_guest), daemon=True)
            g.in_guest_thread.start()
        return g

    def stop(self) -> None:
        if self.running is not None:
            t = self.done[self.running[0]].in_guest_thread
            if t is not None:  # let it answer: a test of it may come after this stop
                t.join(IN_GUEST_TIMEOUT)
            self.running[1].__exit__(None, None, None)
            self.done[self.running[0]].live = False
            self.running = None

    def close(self) -> None:
        self.stop()
        for g in self.done.values():
            os.unlink(g.core)


def _check_in_guest(chan: Path, out: list) -> None:
    """``check`` inside the guest (the lab's request line), its answer appended to ``out``."""
    c = inguest.Channel(chan)
    try:
        out.append(c.run_check(["--json", "--no-debuginfo"], timeout=IN_GUEST_TIMEOUT))
    except Exception as e:  # the test reports it
        out.append(e)
    finally:
        c.close()


@pytest.fixture(scope="module")
def lab(tmp_path_factory):
    lab = Lab(tmp_path_factory)
    yield lab
    lab.close()


@pytest.fixture(scope="module", params=sorted(MODES))
def rv(request, lab):
    return lab.get(request.param)


def test_guest_runs_in_its_mode(rv):
    # the guest's own word (/proc/cpuinfo "mmu"), the kernel's variables, and the tool's
    assert f"mmu\t\t: {rv.mode}" in rv.guest.account.raw
    assert rv.levels() == {"sv39": 3, "sv48": 4, "sv57": 5}[rv.mode]
    _, doc = rv.run("sections")
    assert doc["target"]["arch"] == "riscv64"
    assert doc["target"]["pgtable_levels"] == rv.levels()
    assert doc["target"]["page_size"] == 4096


def test_sections_match_drgn(rv):
    prog = rv.prog
    status, doc = rv.run("sections")
    # asm/pgtable.h: vmemmap = VMEMMAP_START - vmemmap_start_pfn, QEMU virt's RAM (2 GiB)
    # rounded down to a section (6.12) or to a 16 GiB folio's vmemmap alignment (7.2)
    vmemmap_start = number(vmcoreinfo_in(rv.core), "VMEMMAP_START")
    first_pfn = prog["vmemmap_start_pfn"].value_()
    assert first_pfn == {"6.12": 0x80000, "7.2": 0}[rv.spec.debian]
    assert int(doc["target"]["vmemmap_base"], 16) == (vmemmap_start - first_pfn * 64) & U64
    truth = {nr: (decode_section_flags(sec), section_mem_map_addr(sec).value_())
             for nr, sec in for_each_present_section(prog)}
    ours = {s["nr"]: s for s in doc["sections"]["list"] if "present" in s["flags"]}
    assert sorted(ours) == sorted(truth) == list(range(16, 24))  # 1G from 2 GiB, 128M sections
    names = {"SECTION_MARKED_PRESENT": "present", "SECTION_HAS_MEM_MAP": "has_mem_map",
             "SECTION_IS_ONLINE": "online", "SECTION_IS_EARLY": "early"}
    for nr, (flags, coded) in truth.items():
        assert int(ours[nr]["coded_mem_map"], 16) == coded
        assert set(ours[nr]["flags"]) >= {names[f] for f in flags.split("|") if f in names}
    assert {s["nid"] for s in ours.values()} == set(rv.guest.account.nodes)
    assert status == 0 and not [f for f in doc["findings"] if f["severity"] == "error"]


def test_map_matches_naive_walk(rv):
    _, doc = rv.run("map")
    vm = doc["vmemmap"]
    base = int(doc["target"]["vmemmap_base"], 16)
    start, end = base + (16 << 15) * 64, base + (24 << 15) * 64
    assert int(vm["start"], 16) <= start and int(vm["end"], 16) >= end
    leaves = rv.walk(int(vm["start"], 16), int(vm["end"], 16))
    sizes = {}
    for _, size, _, _ in leaves:
        label = {4096: "4K", 2 << 20: "2M", 1 << 30: "1G"}[size]
        sizes[label] = sizes.get(label, 0) + 1
    assert {k: v for k, v in vm["leaves"].items() if v} == sizes
    assert vm["bytes_mapped"] == sum(size for _, size, _, _ in leaves) == 16 << 20
    assert vm["readonly_ptes"] == sum(1 for *_, w in leaves if not w)
    assert vm["split_pmds"] == len({va >> 21 for va, size, _, _ in leaves if size == 4096})
    by_va = {va: (size, phys, w) for va, size, phys, w in leaves}
    seen = 0
    for r in vm["ranges"]:
        for k in range(r["leaves"]):
            va = int(r["start"], 16) + k * r["page_size"]
            assert by_va[va] == (r["page_size"], int(r["phys_start"], 16) + k * r["phys_stride"], r["writable"])
            seen += 1
    assert seen == len(leaves)
    assert not [f for f in doc["findings"] if f["severity"] == "error"]


def test_hvo_folios_share_one_vmemmap_page(rv):
    """mm/hugetlb_vmemmap.c remaps a 2M folio's vmemmap tails (6.12: onto the head's page,
    7.2: onto the zone's shared tail page) with PAGE_KERNEL_RO, which riscv does not
    define: include/linux/pgtable.h makes it PAGE_KERNEL, so on riscv64 they stay writable."""
    _, doc = rv.run("map")
    folios = rv.guest.account.hugepages_total
    assert folios == rv.spec.hugepages
    shared = [r for r in doc["vmemmap"]["ranges"] if r["phys_stride"] == 0 and r["page_size"] == 4096]
    if not rv.spec.hvo:
        assert not shared
        return
    assert len(shared) == folios
    assert all(r["writable"] for r in shared)
    assert doc["vmemmap"]["readonly_ptes"] == 0
    if rv.spec.debian == "6.12":  # every page onto the head's (copied) page: 8 alike
        assert all(r["leaves"] == 8 for r in shared)
    else:  # 7.1+: the 7 tails onto the zone's one shared tail page, the head on its own
        assert all(r["leaves"] == 7 for r in shared) and len({r["phys_start"] for r in shared}) == 1


def test_check_is_consistent_with_the_guests_hvo(rv):
    """check on the dump and on the live guest (QMP: no vmcoreinfo device on riscv virt,
    the text is found in the guest's RAM), with DWARF and without (BTF, kallsyms)."""
    folios = rv.guest.account.hugepages_total if rv.spec.hvo else 0
    docs = [rv.run("check")[1], rv.run("check", target="qemu")[1]]
    status, btf = rv.run("check", "--no-debuginfo")
    docs.append(btf)
    assert btf["target"]["type_source"] == "btf"
    assert docs[1]["target"]["source"] == "qemu"
    for doc in docs:
        assert doc["summary"]["errors"] == 0, doc["findings"]
        assert doc["hvo"]["optimized_folios"] == folios
        assert doc["hvo"]["remapped_ptes"] == 7 * folios
        assert doc["sections"]["present"] == 8
    assert status == 0
    maps = [rv.run("map")[1], rv.run("map", target="qemu")[1]]
    assert maps[0]["vmemmap"]["ranges"] == maps[1]["vmemmap"]["ranges"]


@pytest.mark.parametrize("rv", IN_GUEST, indirect=True)  # the same module-scoped boots
def test_in_guest_check_agrees_with_the_dump(rv):
    """``check`` inside the guest, on its own /proc/kcore (python3, drgn 0.0.31 and the
    project over 9p, types from the kernel's BTF), sees what the dump of the same boot shows:
    the same sections, the same leaves and ranges, the same HVO count."""
    rv.in_guest_thread.join(IN_GUEST_TIMEOUT)
    assert rv.in_guest, "the in-guest check did not answer in time"
    res = rv.in_guest[0]
    assert not isinstance(res, Exception), res
    assert res.status == 0, res.stderr
    from tests import schema

    ig = json.loads(res.stdout)
    schema.validate(ig, "check")
    _, out = rv.run("check", "--no-debuginfo")
    assert ig["target"]["source"] == "live" and out["target"]["source"] == "vmcore"
    assert ig["target"]["type_source"] == "btf"
    for k in ("arch", "pgtable_levels", "vmemmap_base", "kernel_release"):
        assert ig["target"][k] == out["target"][k], k
    assert ig["sections"] == out["sections"]
    assert ig["sections"]["present"] == 8
    for k in ("start", "end", "leaves", "split_pmds", "readonly_ptes", "bytes_mapped", "ranges"):
        assert ig["vmemmap"][k] == out["vmemmap"][k], k
    assert ig["hvo"] == out["hvo"]
    assert ig["hvo"]["optimized_folios"] == (rv.guest.account.hugepages_total if rv.spec.hvo else 0)
    assert ig["summary"]["errors"] == 0, ig["findings"]


def test_boot_command_sv48_hvo(lab):
    """``boot --arch riscv64 ... --sv48`` (the boot command of issue 19), HVO in the one mode
    the fixture's guests leave without it."""
    lab.stop()  # one guest at a time
    cmd = [sys.executable, "-m", "inspect_vmemmap", "boot", "--arch", "riscv64", "--debian", "6.12", "--mem", "1G",
           "--hugepages", "8", "--hvo", "--sv48", "--json", "-q"]
    p = subprocess.run(cmd, capture_output=True, text=True, timeout=900)
    assert p.returncode == 0, p.stderr
    doc = json.loads(p.stdout)
    assert doc["target"]["arch"] == "riscv64" and doc["target"]["pgtable_levels"] == 4
    assert doc["guest"]["mmu"] == "sv48" and doc["guest"]["hugepages_total"] == 8
    assert doc["sections"]["present"] == 8
    assert doc["hvo"]["optimized_folios"] == 8


# -- one fault each, patched into the 6.12 Sv39 dump and restored (as tests/kernel/test_check.py
# does on x86_64 and arm64)

PPN = ((1 << 44) - 1) << 10  # _PAGE_PFN_MASK


def with_phys(e: int, phys: int) -> int:
    return (e & ~PPN) | (phys >> 12) << 10


@pytest.fixture
def faulty(lab):
    from tests.kernel.independent import ElfCore

    rv = lab.get(FAULTY, live=False)
    core = ElfCore(str(rv.core))
    yield rv, core
    core.restore()


def _errors(rv, kind):
    status, doc = rv.run("check")
    assert status == 1
    return doc, [f for f in doc["findings"] if f["severity"] == "error" and f["kind"] == kind]


def _first_page(rv, nr):
    base = number(vmcoreinfo_in(rv.core), "VMEMMAP_START") - rv.prog["vmemmap_start_pfn"].value_() * 64
    return (base & U64) + (nr << 15) * 64


def _section_by(rv, level_size):
    """A present section whose memmap starts in a leaf of ``level_size``: (nr, vaddr)."""
    for nr in range(16, 24):
        va = _first_page(rv, nr)
        _, e = rv.entry(va, rv.levels() - 2)
        if (e & 0b1110 != 0) == (level_size == 2 << 20):
            return nr, va
    raise AssertionError("no such section")


def test_pmd_cleared(faulty):
    rv, core = faulty
    nr, va = _section_by(rv, 2 << 20)
    addr, e = rv.entry(va, rv.levels() - 2)
    core.write_u64(addr, e & ~1)
    _, f = _errors(rv, "memmap-unmapped")
    assert len(f) == 1 and f[0]["section"] == nr and (f[0]["pfn_start"], f[0]["pfn_end"]) == (nr << 15, ((nr + 1) << 15) - 1)  # one 2M PMD: a whole section's struct pages


def test_pte_cleared(faulty):
    rv, core = faulty
    nr, va = _section_by(rv, 4096)
    addr, e = rv.entry(va + 3 * 4096, rv.levels() - 1)
    assert e & 1
    core.write_u64(addr, 0)
    _, f = _errors(rv, "memmap-unmapped")
    assert len(f) == 1 and f[0]["section"] == nr and f[0]["pfn_start"] == (nr << 15) + 3 * 64


@pytest.mark.parametrize("size", [2 << 20, 4096])
def test_leaf_outside_ram(faulty, size):
    rv, core = faulty
    nr, va = _section_by(rv, size)
    addr, e = rv.entry(va, rv.levels() - (2 if size == 2 << 20 else 1))
    core.write_u64(addr, with_phys(e, 0x80 << 30))  # 128 GiB: no RAM there
    _, f = _errors(rv, "backing-outside-ram")
    assert len(f) == 1 and f[0]["section"] == nr and int(f[0]["phys"], 16) == 0x80 << 30


def test_section_mem_map_moved(faulty):
    rv, core = faulty
    from drgn.helpers.linux.mmzone import nr_to_section

    sec = nr_to_section(rv.prog, 21)
    linear = number(vmcoreinfo_in(rv.core), "PAGE_OFFSET")
    addr = sec.value_() - linear + number(vmcoreinfo_in(rv.core), "phys_ram_base")
    core.write_u64(addr, sec.section_mem_map.value_() + (1 << 30))
    _, f = _errors(rv, "mem-map-mismatch")
    assert [x["section"] for x in f] == [21]


def test_vmemmap_page_remapped_onto_another(faulty):
    rv, core = faulty
    nr, va = _section_by(rv, 4096)
    _, a = rv.entry(va, rv.levels() - 1)
    b_addr, b = rv.entry(va + 4096, rv.levels() - 1)
    core.write_u64(b_addr, with_phys(b, (a >> 10 << 12) & ((1 << 56) - 1)))
    _, f = _errors(rv, "alias")
    assert len(f) == 1 and f[0]["section"] == nr and f[0]["pfn_start"] == (nr << 15) + 64


def _hvo_folio(rv):
    """The vmemmap of the first optimized folio: a range of 8 PTEs onto one page."""
    _, doc = rv.run("map")
    r = [r for r in doc["vmemmap"]["ranges"] if r["phys_stride"] == 0 and r["leaves"] == 8][0]
    return int(r["start"], 16)


def test_hvo_tail_pointed_elsewhere(faulty):
    rv, core = faulty
    va = _hvo_folio(rv)
    addr, e = rv.entry(va + 0x3000, rv.levels() - 1)
    core.write_u64(addr, with_phys(e, ((e >> 10) << 12 & ((1 << 56) - 1)) + 0x200000))
    doc, f = _errors(rv, "hvo-inconsistent")
    base = int(doc["target"]["vmemmap_base"], 16)
    assert len(f) == 1 and f[0]["pfn_start"] == (va - base) // 64
    assert doc["hvo"]["optimized_folios"] == rv.spec.hugepages - 1


def test_hvo_tail_made_read_only(faulty):
    """riscv64's HVO tails are writable (no PAGE_KERNEL_RO): a read-only one is no remap's."""
    rv, core = faulty
    va = _hvo_folio(rv)
    addr, e = rv.entry(va + 0x2000, rv.levels() - 1)
    core.write_u64(addr, e & ~4)  # clear W
    doc, f = _errors(rv, "hvo-inconsistent")
    assert len(f) == 1 and "read-only" in f[0]["message"] and int(f[0]["vaddr"], 16) == va
