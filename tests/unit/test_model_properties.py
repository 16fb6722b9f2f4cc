"""Property tests: the reference model against an independent simulation of the kernel.

For random layouts (boot RAM with partial sections, hot-added memory blocks, two nodes,
HugeTLB folios with and without HVO in the 6.1, 6.12 and 7.2 forms, memmap_on_memory blocks
in the 6.1 and 6.12+ forms, ZONE_DEVICE page maps with 4K, 2M and 1G compound pages or their
memmap on the device) :mod:`tests.kernelsim` does what the kernel does, step by step, from
the kernel source, without the model. The model's prediction, the walker, the section
decoder and ``check`` must then all agree with what the simulation built and says it did.
"""

from __future__ import annotations

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from inspect_vmemmap.analysis import load_map, load_sections
from inspect_vmemmap.check import run_check
from inspect_vmemmap.memory import PhysRanges
from inspect_vmemmap.model import Altmap, DeviceMap, Folio, HostedBlock, Inputs, merge, predict, subtract
from inspect_vmemmap.vmemmap import MappedLeaf, NodeMap
from tests import kernelsim as ks
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
    era = draw(st.sampled_from(["6.1", "6.12", "7.2"]))
    # hot-added RAM: whole memory blocks (add_memory(): check_hotplug_memory_range()), above
    # boot RAM
    hot = []
    base = (nsec + 2) * SEC
    for _ in range(draw(st.integers(0, 3))):
        start = base + draw(st.integers(0, 2)) * SEC
        end = start + draw(st.integers(1, 3)) * SEC
        hot.append((start, end))
        base = end + SEC
    # memmap_on_memory blocks, hot-added above: 6.12+ records the block's altmap (free = the
    # 512 pages of its memmap), 6.1 nr_vmemmap_pages (the altmap had the whole block free)
    hosted = []
    for _ in range(draw(st.integers(0, 2))):
        start = base // SEC * SEC
        pfn = start >> 12
        free = SEC >> 12 if era == "6.1" else 512
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
        first, last = max(a // SUB, ks.SECTION_POOL[1] // SUB), b // SUB - 1  # not the kernel's low memory
        if last < first:
            continue
        k = draw(st.integers(first, last))
        if k in used:
            continue
        used.add(k)
        pfn = k * 512
        nid = 0 if split == 1 or pfn < nodes[1][1] else 1
        folios.append(Folio(pfn, 9, draw(st.booleans()), nid, 2))
    shared = era == "7.2"
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
    return Inputs(layout=x86_layout(kernel_release=f"{era}.0-sim"), ram=ram, boot_ram=boot_ram, nodes=nodes, folios=folios,
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


_FLAG_BITS = {"present": ks.SECTION_MARKED_PRESENT, "has_mem_map": ks.SECTION_HAS_MEM_MAP,
              "online": ks.SECTION_IS_ONLINE, "early": ks.SECTION_IS_EARLY,
              "zone_device": ks.SECTION_TAINT_ZONE_DEVICE}


def _names(bits: int):
    return sorted(n for n, b in _FLAG_BITS.items() if bits & b)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(layouts())
def test_model_walker_and_check_agree_with_the_simulated_kernel(inp):
    k = SynthKernel(inp)
    truth = k.sim.truth
    sections, vm, leaves = _observe(k)
    # the walker and the decoder read what the simulation wrote, exactly
    assert sections.findings == [] and vm.findings == []
    assert {va: (size, phys, w) for va, size, phys, w in leaves} == truth.leaves
    assert {s.nr: sorted(s.flag_names()) for s in sections if s.present} == \
        {nr: _names(bits) for nr, bits in truth.section_flags.items()}
    # the model predicts what the kernel did
    pred = predict(inp)
    assert {nr: sorted(sp.flag_names()) for nr, sp in pred.sections.items()} == \
        {nr: _names(bits) for nr, bits in truth.section_flags.items()}
    mapped = merge([(va, va + size) for va, (size, _, _) in truth.leaves.items()])
    assert subtract(pred.required, mapped) == []
    assert subtract(mapped, pred.allowed) == []
    assert sorted(h.start for h in pred.hvo) == sorted(truth.hvo)
    dedup = [d for d in pred.device if d.dedup]
    assert sum(d.compound_pages for d in dedup) == truth.compound_pages
    assert sum(d.shared_ptes for d in dedup) == truth.shared_ptes
    assert [(h.start, h.end, h.phys) for h in pred.hosted] == truth.altmap_backed
    # and check finds nothing to say
    res = run_check(inp, sections, leaves)
    assert [f.to_json() for f in res.findings] == []
    assert res.hvo["optimized_folios"] == len(truth.hvo)
    assert vm.readonly_ptes == 7 * len(truth.hvo)
    assert res.device_dedup["compound_pages"] == truth.compound_pages
    assert res.device_dedup["remapped_ptes"] == truth.shared_ptes
    assert res.self_hosted["memory_blocks"] == len(inp.hosted_blocks)
    # HVO: each optimised 2M folio keeps exactly one vmemmap page of its own (6.1 the
    # head's; 6.12 a copy; 7.2 a copy, its tails on the zone's shared page)
    by_va = {va: phys for va, (size, phys, _) in truth.leaves.items() if size == 4096}
    for start, tail in truth.hvo.items():
        assert {by_va[start + i * 4096] for i in range(1, 8)} == {tail}
        assert (by_va[start] == tail) == (k.sim.era != "7.2")


def _tail_and_block(k: SynthKernel):
    """A deduplicated tail vmemmap page and an altmap-backed PMD of the simulated kernel."""
    leaves = k.sim.truth.leaves
    phys_count = {}
    for va, (size, phys, _) in leaves.items():
        if size == 4096:
            phys_count.setdefault(phys, []).append(va)
    hvo_tails = set(k.sim.truth.hvo.values())
    # a ZONE_DEVICE tail: a writable PTE whose page another vmemmap page also maps
    tail = next(((vas[len(vas) // 2], p) for p, vas in sorted(phys_count.items())
                 if len(vas) > 1 and p not in hvo_tails and all(leaves[v][2] for v in vas)), None)
    block = next(((s, e) for s, e, _ in k.sim.truth.altmap_backed if e - s >= 1 << 21 and s % (1 << 21) == 0), None)
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
        va, _ = tail
        k.tables.map(va, k.alloc(4096, 0), 4096)
        where = (va, va + 4096)
    else:
        va = block[0]
        k.tables.map(va, k.alloc(1 << 21, 0), 1 << 21)
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


def test_offnode_memmap_where_the_kernel_fell_back_to_another_node():
    """Node 1 with 4M of boot memory: its one section's memmap takes 2M of it (the sparse
    buffer), and a hot-add of two sections on node 1 gets the last 2M for the first one; the
    second's comes from node 0 (vmemmap_alloc_block(): alloc_pages_node() falls back), as the
    kernel warns "potential offnode page_structs" (vmemmap_verify()). check says so, there,
    and nothing else."""
    lay = x86_layout()
    b0, b1 = backing_range(0)
    boot = [(0, 8 * SEC), (8 * SEC, 8 * SEC + 2 * SUB), (b0, b1)]
    nodes = [(0, 0, 8 * SEC >> 12), (1, 8 * SEC >> 12, 12 * SEC >> 12), (0, b0 >> 12, b1 >> 12)]
    inp = Inputs(layout=lay, ram=boot + [(10 * SEC, 12 * SEC)], boot_ram=boot, nodes=nodes)
    k = SynthKernel(inp)
    va10, va11 = lay.pfn_to_page(10 * SEC >> 12), lay.pfn_to_page(11 * SEC >> 12)
    assert k.sim.truth.backing_nid[va10] == 1 and k.sim.truth.backing_nid[va11] == 0
    sections, vm, leaves = _observe(k)
    res = run_check(inp, sections, leaves)
    assert [(f.kind, f.section, f.vaddr, f.vaddr_end) for f in res.findings] == \
        [("offnode-memmap", 11, va11, va11 + (1 << 21))]
