"""Broken and hostile input (issue 5): synthetic kernels with corrupted page tables and
mem_section arrays.

A healthy synthetic kernel (4- or 5-level x86_64 paging, boot and hot-added sections,
HugeTLB folios with and without HVO, both HVO eras) is built by the model's rules, then
damaged at random: page-table entries overwritten (random values, self-references, loops,
tables shared between entries, pointers outside memory, reserved bits, PSE where no leaf
can be, aliases), table pages made unreadable, mem_section roots pointed at garbage, at
other roots or at nothing, absurd section numbers, random section_mem_map and usage
words, missing section pages.

Then the decoder, the walker, the map, ``explain_pfn`` and ``check`` run on it, and:

- nothing raises;
- work is bounded by the input, counted, not timed: the walker reads each table page at
  most once, reads only pages that exist plus one read per ``Unreadable`` it reports, and
  yields at most one event per entry it read; ``translate`` reads at most one entry per
  level; the section decoder reads the root array, each root once, each usage once;
- every finding of severity error points at what was damaged: its pfn range (or virtual
  range) overlaps the struct pages whose mapping or section was changed. "What was
  damaged" is the covered range of each changed entry, plus the range of every original
  table reachable from a changed entry (its content now appears there too), plus the
  HugeTLB folios that overlap it (HVO is checked per folio), plus, for ``alias``, the
  physical pages the damaged range now maps; a section change damages its section (a
  root change: the root's sections).
"""

from __future__ import annotations

import io
import json
import os
import struct

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from inspect_vmemmap import report
from inspect_vmemmap.analysis import explain_pfn, load_map, load_sections, paging_format
from inspect_vmemmap.check import run_check
from inspect_vmemmap.memory import FaultError, PhysRanges
from inspect_vmemmap.model import Folio, Inputs, merge
from inspect_vmemmap.pgtable import TABLE, Leaf, Unreadable, translate, walk
from inspect_vmemmap.sections import read_sections
from inspect_vmemmap.vmemmap import MappedLeaf, NodeMap
from tests.synth import PAGE_KERNEL, PAGE_KERNEL_LARGE, PAGE_KERNEL_RO, PSE, SynthKernel, backing_range, \
    with_backing_ram, x86_layout

SEC = 1 << 27  # bytes of RAM per section
SUB = 1 << 21  # bytes of RAM per subsection
ADDR = 0x000FFFFFFFFFF000
U64 = 2**64 - 1


# -- the healthy kernel ----------------------------------------------------------------------


@st.composite
def healthy(draw):
    """Model inputs for a small kernel: a few boot sections (some partial), maybe one
    sub-section hot-add, up to three 2M HugeTLB folios, 4- or 5-level paging."""
    levels = draw(st.sampled_from([4, 5]))
    secs = sorted(draw(st.sets(st.integers(0, 11), min_size=1, max_size=6)))
    boot = [(nr * SEC, (nr + 1) * SEC) for nr in secs]
    if draw(st.booleans()):  # the last boot section only partly RAM
        a, b = boot[-1]
        boot[-1] = (a, a + draw(st.integers(1, 63)) * SUB)
    hot = []
    if draw(st.booleans()):
        start = 14 * SEC + draw(st.integers(0, 63)) * SUB
        hot.append((start, start + draw(st.integers(1, 64)) * SUB))
    boot_ram = with_backing_ram(merge(boot), 1)
    ram = merge(boot_ram + hot)
    top = max(b for _, b in merge(boot + hot)) >> 12
    b0, b1 = backing_range(0)
    nodes = [(0, 0, top), (0, b0 >> 12, b1 >> 12)]
    folios = []
    used = set()
    for _ in range(draw(st.integers(0, 3))):
        a, b = boot[draw(st.integers(0, len(boot) - 1))]
        k = draw(st.integers(a // SUB, b // SUB - 1))
        if k not in used:
            used.add(k)
            folios.append(Folio(k * 512, 9, draw(st.booleans()), 0, 2))
    return Inputs(layout=x86_layout(levels), ram=ram, boot_ram=boot_ram, nodes=nodes, folios=folios,
                  hvo_shared_tails=draw(st.booleans()))


def inventory(mem, fmt, root):
    """The healthy tree: table page -> (depth, virtual base), by a naive recursion."""
    tables = {root: (0, 0)}
    todo = [root]
    while todo:
        t = todo.pop()
        depth, base = tables[t]
        if depth == len(fmt.shifts) - 1:
            continue
        for i, e in enumerate(struct.unpack("<512Q", mem.read(t, 4096, True))):
            kind, nphys, _ = fmt.decode(e, depth) if e else (0, 0, "")
            if kind == TABLE and nphys not in tables:
                va = base + (i << fmt.shifts[depth]) if depth else fmt.canonical(i << fmt.shifts[depth])
                tables[nphys] = (depth + 1, va)
                todo.append(nphys)
    return tables


# -- damage ----------------------------------------------------------------------------------


class Damage:
    """What was changed: virtual ranges of changed or removed entries, values written into
    page tables, and section numbers."""

    def __init__(self) -> None:
        self.vranges = []  # [start, end) of damaged entries' coverage
        self.new_entries = []  # (depth, value) of entries written
        self.sections = []  # [first, last] section numbers
        self.log = []

    def __repr__(self) -> str:
        return "; ".join(self.log)


FLAGS = [0x67, 0x63, 0x163, 0x1E3, 0x161, 0x8000000000000163, 0x80]


@st.composite
def entry_value(draw, k: SynthKernel, tables, leaf_phys, table: int, old: int):
    """A hostile value for an entry of ``table`` that now holds ``old``."""
    others = sorted(tables)
    how = draw(st.sampled_from(["random", "self", "other-table", "root", "outside", "reserved", "pse",
                                "not-present", "alias", "small", "flags", "data-page"]))
    flags = draw(st.sampled_from(FLAGS))
    if how == "random":
        v = draw(st.integers(0, U64))
    elif how == "self":
        v = table | flags
    elif how == "other-table":
        v = draw(st.sampled_from(others)) | flags
    elif how == "root":
        v = k.tables.root | 0x67
    elif how == "outside":
        v = (draw(st.integers(0, (1 << 52) - 1)) & ADDR) | flags
    elif how == "reserved":
        v = (old or (0x200000 | 0x1E3)) | (1 << draw(st.integers(12, 62)))
    elif how == "pse":
        v = (old or 0x67) | PSE
    elif how == "not-present":
        v = old & ~1
    elif how == "alias":
        v = draw(st.sampled_from(leaf_phys)) | draw(st.sampled_from([PAGE_KERNEL, PAGE_KERNEL_RO, PAGE_KERNEL_LARGE]))
    elif how == "small":
        v = draw(st.integers(0, 0x2000))
    elif how == "flags":
        v = (old & ADDR) | draw(st.integers(0, 0xFFF)) | (draw(st.integers(0, 0x7FF)) << 52)
    else:  # a page that holds something else: a section root page, the root array
        pages = sorted(p for p in k.mem.pages if p not in tables)
        v = draw(st.sampled_from(pages)) | 0x67
    return v & U64


@st.composite
def damaged(draw):
    inp = draw(healthy())
    k = SynthKernel(inp)
    lay = k.layout
    fmt = paging_format(lay)
    mem = k.mem
    tables = inventory(mem, fmt, k.tables.root)
    dmg = Damage()
    leaf_phys = sorted({k.tables.get(addr) & ADDR for _, addr in k.leaves.values()}) or [0]
    spr = lay.sections_per_root
    roots_phys = lay.mem_section_addr - mem.virt_base

    def root_ptr(ri):
        try:
            return int.from_bytes(mem.read(roots_phys + ri * 8, 8, True), "little")
        except FaultError:
            return 0

    used_roots = sorted({nr // spr for nr in k.present_sections})

    def written(phys, v):
        """Damage of a write at ``phys``: a damaged root may have made the place hold
        something else too (the root array, another root's sections, a page table)."""
        if roots_phys <= phys < roots_phys + lay.nr_section_roots * 8:
            r = (phys - roots_phys) // 8
            dmg.sections.append((r * spr, r * spr + spr - 1))
        for ri in range(lay.nr_section_roots):
            p = root_ptr(ri) - mem.virt_base
            if p <= phys < p + spr * lay.mem_section_size:
                nr = ri * spr + (phys - p) // lay.mem_section_size
                dmg.sections.append((nr, nr))
        if phys & ~0xFFF in tables:
            depth, base = tables[phys & ~0xFFF]
            shift = fmt.shifts[depth]
            i = (phys & 0xFFF) // 8
            va = base + (i << shift) if depth else fmt.canonical(i << shift)
            dmg.vranges.append((va, va + (1 << shift)))
            dmg.new_entries.append((depth, v))

    def page_damage(page):
        """Remove the physical page ``page``: damages the sections whose root page or
        usage overlaps it (the synthetic pool packs them together)."""
        for ri in used_roots:
            p = root_ptr(ri) - mem.virt_base
            if p < page + 4096 and page < p + spr * lay.mem_section_size:
                dmg.sections.append((ri * spr, ri * spr + spr - 1))
            for j in range(spr):
                try:
                    usage = int.from_bytes(mem.read(p + j * lay.mem_section_size + 8, 8, True), "little")
                except FaultError:
                    continue
                if usage and page - 64 < usage - mem.virt_base < page + 4096:
                    dmg.sections.append((ri * spr + j, ri * spr + j))
        if roots_phys <= page < roots_phys + lay.nr_section_roots * 8:  # a root pointed at the root array
            r0 = (page - roots_phys) // 8
            dmg.sections.append((r0 * spr, (r0 + 512) * spr - 1))
        if page in tables:  # a root pointed at a table page
            depth, base = tables[page]
            dmg.vranges.append((base, base + (512 << fmt.shifts[depth])) if depth else (0, U64 + 1))
        mem.remove(page)

    for _ in range(draw(st.integers(1, 3))):
        what = draw(st.sampled_from(["entry"] * 4 + ["leaf"] * 3 + ["remove-table", "root", "root", "section", "section",
                                                     "remove-section-page", "remove-root-array", "absurd-section",
                                                     "remove-usage"]))
        if what in ("entry", "remove-table", "leaf"):
            if what == "leaf":  # a leaf the healthy kernel has (PTE or PMD block)
                addr = k.leaves[draw(st.sampled_from(sorted(k.leaves)))][1]
                t, forced = addr & ~0xFFF, (addr & 0xFFF) // 8
                if t not in tables:
                    continue
            else:  # a table of a random level
                depth = draw(st.integers(0, len(fmt.shifts) - 1))
                at_depth = sorted(p for p, (d, _) in tables.items() if d == depth)
                if not at_depth:
                    continue
                t, forced = draw(st.sampled_from(at_depth)), None
            depth, base = tables[t]
            shift = fmt.shifts[depth]
            if what == "remove-table":
                if t == k.tables.root and draw(st.booleans()):
                    continue
                mem.remove(t)
                span = 512 << shift
                dmg.vranges.append((base, base + span) if depth else (0, U64 + 1))
                dmg.log.append(f"removed {fmt.names[depth]} table {t:#x} (base {base:#x})")
                continue
            try:
                entries = struct.unpack("<512Q", mem.read(t, 4096, True))
            except FaultError:
                continue  # removed by an earlier damage
            present = [i for i, e in enumerate(entries) if e]
            if forced is not None:
                i = forced
            elif depth == 0:
                # the top level: only the entries the vmemmap walk looks at matter
                lo = (lay.vmemmap_base >> shift) & 511
                present = present or [lo]
                i = draw(st.sampled_from(sorted(set(present) | {lo, (lo + 1) % 512})))
            elif present and draw(st.integers(0, 3)):
                i = draw(st.sampled_from(present))
            else:
                i = draw(st.integers(0, 511))
            old = entries[i]
            v = draw(entry_value(k, tables, leaf_phys, t, old))
            mem.write_u64(t + i * 8, v)
            va = base + (i << shift) if depth else fmt.canonical(i << shift)
            dmg.vranges.append((va, va + (1 << shift)))
            dmg.new_entries.append((depth, v))
            dmg.log.append(f"{fmt.names[depth]}[{i}] @ {t:#x} for {va:#x}: {old:#x} -> {v:#x}")
        elif what == "root":
            ri = draw(st.one_of(st.sampled_from(used_roots), st.integers(0, lay.nr_section_roots - 1)))
            old = root_ptr(ri)
            choices = [draw(st.integers(0, U64)), 0, mem.virt_base + draw(st.sampled_from(sorted(mem.pages))),
                       mem.virt_base + draw(st.sampled_from(sorted(tables))), lay.mem_section_addr,
                       mem.virt_base + (draw(st.integers(0, 1 << 40)) & ~7)]
            if used_roots:
                choices.append(root_ptr(draw(st.sampled_from(used_roots))))  # another root's page
            v = draw(st.sampled_from(choices))
            mem.write_u64(roots_phys + ri * 8, v)
            dmg.sections.append((ri * spr, ri * spr + spr - 1))
            dmg.log.append(f"root {ri}: {old:#x} -> {v:#x}")
        elif what in ("section", "remove-usage"):
            nr = draw(st.sampled_from(sorted(k.present_sections)))
            ptr = root_ptr(nr // spr)
            if not ptr:
                continue
            at = ptr - mem.virt_base + (nr % spr) * lay.mem_section_size
            try:
                smm, usage = struct.unpack("<QQ", mem.read(at, 16, True))
            except FaultError:
                continue
            if what == "remove-usage":
                if usage and 0 <= usage - mem.virt_base < 1 << 52:
                    page = (usage - mem.virt_base) & ~0xFFF
                    page_damage(page)
                    dmg.sections.append((nr, nr))
                    dmg.log.append(f"section {nr}: usage page {page:#x} removed")
                continue
            word = draw(st.sampled_from([0, 8]))
            old = smm if word == 0 else usage
            v = draw(st.one_of(st.integers(0, U64), st.integers(0, 0xFF),
                               st.just((old & ~0x3F) | 0x3F), st.just(old ^ (1 << draw(st.integers(0, 63))))))
            mem.write_u64(at + word, v)
            written(at + word, v)
            dmg.log.append(f"section {nr} word {word}: {old:#x} -> {v:#x}")
        elif what == "remove-section-page":
            if not used_roots:
                continue
            ri = draw(st.sampled_from(used_roots))
            ptr = root_ptr(ri)
            if ptr and 0 <= ptr - mem.virt_base < 1 << 52:
                page_damage((ptr - mem.virt_base) & ~0xFFF)
                dmg.sections.append((ri * spr, ri * spr + spr - 1))
                dmg.log.append(f"root {ri}'s page {ptr:#x} removed")
        elif what == "remove-root-array":
            page = draw(st.integers(0, (lay.nr_section_roots * 8 - 1) // 4096))
            mem.remove(roots_phys + page * 4096)
            dmg.sections.append((page * 512 * spr, (page + 1) * 512 * spr - 1))
            dmg.log.append(f"root array page {page} removed")
        else:  # absurd-section: a root far up, its page full of garbage
            ri = draw(st.sampled_from([lay.nr_section_roots - 1, lay.nr_section_roots // 2,
                                       draw(st.integers(0, lay.nr_section_roots - 1))]))
            page = 0x7F00000 + ri * 4096
            mem.write(page, draw(st.binary(min_size=4096, max_size=4096)))
            mem.write_u64(roots_phys + ri * 8, mem.virt_base + page)
            dmg.sections.append((ri * spr, ri * spr + spr - 1))
            dmg.log.append(f"root {ri} -> a page of garbage")
    return k, tables, dmg


# -- the properties --------------------------------------------------------------------------


class Counting:
    """Memory that counts its reads."""

    def __init__(self, mem) -> None:
        self.mem = mem
        self.reads = []

    def read(self, address, size, physical=False):
        self.reads.append((address, size, physical))
        return self.mem.read(address, size, physical)


def walk_bounded(k, fmt, start, end, phys_ok):
    """Walk and check the walker's bounds; returns the events."""
    mem = Counting(k.mem)
    events = list(walk(mem, fmt, k.layout.pgtable_root, start, end, phys_ok))
    pages = [a for a, _, _ in mem.reads]
    assert all(size == 4096 and phys for _, size, phys in mem.reads)
    assert len(pages) == len(set(pages)), "a table page was read twice"
    missing = [p for p in pages if p not in k.mem.pages]
    unreadable = [e for e in events if type(e) is Unreadable]
    assert len(missing) == len(unreadable)
    assert len(pages) - len(missing) <= len(k.mem.pages)
    assert len(events) <= 512 * len(pages)
    # address order, no overlap
    prev = 0
    for e in events:
        assert e.vaddr >= prev and e.vaddr < end and e.vaddr + e.size > start, (e, hex(prev))
        prev = e.vaddr + e.size
    return events


def pfn_span(lay, a, b):
    """Struct-page pfns [first, last] whose struct pages overlap virtual [a, b)."""
    lo = max(a, lay.vmemmap_base)
    if b <= lo:
        return None
    return lay.page_to_pfn(lo), lay.page_to_pfn(b - 1)


def damaged_pfns(k, fmt, tables, dmg, leaves_after):
    """The pfn intervals (inclusive) and physical pages that the damage can explain."""
    lay = k.layout
    mem = k.mem
    vr = list(dmg.vranges)
    # every original table reachable from a written entry shows its content there too
    todo = []
    for depth, v in dmg.new_entries:
        if v & 1:
            todo.append(v & ADDR)
    seen = set()
    while todo:
        p = todo.pop()
        if p in seen:
            continue
        seen.add(p)
        if p in tables:
            d, base = tables[p]
            shift = fmt.shifts[d]
            vr.append((base, base + (512 << shift)) if d else (0, U64 + 1))
        try:
            entries = struct.unpack("<512Q", mem.read(p, 4096, True))
        except FaultError:
            continue
        todo.extend(e & ADDR for e in entries if e & 1)
    spans = [s for s in (pfn_span(lay, a, b) for a, b in vr) if s]
    pps = lay.pages_per_section
    spans += [(a * pps, (b + 1) * pps - 1) for a, b in dmg.sections]
    # HVO is checked per folio: a damaged part of a folio's vmemmap damages the folio
    hit = set()
    for f in k.inputs.folios:
        a, b = f.head_pfn, f.head_pfn + (1 << f.order) - 1
        if any(x <= b and a <= y for x, y in spans):
            spans.append((a, b))
            hit.add((f.nid, f.zone, f.order))
    phys = []  # physical [start, end) that the damaged ranges now map
    for va, size, p, _ in leaves_after:
        s = pfn_span(lay, va, va + size)
        if s and any(x <= s[1] and s[0] <= y for x, y in spans):
            phys.append((p, p + size))
    return spans, phys


def finding_span(lay, f):
    if f.pfn_start is not None:
        return f.pfn_start, f.pfn_end if f.pfn_end is not None else f.pfn_start
    if f.vaddr is not None:
        return pfn_span(lay, f.vaddr, f.vaddr_end or f.vaddr + 1)
    if f.section is not None:
        return f.section * lay.pages_per_section, (f.section + 1) * lay.pages_per_section - 1
    return None


def observe(k, text=False):
    """Everything the commands compute, with the bounds checked on the way."""
    lay = k.layout
    inp = k.inputs
    fmt = paging_format(lay)
    nodes = NodeMap(inp.nodes)
    ram = PhysRanges(inp.ram)

    cmem = Counting(k.mem)
    sections = load_sections(cmem, lay, nodes)
    root_pages = (lay.nr_section_roots * 8 + 4095) // 4096
    # the root array (whole, else page by page), each root once, each usage once
    assert len(cmem.reads) <= 1 + root_pages + lay.nr_section_roots + len(sections)
    leaves = []
    vm = load_map(k.mem, lay, sections, nodes, ram, on_leaf=lambda l: leaves.append(MappedLeaf.of(l)))
    top = ram.end
    events = walk_bounded(k, fmt, vm.start, vm.end, (lambda p: p < top) if ram else None)
    assert [(e.vaddr, e.size, e.phys, e.leaf_writable) for e in events if type(e) is Leaf] == leaves
    assert len([f for f in vm.findings if f.kind != "permissions"]) == sum(1 for e in events if type(e) is not Leaf)
    res = run_check(inp, sections, leaves, unknown=vm.unknown())
    findings = sections.findings + vm.findings + res.findings

    # pfn: every section start, a few struct pages around what the walk reported
    pfns = {s.start_pfn(lay) for s in sections} | {0, (1 << (lay.max_physmem_bits - lay.page_shift)) - 1}
    pfns |= {lay.page_to_pfn(e.vaddr) for e in events[:50] if e.vaddr >= lay.vmemmap_base}
    for pfn in sorted(pfns)[:64]:
        cm = Counting(k.mem)
        info, _ = explain_pfn(cm, lay, sections, nodes, pfn)
        assert len(cm.reads) <= lay.pgtable_levels
        json.dumps(info)
        steps = translate(k.mem, fmt, lay.pgtable_root, lay.pfn_to_page(pfn))
        assert 1 <= len(steps) <= lay.pgtable_levels

    # the output: JSON and text render without raising
    target = {"source": "vmcore", "kernel_release": "synthetic", "arch": "x86_64", "page_size": 4096,
              "pgtable_levels": lay.pgtable_levels, "vmemmap_base": hex(lay.vmemmap_base), "struct_page_size": 64,
              "section_size_bits": lay.section_size_bits, "type_source": "dwarf"}
    doc = report.document(target, findings, sections=report.sections_json(sections), vmemmap=vm.to_json(), hvo=res.hvo)
    json.loads(json.dumps(doc))
    if text:
        from rich.console import Console

        con = Console(file=io.StringIO(), width=200, no_color=True)
        report.print_check(con, target, lay, sections, vm, res.hvo, findings, [], nodes)
        report.print_map(con, vm)
        report.print_sections(con, sections)
    return sections, vm, leaves, res, findings


@settings(max_examples=20, deadline=None)
@given(healthy())
def test_healthy_synthetic_kernels_have_no_findings(inp):
    k = SynthKernel(inp)
    *_, findings = observe(k)
    assert [f.to_json() for f in findings] == []


EXAMPLES = int(os.environ.get("INSPECT_VMEMMAP_FUZZ_EXAMPLES", "300"))


def assert_located(case):
    k, tables, dmg = case
    fmt = paging_format(k.layout)
    sections, vm, leaves, res, findings = observe(k)
    spans, phys = damaged_pfns(k, fmt, tables, dmg, leaves)
    for f in findings:
        if f.severity != "error":
            continue
        s = finding_span(k.layout, f)
        assert s is not None, f
        located = any(x <= s[1] and s[0] <= y for x, y in spans)
        if not located and f.kind == "alias":
            located = f.phys is not None and any(a <= f.phys < b for a, b in phys)
        assert located, f"{f.to_json()} is not where the damage is: {dmg!r}"


@settings(max_examples=EXAMPLES, deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
@given(damaged())
def test_damage_is_survived_bounded_and_located(case):
    assert_located(case)


@settings(max_examples=max(1, EXAMPLES // 20), deadline=None,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
@given(damaged())
def test_damaged_kernels_render_as_text(case):
    observe(case[0], text=True)


# -- hostile structures, one each --------------------------------------------------------------


def _kernel(levels=4, folios=(), shared=False, nsec=2):
    boot = [(0, nsec * SEC)]
    b0, b1 = backing_range(0)
    ram = with_backing_ram(boot, 1)
    inp = Inputs(layout=x86_layout(levels), ram=ram, boot_ram=ram, nodes=[(0, 0, nsec * SEC >> 12), (0, b0 >> 12, b1 >> 12)],
                 folios=list(folios), hvo_shared_tails=shared)
    return SynthKernel(inp)


@pytest.mark.parametrize("levels", [4, 5])
def test_every_table_pointing_at_every_table(levels):
    """The worst a table pool can do: every entry of every table points at some table
    (loops, sharing, self-references). Each table page is still read once."""
    k = _kernel(levels, nsec=4)
    fmt = paging_format(k.layout)
    tables = sorted(inventory(k.mem, fmt, k.tables.root))
    for n, t in enumerate(tables):
        for i in range(512):
            k.mem.write_u64(t + 8 * i, tables[(n + i) % len(tables)] | 0x67)
    sections, vm, leaves, res, findings = observe(k)
    assert not leaves
    assert {f.kind for f in findings if f.severity == "error"} >= {"bad-entry", "memmap-unmapped"}


@pytest.mark.parametrize("levels", [4, 5])
def test_all_roots_point_at_one_page(levels):
    """Every mem_section root points at the same page: sections are decoded at every root
    and each is reported where it is, with the work bounded by the root count."""
    k = _kernel(levels)
    lay = k.layout
    roots = lay.mem_section_addr - k.mem.virt_base
    first = int.from_bytes(k.mem.read(roots, 8, True), "little")
    k.mem.write(roots, first.to_bytes(8, "little") * lay.nr_section_roots)
    sections, vm, leaves, res, findings = observe(k)
    assert len(sections) == 2 * lay.nr_section_roots
    bad = {f.section for f in findings if f.kind == "section-flags"}
    assert min(bad) >= lay.sections_per_root  # root 0 is the healthy one
    assert bad >= {nr for nr in sections.sections if nr >= lay.sections_per_root and nr not in k.present_sections}


def test_damaged_root_count_is_bounded():
    """A LENGTH(mem_section) far beyond what MAX_PHYSMEM_BITS allows: the decoder reads
    only NR_SECTION_ROOTS roots and says so."""
    k = _kernel()
    lay = k.layout
    lay.nr_section_roots = 1 << 40
    mem = Counting(k.mem)
    table = read_sections(mem, lay)
    assert [s.nr for s in table] == [0, 1] + list(range(2048, 2056))
    assert len(mem.reads) < 100
    assert any(f.kind == "unreadable" and "LENGTH(mem_section)" in f.message for f in table.findings)


def test_partly_unreadable_root_array():
    """A truncated dump can end inside the root array: the roots before the cut are used,
    the missing ones are named."""
    k = _kernel()
    lay = k.layout
    roots = lay.mem_section_addr - k.mem.virt_base
    k.mem.remove(roots + 4096)  # roots 512-1023 (sections 65536-131071)
    table = read_sections(k.mem, lay)
    assert [s.nr for s in table] == [0, 1] + list(range(2048, 2056))
    un = [f for f in table.findings if f.kind == "unreadable"]
    assert len(un) == 1 and "root pointers 512-1023" in un[0].message and "sections 65536-131071" in un[0].message


def test_upper_level_bad_entry_has_sane_pfns():
    """A malformed PGD entry covers far more than the vmemmap: its finding's pfns are
    those of the walked vmemmap, never negative."""
    k = _kernel(5)
    fmt = paging_format(k.layout)
    pgd = k.tables.entry_of(k.layout.vmemmap_base, 0)
    k.mem.write_u64(pgd, k.tables.get(pgd) | PSE)
    sections, vm, leaves, res, findings = observe(k)
    (bad,) = [f for f in findings if f.kind == "bad-entry"]
    assert bad.pfn_start == 0 and bad.pfn_end == k.layout.page_to_pfn(vm.end - 1)
    assert bad.section == 0 and "PSE" in bad.message


def test_shared_table_names_its_first_user():
    k = _kernel()
    lay = k.layout
    pmd0 = k.tables.entry_of(lay.vmemmap_base, 2)
    pmd1 = k.tables.entry_of(lay.vmemmap_base + (1 << 21), 2)
    pte_table = 0x7000000
    k.mem.write(pte_table, bytes(4096))
    k.mem.write_u64(pmd0, pte_table | 0x67)
    k.mem.write_u64(pmd1, pte_table | 0x67)
    *_, findings = observe(k)
    (bad,) = [f for f in findings if f.kind == "bad-entry"]
    assert bad.vaddr == lay.vmemmap_base + (1 << 21)
    assert f"already used for {lay.vmemmap_base:#x}" in bad.message


# -- what the fuzzers found in check.py (reported; xfail until fixed there) ----------------------


def test_shared_tail_damage_blames_the_damaged_folio():
    a, b = Folio(512 * 3, 9, True, 0, 2), Folio(512 * 10, 9, True, 0, 2)
    k = _kernel(folios=[a, b], shared=True)
    va = k.layout.pfn_to_page(a.head_pfn) + 4096
    k.mem.write_u64(k.leaves[va][1], (backing_range(0)[0] + 0x100000) | PAGE_KERNEL_RO)
    *_, findings = observe(k)
    hvo = [f for f in findings if f.kind == "hvo-inconsistent"]
    assert [f.pfn_start for f in hvo] == [a.head_pfn]


def test_unreadable_table_is_not_unmapped():
    k = _kernel(folios=[Folio(512 * 3, 9, True, 0, 2)])
    va = k.layout.pfn_to_page(512 * 3)
    k.mem.remove(k.leaves[va][1] & ~0xFFF)  # the PTE table of the HVO-split PMD
    *_, findings = observe(k)
    assert any(f.kind == "unreadable" for f in findings)
    assert not [f for f in findings if f.kind == "memmap-unmapped"], [f.message for f in findings]


def test_unknown_ram_is_not_outside_ram():
    k = _kernel()
    k.inputs.ram = []
    *_, findings = observe(k)
    assert not [f for f in findings if f.kind == "backing-outside-ram"]


def test_backing_outside_ram_is_one_finding_per_range():
    k = _kernel()
    lay = k.layout
    # a PMD block turned into a table: its 2M of struct pages read as 512 PTEs, all
    # pointing outside RAM
    addr = k.tables.entry_of(lay.vmemmap_base, 2)
    table = 0x7000000
    k.mem.write(table, b"".join(((0x80_0000_0000 + i * 4096) | 0x163).to_bytes(8, "little") for i in range(512)))
    k.mem.write_u64(addr, table | 0x67)
    *_, findings = observe(k)
    assert len([f for f in findings if f.kind == "backing-outside-ram"]) == 1
