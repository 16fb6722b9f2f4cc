"""Issue 2 on real kernels: sections, map and pfn against drgn and a naive walk."""

from __future__ import annotations

import random

import pytest

from tests.kernel import independent as ind
from tests.kernel.conftest import SCENARIOS

pytestmark = pytest.mark.kernel


def test_sections_match_drgn_and_guest(booted):
    prog = booted.prog()
    doc = booted.run("sections")
    assert doc["schema"] == "inspect-vmemmap/1"
    assert doc["target"]["source"] == "vmcore"
    assert doc["target"]["kernel_release"] == booted.guest.account.release
    assert int(doc["target"]["vmemmap_base"], 16) == ind.vmemmap_base(prog)
    assert doc["target"]["pgtable_levels"] == ind.levels(prog)
    if booted.spec.la57 is not None:
        assert doc["target"]["pgtable_levels"] == (5 if booted.spec.la57 else 4)
    assert doc["target"]["arch"] == booted.spec.arch
    assert doc["target"]["page_size"] == 1 << ind.page_shift(prog)
    if booted.spec.arch == "aarch64":
        # Debian's 52-bit-VA kernels: 52 bits on the LPA2 CPU, 48 (47 with 16K) without
        va = 52 if booted.spec.lpa2 is not False else (47 if booted.spec.flavour == "arm64-16k" else 48)
        assert ind.arm64_geometry(prog)[1] == va
        assert doc["target"]["pgtable_levels"] == {(4096, 52): 5, (4096, 48): 4, (16384, 52): 4,
                                                   (16384, 47): 3}[(doc["target"]["page_size"], va)]
    truth = ind.drgn_sections(prog)
    ours = {s["nr"]: s for s in doc["sections"]["list"] if "present" in s["flags"]}
    assert sorted(ours) == sorted(truth)
    assert doc["sections"]["present"] == len(truth)
    for nr, (flags, coded) in truth.items():
        s = ours[nr]
        assert int(s["coded_mem_map"], 16) == coded
        expected = {"SECTION_MARKED_PRESENT": "present", "SECTION_HAS_MEM_MAP": "has_mem_map",
                    "SECTION_IS_ONLINE": "online", "SECTION_IS_EARLY": "early",
                    "SECTION_TAINT_ZONE_DEVICE": "zone_device", "SECTION_IS_VMEMMAP_PREINIT": "vmemmap_preinit"}
        assert set(s["flags"]) == {expected[f] for f in flags.split("|") if f}, (nr, flags)
        assert s["state"].startswith("PM")
    # the guest's own account: its RAM fits in the present sections, and every node has some
    acct = booted.guest.account
    assert len(truth) * 128 * 1024 >= acct.mem_total_kb
    # and /proc/iomem's System RAM lies in them
    shift = ind.pfn_section_shift(prog) + ind.page_shift(prog)
    for a, b in acct.iomem_ranges("System RAM"):
        assert set(range(a >> shift, (b >> shift) + 1)) <= set(truth)
    assert {s["nid"] for s in ours.values()} == set(acct.nodes)
    # as many nodes as the guest was given, and each section on the node sysfs puts its
    # memory block on
    assert acct.nodes == list(range(booted.spec.numa or 1))
    block_node = _block_nodes(acct)
    sec_bytes = 1 << shift
    for nr, s in ours.items():
        blocks = {(nr * sec_bytes + k) // acct.memory_block_size for k in (0, sec_bytes - 1)}
        assert {block_node[b] for b in blocks if b in block_node} <= {s["nid"]}, (nr, s["nid"])
    assert doc["findings"] == []


def _block_nodes(acct) -> dict:
    """Memory block index -> node, from /sys/devices/system/node/nodeN/memoryM."""
    out = {}
    for nid, blocks in acct.node_memory_blocks.items():
        for b in blocks:
            assert b not in out, f"memory block {b} on nodes {out[b]} and {nid}"
            out[b] = nid
    assert out, "the guest's sysfs shows no memory blocks on its nodes"
    return out


def test_map_matches_naive_walk(booted):
    prog = booted.prog()
    doc = booted.run("map")
    vm = doc["vmemmap"]
    base = ind.vmemmap_base(prog)
    present = sorted(ind.drgn_sections(prog))
    shift = ind.pfn_section_shift(prog)
    # the struct pages of the present sections (x86: from pfn 0; arm64 RAM starts at 1 GiB)
    start, end = base + (present[0] << shift) * 64, base + ((present[-1] + 1) << shift) * 64
    assert int(vm["start"], 16) <= start and int(vm["end"], 16) >= end
    leaves = ind.naive_walk(prog, start, end)
    truth = ind.summarize(leaves)
    assert {k: v for k, v in vm["leaves"].items() if v} == {k: v for k, v in truth["leaves"].items() if v}
    assert vm["split_pmds"] == truth["split_pmds"]
    assert vm["readonly_ptes"] == truth["readonly_ptes"]
    assert vm["bytes_mapped"] == truth["bytes_mapped"]
    # the ranges cover exactly the leaves, with the same backing
    covered = sum(int(r["end"], 16) - int(r["start"], 16) for r in vm["ranges"])
    assert covered == truth["bytes_mapped"]
    by_va = {va: (size, phys, w) for va, size, phys, w in leaves}
    for r in vm["ranges"]:
        size = r["page_size"]
        for k in range(r["leaves"]):
            va = int(r["start"], 16) + k * size
            phys = int(r["phys_start"], 16) + k * r["phys_stride"]
            assert by_va[va] == (size, phys, r["writable"])
    # sampled addresses agree with drgn's follow_phys
    rng = random.Random(1)
    for va, size, phys, _ in rng.sample(leaves, min(40, len(leaves))):
        off = rng.randrange(0, size, 64)
        assert ind.follow(prog, va + off) == phys + off
    # every range's node is the node whose memory backs it, by the guest's own sysfs
    acct = booted.guest.account
    block_node = _block_nodes(acct)
    for r in vm["ranges"]:
        first = int(r["phys_start"], 16)
        last = first + (r["leaves"] - 1) * r["phys_stride"] + r["page_size"] - 1
        got = {block_node.get(p // acct.memory_block_size) for p in (first, last)}
        assert got == {r["nid"]}, (r, got)
    assert len({r["nid"] for r in vm["ranges"]}) == len(acct.nodes)
    assert doc["findings"] == []


#: the scenarios that ask for HugeTLB pages with HVO (x86_64 has it, arm64 must not)
HVO_SCENARIOS = sorted(n for n, spec in SCENARIOS.items() if spec.hvo and spec.hugepages)


@pytest.mark.parametrize("booted", HVO_SCENARIOS, indirect=True)
def test_hvo_folios_are_split_readonly(booted):
    if booted.spec.hvo and not booted.hvo:
        # asked for on a kernel without HVO (arm64): every folio keeps its vmemmap
        doc = booted.run("map")
        assert booted.guest.account.hugepages_total == booted.spec.hugepages > 0
        assert doc["vmemmap"]["readonly_ptes"] == 0
        assert not [r for r in doc["vmemmap"]["ranges"] if r["holds"] == "hvo-tail"]
        # init/main.c print_unknown_bootoptions(): the kernel itself did not know the option
        unknown = [line for line in booted.guest.console_text().splitlines()
                   if "Unknown kernel command line parameters" in line]
        assert unknown and "hugetlb_free_vmemmap=on" in unknown[0], unknown
        return
    doc = booted.run("map")
    vm = doc["vmemmap"]
    folios = booted.guest.account.hugepages_total
    assert folios == booted.spec.hugepages
    # 2M folio: 8 vmemmap pages, 7 of them remapped read-only onto the first (mm/hugetlb_vmemmap.c)
    assert vm["readonly_ptes"] == 7 * folios
    tails = [r for r in vm["ranges"] if r["holds"] == "hvo-tail"]
    assert len(tails) == folios
    assert all(r["leaves"] == 7 and r["phys_stride"] == 0 and not r["writable"] and r["page_size"] == 4096 for r in tails)
    assert vm["split_pmds"] >= 1


def test_pfn_agrees_with_follow_phys(booted):
    prog = booted.prog()
    base = ind.vmemmap_base(prog)
    present = sorted(ind.drgn_sections(prog))
    shift = ind.pfn_section_shift(prog)
    ps = ind.page_shift(prog)
    rng = random.Random(2)
    for nr in rng.sample(present, min(3, len(present))):
        pfn = (nr << shift) + rng.randrange(1 << shift)
        doc = booted.run("pfn", str(pfn))
        info = doc["pfn"]
        assert info["section"] == nr and info["valid"]
        assert int(info["struct_page"], 16) == base + pfn * 64
        assert int(info["struct_page_phys"], 16) == ind.follow(prog, base + pfn * 64)
        assert info["walk"][-1]["kind"] == "leaf"
        # a leaf of 2^(ps + k*(ps-3)) bytes ends the walk k levels above the last
        up = (info["backing"]["page_size"].bit_length() - 1 - ps) // (ps - 3)
        assert len(info["walk"]) == ind.levels(prog) - up


def test_live_qemu_matches_dump(booted):
    dump = booted.run("map")
    live = booted.run("map", target="qemu")
    assert live["target"]["source"] == "qemu"
    assert live["vmemmap"] == dump["vmemmap"]
    assert booted.run("sections", target="qemu")["sections"] == booted.run("sections")["sections"]



def test_without_debuginfo_same_sections_and_map(booted):
    """VMCOREINFO plus the kernel's own BTF (found through kallsyms in the dump) give the
    same sections, map, HVO counts and findings as DWARF."""
    import json
    import subprocess
    import sys

    def nodebug(cmd):
        p = subprocess.run([sys.executable, "-m", "inspect_vmemmap", cmd, "--core", str(booted.core), "--no-debuginfo",
                            "--json"], capture_output=True, text=True, timeout=600)
        assert p.returncode in (0, 1), p.stderr
        return json.loads(p.stdout)

    for cmd, part in (("sections", "sections"), ("map", "vmemmap"), ("check", "hvo"), ("check", "findings")):
        ours, dwarf = nodebug(cmd), booted.run(cmd)
        assert ours["target"]["type_source"] == "btf"
        assert dwarf["target"]["type_source"] == "dwarf"
        assert {k: v for k, v in ours["target"].items() if k != "type_source"} == \
            {k: v for k, v in dwarf["target"].items() if k != "type_source"}
        assert ours[part] == dwarf[part]


@pytest.mark.parametrize("booted", ["6.12-numa2-hvo", "7.2-arm64-va48"], indirect=True)
def test_dump_without_vmcoreinfo_note(booted, tmp_path):
    """A dump whose VMCOREINFO note is gone (QEMU without -device vmcoreinfo): the tool
    finds the text in the dump's memory, or takes --vmcoreinfo FILE (one kernel per
    architecture)."""
    expected = booted.run("sections")
    text = booted.prog()["VMCOREINFO"].string_()
    (tmp_path / "vmcoreinfo").write_bytes(text)
    # rename the note and spoil its text, so that only the kernel's own buffer in RAM has it
    with open(booted.core, "r+b") as f:
        head = f.read(1 << 16)
        at = head.index(b"VMCOREINFO\0")
        text_at = head.index(b"OSRELEASE=", at)
        f.seek(at)
        f.write(b"XMCOREINFO\0")
        f.seek(text_at)
        f.write(b"X")
    try:
        assert booted.run("sections") == expected
        assert booted.run("sections", "--vmcoreinfo", str(tmp_path / "vmcoreinfo")) == expected
    finally:
        with open(booted.core, "r+b") as f:
            f.seek(at)
            f.write(b"VMCOREINFO\0")
            f.seek(text_at)
            f.write(b"O")


def test_analyze_with_the_users_program(booted):
    """inspect_vmemmap.analyze on the user's own drgn program (the dump, its vmlinux's DWARF
    loaded by the user) gives the document ``check --json --vmlinux`` prints; and on a
    program through the live guest's QMP socket, a report of the running kernel."""
    import gc

    import drgn

    import inspect_vmemmap

    prog = drgn.Program()
    prog.set_core_dump(str(booted.core))
    prog.load_debug_info([str(booted.vmlinux)])
    report = inspect_vmemmap.analyze(prog)
    assert report.to_json()["target"]["type_source"] == "dwarf"
    assert report.to_json() == booted.run("check")
    live = drgn.Program()
    live.set_qemu_qmp(str(booted.guest.qmp_socket))
    doc = inspect_vmemmap.analyze(live).to_json()
    # The program holds the guest's one QMP monitor for as long as it lives: free it (and
    # whatever of the analysis still refers to it) for the tests that use the guest after.
    del live
    gc.collect()
    assert doc["target"]["source"] == "qemu" and doc["target"]["reads"] >= 1
    assert doc["sections"]["list"] == report.to_json()["sections"]["list"]
