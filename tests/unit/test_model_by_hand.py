"""The reference model's rules, one test each, against numbers worked out by hand from the
kernel source (Debian's linux-source 6.1.176, 6.12.117, 7.2.13), the arithmetic written
beside each expectation. Nothing here is taken from ``predict``.

x86_64 constants used throughout (arch/x86/include/asm/sparsemem.h, page_types.h):
PAGE_SHIFT 12, SECTION_SIZE_BITS 27 -> PAGES_PER_SECTION = 2^(27-12) = 32768;
SUBSECTION_SHIFT 21 -> PAGES_PER_SUBSECTION = 2^(21-12) = 512; sizeof(struct page) 64, so a
section's memmap is 32768 * 64 = 2 MiB = 0x200000 (one PMD) and a subsection's
512 * 64 = 32 KiB = 0x8000 (8 pages). VMEMMAP base 0xffffea0000000000 (4-level).
"""

from __future__ import annotations

from inspect_vmemmap.model import (Altmap, DeviceMap, Folio, HostedBlock, Inputs, _node_of, dax_dedup,
                                   memmap_on_memory_pages, page_flags_layout, predict)
from tests.synth import x86_layout

M = 1 << 20
SEC = 128 * M
BASE = 0xFFFFEA0000000000


def _inp(**kw):
    kw.setdefault("layout", x86_layout())
    kw.setdefault("nodes", [(0, 0, 1 << 24)])
    return Inputs(**kw)


def test_boot_sections_are_present_early_and_whole():
    # mm/sparse.c memory_present(): every section a memblock range touches is present;
    # sparse_init_nid(): its memmap is populated for PAGES_PER_SECTION and the section gets
    # SECTION_IS_EARLY. RAM [0, 192M): 192M / 128M = 1.5 -> sections 0 and 1, section 1 half
    # RAM but valid whole: pfns [32768, 65536).
    p = predict(_inp(ram=[(0, 192 * M)], boot_ram=[(0, 192 * M)]))
    assert sorted(p.sections) == [0, 1]
    assert p.sections[1].flag_names() == ["present", "has_mem_map", "online", "early"]
    assert p.sections[1].valid == [(32768, 65536)]
    # required vmemmap: pfns [0, 65536) * 64 bytes = [0, 0x400000) from the base
    assert p.required == [(BASE, BASE + 0x400000)]


def test_nomap_memory_alone_in_its_section_makes_it_present_early_and_whole():
    # arm64 UEFI boot (QEMU virt with edk2): memblock.memory holds the variable flash at
    # [64M, 128M) as nomap (drivers/firmware/efi/efi-init.c reserve_regions() ->
    # memblock_mark_nomap()), and RAM from 1G. memblocks_present() walks memblock.memory,
    # nomap included: section 0 (pfns 0-32767) is present, early (boot) and valid whole, like
    # a RAM section; section 1 ([128M, 256M)) holds nothing and is absent. The pfn arithmetic
    # is 4K pages' as in this module (the rule is the same for arm64's 128M sections).
    p = predict(_inp(ram=[(8 * SEC, 9 * SEC)], nomap=[(64 * M, SEC)], boot_ram=None))
    assert sorted(p.sections) == [0, 8]
    assert p.sections[0].flag_names() == ["present", "has_mem_map", "online", "early"]
    assert p.sections[0].valid == [(0, 32768)]
    # with a boot-RAM table that lacks it (firmware tables list RAM), nomap is still boot memory
    p = predict(_inp(ram=[(8 * SEC, 9 * SEC)], nomap=[(64 * M, SEC)], boot_ram=[(8 * SEC, 9 * SEC)]))
    assert "early" in p.sections[0].flag_names()


def test_a_hot_added_section_is_not_early_and_offline_blocks_are_not_online():
    # sparse_add_section() passes flags 0 to sparse_init_one_section(): no SECTION_IS_EARLY;
    # online_mem_sections() sets SECTION_IS_ONLINE, offline_mem_sections() clears it.
    # Hot RAM [256M, 512M) = sections 2 (pfns 65536-98303) and 3 (98304-131071); 3 offline.
    p = predict(_inp(ram=[(0, SEC), (2 * SEC, 4 * SEC)], boot_ram=[(0, SEC)], offline_blocks=[(98304, 131072)]))
    assert p.sections[2].flag_names() == ["present", "has_mem_map", "online"]
    assert p.sections[3].flag_names() == ["present", "has_mem_map"]


def test_sub_section_device_memory_is_valid_per_subsection_and_taints_its_section():
    # Device memory [128M + 2M, 128M + 6M): pfns 32768 + 512 = 33280 to 32768 + 1536 = 34304,
    # both subsection-aligned (512 | 33280, 512 | 34304); section_activate() ->
    # subsection_mask_set() marks subsections 1..2. Neither end is section-aligned, so
    # move_pfn_range_to_zone() taints section 1 (section_taint_zone_device()); no RAM, never
    # onlined: flags present, has_mem_map, zone_device.
    dev = DeviceMap([(SEC + 2 * M, SEC + 6 * M)], 0, None, "MEMORY_DEVICE_GENERIC")
    p = predict(_inp(ram=[(0, SEC)], boot_ram=[(0, SEC)], device_maps=[dev]))
    assert p.sections[1].valid == [(33280, 34304)]
    assert p.sections[1].flag_names() == ["present", "has_mem_map", "zone_device"]
    # its struct pages: 33280 * 64 = 0x208000 to 34304 * 64 = 0x218000, populated in base
    # pages (x86 vmemmap_populate(): 0x10000 bytes < a section's 0x200000), so allowed =
    # required (both page-aligned)
    assert (BASE + 0x208000, BASE + 0x218000) in p.required
    assert (BASE + 0x208000, BASE + 0x218000) in p.allowed


def test_section_aligned_device_memory_carries_no_zone_device_mark():
    # [256M, 384M) = exactly section 2: both ends aligned, no taint (mm/memory_hotplug.c)
    dev = DeviceMap([(2 * SEC, 3 * SEC)], 0, None, "MEMORY_DEVICE_GENERIC")
    p = predict(_inp(ram=[(0, SEC)], boot_ram=[(0, SEC)], device_maps=[dev]))
    assert p.sections[2].flag_names() == ["present", "has_mem_map"]


def test_whole_sections_may_be_mapped_in_pmd_blocks():
    # RAM [0, 128M + 2M) boot: sections 0, 1 early and whole -> required [0, 65536 pfns) *
    # 64 = 0x400000; allowed rounds each >= section-sized run out to 2M: the same here.
    # Hot RAM [1G, 1G + 128M) (section 8, pfns 262144-294911): vmemmap 262144 * 64 = 0x1000000
    # to 294912 * 64 = 0x1200000, one PMD.
    p = predict(_inp(ram=[(0, SEC + 2 * M), (8 * SEC, 9 * SEC)], boot_ram=[(0, SEC + 2 * M)]))
    assert p.required == [(BASE, BASE + 0x400000), (BASE + 0x1000000, BASE + 0x1200000)]
    assert p.allowed == p.required


def test_hvo_keeps_one_page_of_eight_for_a_2m_folio():
    # hugetlb_vmemmap_size() = pages_per_huge_page * sizeof(struct page) = 512 * 64 = 32 KiB
    # = 8 vmemmap pages; HUGETLB_VMEMMAP_RESERVE_SIZE = PAGE_SIZE keeps 1, 7 read-only.
    # Folio at pfn 1024: its struct page at BASE + 1024 * 64 = BASE + 0x10000.
    for shared, target in ((False, "head"), (True, "shared")):
        p = predict(_inp(ram=[(0, SEC)], boot_ram=[(0, SEC)], folios=[Folio(1024, 9, True, 0, 2)],
                         hvo_shared_tails=shared))
        (h,) = p.hvo
        assert (h.start, h.pages, h.tail_target) == (BASE + 0x10000, 8, target)
    # a 1G folio (order 18): 262144 * 64 / 4096 = 4096 vmemmap pages
    p = predict(_inp(ram=[(0, 8 * SEC)], boot_ram=[(0, 8 * SEC)], folios=[Folio(0, 18, True, 0, 2)]))
    assert p.hvo[0].pages == 4096
    # an unoptimized folio gets nothing
    assert predict(_inp(ram=[(0, SEC)], boot_ram=[(0, SEC)], folios=[Folio(1024, 9, False, 0, 2)])).hvo == []


def test_arm64_has_no_hvo():
    # arch/arm64/Kconfig selects no ARCH_WANT_OPTIMIZE_HUGETLB_VMEMMAP (6.1, 6.12, 7.2)
    lay = x86_layout(arch="aarch64")
    p = predict(_inp(layout=lay, ram=[(0, SEC)], folios=[Folio(1024, 9, True, 0, 2)]))
    assert p.hvo[0].tail_target == "unsupported"


def test_dax_dedup_rule():
    lay = x86_layout()
    # 2M device-dax: vmemmap_shift 9 -> 512 * 64 / 4096 = 8 vmemmap pages > VMEMMAP_RESERVE_NR 2
    assert dax_dedup(lay, 9, False)[0] is True
    assert dax_dedup(lay, 0, False)[0] is False  # no compound pages
    assert dax_dedup(lay, 9, True)[0] is False  # an altmap: the memmap is on the device
    # arm64: 6.1 dedups (any shift > 0), 6.12/7.2 do not (no ARCH_WANT_OPTIMIZE_DAX_VMEMMAP)
    assert dax_dedup(x86_layout(arch="aarch64"), 9, False)[0] is None


def test_2m_compound_pages_share_their_tail_vmemmap():
    # A 4M device-dax range at 1G (section 8), vmemmap_shift 9: two compound pages of 512
    # pages; each has 8 vmemmap pages, 0 (head) and 1 its own, 2..7 map page 1's: 6 shared
    # each, 12 in all (vmemmap_populate_compound_pages()).
    dev = DeviceMap([(8 * SEC, 8 * SEC + 4 * M)], 9, None, "MEMORY_DEVICE_GENERIC")
    p = predict(_inp(ram=[(0, SEC)], boot_ram=[(0, SEC)], device_maps=[dev]))
    (d,) = p.device
    assert (d.dedup, d.compound_pages, d.shared_ptes) == (True, 2, 12)
    # the first compound page's struct pages at 8 * 32768 * 64 = 0x1000000 from the base: page
    # 0x1000000 and 0x1001000 own, 0x1002000..0x1007000 map 0x1001000's page
    assert d.target_of(BASE + 0x1002000) == BASE + 0x1001000
    assert d.target_of(BASE + 0x1001000) is None
    assert d.target_of(BASE + 0x1008000) is None  # the second one's head


def test_1g_compound_pages_reuse_the_previous_section():
    # A 1G range at 1G, vmemmap_shift 18: one compound page of 262144 pages over 8 sections.
    # Section 8 (the first chunk, offset 0): size = min(2M of memmap, 262144 * 64 = 16M) = 2M,
    # one head: pages 0 and 1 own, 512 - 2 = 510 shared. Sections 9..15 start inside the
    # compound page (offset % 262144 != 0, 262144 > PAGES_PER_SUBSECTION):
    # reuse_compound_section(), all 512 pages each shared: 7 * 512 = 3584. Total 4094
    # = 262144 * 64 / 4096 - 2.
    dev = DeviceMap([(8 * SEC, 16 * SEC)], 18, None, "MEMORY_DEVICE_GENERIC")
    (d,) = predict(_inp(ram=[(0, SEC)], boot_ram=[(0, SEC)], device_maps=[dev])).device
    assert (d.compound_pages, d.shared_ptes) == (1, 4094)


def test_memmap_on_memory_block_6_12():
    # 6.12 create_altmaps_and_memory_blocks(): altmap {base_pfn = block start, free =
    # memory_block_memmap_on_memory_pages() = PFN_UP(32768 * 64) = 512}. x86
    # vmemmap_populate_hugepages() takes one PMD_SIZE block: nr_pfns 512, next pfn = base
    # (reserve 0, alloc 0, align 0); base = 2 * 32768 = 65536 is 512-aligned: nr_align 0;
    # 512 + 0 <= 512 free. So the block's memmap is its own first 2M: phys 65536 << 12 =
    # 0x10000000, for vmemmap 65536 * 64 = 0x400000 .. 98304 * 64 = 0x600000.
    hb = HostedBlock(65536, 98304, Altmap(65536, 0, 512), 512)
    p = predict(_inp(ram=[(0, SEC), (2 * SEC, 3 * SEC)], boot_ram=[(0, SEC)], hosted_blocks=[hb],
                     memmap_on_memory="enable"))
    (b,) = p.blocks
    assert (b.reserved_pages, b.used_pages) == (512, 512)
    assert [(h.start, h.end, h.phys) for h in b.hosted] == [(BASE + 0x400000, BASE + 0x600000, 0x10000000)]


def test_memmap_on_memory_block_6_1():
    # 6.1 add_memory_resource(): one altmap, .free = PHYS_PFN(size) = 32768 (the whole block);
    # the population uses 512 pfns, which create_memory_block_devices() records as the
    # block's nr_vmemmap_pages: reserved = used = 512.
    hb = HostedBlock(65536, 98304, Altmap(65536, 0, 32768), 512)
    (b,) = predict(_inp(ram=[(0, SEC), (2 * SEC, 3 * SEC)], boot_ram=[(0, SEC)], hosted_blocks=[hb],
                        memmap_on_memory="enable")).blocks
    assert (b.reserved_pages, b.used_pages) == (512, 512)


def test_memmap_on_memory_pages_force_rounds_to_pageblocks():
    lay = x86_layout()
    # PFN_UP(32768 * 64) = 2097152 / 4096 = 512
    assert memmap_on_memory_pages(lay, 32768, "enable", None) == 512
    # force: pageblock_align(512) with pageblock_order 10 -> 1024
    assert memmap_on_memory_pages(lay, 32768, "force", 10) == 1024
    # a 16M block (4096 pages): 4096 * 64 / 4096 = 64 pages; force with order 9 -> 512
    assert memmap_on_memory_pages(lay, 4096, "force", 9) == 512
    assert memmap_on_memory_pages(lay, 32768, None, None) is None


def test_device_altmap_starts_after_its_reserve_aligned():
    # nvdimm "pmem" mode: altmap base_pfn = the range's first pfn (1G -> 262144), reserve 2
    # (the 8K info block). The first PMD allocation: next pfn = 262144 + 2 = 262146; nr_pfns
    # 512, align 512: nr_align = ALIGN(262146, 512) - 262146 = 262656 - 262146 = 510; so the
    # PMD is at pfn 262656 = phys 0x40200000 and uses 512 + 510 = 1022 of `free`. With free
    # 1536, the second section's PMD would need 512 more: 1022 + 512 = 1534 <= 1536, it fits
    # at pfn 262656 + 512 = 263168 = phys 0x40400000.
    dev = DeviceMap([(8 * SEC, 10 * SEC)], 9, Altmap(262144, 2, 1536), "MEMORY_DEVICE_GENERIC")
    (d,) = predict(_inp(ram=[(0, SEC)], boot_ram=[(0, SEC)], device_maps=[dev])).device
    assert d.dedup is False
    # vmemmap of sections 8, 9: 262144 * 64 = 0x1000000 .. 327680 * 64 = 0x1400000, contiguous
    assert [(h.start, h.end, h.phys) for h in d.hosted] == [(BASE + 0x1000000, BASE + 0x1400000, 0x40200000)]
    # free 1535: the second PMD needs 1022 + 512 = 1534 <= 1535 still; free 1533 does not fit
    dev = DeviceMap([(8 * SEC, 10 * SEC)], 9, Altmap(262144, 2, 1533), "MEMORY_DEVICE_GENERIC")
    (d,) = predict(_inp(ram=[(0, SEC)], boot_ram=[(0, SEC)], device_maps=[dev])).device
    assert [(h.start, h.end) for h in d.hosted] == [(BASE + 0x1000000, BASE + 0x1200000)]


def test_page_flags_layout():
    # include/linux/page-flags-layout.h: NODES_SHIFT = log2(64) = 6; MAX_NR_ZONES 5 -> ZONES_SHIFT
    # 3 (<= 8); from the top of 64 bits: NODES_PGSHIFT = 64 - 6 = 58, ZONES_PGSHIFT = 58 - 3 = 55
    assert page_flags_layout(64, 5) == {"nodes_shift": 58, "nodes_width": 6, "zones_shift": 55, "zones_width": 3}
    # 1 node, 4 zones: NODES_SHIFT 0, ZONES_SHIFT 2
    assert page_flags_layout(1, 4) == {"nodes_shift": 64, "nodes_width": 0, "zones_shift": 62, "zones_width": 2}


def test_node_of_nested_spans():
    # node 0 spans [0, 1000) after a hot-add grew it over node 1's [400, 600): a pfn in
    # [400, 600) is node 1's (the innermost span)
    nodes = [(0, 0, 1000), (1, 400, 600)]
    assert _node_of(nodes, 450, 460) == 1
    assert _node_of(nodes, 100, 110) == 0
    assert _node_of(nodes, 2000, 2100) is None
