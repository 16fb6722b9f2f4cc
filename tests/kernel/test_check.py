"""Issue 3 on real kernels: `check` on healthy kernels, and on dumps with one injected
fault each (patched in place in the ELF dump and restored afterwards)."""

from __future__ import annotations

import pytest

from tests.kernel import independent as ind

pytestmark = pytest.mark.kernel


def errors(doc):
    return [f for f in doc["findings"] if f["severity"] == "error"]


def test_healthy_kernel_is_consistent(booted):
    doc = booted.run("check", "--deep")
    assert errors(doc) == [], doc["findings"]
    assert doc["summary"]["errors"] == 0
    assert doc["hvo"]["optimized_folios"] == (booted.guest.account.hugepages_total if booted.spec.hvo else 0)
    assert doc["hvo"]["remapped_ptes"] == 7 * doc["hvo"]["optimized_folios"]
    assert doc["sections"]["present"] > 0 and doc["vmemmap"]["bytes_mapped"] > 0


@pytest.fixture
def mutable(booted):
    if booted.name != "6.1-la57-hvo":
        pytest.skip("mutations run on the HVO dump")
    core = ind.ElfCore(str(booted.core))
    yield booted, booted.prog(), core
    core.restore()


def _check(booted, *extra):
    import json
    import subprocess
    import sys

    p = subprocess.run([sys.executable, "-m", "inspect_vmemmap", "check", "--core", str(booted.core),
                        "--vmlinux", str(booted.vmlinux), "--json", *extra], capture_output=True, text=True, timeout=600)
    assert "Traceback" not in p.stderr, p.stderr
    return p.returncode, json.loads(p.stdout)


def _pmd_leaf_section(prog):
    """A present section whose memmap is one 2M PMD leaf: (nr, vaddr)."""
    base = ind.vmemmap_base(prog)
    for nr in sorted(ind.drgn_sections(prog)):
        va = base + (nr << 15) * 64
        _, e = ind.entry_addr(prog, va, ind.levels(prog) - 2)
        if e & 1 and e & 0x80:
            return nr, va
    pytest.skip("no PMD-mapped section")


def test_pmd_not_present(mutable):
    booted, prog, core = mutable
    nr, va = _pmd_leaf_section(prog)
    addr, e = ind.entry_addr(prog, va, ind.levels(prog) - 2)
    core.write_u64(addr, e & ~1)
    rc, doc = _check(booted)
    assert rc == 1
    f = [f for f in errors(doc) if f["kind"] == "memmap-unmapped"]
    assert len(f) == 1 and f[0]["section"] == nr
    assert (f[0]["pfn_start"], f[0]["pfn_end"]) == (nr << 15, ((nr + 1) << 15) - 1)


def test_pte_not_present(mutable):
    booted, prog, core = mutable
    base = ind.vmemmap_base(prog)
    # the first vmemmap page of section 0 sits in a split PMD (4K PTEs) on this dump
    va = base + 0x1000 * 3
    addr, e = ind.entry_addr(prog, va, ind.levels(prog) - 1)
    assert e & 1
    core.write_u64(addr, 0)
    rc, doc = _check(booted)
    assert rc == 1
    f = [f for f in errors(doc) if f["kind"] == "memmap-unmapped"]
    assert len(f) == 1 and f[0]["section"] == 0
    assert (f[0]["pfn_start"], f[0]["pfn_end"]) == (3 * 64, 4 * 64 - 1)


def test_leaf_outside_ram(mutable):
    booted, prog, core = mutable
    nr, va = _pmd_leaf_section(prog)
    addr, e = ind.entry_addr(prog, va, ind.levels(prog) - 2)
    core.write_u64(addr, (e & ~ind.ADDR) | (0x80 << 30))  # 128 GiB: no RAM in a 1 GiB guest
    rc, doc = _check(booted)
    assert rc == 1
    f = [f for f in errors(doc) if f["kind"] == "backing-outside-ram"]
    assert len(f) == 1 and f[0]["section"] == nr and int(f[0]["phys"], 16) == 0x80 << 30


def _section_addr(prog, nr):
    from drgn.helpers.linux.mmzone import nr_to_section

    sec = nr_to_section(prog, nr)
    return ind.follow(prog, sec.value_()), sec.section_mem_map.value_()


def test_section_mem_map_overwritten(mutable):
    booted, prog, core = mutable
    addr, smm = _section_addr(prog, 5)
    core.write_u64(addr, smm + (1 << 30))  # coded mem_map moved by 1 GiB, flags kept
    rc, doc = _check(booted)
    assert rc == 1
    f = [f for f in errors(doc) if f["kind"] == "mem-map-mismatch"]
    assert [x["section"] for x in f] == [5]


def test_section_flag_flipped(mutable):
    booted, prog, core = mutable
    addr, smm = _section_addr(prog, 2)
    core.write_u64(addr, smm & ~0x4)  # clear SECTION_IS_ONLINE
    rc, doc = _check(booted)
    assert rc == 1
    f = [f for f in errors(doc) if f["kind"] == "section-flags"]
    assert [x["section"] for x in f] == [2]


def test_vmemmap_page_remapped_onto_another(mutable):
    booted, prog, core = mutable
    base = ind.vmemmap_base(prog)
    a_addr, a = ind.entry_addr(prog, base, ind.levels(prog) - 1)
    b_addr, b = ind.entry_addr(prog, base + 0x1000, ind.levels(prog) - 1)
    core.write_u64(b_addr, (b & ~ind.ADDR) | (a & ind.ADDR))
    rc, doc = _check(booted)
    assert rc == 1
    f = [f for f in errors(doc) if f["kind"] == "alias"]
    assert len(f) == 1 and f[0]["section"] == 0 and int(f[0]["phys"], 16) == a & ind.ADDR
    assert f[0]["pfn_start"] == 64


def _hvo_tail(booted):
    doc = booted.run("map")
    r = [r for r in doc["vmemmap"]["ranges"] if r["holds"] == "hvo-tail"][0]
    return int(r["start"], 16)


def test_hvo_tail_made_writable(mutable):
    booted, prog, core = mutable
    va = _hvo_tail(booted)
    addr, e = ind.entry_addr(prog, va + 0x2000, ind.levels(prog) - 1)
    core.write_u64(addr, e | 2)
    rc, doc = _check(booted)
    assert rc == 1
    f = [f for f in errors(doc) if f["kind"] == "hvo-inconsistent"]
    assert len(f) == 1 and "writable" in f[0]["message"]
    assert int(f[0]["vaddr"], 16) == va - 0x1000
    assert doc["hvo"]["optimized_folios"] == booted.spec.hugepages - 1


def test_hvo_tail_pointed_elsewhere(mutable):
    booted, prog, core = mutable
    va = _hvo_tail(booted)
    addr, e = ind.entry_addr(prog, va + 0x3000, ind.levels(prog) - 1)
    core.write_u64(addr, (e & ~ind.ADDR) | ((e & ind.ADDR) + 0x200000))
    rc, doc = _check(booted)
    assert rc == 1
    f = [f for f in errors(doc) if f["kind"] == "hvo-inconsistent"]
    assert len(f) == 1 and f[0]["pfn_start"] == (va - 0x1000 - ind.vmemmap_base(prog)) // 64


def test_struct_page_on_the_wrong_node(mutable):
    booted, prog, core = mutable
    pfn = 50000
    page = ind.vmemmap_base(prog) + pfn * 64
    phys = ind.follow(prog, page)
    flags = prog.read_u64(phys, True)
    core.write_u64(phys, flags ^ (1 << 54))  # page->flags node field is bits 54-63 on amd64
    rc, doc = _check(booted, "--deep")
    assert rc == 1
    f = [f for f in errors(doc) if f["kind"] == "page-node-zone"]
    assert [(x["pfn_start"], x["pfn_end"]) for x in f] == [(pfn, pfn)]
