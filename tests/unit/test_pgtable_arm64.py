import pytest

from tests.synthmem import SyntheticMemory
from inspect_vmemmap.pgtable import BadEntry, Leaf, Unreadable, translate, walk
from inspect_vmemmap.pgtable.arm64 import Arm64Paging, ttbr1_root
from tests.synth import (ARM64_CONT, ARM64_DBM, ARM64_PAGE_KERNEL, ARM64_PAGE_KERNEL_RO, ARM64_RDONLY,
                         ARM64_SECT_KERNEL, ARM64_SH, ARM64_TABLE, Arm64Spec, Arm64Tables)

K4, K16, K64 = 1 << 12, 1 << 14, 1 << 16
M2, M32, M512 = 1 << 21, 1 << 25, 1 << 29
G1, G64, G512, T4 = 1 << 30, 1 << 36, 1 << 39, 1 << 42
TOP = 1 << 64

VMEMMAP_48 = 0xFFFFFC0000000000  # 6.1, VA_BITS 48: -(1 << (VA_BITS - 6))
VMEMMAP_52 = 0xFFFFC1FFC0000000  # 6.12/7.2 4K, VA_BITS 52 with LPA2
PAGE_OFFSET_48 = 0xFFFF000000000000  # bit 47 clear: must not be sign-extended to 0


def leaves(evs):
    assert all(isinstance(e, Leaf) for e in evs), evs
    return [(e.vaddr, e.size, e.level, e.phys) for e in evs]


# -- geometry ----------------------------------------------------------------------------------

@pytest.mark.parametrize("page_size,va_bits,levels,shifts,top", [
    (K4, 39, 3, (30, 21, 12), 512),
    (K4, 48, 4, (39, 30, 21, 12), 512),
    (K4, 52, 5, (48, 39, 30, 21, 12), 16),
    (K16, 36, 2, (25, 14), 2048),
    (K16, 47, 3, (36, 25, 14), 2048),
    (K16, 48, 4, (47, 36, 25, 14), 2),
    (K16, 52, 4, (47, 36, 25, 14), 32),
    (K64, 42, 2, (29, 16), 8192),
    (K64, 48, 3, (42, 29, 16), 64),
    (K64, 52, 3, (42, 29, 16), 1024),
])
def test_geometry_follows_pgtable_hwdef(page_size, va_bits, levels, shifts, top):
    pa = 52 if va_bits == 52 else 48
    f = Arm64Paging(page_size, va_bits, pa)
    assert f.levels == levels and f.shifts == shifts
    assert f.table_entries(0) == top  # PTRS_PER_PGD = 1 << (VA_BITS - PGDIR_SHIFT)
    assert all(f.table_entries(d) == page_size // 8 for d in range(1, levels))
    assert f.names[0] == "pgd" and f.names[-1] == "pte" and len(f.names) == levels
    assert f.lpa2 == (va_bits == 52 and page_size != K64)


@pytest.mark.parametrize("page_size,va_bits,pa_bits,lpa2,blocks", [
    (K4, 48, 48, False, {1: True, 2: True, 0: False}),
    (K4, 52, 52, True, {-1: False, 0: True, 1: True, 2: True}),
    (K4, 39, 48, False, {1: True, 2: True}),
    (K16, 48, 48, False, {0: False, 1: False, 2: True}),
    (K16, 52, 52, True, {0: False, 1: True, 2: True}),
    (K64, 48, 48, False, {1: False, 2: True}),
    (K64, 48, 52, False, {1: True, 2: True}),
])
def test_block_levels(page_size, va_bits, pa_bits, lpa2, blocks):
    f = Arm64Paging(page_size, va_bits, pa_bits, lpa2)
    for level, ok in blocks.items():
        assert f.can_be_leaf(f.hw_levels.index(level)) is ok, level
    assert f.can_be_leaf(f.levels - 1)
    assert f.pmd_blocks(None) is (page_size == K4)


def test_bad_parameters():
    with pytest.raises(ValueError):
        Arm64Paging(8192, 48)
    with pytest.raises(ValueError):
        Arm64Paging(K4, 47)
    with pytest.raises(ValueError):
        Arm64Paging(K4, 52, 48)  # 52-bit VA with 4K needs LPA2
    with pytest.raises(ValueError):
        Arm64Paging(K64, 48, 52, lpa2=True)
    with pytest.raises(ValueError):
        Arm64Paging(K4, 48, 48, levels=3)
    assert Arm64Paging(K4, 48, 48, levels=4).levels == 4


# -- walks per granule -------------------------------------------------------------------------

def test_4k_4level_blocks_and_pages():
    mem = SyntheticMemory()
    f = Arm64Paging(K4, 48, 48)
    t = Arm64Tables(mem, Arm64Spec(K4, 48, 48))
    base = VMEMMAP_48
    t.map(base, 0x40000000, G1)
    t.map(base + G1, 0x200000, M2)
    for i in range(3):
        t.map(base + G1 + M2 + i * K4, 0x600000 + i * K4, K4)
    t.map(PAGE_OFFSET_48, 0x80000000, G1)
    evs = list(walk(mem, f, t.root, base, base + 4 * G1))
    assert leaves(evs) == [
        (base, G1, "pud", 0x40000000),
        (base + G1, M2, "pmd", 0x200000),
        (base + G1 + M2, K4, "pte", 0x600000),
        (base + G1 + M2 + K4, K4, "pte", 0x601000),
        (base + G1 + M2 + 2 * K4, K4, "pte", 0x602000),
    ]
    assert evs[0].writable and evs[0].attrs == ("NX", "SHD", "AF", "BLK", "UXN", "MEM/NORMAL")
    assert evs[2].attrs == ("NX", "SHD", "AF", "UXN", "MEM/NORMAL")
    # a TTBR1 address with bit 47 clear comes back with all upper bits set
    evs = list(walk(mem, f, t.root, PAGE_OFFSET_48, TOP))
    assert [e.vaddr for e in evs][0] == PAGE_OFFSET_48 and len(evs) == 6
    assert f.canonical(0) == PAGE_OFFSET_48


def test_4k_3level_39bit():
    mem = SyntheticMemory()
    f = Arm64Paging(K4, 39, 48)
    t = Arm64Tables(mem, Arm64Spec(K4, 39, 48))
    base = 0xFFFFFFC000000000 + 0x3000000000  # anywhere in the 39-bit TTBR1 range
    t.map(base, 0x40000000, G1)  # a level 1 block in the pgd
    t.map(base + G1, 0x200000, M2)
    t.map(base + G1 + M2, 0x400000, K4)
    evs = list(walk(mem, f, t.root, base, base + 2 * G1))
    assert leaves(evs) == [(base, G1, "pgd", 0x40000000), (base + G1, M2, "pmd", 0x200000),
                           (base + G1 + M2, K4, "pte", 0x400000)]


def test_4k_5level_lpa2_above_2_to_50():
    mem = SyntheticMemory()
    f = Arm64Paging(K4, 52, 52)
    assert f.lpa2
    hi = (1 << 51) | (1 << 50)
    t = Arm64Tables(mem, Arm64Spec(K4, 52, 52), table_pool=hi + 0x100000)  # tables above 2^50 too
    base = VMEMMAP_52
    page_e = t.map(base + M2, hi + 0x7000, K4)
    blk_e = t.map(base + 2 * M2, hi + 0x40000000, M2)
    raw = t.get(page_e)
    assert raw & 0x300 == 0x300 and raw & (1 << 50) == 0  # PA[51:50] in bits 9:8
    assert raw == (0x7000 | ARM64_PAGE_KERNEL) & ~ARM64_SH | 0x300
    evs = list(walk(mem, f, t.root, base, base + G1))
    assert leaves(evs) == [(base + M2, K4, "pte", hi + 0x7000), (base + 2 * M2, M2, "pmd", hi + 0x40000000)]
    # the notes' formula for 4K: (pte & GENMASK(49, 12)) | ((pte & 0x300) << 42)
    assert ((raw & (((1 << 50) - 1) & ~0xFFF)) | ((raw & 0x300) << 42)) == hi + 0x7000
    # bits 8-9 are address bits, so no SHD
    assert "SHD" not in evs[0].attrs and evs[0].writable
    assert t.get(blk_e) & 3 == 1
    # a level 0 (512G) block is legal with LPA2 (the p4d level of 5)
    t.map(base - G512 * 4 & ~(G512 - 1), 1 << 51, G512)
    va0 = base - G512 * 4 & ~(G512 - 1)
    evs = list(walk(mem, f, t.root, va0, va0 + G512))
    assert leaves(evs) == [(va0, G512, "p4d", 1 << 51)]
    # the top level has 16 entries: pgd_index is bits 51:48
    steps = translate(mem, f, t.root, base + M2 + 0x40)
    assert steps[0].index == (base >> 48) & 15 == 0xF
    assert [s.level for s in steps] == ["pgd", "p4d", "pud", "pmd", "pte"]
    assert [s.kind for s in steps] == ["table"] * 4 + ["leaf"] and steps[-1].phys == hi + 0x7000
    assert steps[1].table_phys >= hi


def test_16k_4level_two_entry_top():
    mem = SyntheticMemory()
    f = Arm64Paging(K16, 48, 48)
    t = Arm64Tables(mem, Arm64Spec(K16, 48, 48))
    base = VMEMMAP_48  # top index 1
    t.map(base, 0x2000000, M32)
    t.map(base + M32, 0x4000000, K16)
    t.map(base + M32 + K16, 0x4004000, K16, ARM64_PAGE_KERNEL_RO)
    t.map(PAGE_OFFSET_48, 0x8000000, M32)  # top index 0
    assert t.entry_addr(t.root, base, 0) == t.root + 8
    evs = list(walk(mem, f, t.root, PAGE_OFFSET_48, TOP))
    assert leaves(evs) == [(PAGE_OFFSET_48, M32, "pmd", 0x8000000), (base, M32, "pmd", 0x2000000),
                           (base + M32, K16, "pte", 0x4000000), (base + M32 + K16, K16, "pte", 0x4004000)]
    assert [e.writable for e in evs] == [True, True, True, False]
    # a 64G block at level 1 (pud) is not possible with 16K pages without LPA2
    pud_e = t.entry_of(base, 1)
    mem.write_u64(pud_e, 0x1000000000 | ARM64_SECT_KERNEL)
    evs = list(walk(mem, f, t.root, base, base + G64))
    assert len(evs) == 1 and isinstance(evs[0], BadEntry) and evs[0].level == "pud"
    assert "cannot have one" in evs[0].reason and evs[0].size == G64


def test_16k_lpa2_level1_block():
    mem = SyntheticMemory()
    f = Arm64Paging(K16, 52, 52)
    t = Arm64Tables(mem, Arm64Spec(K16, 52, 52))
    va = 0xFFF0000000000000 + 3 * G64
    t.map(va, (1 << 50) + G64, G64)
    assert leaves(list(walk(mem, f, t.root, va, va + G64))) == [(va, G64, "pud", (1 << 50) + G64)]


def test_64k_3level_52bit_pa():
    mem = SyntheticMemory(page_size=K64)
    f = Arm64Paging(K64, 48, 52)
    assert not f.lpa2 and f.table_entries(0) == 64
    hi = 0xA_0000_0000_0000 | 0x4000_0000_0000  # bits 51..48 = 0xa, and bit 46
    t = Arm64Tables(mem, Arm64Spec(K64, 48, 52), table_pool=(1 << 49) + 0x1000000)
    base = VMEMMAP_48
    pe = t.map(base + M512, hi + 0x30000, K64)
    t.map(base + 2 * M512, hi + M512, M512)
    raw = t.get(pe)
    assert (raw >> 12) & 0xF == 0xA and raw & (3 << 48) == 0  # PA[51:48] in bits 15:12
    evs = list(walk(mem, f, t.root, base, base + T4))
    assert leaves(evs) == [(base + M512, K64, "pte", hi + 0x30000), (base + 2 * M512, M512, "pmd", hi + M512)]
    # 6.12+ also leaves PA[49:48] in bits 49:48 (PTE_ADDR_LOW is bits 49:16): same address
    mem.write_u64(pe, raw | (0x2 << 48))
    assert leaves(list(walk(mem, f, t.root, base + M512, base + M512 + K64))) == [(base + M512, K64, "pte", hi + 0x30000)]
    # ...but bits 49:48 that disagree are corrupt
    mem.write_u64(pe, raw | (0x1 << 48))
    ev, = walk(mem, f, t.root, base + M512, base + M512 + K64)
    assert isinstance(ev, BadEntry) and "49:48" in ev.reason
    # a 4T level 1 block is allowed with a 52-bit PA
    va = base - T4 * 2
    t.map(va, 1 << 51, T4)
    assert leaves(list(walk(mem, f, t.root, va, va + T4))) == [(va, T4, "pgd", 1 << 51)]
    # and not with a 48-bit PA
    f48 = Arm64Paging(K64, 48, 48)
    ev, = walk(mem, f48, t.root, va, va + T4)
    assert isinstance(ev, BadEntry)


def test_64k_2level_42bit():
    mem = SyntheticMemory()
    f = Arm64Paging(K64, 42, 48)
    t = Arm64Tables(mem, Arm64Spec(K64, 42, 48))
    base = 0xFFFFFE0000000000 + 7 * M512
    t.map(base, 0x20000000, M512)
    t.map(base + M512, 0x40000000, K64)
    assert leaves(list(walk(mem, f, t.root, base, base + 2 * M512))) == [
        (base, M512, "pgd", 0x20000000), (base + M512, K64, "pte", 0x40000000)]


def test_64k_52bit_va_on_48bit_hardware_root_offset():
    # CONFIG_ARM64_VA_BITS_52 with 64K pages on a 48-bit CPU: TTBR1 = swapper_pg_dir +
    # TTBR1_BADDR_4852_OFFSET; walking either view must give the same leaves.
    mem = SyntheticMemory()
    f52 = Arm64Paging(K64, 52, 52)
    t = Arm64Tables(mem, Arm64Spec(K64, 52, 52))
    base = VMEMMAP_48
    t.map(base, 0x20000000, M512)
    t.map(base + M512, 0x40000000, K64)
    assert ttbr1_root(t.root, K64, 52, 48) == t.root + (1024 - 64) * 8
    assert ttbr1_root(t.root, K64, 48, 48) == t.root
    assert ttbr1_root(t.root, K4, 52, 48) == t.root  # LPA2 folds instead
    f48 = Arm64Paging(K64, 48, 52)
    a = leaves(list(walk(mem, f52, t.root, base, base + 2 * M512)))
    b = leaves(list(walk(mem, f48, ttbr1_root(t.root, K64, 52, 48), base, base + 2 * M512)))
    assert a == b and len(a) == 2


# -- attributes --------------------------------------------------------------------------------

def test_contiguous_readonly_and_dbm():
    mem = SyntheticMemory()
    f = Arm64Paging(K4, 48, 48)
    t = Arm64Tables(mem, Arm64Spec(K4, 48, 48))
    base = VMEMMAP_48
    for i in range(16):  # CONT_PTES = 16 with 4K pages
        t.map(base + i * K4, 0x800000 + i * K4, K4, ARM64_PAGE_KERNEL | ARM64_CONT)
    t.map(base + 16 * K4, 0x900000, K4, ARM64_PAGE_KERNEL_RO)
    t.map(base + 17 * K4, 0x900000, K4, ARM64_PAGE_KERNEL_RO | ARM64_DBM)  # writable-clean
    t.map(base + 18 * K4, 0x901000, K4, ARM64_PAGE_KERNEL & ~ARM64_DBM)  # 6.1-style, still RW
    evs = list(walk(mem, f, t.root, base, base + M2))
    assert all("CON" in e.attrs for e in evs[:16]) and "CON" not in evs[16].attrs
    assert [e.writable for e in evs[16:]] == [False, False, True]
    assert "DBM" not in evs[16].attrs and "DBM" in evs[17].attrs and "DBM" not in evs[0].attrs
    w, attrs = f.leaf_info(ARM64_PAGE_KERNEL | (1 << 6) | (1 << 11) | (1 << 50) | (4 << 2), 3)
    assert w and attrs == ("USR", "NX", "SHD", "AF", "NG", "UXN", "GP", "DEVICE/nGnRE")


# -- malformed ---------------------------------------------------------------------------------

def test_reserved_descriptor_at_the_last_level():
    mem = SyntheticMemory()
    f = Arm64Paging(K4, 48, 48)
    t = Arm64Tables(mem, Arm64Spec(K4, 48, 48))
    base = VMEMMAP_48
    t.map(base, 0x800000, K4)
    pe = t.map(base + K4, 0x801000, K4, ARM64_PAGE_KERNEL & ~2)  # bits[1:0] = 01
    evs = list(walk(mem, f, t.root, base, base + M2))
    assert isinstance(evs[0], Leaf) and isinstance(evs[1], BadEntry)
    assert evs[1].level == "pte" and "reserved" in evs[1].reason and evs[1].table_phys == pe & ~0xFFF
    steps = translate(mem, f, t.root, base + K4)
    assert steps[-1].kind == "bad" and "reserved" in steps[-1].reason


def test_blocks_where_the_granule_cannot_have_one():
    # 4K without LPA2: no level 0 block
    mem = SyntheticMemory()
    f = Arm64Paging(K4, 48, 48)
    t = Arm64Tables(mem, Arm64Spec(K4, 48, 48))
    base = VMEMMAP_48
    t.map(base, 0x200000, M2)
    mem.write_u64(t.entry_of(base, 0), ARM64_SECT_KERNEL)
    evs = list(walk(mem, f, t.root, base, base + G512))
    assert len(evs) == 1 and evs[0].level == "pgd" and "level 0" in evs[0].reason
    # 4K with LPA2: never at level -1
    mem = SyntheticMemory()
    f = Arm64Paging(K4, 52, 52)
    t = Arm64Tables(mem, Arm64Spec(K4, 52, 52))
    t.map(VMEMMAP_52, 0x200000, M2)
    mem.write_u64(t.entry_of(VMEMMAP_52, 0), ARM64_SECT_KERNEL & ~ARM64_SH)
    ev, = walk(mem, f, t.root, VMEMMAP_52, VMEMMAP_52 + M2)
    assert isinstance(ev, BadEntry) and "level -1" in ev.reason and ev.size == 1 << 48
    # 64K, 48-bit PA: no level 1 block
    mem = SyntheticMemory()
    f = Arm64Paging(K64, 48, 48)
    t = Arm64Tables(mem, Arm64Spec(K64, 48, 48))
    t.map(VMEMMAP_48, 0x20000000, M512)
    mem.write_u64(t.entry_of(VMEMMAP_48, 0), ARM64_SECT_KERNEL)
    ev, = walk(mem, f, t.root, VMEMMAP_48, VMEMMAP_48 + M512)
    assert isinstance(ev, BadEntry) and "64K granule cannot have one" in ev.reason


def test_address_bits_out_of_range_and_misaligned_block():
    mem = SyntheticMemory()
    f = Arm64Paging(K4, 48, 48)
    t = Arm64Tables(mem, Arm64Spec(K4, 48, 48))
    base = VMEMMAP_48
    pe = t.map(base, 0x800000, K4)
    be = t.map(base + M2, 0x400000, M2)
    mem.write_u64(pe, t.get(pe) | (1 << 48))  # RES0 without LPA2
    mem.write_u64(be, t.get(be) | 0x1000)  # 2M block with bit 12 set
    evs = list(walk(mem, f, t.root, base, base + 2 * M2))
    assert all(isinstance(e, BadEntry) for e in evs) and len(evs) == 2
    assert "49:48" in evs[0].reason and "aligned" in evs[1].reason
    # an address above a smaller PA size
    f40 = Arm64Paging(K4, 48, 40)
    mem.write_u64(pe, (1 << 44) | ARM64_PAGE_KERNEL)
    ev, = walk(mem, f40, t.root, base, base + K4)
    assert isinstance(ev, BadEntry) and "40-bit" in ev.reason
    # bit 16 (nT) in a block is not an address bit
    mem.write_u64(be, 0x400000 | (1 << 16) | ARM64_SECT_KERNEL)
    ev, = walk(mem, f, t.root, base + M2, base + 2 * M2)
    assert isinstance(ev, Leaf) and ev.phys == 0x400000


def test_table_outside_ram_and_unreadable():
    mem = SyntheticMemory()
    f = Arm64Paging(K16, 48, 48)
    t = Arm64Tables(mem, Arm64Spec(K16, 48, 48))
    base = VMEMMAP_48
    t.map(base, 0x2000000, M32)
    t.map(base + G64, 0x4000000, M32)
    pud_e = t.entry_of(base + G64, 1)
    mem.write_u64(pud_e, 0x7_0000_0000 | ARM64_TABLE)
    evs = list(walk(mem, f, t.root, base, base + 2 * G64, phys_ok=lambda p: p < 0x1_0000_0000))
    assert isinstance(evs[1], BadEntry) and "outside physical memory" in evs[1].reason
    evs = list(walk(mem, f, t.root, base, base + 2 * G64))
    assert isinstance(evs[1], Unreadable) and evs[1].vaddr == base + G64 and evs[1].size == G64


def test_cycles_terminate():
    mem = SyntheticMemory()
    f = Arm64Paging(K4, 48, 48)
    t = Arm64Tables(mem, Arm64Spec(K4, 48, 48))
    base = VMEMMAP_48
    t.map(base, 0x200000, M2)
    # the PUD entry for the next GiB points back at the PGD, and a PMD entry at its own table
    mem.write_u64(t.entry_of(base + G1, 1), t.root | ARM64_TABLE)
    pmd_table = t.entry_of(base, 2) & ~0xFFF
    mem.write_u64(pmd_table + 8, pmd_table | ARM64_TABLE)
    evs = list(walk(mem, f, t.root, base, base + G512))
    bad = [e for e in evs if isinstance(e, BadEntry)]
    assert len(bad) == 2 and all("already used" in b.reason for b in bad)
    assert len([e for e in evs if isinstance(e, Leaf)]) == 1


def test_translate_steps_and_holes():
    mem = SyntheticMemory()
    f = Arm64Paging(K16, 48, 48)
    t = Arm64Tables(mem, Arm64Spec(K16, 48, 48))
    base = VMEMMAP_48
    t.map(base + M32, 0x8000000, K16)
    steps = translate(mem, f, t.root, base + M32 + 0x40)
    assert [s.level for s in steps] == ["pgd", "pud", "pmd", "pte"]
    assert [s.kind for s in steps] == ["table"] * 3 + ["leaf"]
    assert steps[0].index == 1 and steps[0].size == 1 << 47
    assert steps[-1].phys == 0x8000000 and steps[-1].size == K16
    steps = translate(mem, f, t.root, base + 3 * M32)
    assert steps[-1].kind == "none" and steps[-1].level == "pmd"
    # walking a hole and an empty range
    assert list(walk(mem, f, t.root, base + 2 * M32, base + 5 * M32)) == []
