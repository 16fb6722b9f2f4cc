"""ZONE_DEVICE on real kernels: emulated NVDIMMs turned into device-dax devices by the
guest's /init through sysfs (lab.Nvdimm), checked against the model's rules for device
memory: compound-page tail vmemmap dedup (memmap in RAM, 1G and 2M alignment), the memmap
on the device itself (an altmap), and SECTION_TAINT_ZONE_DEVICE on the sections device
memory shares.

Each scenario boots once (module scope) with three NVDIMMs that QEMU places one after the
other above 4G: 2G as device-dax with 1G alignment (two 1G compound pages, the first over
the info block and metadata), 192M with 2M alignment ending mid-section, and 352M with 2M
alignment and its memmap on the device, starting and ending mid-section. Ground truth:
QEMU's placement (query-memory-devices), the guest's own sysfs account of each dax device,
drgn (pgmap_array, its sparsemem helpers) and a naive page-table walk (independent.py).
Faults are then injected into the dumps in place.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from dataclasses import dataclass

import pytest

from inspect_vmemmap.lab import GuestSpec, Nvdimm, boot_guest
from tests.kernel import independent as ind
from tests.kernel.conftest import Booted, errors

pytestmark = pytest.mark.kernel

SECTION = 128 << 20
PAGE = 4096
STRUCT_PAGE = 64
PMD = 2 << 20

NVDIMMS = (Nvdimm("2G", devdax_align="1G"), Nvdimm("192M", devdax_align="2M"),
           Nvdimm("352M", devdax_align="2M", location="dev"))
_DAX = dict(mem="1G", maxmem="8G", slots=4, nvdimms=NVDIMMS)

SCENARIOS = {
    "6.12-devdax": GuestSpec(debian="6.12", la57=False, **_DAX),
    "6.1-devdax": GuestSpec(debian="6.1", **_DAX),
    "7.2-devdax": GuestSpec(debian="7.2", **_DAX),
}


@dataclass
class Dax:
    booted: Booted

    @property
    def guest(self):
        return self.booted.guest

    def cli(self, *args: str, live: bool = False) -> tuple[int, dict]:
        b = self.booted
        tgt = ["--qemu", str(b.guest.qmp_socket)] if live else ["--core", str(b.core)]
        cmd = [sys.executable, "-m", "inspect_vmemmap", *args, *tgt, "--vmlinux", str(b.vmlinux), "--json"]
        p = subprocess.run(cmd, capture_output=True, text=True, timeout=900)
        assert "Traceback" not in p.stderr, p.stderr
        assert p.returncode in (0, 1), f"{cmd} exited {p.returncode}: {p.stderr}"
        from tests.kernel.conftest import cli_json

        return p.returncode, cli_json(p.stdout, args[0])

    def devices(self):
        """(QEMU's NVDIMM, the guest's dax device, the spec) for each NVDIMM, in order."""
        return list(zip(self.guest.nvdimms, self.guest.devdax, NVDIMMS))

    def in_ram(self):
        return [(n, d) for n, d, s in self.devices() if s.location == "mem"]

    def on_device(self):
        return [(n, d) for n, d, s in self.devices() if s.location == "dev"]


@pytest.fixture(scope="module", params=sorted(SCENARIOS))
def dax(request, tmp_path_factory):
    name = request.param
    spec = SCENARIOS[name]
    work = tmp_path_factory.mktemp(f"zone-device-{name}")
    with boot_guest(spec, workdir=work) as guest:
        core = guest.dump(work / "vmcore")
        try:
            yield Dax(Booted(name, spec, guest, core, guest.kernel.vmlinux))
        finally:
            try:
                os.unlink(core)
            except OSError:
                pass


def _align_up(x: int, a: int) -> int:
    return (x + a - 1) // a * a


def test_guest_set_up_device_dax(dax):
    """QEMU placed the NVDIMMs one after another from 4G; the guest's own sysfs account
    shows each namespace as the whole NVDIMM and the dax device where nd_pfn_init()
    (drivers/nvdimm/pfn_devs.c) puts its data: after the 8K info block, and with mode
    pmem after a memmap of 64 bytes per page, aligned up to the device's alignment."""
    devs = dax.devices()
    assert len(devs) == len(NVDIMMS)
    assert devs[0][0].addr == 4 << 30
    for (n, d, s), nxt in zip(devs, devs[1:] + [None]):
        if nxt is not None:
            assert nxt[0].addr == n.end
        assert (d.namespace_start, d.namespace_size) == (n.addr, n.size)
        assert d.align == {"1G": 1 << 30, "2M": PMD}[s.devdax_align]
        assert d.mode == {"mem": "ram", "dev": "pmem"}[s.location]
        memmap = STRUCT_PAGE * ((n.size - 8192) // PAGE) if s.location == "dev" else 0
        assert d.data_start == _align_up(n.addr + 8192 + memmap, d.align)
        assert d.data_start + d.data_size == n.end


def _tainted(devs) -> set:
    """section_taint_zone_device() (mm/memory_hotplug.c): the sections where a device
    range starts or ends off a section boundary."""
    out = set()
    for n, *_ in devs:
        for edge in (n.addr, n.end):
            if edge % SECTION:
                out.add(edge // SECTION)
    return out


def test_zone_device_sections(dax):
    """Every section the NVDIMMs overlap is present with a memmap, never online nor early;
    exactly those where a device starts or ends mid-section are ZONE_DEVICE-tainted; drgn
    decodes the same flags."""
    _, doc = dax.cli("sections")
    assert errors(doc) == [], doc["findings"]
    by_nr = {s["nr"]: s for s in doc["sections"]["list"]}
    truth = ind.drgn_sections(dax.booted.prog())
    devs = dax.devices()
    tainted = _tainted(devs)
    assert tainted == {(devs[1][0].end) // SECTION, devs[2][0].end // SECTION}  # 192M ends mid-section, 352M too
    nrs = set()
    for n, *_ in devs:
        nrs |= set(range(n.addr // SECTION, (n.end + SECTION - 1) // SECTION))
    for nr in sorted(nrs):
        s = by_nr[nr]
        want = {"present", "has_mem_map"} | ({"zone_device"} if nr in tainted else set())
        assert set(s["flags"]) == want, s
        flags = set(truth[nr][0].split("|"))
        assert ("SECTION_TAINT_ZONE_DEVICE" in flags) == (nr in tainted)
        assert "SECTION_IS_ONLINE" not in flags and "SECTION_IS_EARLY" not in flags
    assert doc["sections"]["zone_device"] == len(tainted)


def _expected_dedup(dax):
    """(compound pages, shared PTEs) the guest's device-dax devices with the memmap in RAM
    must have: one compound page per ``align`` of each namespace (memremap_pages() covers
    the whole namespace, info block and all), each with 2 vmemmap pages of its own and the
    rest mapping the second."""
    pages = ptes = 0
    for n, d in dax.in_ram():
        per = d.align // PAGE * STRUCT_PAGE // PAGE
        pages += n.size // d.align
        ptes += n.size // d.align * (per - 2)
    return pages, ptes


def _whole_sections(n) -> list:
    return [nr for nr in range(n.addr // SECTION, n.end // SECTION + 1)
            if nr * SECTION >= n.addr and (nr + 1) * SECTION <= n.end]


def test_check_is_consistent(dax):
    """check: no error, no warning; the dedup of every compound page recognised; the
    device with its memmap on the device backs a PMD per whole section from its altmap."""
    rc, doc = dax.cli("check")
    assert doc["findings"] == []
    assert rc == 0
    pages, ptes = _expected_dedup(dax)
    assert pages == 2 + 96
    assert doc["device_dedup"] == {"compound_pages": pages, "remapped_ptes": ptes, "saved_bytes": ptes * PAGE}
    (n, _), = dax.on_device()
    assert doc["self_hosted"] == {"memory_blocks": 0, "device_maps": 1, "bytes": len(_whole_sections(n)) * PMD}


def test_dedup_matches_an_independent_walk(dax):
    """A naive walk of each device's vmemmap: per compound page, vmemmap page 0 and 1 on
    pages of their own, every other page on page 1's, all writable 4K PTEs
    (Documentation/mm/vmemmap_dedup.rst: "Deduplicated tail pages are not mapped read-only")."""
    prog = dax.booted.prog()
    base = ind.vmemmap_base(prog)
    own = []
    for n, d in dax.in_ram():
        leaves = ind.naive_walk(prog, base + n.addr // PAGE * STRUCT_PAGE, base + n.end // PAGE * STRUCT_PAGE)
        assert {(size, w) for _, size, _, w in leaves} == {(PAGE, True)}
        phys = {va: p for va, _, p, _ in leaves}
        per = d.align // PAGE * STRUCT_PAGE
        for c in range(n.addr, n.end, d.align):
            va = base + c // PAGE * STRUCT_PAGE
            head, tail = phys[va], phys[va + PAGE]
            assert head != tail
            assert {phys[va + k] for k in range(2 * PAGE, per, PAGE)} == {tail}
            own += [head, tail]
    assert len(own) == len(set(own)) == 2 * _expected_dedup(dax)[0]


def test_altmap_backing_matches_an_independent_walk(dax):
    """The device with its memmap on the device: each whole section's memmap is a PMD
    block from the device's own memory between the info block and the data, in address
    order (x86 vmemmap_populate_hugepages() with the altmap); partial sections' memmap are
    base pages from RAM (vmemmap_populate_basepages() with no altmap)."""
    prog = dax.booted.prog()
    base = ind.vmemmap_base(prog)
    (n, d), = dax.on_device()
    whole = _whole_sections(n)
    assert whole and n.addr % SECTION and n.end % SECTION
    leaves = ind.naive_walk(prog, base + n.addr // PAGE * STRUCT_PAGE, base + n.end // PAGE * STRUCT_PAGE)
    blocks = [(va, p) for va, size, p, _ in leaves if size == PMD]
    assert [va for va, _ in blocks] == [base + nr * SECTION // PAGE * STRUCT_PAGE for nr in whole]
    first = _align_up(n.addr + 8192, PMD)  # past the info block, PMD-aligned (altmap_alloc_block_buf)
    assert [p for _, p in blocks] == [first + k * PMD for k in range(len(whole))]
    assert blocks[-1][1] + PMD <= d.data_start
    ram = dax.guest.account.iomem_ranges("System RAM")
    small = [(va, p) for va, size, p, _ in leaves if size == PAGE]
    assert small and all(any(s <= p <= e for s, e in ram) for _, p in small)


def test_model_replays_saved_layout(dax, tmp_path):
    """`check --save-layout` then `model`: the page maps read from pgmap_array are the
    NVDIMMs, with the alignment as vmemmap_shift, and the model says which deduplicate."""
    layout = tmp_path / "layout.json"
    dax.cli("check", "--save-layout", str(layout))
    p = subprocess.run([sys.executable, "-m", "inspect_vmemmap", "model", str(layout), "--json"],
                       capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stderr
    dev = json.loads(p.stdout)["model"]["device"]
    want = []
    for n, d, s in dax.devices():
        shift = (d.align // PAGE).bit_length() - 1
        want.append(([[hex(n.addr), hex(n.end)]], shift, s.location == "dev", s.location == "mem",
                     n.size // d.align if s.location == "mem" else 0))
    got = sorted(([r for r in m["ranges"]], m["vmemmap_shift"], m["altmap"], m["dedup"], m["compound_pages"])
                 for m in dev)
    assert got == sorted(want)
    assert all(m["type"] == "MEMORY_DEVICE_GENERIC" for m in dev)


def test_check_live(dax):
    """The same through the running guest's QMP socket."""
    rc, doc = dax.cli("check", live=True)
    assert errors(doc) == [], doc["findings"]
    assert rc == 0
    assert doc["device_dedup"]["compound_pages"] == _expected_dedup(dax)[0]


# -- faults injected into the dump ----------------------------------------------------


@pytest.fixture
def mutable(dax):
    core = ind.ElfCore(str(dax.booted.core))
    yield dax, dax.booted.prog(), core
    core.restore()


def _kernel_text(prog) -> int:
    """Physical address of the kernel image's start: RAM that is neither free nor vmemmap."""
    phys = ind.follow(prog, prog.symbol("_text").address)
    assert phys % PMD == 0
    return phys


def _check(dax):
    p = subprocess.run([sys.executable, "-m", "inspect_vmemmap", "check", "--core", str(dax.booted.core),
                        "--vmlinux", str(dax.booted.vmlinux), "--json"], capture_output=True, text=True, timeout=900)
    assert "Traceback" not in p.stderr, p.stderr
    from tests.kernel.conftest import cli_json

    return p.returncode, cli_json(p.stdout, "check")


def _compound_vmemmap(prog, dax, k: int) -> int:
    """vaddr of the k-th 2M compound page's head struct page of the 192M device."""
    n, d = dax.in_ram()[1]
    assert d.align == PMD
    return ind.vmemmap_base(prog) + (n.addr + k * PMD) // PAGE * STRUCT_PAGE


def test_dedup_tail_pointed_elsewhere(mutable):
    """One deduplicated tail vmemmap page pointed at another page (the kernel's text):
    exactly one backing-misplaced error, for those 64 struct pages."""
    dax, prog, core = mutable
    va = _compound_vmemmap(prog, dax, 3) + 5 * PAGE
    addr, e = ind.entry_addr(prog, va, ind.levels(prog) - 1)
    core.write_u64(addr, ind.with_addr(prog, e, _kernel_text(prog)))
    rc, doc = _check(dax)
    assert rc == 1
    f = errors(doc)
    base = ind.vmemmap_base(prog)
    assert [(x["kind"], int(x["vaddr"], 16), x["pfn_start"], x["pfn_end"]) for x in f] == [
        ("backing-misplaced", va, (va - base) // STRUCT_PAGE, (va - base) // STRUCT_PAGE + 63)]
    assert int(f[0]["phys"], 16) == _kernel_text(prog)
    assert doc["device_dedup"]["compound_pages"] == _expected_dedup(dax)[0] - 1


def test_head_page_made_an_alias(mutable):
    """A compound page's head vmemmap page (never shared) remapped onto the previous
    compound page's: exactly one alias error, at the remapped page."""
    dax, prog, core = mutable
    prev, va = _compound_vmemmap(prog, dax, 4), _compound_vmemmap(prog, dax, 5)
    _, pe = ind.entry_addr(prog, prev, ind.levels(prog) - 1)
    addr, e = ind.entry_addr(prog, va, ind.levels(prog) - 1)
    core.write_u64(addr, ind.with_addr(prog, e, ind.leaf_phys(prog, pe)))
    rc, doc = _check(dax)
    assert rc == 1
    f = errors(doc)
    base = ind.vmemmap_base(prog)
    assert [(x["kind"], int(x["vaddr"], 16), x["pfn_start"]) for x in f] == [("alias", va, (va - base) // STRUCT_PAGE)]
    assert int(f[0]["phys"], 16) == ind.leaf_phys(prog, pe)


def test_altmap_block_pointed_elsewhere(mutable):
    """The device-hosted memmap's first PMD pointed at RAM (the kernel's text): exactly
    one backing-misplaced error, for that section's struct pages."""
    dax, prog, core = mutable
    (n, _), = dax.on_device()
    nr = _whole_sections(n)[0]
    base = ind.vmemmap_base(prog)
    va = base + nr * SECTION // PAGE * STRUCT_PAGE
    addr, e = ind.entry_addr(prog, va, ind.levels(prog) - 2)
    assert ind.is_block(prog, e)
    core.write_u64(addr, ind.with_addr(prog, e, _kernel_text(prog)))
    rc, doc = _check(dax)
    assert rc == 1
    f = errors(doc)
    first = nr * SECTION // PAGE
    assert [(x["kind"], x["section"], x["pfn_start"], x["pfn_end"]) for x in f] == [
        ("backing-misplaced", nr, first, first + SECTION // PAGE - 1)]
    assert doc["self_hosted"]["device_maps"] == 0


def test_zone_device_taint_cleared(mutable):
    """SECTION_TAINT_ZONE_DEVICE cleared where a device ends mid-section: a section-flags
    error for that section only."""
    from drgn.helpers.linux.mmzone import nr_to_section

    dax, prog, core = mutable
    nr = dax.devices()[1][0].end // SECTION
    sec = nr_to_section(prog, nr)
    bit = 1 << prog["SECTION_TAINT_ZONE_DEVICE_BIT"].value_()
    smm = sec.section_mem_map.value_()
    assert smm & bit
    core.write_u64(ind.follow(prog, sec.value_()), smm & ~bit)
    rc, doc = _check(dax)
    assert rc == 1
    assert [(x["kind"], x["section"]) for x in errors(doc)] == [("section-flags", nr)]
