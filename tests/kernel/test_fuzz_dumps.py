"""Broken and hostile input on a real dump (issue 5): the 6.1 LA57 HVO dump with random
bytes of its vmemmap page tables and of its mem_section pages changed (patched in place
with :class:`ElfCore` and restored), and truncated copies of it.

For every damaged dump ``check`` must end with status 0 or 1, print valid JSON and no
traceback, and every error finding must point at what was damaged: the struct pages
whose page-table entry or section was changed (see :func:`located`).
"""

from __future__ import annotations

import json
import os
import random
import struct
import subprocess
import sys

import pytest

from tests.kernel import independent as ind

pytestmark = pytest.mark.kernel

SCENARIO = "6.1-la57-hvo"
SEED = int(os.environ.get("INSPECT_VMEMMAP_FUZZ_SEED", "5"))
CASES = int(os.environ.get("INSPECT_VMEMMAP_FUZZ_CASES", "200"))  # damaged checks, in process
SUBPROCESS_CASES = 4  # of which also run through the command line

one_scenario = pytest.mark.parametrize("booted", [SCENARIO], indirect=True)


# -- what the dump holds, from drgn and the naive walk ------------------------------------------


class DumpFacts:
    """The healthy dump's vmemmap page tables and mem_section pages, found with drgn and
    the independent walk, and the struct pages ``check`` reads as model inputs."""

    def __init__(self, booted) -> None:
        from drgn.helpers.linux.list import list_for_each_entry
        from drgn.helpers.linux.mmzone import nr_to_section

        prog = booted.prog()
        self.prog = prog
        self.base = ind.vmemmap_base(prog)
        self.levels = ind.levels(prog)
        self.shifts = [48, 39, 30, 21, 12][5 - self.levels:]
        sections = ind.drgn_sections(prog)
        self.sections = sorted(sections)
        last = max(sections)
        gran = 1 << 30
        self.end = (self.base + ((last + 1) << 15) * 64 + gran - 1) // gran * gran
        # table pages: phys -> (depth, virtual base), restricted to [base, end)
        self.tables = {}
        root = ind.follow(prog, prog.symbol("init_top_pgt").address)
        self.root = root
        self.leaves = []

        def visit(table, depth, vbase):
            self.tables[table] = (depth, vbase)
            shift = self.shifts[depth]
            for i in range(512):
                va = self._canon(i << shift) if depth == 0 else vbase + (i << shift)
                if va + (1 << shift) <= self.base or va >= self.end:
                    continue
                e = prog.read_u64(table + 8 * i, True)
                if not e & 1:
                    continue
                if depth == self.levels - 1 or (e & 0x80 and depth >= self.levels - 3):
                    self.leaves.append((va, 1 << shift, e & ind.ADDR & ~((1 << shift) - 1)))
                else:
                    visit(e & ind.ADDR, depth + 1, va)

        visit(root, 0, 0)
        # mem_section: the first page of the root array, the root pages, the usage maps
        ms = prog["mem_section"].value_()
        self.root_array = ind.follow(prog, ms)
        self.root_pages = {}
        self.usages = {}
        for nr in self.sections:
            sec = nr_to_section(prog, nr)
            self.root_pages.setdefault(nr // 128, ind.follow(prog, sec.value_()) - (nr % 128) * 32)
            self.usages[nr] = ind.follow(prog, sec.usage.value_())
        # struct pages check reads as model inputs (HugeTLB heads, buddy state of backing)
        self.input_pfns = set()
        for h in prog["hstates"][: prog["hugetlb_max_hstate"].value_()]:
            heads = [h.hugepage_activelist.address_of_()] + [
                h.hugepage_freelists[n].address_of_() for n in range(len(h.hugepage_freelists))]
            for head in heads:
                if not head.next:
                    continue
                for page in list_for_each_entry("struct page", head, "lru"):
                    self.input_pfns.add((page.value_() - self.base) // 64)
        self.hvo_folios = sorted(self.input_pfns)
        for _, size, phys in self.leaves:
            for p in range(phys >> 12, (phys + min(size, 1 << 21)) >> 12):
                for o in range(11):
                    self.input_pfns.add(p & ~((1 << o) - 1))

    def _canon(self, va):
        bits = 57 if self.levels == 5 else 48
        va &= (1 << bits) - 1
        return va | (((1 << 64) - 1) ^ ((1 << bits) - 1)) if va >> (bits - 1) else va

    def entry_range(self, table, index):
        """Virtual [start, end) that entry ``index`` of ``table`` covers."""
        depth, vbase = self.tables[table]
        shift = self.shifts[depth]
        va = self._canon(index << shift) if depth == 0 else vbase + (index << shift)
        return va, va + (1 << shift)

    def pfns(self, a, b, end=None):
        """Struct-page pfns [first, last] of virtual [a, b) within the vmemmap (up to
        ``end``: by default all of it, for the check walks further when damaged sections
        say so)."""
        a, b = max(a, self.base), min(b, end or self.base + (64 << 40))
        return None if b <= a else ((a - self.base) // 64, (b - 1 - self.base) // 64)


@pytest.fixture(scope="module")
def facts(booted):
    return DumpFacts(booted)


# -- damage ----------------------------------------------------------------------------------


class Damage:
    def __init__(self, core: ind.ElfCore) -> None:
        self.core = core
        self.spans = []  # struct-page pfn intervals [first, last]
        self.values = []  # new entry values written into page tables
        self.log = []

    def read_u64(self, phys):
        with open(self.core.path, "rb") as f:
            f.seek(self.core.offset(phys))
            return int.from_bytes(f.read(8), "little")

    def write_u64(self, phys, value):
        self.core.write_u64(phys, value & (2**64 - 1))


def mutate(rng: random.Random, v: int) -> int:
    """Random byte damage to one 64-bit word."""
    how = rng.randrange(5)
    if how == 0:
        return rng.getrandbits(64)
    if how == 1:
        return v ^ (1 << rng.randrange(64))
    if how == 2:  # some bytes
        b = bytearray(v.to_bytes(8, "little"))
        for _ in range(rng.randint(1, 3)):
            b[rng.randrange(8)] = rng.randrange(256)
        return int.from_bytes(b, "little")
    if how == 3:
        return v & ~1 if v & 1 else v | 1
    return v ^ rng.choice([0x80, 0x2, 0x1FE000, 1 << 51, 1 << 63, 0x7FF << 52])


def damage(rng: random.Random, facts: DumpFacts, dmg: Damage) -> None:
    what = rng.choice(["table"] * 6 + ["root-array", "root-page", "root-page", "usage"])
    if what == "table":
        table = rng.choice(sorted(facts.tables))
        depth, _ = facts.tables[table]
        # only entries that cover the vmemmap: the upper tables map other regions too
        idx = [i for i in range(512) if facts.pfns(*facts.entry_range(table, i), facts.end)]
        used = [i for i in idx if dmg.read_u64(table + 8 * i)]
        i = rng.choice(used if used and rng.random() < 0.8 else idx)
        old = dmg.read_u64(table + 8 * i)
        new = mutate(rng, old)
        dmg.write_u64(table + 8 * i, new)
        dmg.spans.append(facts.pfns(*facts.entry_range(table, i)))
        dmg.values.append(new)
        dmg.log.append(f"level {depth} table {table:#x}[{i}]: {old:#x} -> {new:#x}")
    elif what == "root-array":
        ri = rng.choice([0, 0, 0, rng.randrange(512)])
        old = dmg.read_u64(facts.root_array + 8 * ri)
        new = mutate(rng, old)
        dmg.write_u64(facts.root_array + 8 * ri, new)
        dmg.spans.append((ri * 128 << 15, ((ri + 1) * 128 << 15) - 1))
        dmg.log.append(f"root {ri}: {old:#x} -> {new:#x}")
    elif what == "root-page":
        nr = rng.choice(facts.sections + [rng.randrange(128)])
        at = facts.root_pages[nr // 128] + (nr % 128) * 32 + rng.choice([0, 0, 8])
        old = dmg.read_u64(at)
        new = mutate(rng, old)
        dmg.write_u64(at, new)
        dmg.spans.append((nr << 15, ((nr + 1) << 15) - 1))
        dmg.log.append(f"section {nr} at {at:#x}: {old:#x} -> {new:#x}")
    else:
        nr = rng.choice(facts.sections)
        at = facts.usages[nr] + 16  # subsection_map
        old = dmg.read_u64(at)
        new = mutate(rng, old)
        dmg.write_u64(at, new)
        dmg.spans.append((nr << 15, ((nr + 1) << 15) - 1))
        dmg.log.append(f"section {nr} subsection map: {old:#x} -> {new:#x}")


def reachable_tables(facts: DumpFacts, dmg: Damage, limit: int = 4096):
    """Healthy table pages that a written entry reaches (as a table, through anything):
    their content now shows at the damaged place too."""
    todo = [v & ind.ADDR for v in dmg.values if v & 1]
    seen = set()
    out = []
    while todo and len(seen) < limit:
        p = todo.pop()
        if p in seen:
            continue
        seen.add(p)
        if p in facts.tables:
            out.append(p)
        try:
            with open(dmg.core.path, "rb") as f:
                f.seek(dmg.core.offset(p))
                raw = f.read(4096)
        except KeyError:
            continue
        if len(raw) == 4096:
            todo.extend(e & ind.ADDR for e in struct.unpack("<512Q", raw) if e & 1 and (e & ind.ADDR) < 1 << 32)
    return out


def located(facts: DumpFacts, dmg: Damage, doc: dict):
    """:return: the error findings that do not point at the damage (should be none).

    The damage is: the struct pages each changed entry covers, the range of each healthy
    table a changed entry reaches, the changed sections, and the HugeTLB folios that
    overlap any of these (HVO is checked per folio). ``alias`` may also name a physical
    page that a damaged range maps. Where the damage covers struct pages that ``check``
    reads as model inputs (HugeTLB heads, buddy state of vmemmap backing), ``hvo-*``,
    ``alias`` and ``backing-free`` may be anywhere: those inputs are read through the
    damaged vmemmap.
    """
    spans = [s for s in dmg.spans if s]
    for t in reachable_tables(facts, dmg):
        depth, vbase = facts.tables[t]
        s = facts.pfns(vbase, vbase + (512 << facts.shifts[depth])) if depth else (0, 1 << 40)
        if s:
            spans.append(s)
    for head in facts.hvo_folios:
        if any(a <= head + 511 and head <= b for a, b in spans):
            spans.append((head, head + 511))
    hit = lambda a, b: any(x <= b and a <= y for x, y in spans)  # noqa: E731
    inputs_damaged = any(hit(p, p) for p in facts.input_pfns)
    phys = set()
    for r in doc["vmemmap"]["ranges"]:
        a, b = int(r["start"], 16), int(r["end"], 16)
        s = facts.pfns(a, b)
        if s and hit(*s):
            p0 = int(r["phys_start"], 16)
            n = (b - a) // r["page_size"]
            stride = r["phys_stride"]
            for k in range(min(n, 4096)):
                phys.update(range((p0 + k * stride) >> 12, (p0 + k * stride + min(r["page_size"], 1 << 21)) >> 12))
    bad = []
    for f in doc["findings"]:
        if f["severity"] != "error":
            continue
        if "pfn_start" in f:
            s = (f["pfn_start"], f.get("pfn_end", f["pfn_start"]))
        elif "vaddr" in f:
            s = facts.pfns(int(f["vaddr"], 16), int(f.get("vaddr_end", hex(int(f["vaddr"], 16) + 1)), 16))
        else:
            s = (f["section"] << 15, ((f["section"] + 1) << 15) - 1) if "section" in f else None
        if s and hit(*s):
            continue
        if f["kind"] == "alias" and "phys" in f and int(f["phys"], 16) >> 12 in phys:
            continue
        if inputs_damaged and f["kind"] in ("hvo-inconsistent", "alias", "backing-free"):
            continue
        bad.append(f)
    return bad


def run_cli(booted, core=None, *extra):
    p = subprocess.run([sys.executable, "-m", "inspect_vmemmap", "check", "--core", str(core or booted.core),
                        "--vmlinux", str(booted.vmlinux), "--json", *extra], capture_output=True, text=True,
                       timeout=300)
    assert p.returncode in (0, 1), (p.returncode, p.stderr)
    assert "Traceback" not in p.stderr and "internal error" not in p.stderr, p.stderr
    return p.returncode, json.loads(p.stdout)


def run_in_process(t):
    """What `check --json` computes, in this process, on an opened target."""
    from inspect_vmemmap.commands import Analysis
    from inspect_vmemmap.findings import exit_status

    doc, findings, *_ = Analysis(t).check()
    return exit_status(findings), json.loads(json.dumps(doc))


@one_scenario
def test_random_damage_to_tables_and_sections(booted, facts):
    from inspect_vmemmap.source import open_target

    t = open_target(core=str(booted.core), vmlinux=str(booted.vmlinux))
    rng = random.Random(SEED)
    core = ind.ElfCore(str(booted.core))
    failures = []
    kinds = {}
    try:
        for case in range(CASES):
            dmg = Damage(core)
            for _ in range(rng.choice([1, 1, 1, 2, 3])):
                damage(rng, facts, dmg)
            if case < SUBPROCESS_CASES:
                rc, doc = run_cli(booted)
            else:
                rc, doc = run_in_process(t)
            assert rc in (0, 1)
            assert rc == (1 if doc["summary"]["errors"] else 0)
            for f in doc["findings"]:
                kinds[f["kind"]] = kinds.get(f["kind"], 0) + 1
            bad = located(facts, dmg, doc)
            if bad:
                failures.append((dmg.log, bad[:3]))
            core.restore()
    finally:
        core.restore()
    assert not failures, "\n".join(f"{log}: {bad}" for log, bad in failures[:3])
    assert kinds.get("bad-entry") and kinds.get("memmap-unmapped") and kinds.get("section-flags"), kinds
    # and the dump is healthy again
    rc, doc = run_cli(booted)
    assert rc == 0 and not [f for f in doc["findings"] if f["severity"] == "error"]


# -- truncated dumps -------------------------------------------------------------------------------


def truncated_copy(src: str, dst: str, size: int) -> None:
    """The first ``size`` bytes of ``src`` (an interrupted copy of the dump)."""
    with open(src, "rb") as fi, open(dst, "wb") as fo:
        left = size
        while left:
            n = os.copy_file_range(fi.fileno(), fo.fileno(), left)
            if n <= 0:
                break
            left -= n


@one_scenario
def test_truncated_dump_keeps_what_it_has(booted, facts, tmp_path):
    """Cut inside the mem_section root array (allocated near the top of RAM): the sections
    whose roots are before the cut are all listed, the map is complete, and the missing
    roots are named in an ``unreadable`` warning."""
    core = ind.ElfCore(str(booted.core))
    roots_needed = max(facts.root_pages) + 1
    cut_phys = (facts.root_array + 8 * roots_needed + 4095) // 4096 * 4096
    below = [facts.root_array, *facts.root_pages.values(), *facts.usages.values(), *facts.tables]
    # the site this test needs; a scenario that stops offering it fails, it is not skipped
    assert max(below) < cut_phys < facts.root_array + (1 << 21), \
        f"{booted.name}: the mem_section pages are no longer laid out below a cut in the root array"
    path = tmp_path / "vmcore.cut"
    truncated_copy(str(booted.core), str(path), core.offset(cut_phys))
    rc, doc = run_cli(booted, path)
    _, healthy = run_cli(booted)
    assert rc == 0 and doc["summary"]["errors"] == 0, doc["findings"]
    un = [f for f in doc["findings"] if f["kind"] == "unreadable"]
    first_missing = (cut_phys - facts.root_array) // 8
    assert any(f"root pointers {first_missing}-" in f["message"] and f["section"] == first_missing * 128 for f in un), un

    def without_nid(items):  # node_data lies above the cut on this dump: nodes may be unknown
        return [{k: v for k, v in d.items() if k != "nid"} for d in items]

    assert [s["nr"] for s in doc["sections"]["list"]] == facts.sections
    assert without_nid(doc["sections"]["list"]) == without_nid(healthy["sections"]["list"])
    if max(p for _, s, p in facts.leaves) < cut_phys:
        assert without_nid(doc["vmemmap"]["ranges"]) == without_nid(healthy["vmemmap"]["ranges"])
        assert doc["hvo"] == healthy["hvo"]


@one_scenario
def test_truncated_below_the_page_tables(booted, facts, tmp_path):
    """Cut below the vmemmap's upper page tables: the walk (``map``) names the table it
    could not read; ``check`` names the truncation, and with mem_section cut off too
    (it lies above the tables in this guest) refuses in one line (issue 15)."""
    core = ind.ElfCore(str(booted.core))
    upper = sorted(p for p, (d, _) in facts.tables.items() if d == 1)
    cut_phys = upper[0] // 4096 * 4096
    assert facts.root < cut_phys, f"{booted.name}: the top-level table is no longer below the second level"
    path = tmp_path / "vmcore.cut"
    truncated_copy(str(booted.core), str(path), core.offset(cut_phys))
    p = subprocess.run([sys.executable, "-m", "inspect_vmemmap", "check", "--core", str(path),
                        "--vmlinux", str(booted.vmlinux), "--json"], capture_output=True, text=True, timeout=300)
    if p.returncode == 2:
        lines = p.stderr.strip().splitlines()
        assert len(lines) == 1 and "truncated" in lines[0] and "no section" in lines[0], p.stderr
    else:
        assert p.returncode in (0, 1) and json.loads(p.stdout)["target"]["dump"]["truncated"], p.stderr
    p = subprocess.run([sys.executable, "-m", "inspect_vmemmap", "map", "--core", str(path),
                        "--vmlinux", str(booted.vmlinux), "--json"], capture_output=True, text=True, timeout=300)
    assert p.returncode in (0, 1) and "Traceback" not in p.stderr, p.stderr
    doc = json.loads(p.stdout)
    assert doc["target"]["dump"]["truncated"] is True and doc["target"]["dump"]["complete"] is False
    un = [f for f in doc["findings"] if f["kind"] == "unreadable"]
    assert any(f.get("phys") == hex(upper[0]) and int(f["vaddr"], 16) <= facts.base < int(f["vaddr_end"], 16)
               for f in un), un
