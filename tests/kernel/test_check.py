"""Issue 3 on real kernels: `check` on healthy kernels, and on dumps with one injected
fault each (patched in place in the ELF dump and restored afterwards)."""

from __future__ import annotations

import pytest

from tests.kernel import independent as ind
from tests.kernel.conftest import errors

pytestmark = pytest.mark.kernel


def test_healthy_kernel_is_consistent(booted):
    doc = booted.run("check", "--deep")
    assert errors(doc) == [], doc["findings"]
    assert doc["summary"]["errors"] == 0
    assert doc["hvo"]["optimized_folios"] == (booted.guest.account.hugepages_total if booted.hvo else 0)
    assert doc["hvo"]["remapped_ptes"] == 7 * doc["hvo"]["optimized_folios"]
    assert doc["sections"]["present"] > 0 and doc["vmemmap"]["bytes_mapped"] > 0


#: the dumps faults are injected into: x86_64 with HVO (split PMDs, HVO tails), arm64 4K
#: (PMD blocks, LPA2 descriptors) and arm64 16K on a 48-bit CPU (PTEs only, 3 levels)
MUTABLE = ("6.1-la57-hvo", "6.12-arm64-numa2", "6.12-arm64-16k-va47")


@pytest.fixture
def mutable(booted):
    if booted.name not in MUTABLE:
        pytest.skip(f"mutations run on {', '.join(MUTABLE)}")
    core = ind.ElfCore(str(booted.core))
    yield booted, booted.prog(), core
    core.restore()


def _geometry(prog):
    """(vmemmap base, PFN_SECTION_SHIFT, page size, present sections in order)."""
    return (ind.vmemmap_base(prog), ind.pfn_section_shift(prog), 1 << ind.page_shift(prog),
            sorted(ind.drgn_sections(prog)))


def _check(booted, *extra):
    import json
    import subprocess
    import sys

    p = subprocess.run([sys.executable, "-m", "inspect_vmemmap", "check", "--core", str(booted.core),
                        "--vmlinux", str(booted.vmlinux), "--json", *extra], capture_output=True, text=True, timeout=600)
    assert "Traceback" not in p.stderr, p.stderr
    from tests.kernel.conftest import cli_json

    return p.returncode, cli_json(p.stdout, "check")


def _pmd_leaf_section(prog):
    """A present section whose memmap is one 2M PMD leaf: (nr, vaddr)."""
    base, shift, _, present = _geometry(prog)
    for nr in present:
        va = base + (nr << shift) * 64
        _, e = ind.entry_addr(prog, va, ind.levels(prog) - 2)
        if ind.is_block(prog, e):
            return nr, va
    pytest.skip("no PMD-mapped section")


def _pte_section(prog):
    """The first present section whose memmap starts in a PTE table (x86 6.1: section 0,
    split by HVO; arm64 16K: every section): (nr, vaddr of its first struct page)."""
    base, shift, _, present = _geometry(prog)
    for nr in present:
        va = base + (nr << shift) * 64
        _, e = ind.entry_addr(prog, va, ind.levels(prog) - 2)
        if e & 1 and not ind.is_block(prog, e):
            return nr, va
    pytest.skip("no section mapped by base pages")


def test_pmd_not_present(mutable):
    booted, prog, core = mutable
    nr, va = _pmd_leaf_section(prog)
    shift = ind.pfn_section_shift(prog)
    addr, e = ind.entry_addr(prog, va, ind.levels(prog) - 2)
    core.write_u64(addr, e & ~1)
    rc, doc = _check(booted)
    assert rc == 1
    f = [f for f in errors(doc) if f["kind"] == "memmap-unmapped"]
    assert len(f) == 1 and f[0]["section"] == nr
    assert (f[0]["pfn_start"], f[0]["pfn_end"]) == (nr << shift, ((nr + 1) << shift) - 1)


def test_pte_not_present(mutable):
    booted, prog, core = mutable
    base, _, page, _ = _geometry(prog)
    nr, first = _pte_section(prog)
    # the fourth vmemmap page of the section
    va = first + page * 3
    addr, e = ind.entry_addr(prog, va, ind.levels(prog) - 1)
    assert e & 1
    core.write_u64(addr, 0)
    rc, doc = _check(booted)
    assert rc == 1
    f = [f for f in errors(doc) if f["kind"] == "memmap-unmapped"]
    assert len(f) == 1 and f[0]["section"] == nr
    assert (f[0]["pfn_start"], f[0]["pfn_end"]) == ((va - base) // 64, (va + page - base) // 64 - 1)


@pytest.mark.parametrize("level", ["pmd", "pte"])
def test_leaf_outside_ram(mutable, level):
    booted, prog, core = mutable
    nr, va = _pmd_leaf_section(prog) if level == "pmd" else _pte_section(prog)
    addr, e = ind.entry_addr(prog, va, ind.levels(prog) - (2 if level == "pmd" else 1))
    core.write_u64(addr, ind.with_addr(prog, e, 0x80 << 30))  # 128 GiB: no RAM in a 1 GiB guest
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
    nr = _geometry(prog)[3][5]  # the sixth present section (x86: 5, arm64: 13)
    addr, smm = _section_addr(prog, nr)
    core.write_u64(addr, smm + (1 << 30))  # coded mem_map moved by 1 GiB, flags kept
    rc, doc = _check(booted)
    assert rc == 1
    f = [f for f in errors(doc) if f["kind"] == "mem-map-mismatch"]
    assert [x["section"] for x in f] == [nr]


def test_section_flag_flipped(mutable):
    booted, prog, core = mutable
    nr = _geometry(prog)[3][2]
    addr, smm = _section_addr(prog, nr)
    core.write_u64(addr, smm & ~0x4)  # clear SECTION_IS_ONLINE
    rc, doc = _check(booted)
    assert rc == 1
    f = [f for f in errors(doc) if f["kind"] == "section-flags"]
    assert [x["section"] for x in f] == [nr]


def test_vmemmap_page_remapped_onto_another(mutable):
    booted, prog, core = mutable
    base, _, page, _ = _geometry(prog)
    nr, first = _pte_section(prog)
    a_addr, a = ind.entry_addr(prog, first, ind.levels(prog) - 1)
    b_addr, b = ind.entry_addr(prog, first + page, ind.levels(prog) - 1)
    core.write_u64(b_addr, ind.with_addr(prog, b, ind.leaf_phys(prog, a)))
    rc, doc = _check(booted)
    assert rc == 1
    f = [f for f in errors(doc) if f["kind"] == "alias"]
    assert len(f) == 1 and f[0]["section"] == nr and int(f[0]["phys"], 16) == ind.leaf_phys(prog, a)
    assert f[0]["pfn_start"] == (first + page - base) // 64


def _hvo_tail(booted):
    if not booted.hvo:
        pytest.skip("no HVO on this kernel")
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
    base, shift, _, present = _geometry(prog)
    pfn = (present[0] << shift) + 50000
    page = base + pfn * 64
    phys = ind.follow(prog, page)
    flags = prog.read_u64(phys, True)
    # page->flags node field: bits 54-63 on amd64, 60-63 on arm64
    core.write_u64(phys, flags ^ (1 << ind.nodes_pgshift(prog)))
    rc, doc = _check(booted, "--deep")
    assert rc == 1
    f = [f for f in errors(doc) if f["kind"] == "page-node-zone"]
    assert [(x["pfn_start"], x["pfn_end"]) for x in f] == [(pfn, pfn)]


def test_model_replays_saved_layout(booted, tmp_path):
    """`check --save-layout` then `model LAYOUT`: the offline model predicts what check found."""
    import json
    import subprocess
    import sys

    layout = tmp_path / "layout.json"
    doc = booted.run("check", "--save-layout", str(layout))
    p = subprocess.run([sys.executable, "-m", "inspect_vmemmap", "model", str(layout), "--json"],
                       capture_output=True, text=True, timeout=120)
    assert p.returncode == 0, p.stderr
    pred = json.loads(p.stdout)["model"]
    found = {s["nr"]: sorted(s["flags"]) for s in doc["sections"]["list"] if "present" in s["flags"]}
    assert {s["nr"]: sorted(s["flags"]) for s in pred["sections"]} == found
    # every range the model requires is mapped, and the HVO folios are the ones check counted
    ranges = [(int(r["start"], 16), int(r["end"], 16)) for r in doc["vmemmap"]["ranges"]]
    for a, b in ((int(a, 16), int(b, 16)) for a, b in pred["required"]):
        covered = sum(min(b, e) - max(a, s) for s, e in ranges if s < b and a < e)
        assert covered == b - a
    assert len(pred["hvo"]) == doc["hvo"]["optimized_folios"]
    assert sum(h["readonly"] for h in pred["hvo"]) == doc["hvo"]["remapped_ptes"] == doc["vmemmap"]["readonly_ptes"]


def test_backing_page_free_in_the_middle_of_a_block(mutable):
    """The sixth page of a 2M block of memmap marked free in the buddy allocator: the
    default check asks only the first page of each leaf; --deep reads the struct page of
    every page that backs the vmemmap and names that one page."""
    from drgn import offsetof

    booted, prog, core = mutable
    base, _, page, _ = _geometry(prog)
    nr, va = _pmd_leaf_section(prog)
    _, e = ind.entry_addr(prog, va, ind.levels(prog) - 2)
    phys = ind.leaf_phys(prog, e) + 5 * page
    sp = ind.follow(prog, base + (phys // page) * 64)  # where its struct page is
    t = prog.type("struct page")
    o_type, o_priv = offsetof(t, "page_type"), offsetof(t, "private")
    try:
        buddy = prog.constant("PGTY_buddy").value_() << 24  # 6.11+
    except LookupError:
        buddy = 0xFFFFFF7F  # PAGE_TYPE_BASE with PG_buddy cleared
    word = sp + o_type - o_type % 8
    shift = (o_type % 8) * 8
    core.write_u64(word, (prog.read_u64(word, True) & ~(0xFFFFFFFF << shift)) | (buddy << shift))
    core.write_u64(sp + o_priv, 0)  # order 0
    rc, doc = _check(booted)
    assert [f for f in errors(doc) if f["kind"] == "backing-free"] == []
    rc, doc = _check(booted, "--deep")
    assert rc == 1
    f = [f for f in errors(doc) if f["kind"] == "backing-free"]
    assert len(f) == 1 and f[0]["section"] == nr, f
    assert (int(f[0]["vaddr"], 16), int(f[0]["vaddr_end"], 16), int(f[0]["phys"], 16)) == \
        (va + 5 * page, va + 6 * page, phys)
