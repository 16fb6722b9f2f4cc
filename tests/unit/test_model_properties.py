"""Property tests: the reference model against synthetic kernels built by its rules.

For random layouts (boot and hot-added RAM, sub-section hot-add, two nodes, HugeTLB folios
with and without HVO, both HVO eras) a synthetic kernel is populated the way x86_64 does
it; the walker, the section decoder and `check` must then agree with the model exactly.
"""

from __future__ import annotations

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from inspect_vmemmap.analysis import load_map, load_sections
from inspect_vmemmap.check import run_check
from inspect_vmemmap.memory import PhysRanges
from inspect_vmemmap.model import Altmap, DeviceMap, Folio, HostedBlock, Inputs, merge, predict
from inspect_vmemmap.vmemmap import MappedLeaf, NodeMap
from tests.synth import SynthKernel, backing_range, with_backing_ram, x86_layout

SEC = 1 << 27  # bytes per section
SUB = 1 << 21  # bytes per subsection


@st.composite
def layouts(draw):
    nsec = draw(st.integers(2, 24))
    boot = []
    pos = 0
    # boot RAM: runs of whole or partial sections
    while pos < nsec * SEC:
        length = draw(st.integers(1, 4)) * SEC // draw(st.sampled_from([1, 1, 2, 4]))
        if draw(st.booleans()) or not boot:
            boot.append((pos, min(pos + length, nsec * SEC)))
        pos += length + draw(st.sampled_from([0, 0, SEC, 3 * SEC]))
    # hot-added RAM: subsection-granular, above boot RAM
    hot = []
    base = (nsec + 2) * SEC
    for _ in range(draw(st.integers(0, 3))):
        start = base + draw(st.integers(0, 63)) * SUB
        end = start + draw(st.integers(1, 96)) * SUB
        hot.append((start, end))
        base = (end + SEC - 1) // SEC * SEC + SEC
    # memmap_on_memory blocks, hot-added above: 6.12+ records the block's altmap (free = the
    # 512 pages of its memmap), 6.1 nr_vmemmap_pages (the altmap had the whole block free)
    hosted = []
    for _ in range(draw(st.integers(0, 2))):
        start = base // SEC * SEC
        pfn = start >> 12
        free = 512 if draw(st.booleans()) else SEC >> 12
        hosted.append(HostedBlock(pfn, pfn + (SEC >> 12), Altmap(pfn, 0, free), 512))
        hot.append((start, start + SEC))
        base = start + 2 * SEC
    split = draw(st.integers(1, 2))
    boot_ram = with_backing_ram(merge(boot), split)
    ram = merge(boot_ram + hot)
    top = (max(b for a, b in merge(boot + hot)) >> 12) + 1
    half = (nsec // 2) * (SEC >> 12)
    nodes = [(0, 0, top)] if split == 1 else [(0, 0, half), (1, half, top)]
    nodes += [(n, backing_range(n)[0] >> 12, backing_range(n)[1] >> 12) for n in range(split)]
    # HugeTLB 2M folios in whole boot sections
    folios = []
    used = set()
    for _ in range(draw(st.integers(0, 12))):
        a, b = boot[draw(st.integers(0, len(boot) - 1))]
        first, last = a // SUB, b // SUB - 1
        if last < first:
            continue
        k = draw(st.integers(first, last))
        if k in used:
            continue
        used.add(k)
        pfn = k * 512
        nid = 0 if split == 1 or pfn < nodes[1][1] else 1
        folios.append(Folio(pfn, 9, draw(st.booleans()), nid, 2))
    shared = draw(st.booleans())
    # ZONE_DEVICE page maps above all memory: device-dax with 4K, 2M or 1G compound pages,
    # the memmap in RAM or (2M) on the device; neighbours may share a section
    devices = []
    for _ in range(draw(st.integers(0, 2))):
        kind = draw(st.sampled_from(["4K", "2M", "1G", "altmap"]))
        if kind == "1G":
            start = (base + (1 << 30) - 1) >> 30 << 30
            size = draw(st.integers(1, 2)) << 30
        else:
            start = base + draw(st.integers(0, 63)) * SUB
            size = draw(st.integers(1, 160)) * SUB
        altmap = None
        if kind == "altmap":  # drivers/nvdimm/pfn_devs.c: base, 8K info block reserved, padded memmap
            altmap = Altmap(start >> 12, 2, (size // SEC + 2) * 512)
        devices.append(DeviceMap([(start, start + size)], {"4K": 0, "2M": 9, "1G": 18, "altmap": 9}[kind], altmap,
                                 "MEMORY_DEVICE_GENERIC"))
        base = start + size
    return Inputs(layout=x86_layout(), ram=ram, boot_ram=boot_ram, nodes=nodes, folios=folios,
                  hvo_shared_tails=shared, device_maps=devices, hosted_blocks=hosted, memmap_on_memory="enable",
                  pageblock_order=9)


def _observe(k: SynthKernel):
    lay = k.layout
    nodes = NodeMap(k.inputs.nodes)
    sections = load_sections(k.mem, lay, nodes)
    leaves = []
    vm = load_map(k.mem, lay, sections, nodes, PhysRanges(k.inputs.ram),
                  on_leaf=lambda l: leaves.append(MappedLeaf.of(l)))
    return sections, vm, leaves


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(layouts())
def test_model_walker_and_check_agree(inp):
    k = SynthKernel(inp)
    sections, vm, leaves = _observe(k)
    assert sections.findings == [] and vm.findings == []
    res = run_check(inp, sections, leaves)
    assert [f.to_json() for f in res.findings] == []
    pred = k.pred
    # sections: exactly the predicted ones, with the predicted flags
    assert sorted(s.nr for s in sections if s.present) == sorted(pred.sections)
    for s in sections:
        assert sorted(s.flag_names()) == sorted(pred.sections[s.nr].flag_names())
    # leaves never overlap, and every valid pfn's struct page is covered exactly once
    prev_end = 0
    for va, size, _, _ in leaves:
        assert va >= prev_end
        prev_end = va + size
    mapped = merge([(va, va + size) for va, size, _, _ in leaves])
    from inspect_vmemmap.model import subtract
    assert subtract(pred.required, mapped) == []
    # HVO: each optimised 2M folio keeps exactly one vmemmap page of its own
    opt = [f for f in inp.folios if f.optimized]
    assert res.hvo["optimized_folios"] == len(opt)
    assert vm.readonly_ptes == 7 * len(opt)
    by_va = {va: phys for va, size, phys, _ in leaves if size == 4096}
    for f in opt:
        start = inp.layout.pfn_to_page(f.head_pfn)
        own = {by_va[start + i * 4096] for i in range(8)} - ({by_va[start + 4096]} if inp.hvo_shared_tails else set())
        assert len(own) == 1
    # ZONE_DEVICE: every compound page's tails recognised; altmaps where the model puts them
    dedup = [d for d in pred.device if d.dedup]
    assert res.device_dedup["compound_pages"] == sum(d.compound_pages for d in dedup)
    assert res.device_dedup["remapped_ptes"] == sum(d.shared_ptes for d in dedup)
    assert res.self_hosted["memory_blocks"] == len(inp.hosted_blocks)
    assert res.self_hosted["device_maps"] == sum(1 for d in pred.device if d.hosted)
    for b in pred.blocks:  # the block's own first pages, 512 of them (a 2M PMD)
        assert b.used_pages == b.reserved_pages == 512
        assert [(h.start, h.end, h.phys) for h in b.hosted] == [
            (inp.layout.pfn_to_page(b.block.start_pfn), inp.layout.pfn_to_page(b.block.start_pfn + 512 * 64),
             b.block.start_pfn << 12)]


def _tail_and_block(k: SynthKernel):
    """A deduplicated tail vmemmap page and an altmap-backed PMD of the synthetic kernel."""
    tail = next(((a + 4096 * ((b - a) // 8192), t) for d in k.pred.device if d.dedup for a, b, t in d.runs()), None)
    block = next((h for h in k.pred.hosted if h.end - h.start >= 1 << 21), None)
    return tail, block


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(layouts())
def test_misplaced_backing_is_found_where_it_is(inp):
    """A deduplicated tail or an altmap-backed PMD pointed elsewhere (at a page no one else
    maps): exactly one backing-misplaced error, there."""
    k = SynthKernel(inp)
    tail, block = _tail_and_block(k)
    if tail is None and block is None:
        return
    lay = inp.layout
    if tail is not None:
        va, target = tail
        k.tables.map(va, backing_range(0)[1] - 4096, 4096)
        where = (va, va + 4096)
    else:
        va = block.start
        k.tables.map(va, backing_range(0)[1] - (1 << 21), 1 << 21)
        where = (va, va + (1 << 21))
    sections, vm, leaves = _observe(k)
    res = run_check(inp, sections, leaves)
    errs = [f for f in res.findings if f.severity == "error"]
    assert [(f.kind, f.vaddr, f.vaddr_end) for f in errs] == [("backing-misplaced",) + where], \
        [f.to_json() for f in errs]
    assert errs[0].pfn_start == lay.page_to_pfn(where[0])


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(layouts(), st.data())
def test_a_dropped_leaf_is_found_where_it_was(inp, data):
    k = SynthKernel(inp)
    va = data.draw(st.sampled_from(sorted(k.leaves)))
    size, addr = k.leaves[va]
    k.mem.write_u64(addr, 0)
    sections, vm, leaves = _observe(k)
    res = run_check(inp, sections, leaves)
    errs = [f for f in res.findings if f.severity == "error"]
    assert errs
    assert any(f.vaddr is not None and f.vaddr < va + size and va < (f.vaddr_end or f.vaddr + 1) for f in errs), \
        [f.to_json() for f in errs]
