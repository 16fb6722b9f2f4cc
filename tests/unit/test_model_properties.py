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
from inspect_vmemmap.model import Folio, Inputs, merge, predict
from inspect_vmemmap.vmemmap import NodeMap
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
    return Inputs(layout=x86_layout(), ram=ram, boot_ram=boot_ram, nodes=nodes, folios=folios,
                  hvo_shared_tails=shared)


def _observe(k: SynthKernel):
    lay = k.layout
    nodes = NodeMap(k.inputs.nodes)
    sections = load_sections(k.mem, lay, nodes)
    leaves = []
    vm = load_map(k.mem, lay, sections, nodes, PhysRanges(k.inputs.ram),
                  on_leaf=lambda l: leaves.append((l.vaddr, l.size, l.phys, l.writable)))
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
        assert sorted(s.flag_names()) == sorted(pred.sections[s.nr].flags)
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
