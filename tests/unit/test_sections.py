from tests.synthmem import SyntheticMemory
from inspect_vmemmap.sections import read_sections
from tests.synth import build_sections, x86_layout


def test_extreme_sections_flags_and_mem_map():
    mem = SyntheticMemory()
    layout = x86_layout()
    build_sections(mem, layout, {
        0: (0xF, 0xFFFFFFFFFFFFFFFF),      # early boot section
        1: (0xF, 0xFFFFFFFFFFFFFFFF),
        300: (0x7, 0x00000000000000FF),    # hot-added, online, first 8 subsections
        301: (0x3, 0x1),                   # hot-added, offline
    })
    table = read_sections(mem, layout)
    assert [s.nr for s in table] == [0, 1, 300, 301]
    s0 = table.get(0)
    assert s0.letters() == "PMOE" and s0.flag_names() == ["present", "has_mem_map", "online", "early"]
    assert s0.coded_mem_map == layout.vmemmap_base
    assert table.get(1).mem_map(layout) == layout.vmemmap_base + 32768 * 64
    s300 = table.get(300)
    assert s300.letters() == "PMO" and not s300.early
    assert s300.subsection_map == 0xFF
    assert s300.pfn_ranges(layout) == [(300 * 32768, 300 * 32768 + 8 * 512)]
    assert table.get(301).pfn_ranges(layout) == [(301 * 32768, 301 * 32768 + 512)]
    assert table.counts() == {"present": 4, "has_mem_map": 4, "online": 3, "early": 2, "zone_device": 0}
    assert not table.findings


def test_bad_flags_and_unreadable_root():
    mem = SyntheticMemory()
    layout = x86_layout()
    build_sections(mem, layout, {0: (0xF, None), 1: (0x2, None), 2: (0x1 | 0x4 | 0x10, None), 200: (0xF, None)})
    # unknown bit 5 is part of the map bits (last bit 5), so use a layout with last bit 6
    table = read_sections(mem, layout)
    kinds = sorted((f.kind, f.section) for f in table.findings)
    assert ("section-flags", 1) in kinds  # mem_map but not present
    # ZONE_DEVICE-tainted and online is a section device memory shares with online RAM
    # (section_taint_zone_device()): the decoder accepts it, the model says where it belongs
    assert ("section-flags", 2) not in kinds
    # drop the page holding root 1 (sections 128-255)
    root1 = int.from_bytes(mem.read(layout.mem_section_addr + 8, 8), "little")
    mem.remove(root1 - mem.virt_base)
    table = read_sections(mem, layout)
    assert 200 not in table.sections and 0 in table.sections
    un = [f for f in table.findings if f.kind == "unreadable"]
    assert len(un) == 1 and un[0].section == 128 and "128-255" in un[0].message


def test_unknown_flag_bits():
    mem = SyntheticMemory()
    layout = x86_layout(section_map_last_bit=6)
    build_sections(mem, layout, {5: (0xF | 0x20, None)})
    table = read_sections(mem, layout)
    assert [(f.kind, f.section) for f in table.findings] == [("section-flags", 5)]
    assert "0x20" in table.findings[0].message
