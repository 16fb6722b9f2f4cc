"""The riscv64 walker on page tables built here by hand, entry by entry, from the rv64 PTE
format (arch/riscv/include/asm/pgtable-64.h, pgtable-bits.h): ``PPN << 10 | flags``."""

import struct

import pytest

from tests.synthmem import SyntheticMemory
from inspect_vmemmap.pgtable import BadEntry, Leaf, translate, walk
from inspect_vmemmap.pgtable.riscv64 import RiscvPaging

V, R, W, X, U, G, A, D = (1 << i for i in range(8))
N = 1 << 63
NC, IO = 1 << 61, 1 << 62
KERNEL = V | R | W | A | D | G  # _PAGE_KERNEL
KERNEL_RO = KERNEL & ~W  # PAGE_KERNEL_READ
K4, K64, M2, G1 = 1 << 12, 1 << 16, 1 << 21, 1 << 30

# VMEMMAP_START per mode (asm/pgtable.h: VMALLOC_START - BIT(VA_BITS - PAGE_SHIFT - 1 + 6))
BASES = {3: 0xFFFFFFC500000000, 4: 0xFFFF8D8000000000, 5: 0xFF1C000000000000}
SHIFTS = {3: (30, 21, 12), 4: (39, 30, 21, 12), 5: (48, 39, 30, 21, 12)}


def pte(phys, flags):
    return (phys >> 12) << 10 | flags


def ptr(phys):
    return pte(phys, V)  # _PAGE_TABLE


class Tables:
    """Hand-made tables: table pages from 0x100000 up, one new page per missing level."""

    def __init__(self, levels):
        self.mem = SyntheticMemory()
        self.levels = levels
        self.shifts = SHIFTS[levels]
        self.next = 0x100000
        self.root = self.alloc()

    def alloc(self):
        p = self.next
        self.next += K4
        self.mem.write(p, bytes(K4))
        return p

    def slot(self, va, depth):
        """Physical address of the entry for ``va`` at ``depth``, making tables above it."""
        table = self.root
        for d in range(depth):
            at = table + ((va >> self.shifts[d]) & 511) * 8
            (e,) = struct.unpack("<Q", self.mem.read(at, 8, True))
            if not e:
                e = ptr(self.alloc())
                self.mem.write_u64(at, e)
            table = (e >> 10) << 12
        return table + ((va >> self.shifts[depth]) & 511) * 8

    def set(self, va, depth, entry):
        self.mem.write_u64(self.slot(va, depth), entry)


@pytest.mark.parametrize("levels", [3, 4, 5])
def test_leaves_at_pud_pmd_and_pte_levels(levels):
    t = Tables(levels)
    base = BASES[levels]
    last = levels - 1
    t.set(base, last - 2, pte(0x80000000, KERNEL))  # a 1G leaf
    t.set(base + G1, last - 1, pte(0x80200000, KERNEL))  # 2M
    t.set(base + G1 + M2, last, pte(0x80400000, KERNEL))  # 4K
    t.set(base + G1 + M2 + K4, last, pte(0x80500000, KERNEL_RO | X))
    fmt = RiscvPaging(levels)
    assert fmt.va_bits == {3: 39, 4: 48, 5: 57}[levels]
    evs = list(walk(t.mem, fmt, t.root, base, base + 2 * G1))
    assert all(type(e) is Leaf for e in evs), evs
    assert [(e.vaddr, e.size, e.level, e.phys, e.writable) for e in evs] == [
        (base, G1, "pud" if levels > 3 else "pgd", 0x80000000, True),
        (base + G1, M2, "pmd", 0x80200000, True),
        (base + G1 + M2, K4, "pte", 0x80400000, True),
        (base + G1 + M2 + K4, K4, "pte", 0x80500000, False),
    ]
    assert evs[0].attrs == ("D", "A", "G")
    assert evs[3].attrs == ("D", "A", "G", "X")


def test_kernel_names_of_levels():
    assert RiscvPaging(3).names == ("pgd", "pmd", "pte")
    assert RiscvPaging(4).names == ("pgd", "pud", "pmd", "pte")
    assert RiscvPaging(5).names == ("pgd", "p4d", "pud", "pmd", "pte")
    with pytest.raises(ValueError):
        RiscvPaging(2)


def test_top_level_leaf_is_a_leaf():
    # Sv48: a 512G leaf in the pgd is legal in the architecture (a "terapage")
    t = Tables(4)
    base = 0xFFFF800000000000
    t.set(base, 0, pte(0, KERNEL))
    evs = list(walk(t.mem, RiscvPaging(4), t.root, base, base + (1 << 39)))
    assert [(type(e), e.size, e.level) for e in evs] == [(Leaf, 1 << 39, "pgd")]


def test_walk_reads_each_table_page_once():
    t = Tables(5)
    base = BASES[5]
    for i in range(512):
        t.set(base + i * K4, 4, pte(0x80000000 + i * K4, KERNEL))
    reads = []
    orig = t.mem.read

    def counting(address, size, physical=False):
        reads.append((address, size))
        return orig(address, size, physical)

    t.mem.read = counting
    evs = list(walk(t.mem, RiscvPaging(5), t.root, base, base + M2))
    assert len(evs) == 512
    assert len(reads) == 5 and all(size == K4 for _, size in reads)


def test_napot_64k_is_one_leaf_of_16_ptes():
    t = Tables(3)
    base = BASES[3]
    # pte_mknapot(): PPN of the first 4K of the 64K range with bit 3 set, N set
    e = ((0x80340000 >> 12) | 0b1000) << 10 | N | KERNEL
    for i in range(16):
        t.set(base + i * K4, 2, e)
    t.set(base + K64, 2, pte(0x80400000, KERNEL))
    fmt = RiscvPaging(3)
    evs = list(walk(t.mem, fmt, t.root, base, base + M2))
    assert [(type(x), x.vaddr, x.size, x.phys) for x in evs] == [
        (Leaf, base, K64, 0x80340000), (Leaf, base + K64, K4, 0x80400000)]
    assert "NAPOT" in evs[0].attrs
    # starting in the middle of the group still gives the whole range, once
    evs = list(walk(t.mem, fmt, t.root, base + 5 * K4, base + 6 * K4))
    assert [(x.vaddr, x.size) for x in evs] == [(base, K64)]
    # translate: the step covers 64K, so the offset inside it finds the right 4K
    steps = translate(t.mem, fmt, t.root, base + 5 * K4 + 0x123)
    assert steps[-1].kind == "leaf" and steps[-1].size == K64 and steps[-1].phys == 0x80340000
    # one PTE of the group differs: each PTE is reported, none becomes a leaf
    t.set(base + 7 * K4, 2, pte(0x80347000, KERNEL))
    evs = list(walk(t.mem, fmt, t.root, base, base + K64))
    assert sum(type(x) is BadEntry for x in evs) == 15
    assert [x.vaddr for x in evs if type(x) is Leaf] == [base + 7 * K4]


@pytest.mark.parametrize("entry,depth,words", [
    (pte(0x80000000, KERNEL) | 1 << 54, 2, "reserved bits 60-54"),
    (pte(0x80000000, KERNEL) | 3 << 61, 2, "PBMT) 3"),
    (pte(0x80000000, V | W | A | D), 2, "W without R"),
    (pte(0x80001000, KERNEL), 1, "misaligned 2M"),
    (pte(0x80000000, KERNEL) | N, 1, "NAPOT bit set in a 2M leaf"),
    (((0x80000000 >> 12) | 0b0100) << 10 | N | KERNEL, 2, "not 1000"),
    (ptr(0x200000) | A, 1, "A set in a pointer"),
    (ptr(0x200000) | U | D, 0, "D/U set in a pointer"),
    (ptr(0x200000) | NC, 0, "PBMT set in a pointer"),
    (ptr(0x200000) | N, 1, "N set in a pointer"),
])
def test_malformed_entries_are_reported_not_followed(entry, depth, words):
    t = Tables(3)
    base = BASES[3]
    t.set(base, depth, entry)
    evs = list(walk(t.mem, RiscvPaging(3), t.root, base, base + G1))
    assert len(evs) == 1 and type(evs[0]) is BadEntry, evs
    assert words in evs[0].reason
    assert evs[0].level == ("pgd", "pmd", "pte")[depth]


def test_pointer_at_the_last_level_and_outside_ram():
    t = Tables(3)
    base = BASES[3]
    t.set(base, 2, ptr(0x300000))
    t.set(base + M2, 1, ptr(0x7FFFF000000))
    evs = list(walk(t.mem, RiscvPaging(3), t.root, base, base + G1, phys_ok=lambda p: p < 1 << 32))
    assert [type(e) for e in evs] == [BadEntry, BadEntry]
    assert "last level" in evs[0].reason and "outside physical memory" in evs[1].reason


def test_address_above_pa_bits_and_memory_types():
    t = Tables(3)
    base = BASES[3]
    t.set(base, 2, pte(1 << 40, KERNEL))
    t.set(base + K4, 2, pte(0x80000000, KERNEL) | NC)
    t.set(base + 2 * K4, 2, pte(0x80000000, KERNEL) | IO)
    evs = list(walk(t.mem, RiscvPaging(3, pa_bits=40), t.root, base, base + M2))
    assert type(evs[0]) is BadEntry and "40-bit" in evs[0].reason
    assert evs[1].attrs[-1] == "NC" and evs[2].attrs[-1] == "IO"


def test_thead_memory_type_bits_are_attributes():
    t = Tables(3)
    base = BASES[3]
    pma = (1 << 62) | (1 << 61) | (1 << 60)  # _PAGE_PMA_THEAD
    t.set(base, 2, pte(0x80000000, KERNEL) | pma)
    assert type(next(walk(t.mem, RiscvPaging(3), t.root, base, base + K4))) is BadEntry
    (leaf,) = walk(t.mem, RiscvPaging(3, thead=True), t.root, base, base + K4)
    assert type(leaf) is Leaf and leaf.phys == 0x80000000 and leaf.attrs[-1] == "MT=0xe"


def test_invalid_entries_map_nothing():
    t = Tables(4)
    base = BASES[4]
    t.set(base, 3, pte(0x80000000, KERNEL) & ~V)  # not present (a swap-like entry)
    t.set(base + K4, 3, G)  # _PAGE_PROT_NONE alone
    assert list(walk(t.mem, RiscvPaging(4), t.root, base, base + M2)) == []


def test_canonical_kernel_addresses():
    assert RiscvPaging(3).canonical(0x46_0000_0000) == 0xFFFFFFC600000000
    assert RiscvPaging(5).canonical(0x011C_0000_0000_0000) == 0xFF1C000000000000
    assert RiscvPaging(4).canonical(0x0000_0D80_0000_0000) == 0x0000_0D80_0000_0000  # bit 47 clear: user half
