"""Deliberately naive page-table walks for the tests' truth, written from the architecture
manuals, not from inspect_vmemmap.pgtable: one read per entry, recursion, nothing shared
with the product.

Each walk takes ``u64(phys) -> int``, a reader of physical memory (a fixture's ELF pages,
or drgn's physical reads of a live target), and returns every leaf in ``[start, end)`` as
``(vaddr, size, phys, writable)``.

- x86_64 (SDM vol. 3, 4.5): bit 0 present, bit 1 R/W, bit 7 PS at the PDPT and PD levels;
  the address in bits [51:12].
- arm64 (Arm ARM, VMSAv8-64 stage 1 descriptors): bit 0 valid; bit 1 table (or page at the
  last level), clear = block; bit 7 AP[2] read-only; the output address in bits
  [47:page shift], with FEAT_LPA2 (TCR_EL1.DS) bits [49:page shift] plus PA[51:50] in
  bits [9:8].
"""

from __future__ import annotations

from typing import Callable, List, NamedTuple, Tuple

Leaf = Tuple[int, int, int, bool]
U64 = Callable[[int], int]

X86_ADDR = 0x000FFFFFFFFFF000


def x86_shifts(levels: int) -> List[int]:
    return [48, 39, 30, 21, 12][5 - levels:]


def x86_leaves(u64: U64, root: int, levels: int, start: int, end: int) -> List[Leaf]:
    """Every x86_64 leaf in [start, end) under the top-level table at ``root``."""
    shifts = x86_shifts(levels)
    bits = 57 if levels == 5 else 48
    out: List[Leaf] = []

    def canon(va: int) -> int:
        va &= (1 << bits) - 1
        return va | (((1 << 64) - 1) ^ ((1 << bits) - 1)) if va >> (bits - 1) else va

    def visit(table: int, depth: int, base: int) -> None:
        shift = shifts[depth]
        for i in range(512):
            va = canon(base + (i << shift)) if depth == 0 else base + (i << shift)
            if va + (1 << shift) <= start or va >= end:
                continue
            e = u64(table + 8 * i)
            if not e & 1:
                continue
            if depth == len(shifts) - 1 or (e & 0x80 and depth >= len(shifts) - 3):
                size = 1 << shift
                out.append((va, size, e & X86_ADDR & ~(size - 1), bool(e & 2)))
            else:
                visit(e & X86_ADDR, depth + 1, va)

    visit(root, 0, 0)
    return out


class Arm64Geometry(NamedTuple):
    page_shift: int
    va_bits: int
    lpa2: bool
    shifts: List[int]  # the VA shift of each level, from the top


def arm64_geometry(page_shift: int, tcr_el1_t1sz: int, max_physmem_bits: int) -> Arm64Geometry:
    """The TTBR1 geometry: VA bits from T1SZ; LPA2 exactly when the kernel says 52-bit
    physical addresses with 4K or 16K pages (with 64K, 52 bits is FEAT_LPA, no LPA2)."""
    va_bits = 64 - tcr_el1_t1sz
    lpa2 = page_shift != 16 and max_physmem_bits == 52
    per = page_shift - 3
    n = -(-(va_bits - page_shift) // per)
    return Arm64Geometry(page_shift, va_bits, lpa2, [page_shift + per * k for k in reversed(range(n))])


def arm64_oa(g: Arm64Geometry, e: int) -> int:
    """The output address of an arm64 descriptor."""
    a = e & ((1 << (50 if g.lpa2 else 48)) - 1) & ~((1 << g.page_shift) - 1)
    return a | (((e >> 8) & 3) << 50 if g.lpa2 else 0)


def arm64_addr_mask(g: Arm64Geometry) -> int:
    """The bits of a descriptor that hold its output address."""
    return (((1 << (50 if g.lpa2 else 48)) - 1) & ~((1 << g.page_shift) - 1)) | (0x300 if g.lpa2 else 0)


def arm64_leaves(u64: U64, root: int, g: Arm64Geometry, start: int, end: int) -> List[Leaf]:
    """Every arm64 TTBR1 leaf in [start, end) under the table at ``root``."""
    out: List[Leaf] = []

    def visit(table: int, depth: int, base: int) -> None:
        shift = g.shifts[depth]
        size = 1 << shift
        n = (1 << (g.va_bits - shift)) if depth == 0 else (1 << (g.page_shift - 3))
        lo = (start - base) // size if start > base else 0
        for i in range(lo, n):
            va = base + i * size
            if va >= end:
                break
            if va + size <= start:
                continue
            e = u64(table + 8 * i)
            if not e & 1:
                continue
            if depth == len(g.shifts) - 1 or not e & 2:
                out.append((va, size, arm64_oa(g, e) & ~(size - 1), not e & (1 << 7)))
            else:
                visit(arm64_oa(g, e), depth + 1, va)

    visit(root, 0, (1 << 64) - (1 << g.va_bits))
    return out
