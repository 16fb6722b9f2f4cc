"""The model's rules for ZONE_DEVICE memory and memmap_on_memory, on hand-made inputs."""

from __future__ import annotations

import json

from inspect_vmemmap.check import run_check
from inspect_vmemmap.model import (Altmap, DeviceMap, HostedBlock, Inputs, dax_dedup, memmap_on_memory_pages,
                                   predict, predict_device)
from tests.synth import SynthKernel, with_backing_ram, x86_layout
from tests.unit.test_model_properties import _observe

G = 1 << 30
M = 1 << 20
SEC = 128 * M
PAGE = 4096


def test_dedup_rule_by_architecture_and_size():
    x86, arm = x86_layout(), x86_layout(arch="aarch64")
    assert dax_dedup(x86, 9, False)[0] is True  # 2M: 8 vmemmap pages
    assert dax_dedup(x86, 18, False)[0] is True  # 1G
    assert dax_dedup(x86, 9, True)[0] is False  # the memmap on the device
    assert dax_dedup(x86, 0, False)[0] is False  # 4K alignment: no compound pages
    # 6.1 deduplicates these, vmemmap_can_optimize() (6.12, 7.2) does not: either is right
    assert dax_dedup(x86, 7, False)[0] is None  # 2 vmemmap pages: not more than VMEMMAP_RESERVE_NR
    assert dax_dedup(arm, 9, False)[0] is None  # arm64 has no ARCH_WANT_OPTIMIZE_DAX_VMEMMAP
    assert dax_dedup(x86_layout(struct_page_size=72), 9, False)[0] is False


def test_1g_compound_pages_reuse_the_previous_sections_tail_page():
    """vmemmap_populate_compound_pages(): a 1G compound page spans 8 sections; the first
    gets the head's and one tail vmemmap page, the other 7 sections map all their pages
    onto that tail page (reuse_compound_section(), compound_section_tail_page())."""
    lay = x86_layout()
    p = predict_device(lay, DeviceMap([(4 * G, 6 * G)], 18))
    v = lay.pfn_to_page
    assert p.dedup and p.compound_pages == 2
    c0, c1 = v((4 * G) // PAGE), v((5 * G) // PAGE)
    assert list(p.runs()) == [(c0 + 2 * PAGE, c1, c0 + PAGE), (c1 + 2 * PAGE, v((6 * G) // PAGE), c1 + PAGE)]
    assert p.shared_ptes == 2 * (4096 - 2)


def test_2m_compound_pages_and_the_taint_at_unaligned_ends():
    lay = x86_layout()
    start, end = 6 * G, 6 * G + 192 * M  # ends in the middle of section 49
    inp = Inputs(lay, ram=[(0, G)], device_maps=[DeviceMap([(start, end)], 9)])
    pred = predict(inp)
    d, = pred.device
    assert d.compound_pages == 96 and len(list(d.runs())) == 96 and d.shared_ptes == 96 * 6
    c = lay.pfn_to_page(start // PAGE)
    assert next(d.runs()) == (c + 2 * PAGE, c + 8 * PAGE, c + PAGE)
    s48, s49 = pred.sections[48], pred.sections[49]
    assert s48.flag_names() == ["present", "has_mem_map"]  # never online, never early
    assert s49.flag_names() == ["present", "has_mem_map", "zone_device"]
    assert s49.valid == [(49 * 32768, 49 * 32768 + 16384)]  # the device's subsections only


def test_device_altmap_backs_whole_sections_only():
    """x86_64: a whole section's memmap is a PMD from the altmap (aligned: the first after
    the 8K info block is 2M in), a partial section's comes from RAM."""
    lay = x86_layout()
    start = 6 * G + 192 * M
    size = 352 * M
    free = 6 * M // PAGE - 2
    p = predict_device(lay, DeviceMap([(start, start + size)], 9, Altmap(start // PAGE, 2, free)))
    assert p.dedup is False and p.segments == []
    v = lay.pfn_to_page
    assert [(h.start, h.end, h.phys) for h in p.hosted] == [(v(50 * 32768), v(52 * 32768), start + 2 * M)]
    # the altmap runs out: the hot-add fails after what fitted
    p = predict_device(lay, DeviceMap([(start, start + size)], 9, Altmap(start // PAGE, 2, free - 1)))
    assert [(h.start, h.end) for h in p.hosted] == [(v(50 * 32768), v(51 * 32768))]


def test_memmap_on_memory_reserved_pages():
    lay = x86_layout()
    assert memmap_on_memory_pages(lay, 32768, "enable", 9) == 512
    assert memmap_on_memory_pages(lay, 32768, "force", 9) == 512
    odd = x86_layout(struct_page_size=72)  # 576 pages of memmap: force pads to whole pageblocks
    assert memmap_on_memory_pages(odd, 32768, "enable", 9) == 576
    assert memmap_on_memory_pages(odd, 32768, "force", 9) == 1024
    assert memmap_on_memory_pages(lay, 32768, None, 9) is None
    # 6.12, 7.2: the block's altmap, free = the reservation; 6.1: the whole block free, the use reserved
    for free in (512, 32768):
        inp = Inputs(lay, ram=[(0, G), (4 * G, 4 * G + SEC)], memmap_on_memory="enable", pageblock_order=9,
                     hosted_blocks=[HostedBlock(4 * G // PAGE, (4 * G + SEC) // PAGE, Altmap(4 * G // PAGE, 0, free), 512)])
        b, = predict(inp).blocks
        assert (b.reserved_pages, b.used_pages) == (512, 512)
        assert [(h.start, h.end, h.phys) for h in b.hosted] == [
            (lay.pfn_to_page(4 * G // PAGE), lay.pfn_to_page(4 * G // PAGE) + 2 * M, 4 * G)]


def test_inputs_round_trip_and_old_layouts():
    lay = x86_layout()
    inp = Inputs(lay, ram=[(0, G)], device_maps=[DeviceMap([(4 * G, 6 * G)], 18, None, "MEMORY_DEVICE_GENERIC"),
                                                 DeviceMap([(6 * G, 7 * G)], 9, Altmap(1, 2, 3))],
                 hosted_blocks=[HostedBlock(1, 2, Altmap(1, 0, 1), 1)], memmap_on_memory="force", pageblock_order=9)
    assert Inputs.from_json(json.loads(json.dumps(inp.to_json()))) == inp
    old = inp.to_json()
    for k in ("device_maps", "hosted_blocks", "memmap_on_memory", "pageblock_order"):
        del old[k]
    back = Inputs.from_json(old)
    assert back.device_maps is None and back.hosted_blocks is None and back.memmap_on_memory is None


def test_unknown_device_maps_keep_tainted_sections_unchecked():
    """Without the page maps (an old layout, no type information) device sections are not
    predicted: a tainted one is let be, as before."""
    lay = x86_layout()
    ram = with_backing_ram([(0, 2 * SEC)])
    dev = Inputs(lay, ram=ram, nodes=[(0, 0, 1 << 22)], device_maps=[DeviceMap([(3 * SEC + 64 * M, 4 * SEC)], 9)])
    k = SynthKernel(dev)
    sections, vm, leaves = _observe(k)
    assert run_check(dev, sections, leaves).findings == []
    blind = Inputs(lay, ram=ram, nodes=dev.nodes)
    res = run_check(blind, sections, leaves)
    assert [f.kind for f in res.findings if f.severity == "error"] == ["alias"] * 32  # the dedup, unexplained
    assert not [f for f in res.findings if f.kind == "section-flags"]
    # known maps, but none for this memory: its sections must not be there
    none = Inputs(lay, ram=ram, nodes=dev.nodes, device_maps=[])
    assert [f.section for f in run_check(none, sections, leaves).findings if f.kind == "section-flags"] == [3]


def test_dedup_missing_is_misplaced_backing():
    """Device memory whose memmap is mapped by ordinary PMD blocks where the model says
    the compound pages' tails share a page: backing-misplaced for each compound page's
    tails, nothing else."""
    lay = x86_layout()
    ram = with_backing_ram([(0, 2 * SEC)])
    plain = Inputs(lay, ram=ram, nodes=[(0, 0, 1 << 22)], device_maps=[DeviceMap([(3 * SEC, 4 * SEC)], 0)])
    k = SynthKernel(plain)  # vmemmap_shift 0: one 2M PMD block of struct pages
    sections, vm, leaves = _observe(k)
    assert run_check(plain, sections, leaves).findings == []
    dedup = Inputs(lay, ram=ram, nodes=plain.nodes, device_maps=[DeviceMap([(3 * SEC, 4 * SEC)], 9)])
    res = run_check(dedup, sections, leaves)
    assert {f.kind for f in res.findings} == {"backing-misplaced"} and len(res.findings) == 64
    first = res.findings[0]
    v = lay.pfn_to_page(3 * SEC // PAGE)
    assert (first.vaddr, first.vaddr_end, first.section) == (v + 2 * PAGE, v + 8 * PAGE, 3)
    assert "2M block" in first.message
    assert res.device_dedup["compound_pages"] == 0
