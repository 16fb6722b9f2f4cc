"""Issue 3 on real kernels: `check` on healthy kernels, and on dumps with one injected
fault each (patched in place in the ELF dump and restored afterwards)."""

from __future__ import annotations

import pytest

from tests.kernel import independent as ind
from tests.kernel.conftest import errors

pytestmark = pytest.mark.kernel


def test_healthy_kernel_is_consistent(booted):
    doc = booted.run("check", "--deep")
    assert doc["findings"] == []
    assert doc["summary"] == {"errors": 0, "warnings": 0, "infos": 0} or doc["summary"]["errors"] == 0 and \
        not doc["summary"].get("warnings") and not doc["summary"].get("infos")
    assert doc["hvo"]["optimized_folios"] == (booted.guest.account.hugepages_total if booted.hvo else 0)
    assert doc["hvo"]["remapped_ptes"] == 7 * doc["hvo"]["optimized_folios"]
    assert doc["sections"]["present"] > 0 and doc["vmemmap"]["bytes_mapped"] > 0


#: the dumps faults are injected into: x86_64 with HVO (split PMDs, HVO tails), arm64 4K
#: (PMD blocks, LPA2 descriptors) and arm64 16K on a 48-bit CPU (PTEs only, 3 levels). Each
#: fault runs on every one of them that offers its site; one that should and does not fails.
MUTABLE = ("6.1-la57-hvo", "6.12-arm64-numa2", "6.12-arm64-16k-va47")
#: with a section whose memmap is one PMD leaf (4K pages)
PMD_SITES = ("6.1-la57-hvo", "6.12-arm64-numa2")
#: with a section whose memmap starts in a PTE table (x86 6.1: split by HVO; arm64 16K: all)
PTE_SITES = ("6.1-la57-hvo", "6.12-arm64-16k-va47")
#: with HVO tails
HVO_SITES = ("6.1-la57-hvo",)
#: with two nodes
NUMA_SITES = ("6.12-numa2-hvo", "6.12-arm64-numa2")


def on(names):
    return pytest.mark.parametrize("booted", names, indirect=True)


@pytest.fixture
def mutable(booted):
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
    pytest.fail("no PMD-mapped section")


def _pte_section(prog):
    """The first present section whose memmap starts in a PTE table (x86 6.1: section 0,
    split by HVO; arm64 16K: every section): (nr, vaddr of its first struct page)."""
    base, shift, _, present = _geometry(prog)
    for nr in present:
        va = base + (nr << shift) * 64
        _, e = ind.entry_addr(prog, va, ind.levels(prog) - 2)
        if e & 1 and not ind.is_block(prog, e):
            return nr, va
    pytest.fail("no section mapped by base pages")


@on(PMD_SITES)
def test_pmd_not_present(mutable):
    booted, prog, core = mutable
    nr, va = _pmd_leaf_section(prog)
    shift = ind.pfn_section_shift(prog)
    addr, e = ind.entry_addr(prog, va, ind.levels(prog) - 2)
    core.write_u64(addr, e & ~1)
    rc, doc = _check(booted)
    assert rc == 1
    assert [(f["kind"], f["section"], f["pfn_start"], f["pfn_end"]) for f in errors(doc)] == \
        [("memmap-unmapped", nr, nr << shift, ((nr + 1) << shift) - 1)]


@on(PTE_SITES)
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
    assert [(f["kind"], f["section"], f["pfn_start"], f["pfn_end"]) for f in errors(doc)] == \
        [("memmap-unmapped", nr, (va - base) // 64, (va + page - base) // 64 - 1)]


@pytest.mark.parametrize("booted,level", [(n, "pmd") for n in PMD_SITES] + [(n, "pte") for n in PTE_SITES],
                         indirect=["booted"])
def test_leaf_outside_ram(mutable, level):
    booted, prog, core = mutable
    nr, va = _pmd_leaf_section(prog) if level == "pmd" else _pte_section(prog)
    addr, e = ind.entry_addr(prog, va, ind.levels(prog) - (2 if level == "pmd" else 1))
    core.write_u64(addr, ind.with_addr(prog, e, 0x80 << 30))  # 128 GiB: no RAM in a 1 GiB guest
    rc, doc = _check(booted)
    assert rc == 1
    assert [(f["kind"], f["section"], int(f["phys"], 16)) for f in errors(doc)] == \
        [("backing-outside-ram", nr, 0x80 << 30)]


def _section_addr(prog, nr):
    from drgn.helpers.linux.mmzone import nr_to_section

    sec = nr_to_section(prog, nr)
    return ind.follow(prog, sec.value_()), sec.section_mem_map.value_()


@on(MUTABLE)
def test_section_mem_map_overwritten(mutable):
    booted, prog, core = mutable
    nr = _geometry(prog)[3][5]  # the sixth present section (x86: 5, arm64: 13)
    addr, smm = _section_addr(prog, nr)
    core.write_u64(addr, smm + (1 << 30))  # coded mem_map moved by 1 GiB, flags kept
    rc, doc = _check(booted)
    assert rc == 1
    assert [(f["kind"], f["section"]) for f in errors(doc)] == [("mem-map-mismatch", nr)]


@on(MUTABLE)
def test_section_flag_flipped(mutable):
    booted, prog, core = mutable
    nr = _geometry(prog)[3][2]
    addr, smm = _section_addr(prog, nr)
    core.write_u64(addr, smm & ~0x4)  # clear SECTION_IS_ONLINE
    rc, doc = _check(booted)
    assert rc == 1
    assert [(f["kind"], f["section"]) for f in errors(doc)] == [("section-flags", nr)]


@on(PTE_SITES)
def test_vmemmap_page_remapped_onto_another(mutable):
    booted, prog, core = mutable
    base, _, page, _ = _geometry(prog)
    nr, first = _pte_section(prog)
    a_addr, a = ind.entry_addr(prog, first, ind.levels(prog) - 1)
    b_addr, b = ind.entry_addr(prog, first + page, ind.levels(prog) - 1)
    core.write_u64(b_addr, ind.with_addr(prog, b, ind.leaf_phys(prog, a)))
    rc, doc = _check(booted)
    assert rc == 1
    assert [(f["kind"], f["section"], int(f["phys"], 16), f["pfn_start"]) for f in errors(doc)] == \
        [("alias", nr, ind.leaf_phys(prog, a), (first + page - base) // 64)]


def _hvo_tail(booted):
    assert booted.hvo, f"{booted.name} has no HVO"
    doc = booted.run("map")
    r = [r for r in doc["vmemmap"]["ranges"] if r["holds"] == "hvo-tail"][0]
    return int(r["start"], 16)


@on(HVO_SITES)
def test_hvo_tail_made_writable(mutable):
    booted, prog, core = mutable
    va = _hvo_tail(booted)
    addr, e = ind.entry_addr(prog, va + 0x2000, ind.levels(prog) - 1)
    core.write_u64(addr, e | 2)
    rc, doc = _check(booted)
    assert rc == 1
    f = errors(doc)
    assert [x["kind"] for x in f] == ["hvo-inconsistent"] and "writable" in f[0]["message"]
    assert int(f[0]["vaddr"], 16) == va - 0x1000
    assert doc["hvo"]["optimized_folios"] == booted.spec.hugepages - 1


@on(HVO_SITES)
def test_hvo_tail_pointed_elsewhere(mutable):
    booted, prog, core = mutable
    va = _hvo_tail(booted)
    addr, e = ind.entry_addr(prog, va + 0x3000, ind.levels(prog) - 1)
    # onto a copy of the page it maps, where no other vmemmap page maps (same struct pages)
    core.write_u64(addr, ind.with_addr(prog, e, _copy_to_reserved(prog, core, ind.leaf_phys(prog, e), 0x1000)))
    rc, doc = _check(booted)
    assert rc == 1
    assert [(f["kind"], f["pfn_start"]) for f in errors(doc)] == \
        [("hvo-inconsistent", (va - 0x1000 - ind.vmemmap_base(prog)) // 64)]


@on(MUTABLE)
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
    assert [(f["kind"], f["pfn_start"], f["pfn_end"]) for f in errors(doc)] == [("page-node-zone", pfn, pfn)]


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


@on(PMD_SITES)
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
    assert [(f["kind"], f["section"], int(f["vaddr"], 16), int(f["vaddr_end"], 16), int(f["phys"], 16))
            for f in errors(doc)] == [("backing-free", nr, va + 5 * page, va + 6 * page, phys)]


def _copy_to_reserved(prog, core, phys: int, size: int) -> int:
    """Copy ``size`` bytes of guest memory at ``phys`` into a reserved block of that size
    (see _reserved_block) in the dump; :return: the block's address."""
    target = _reserved_block(prog, size)
    core.write(target, prog.read(phys, size, True))
    return target


def _hugetlb_block(prog, nid: int) -> int:
    """The physical address of a free 2M HugeTLB folio on node ``nid`` (drgn: the default
    hstate's hugepage_freelists[nid])."""
    from drgn.helpers.linux.list import list_for_each_entry
    from drgn.helpers.linux.mm import page_to_pfn

    for i in range(prog["hugetlb_max_hstate"].value_()):
        h = prog["hstates"][i]
        if h.order.value_() != 21 - ind.page_shift(prog):
            continue
        for folio in list_for_each_entry("struct folio", h.hugepage_freelists[nid].address_of_(), "lru"):
            return page_to_pfn(folio.page.address_of_()).value_() << ind.page_shift(prog)
    pytest.fail(f"no free 2M HugeTLB folio on node {nid}")


def _reserved_block(prog, size):
    """A ``size``-aligned block of RAM that the kernel image occupies (reserved, never in
    the buddy allocator, not vmemmap): the one holding the kernel's text."""
    text = ind.follow(prog, prog.symbol("_stext").address)
    return text // size * size


@on(PMD_SITES)
def test_stray_mapping(mutable):
    """A PMD leaf added past the last present section's memmap, in the same PMD table: a
    stray-mapping warning for exactly the pfns whose struct pages it holds, nothing else."""
    booted, prog, core = mutable
    base, shift, page, present = _geometry(prog)
    pmd = 1 << (2 * ind.page_shift(prog) - 3)
    nr, va = _pmd_leaf_section(prog)
    nxt = present[-1] + 1
    stray = base + (nxt << shift) * 64
    addr, e = ind.entry_addr(prog, stray, ind.levels(prog) - 2)
    assert not e & 1, f"section {nxt}'s memmap is already mapped"
    _, leaf = ind.entry_addr(prog, va, ind.levels(prog) - 2)
    core.write_u64(addr, ind.with_addr(prog, leaf, _reserved_block(prog, pmd)))
    rc, doc = _check(booted)
    assert rc == 0, errors(doc)
    first = (stray - base) // 64
    assert [(f["kind"], f["severity"], int(f["vaddr"], 16), int(f["vaddr_end"], 16), f["pfn_start"], f["pfn_end"])
            for f in doc["findings"]] == [("stray-mapping", "warning", stray, stray + pmd, first, first + pmd // 64 - 1)]


@on(NUMA_SITES)
def test_offnode_memmap(mutable):
    """The PMD leaf of a node-1 section pointed at a copy of its struct pages in a 2M HugeTLB
    folio of node 0: one offnode-memmap warning, for that leaf's struct pages; nothing else."""
    booted, prog, core = mutable
    base, shift, page, present = _geometry(prog)
    pmd = 1 << (2 * ind.page_shift(prog) - 3)
    doc = booted.run("sections")
    node1 = [s["nr"] for s in doc["sections"]["list"] if "present" in s["flags"] and s["nid"] == 1]
    leaves = [(nr, base + (nr << shift) * 64) for nr in node1]
    leaves = [(nr, va, ind.entry_addr(prog, va, ind.levels(prog) - 2)) for nr, va in leaves]
    blocks = [(nr, va, addr, e) for nr, va, (addr, e) in leaves if ind.is_block(prog, e)]
    assert blocks, f"no section of node 1 ({node1}) has its memmap on one PMD leaf"
    nr, va, addr, e = blocks[-1]
    # the same struct pages, copied into a free HugeTLB folio of node 0 (not buddy memory,
    # not vmemmap; its contents are no one's): only their place is wrong
    target = _hugetlb_block(prog, 0)
    core.write(target, prog.read(ind.leaf_phys(prog, e), pmd, True))
    core.write_u64(addr, ind.with_addr(prog, e, target))
    rc, doc = _check(booted)
    assert rc == 0, errors(doc)
    assert [(f["kind"], f["severity"], f["section"], int(f["vaddr"], 16), int(f["vaddr_end"], 16))
            for f in doc["findings"]] == [("offnode-memmap", "warning", nr, va, va + pmd)]
