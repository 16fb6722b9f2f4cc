import pytest

from tests.synthmem import SyntheticMemory
from inspect_vmemmap.pgtable import BadEntry, Leaf, Unreadable, translate, walk
from inspect_vmemmap.pgtable.x86_64 import X86_64Paging
from tests.synth import PAGE_KERNEL_RO, PSE, X86Tables

G1, M2, K4 = 1 << 30, 1 << 21, 1 << 12


@pytest.mark.parametrize("levels,base", [(4, 0xFFFFEA0000000000), (5, 0xFFD4000000000000)])
def test_leaves_of_every_size_in_order(levels, base):
    mem = SyntheticMemory()
    t = X86Tables(mem, levels)
    t.map(base, 0x40000000, G1)
    t.map(base + G1, 0x200000, M2)
    t.map(base + G1 + M2, 0x400000, M2)
    for i in range(3):
        t.map(base + G1 + 2 * M2 + i * K4, 0x600000 + i * K4, K4)
    fmt = X86_64Paging(levels)
    evs = list(walk(mem, fmt, t.root, base, base + 4 * G1))
    assert all(isinstance(e, Leaf) for e in evs)
    assert [(e.vaddr - base, e.size, e.level, e.phys) for e in evs] == [
        (0, G1, "pud", 0x40000000),
        (G1, M2, "pmd", 0x200000),
        (G1 + M2, M2, "pmd", 0x400000),
        (G1 + 2 * M2, K4, "pte", 0x600000),
        (G1 + 2 * M2 + K4, K4, "pte", 0x601000),
        (G1 + 2 * M2 + 2 * K4, K4, "pte", 0x602000),
    ]
    assert evs[0].writable and "PSE" in evs[0].attrs and "NX" in evs[0].attrs


def test_walk_honours_bounds_and_holes():
    mem = SyntheticMemory()
    t = X86Tables(mem)
    base = 0xFFFFEA0000000000
    t.map(base, 0x200000, M2)
    t.map(base + 10 * M2, 0x400000, M2)
    fmt = X86_64Paging(4)
    evs = list(walk(mem, fmt, t.root, base + M2, base + 20 * M2))
    assert [e.vaddr for e in evs] == [base + 10 * M2]
    # a range not touching any leaf
    assert list(walk(mem, fmt, t.root, base + 11 * M2, base + 12 * M2)) == []


def test_readonly_pte_and_same_backing():
    mem = SyntheticMemory()
    t = X86Tables(mem)
    base = 0xFFFFEA0000000000
    t.map(base, 0x800000, K4)
    for i in range(1, 8):
        t.map(base + i * K4, 0x800000, K4, PAGE_KERNEL_RO)
    evs = list(walk(mem, X86_64Paging(4), t.root, base, base + M2))
    assert [e.writable for e in evs] == [True] + [False] * 7
    assert {e.phys for e in evs} == {0x800000}


def test_malformed_entries_are_reported_not_followed():
    mem = SyntheticMemory()
    t = X86Tables(mem)
    base = 0xFFFFEA0000000000
    t.map(base, 0x200000, M2)
    t.map(base + G1, 0x400000, M2)
    # PSE at the PGD level (where no leaf can be)
    pgd_e = t.entry_of(base, 0)
    fmt = X86_64Paging(4)
    good = list(walk(mem, fmt, t.root, base, base + 2 * G1))
    assert len(good) == 2
    # reserved bits in a 2M leaf
    pmd_e = t.entry_of(base + G1, 2)
    mem.write_u64(pmd_e, t.get(pmd_e) | 0x2000)
    evs = list(walk(mem, fmt, t.root, base, base + 2 * G1))
    assert isinstance(evs[1], BadEntry) and "reserved" in evs[1].reason and evs[1].level == "pmd"
    # an address above MAX_PHYSMEM_BITS
    mem.write_u64(pmd_e, (1 << 47) | 0x1E3)
    evs = list(walk(mem, fmt, t.root, base, base + 2 * G1))
    assert isinstance(evs[1], BadEntry) and "MAX_PHYSMEM_BITS" in evs[1].reason
    mem.write_u64(pgd_e, t.get(pgd_e) | PSE)
    evs = list(walk(mem, fmt, t.root, base, base + 2 * G1))
    assert len(evs) == 1 and isinstance(evs[0], BadEntry) and evs[0].level == "pgd" and "PSE" in evs[0].reason


def test_cycles_terminate():
    mem = SyntheticMemory()
    t = X86Tables(mem)
    base = 0xFFFFEA0000000000
    t.map(base, 0x200000, M2)
    # the PUD entry for the next GiB points back at the PGD (a loop)
    pud_e = t.entry_of(base + G1, 1)
    mem.write_u64(pud_e, t.root | 0x67)
    # and a PMD entry pointing at its own table
    pmd_table = t.entry_of(base, 2) & ~0xFFF
    mem.write_u64(pmd_table + 8, pmd_table | 0x67)
    evs = list(walk(mem, X86_64Paging(4), t.root, base, base + 512 * G1))
    bad = [e for e in evs if isinstance(e, BadEntry)]
    assert len(bad) == 2 and all("already used" in b.reason for b in bad)


def test_table_outside_ram_and_unreadable():
    mem = SyntheticMemory()
    t = X86Tables(mem)
    base = 0xFFFFEA0000000000
    t.map(base, 0x200000, M2)
    t.map(base + G1, 0x400000, M2)
    pud_e = t.entry_of(base + G1, 1)
    mem.write_u64(pud_e, 0x7_0000_0000 | 0x67)
    fmt = X86_64Paging(4)
    evs = list(walk(mem, fmt, t.root, base, base + 2 * G1, phys_ok=lambda p: p < 0x1_0000_0000))
    assert isinstance(evs[1], BadEntry) and "outside physical memory" in evs[1].reason
    # without a RAM list the walk tries to read it and says it could not
    evs = list(walk(mem, fmt, t.root, base, base + 2 * G1))
    assert isinstance(evs[1], Unreadable) and evs[1].vaddr == base + G1 and evs[1].size == G1


def test_translate_steps():
    mem = SyntheticMemory()
    t = X86Tables(mem, 5)
    base = 0xFFD4000000000000
    t.map(base + M2, 0x800000, K4)
    steps = translate(mem, X86_64Paging(5), t.root, base + M2 + 0x40)
    assert [s.level for s in steps] == ["pgd", "p4d", "pud", "pmd", "pte"]
    assert [s.kind for s in steps] == ["table"] * 4 + ["leaf"]
    assert steps[-1].phys == 0x800000 and steps[-1].size == K4
    steps = translate(mem, X86_64Paging(5), t.root, base + 3 * M2)
    assert steps[-1].kind == "none" and steps[-1].level == "pmd"
