"""kstructs.BuddyChecker: the bulk scan (check --deep, every page that backs the vmemmap)
must say exactly what asking pfn by pfn says, in each era's encoding of PageBuddy."""

from __future__ import annotations

import random

from hypothesis import given, settings
from hypothesis import strategies as st

from inspect_vmemmap.source.kstructs import BuddyChecker
from inspect_vmemmap.memory import FaultError
from inspect_vmemmap.model import merge
from tests.synth import x86_layout

PAGES = 4096  # pfns 0..PAGES-1 have struct pages
OFF_TYPE, OFF_PRIV = 48, 40  # where struct page keeps page_type and private (any two places do)
PGTY_BUDDY = 0xF0


class StructPages:
    """The struct page array of pfns [0, PAGES) at the layout's vmemmap base; nothing else."""

    def __init__(self, layout) -> None:
        self.base = layout.pfn_to_page(0)
        self.buf = bytearray(PAGES * layout.struct_page_size)

    def put(self, pfn: int, page_type: int, private: int) -> None:
        at = pfn * 64
        self.buf[at + OFF_TYPE:at + OFF_TYPE + 4] = page_type.to_bytes(4, "little")
        self.buf[at + OFF_PRIV:at + OFF_PRIV + 8] = private.to_bytes(8, "little")

    def read(self, address: int, size: int, physical: bool = False) -> bytes:
        off = address - self.base
        if physical or off < 0 or off + size > len(self.buf):
            raise FaultError(address, physical, "no struct page there")
        return bytes(self.buf[off:off + size])


#: PageBuddy by era (kstructs.buddy_checker): (mask, value), a free block head's page_type,
#: and what other pages hold there (no type, mapcounts, other types, near misses)
ERAS = {
    "6.11+": (0xFF000000, PGTY_BUDDY << 24, PGTY_BUDDY << 24,
              [0xFFFFFFFF, 0, 5, 0xF2000000, 0xF1000003, 0xEF000000, 0x00F00000]),
    "6.9": (0xC0000000, 0x80000000, 0xBFFFFFFF,
            [0xFFFFFFFF, 0, 5, 0xEFFFFFFF, 0xFDFFFFFF, 0x3FFFFFFF, 0x7FFFFFFF]),
    "6.1": (0xF0000080, 0xF0000000, 0xFFFFFF7F,
            [0xFFFFFFFF, 0, 5, 0xFFFFFFFE, 0xF00000FF, 0xEFFFFF7F, 0x7FFFFF7F]),
}


@st.composite
def pages(draw):
    mask, value, buddy_type, noise = ERAS[draw(st.sampled_from(sorted(ERAS)))]
    lay = x86_layout()
    mem = StructPages(lay)
    rng = random.Random(draw(st.integers(0, 1 << 32)))  # page contents: too many to draw one by one
    for pfn in range(PAGES):
        mem.put(pfn, rng.choice(noise), rng.randrange(21))
    pfn = 0
    while pfn < PAGES:
        order = rng.randrange(7)
        pfn = (pfn + (1 << order) - 1) & ~((1 << order) - 1)
        if pfn + (1 << order) > PAGES:
            break
        if rng.random() < 0.5:
            mem.put(pfn, buddy_type, order)  # a free block: only its head says so
        pfn += 1 << order
    checker = BuddyChecker(mem, lay, OFF_TYPE, OFF_PRIV, mask, value, max_order=10)
    start = draw(st.integers(0, PAGES - 1))
    end = draw(st.integers(start + 1, PAGES))
    chunk = draw(st.sampled_from([1, 7, 64, 1 << 15]))
    return checker, start, end, chunk


@settings(max_examples=60, deadline=None)
@given(pages())
def test_bulk_scan_agrees_with_one_by_one(case):
    checker, start, end, chunk = case
    free, unread = checker.free_ranges(start, end, chunk=chunk)
    assert unread == []
    assert free == merge([(p, p + 1) for p in range(start, end) if checker(p)])


@settings(max_examples=60, deadline=None)
@given(pages(), st.lists(st.integers(0, PAGES + 200), max_size=300), st.sampled_from([4096, 8192, 1 << 20]))
def test_many_at_once_agrees_with_one_by_one(case, pfns, max_read):
    """free_of (check's first page of each leaf, read in bulk) against __call__, also for
    pfns whose struct pages (or some of their block heads') cannot be read."""
    checker = case[0]
    assert checker.free_of(pfns, max_read) == {p for p in pfns if checker(p)}


def test_many_at_once_reads_each_page_once_in_address_order():
    lay = x86_layout()
    mem = StructPages(lay)
    reads = []
    read = mem.read
    mem.read = lambda a, n, physical=False: reads.append((a, n)) or read(a, n, physical)
    checker = BuddyChecker(mem, lay, OFF_TYPE, OFF_PRIV, 0xFF000000, PGTY_BUDDY << 24, max_order=10)
    mem.put(1024, PGTY_BUDDY << 24, 10)
    pfns = list(range(1024, 2048, 7)) + list(range(3000, 3100))
    assert checker.free_of(pfns) == {p for p in pfns if p < 2048}
    # 64 struct pages to a vmemmap page. pfns 1024-2047 (head 1024 at every order): pages
    # 16-31. pfns 3000-3071: themselves on pages 46-47, heads 2944 (orders 7), 2816 (8),
    # 2560 (9), 2048 (10) on pages 46, 44, 40 and 32; pfns 3072-3099 are their own heads
    # (3072) up to order 10, on page 48. Pages 16-32, 40, 44, 46-48: four runs, each read once.
    base = lay.pfn_to_page(0)
    assert reads == [(base + 16 * 4096, 17 * 4096), (base + 40 * 4096, 4096), (base + 44 * 4096, 4096),
                     (base + 46 * 4096, 3 * 4096)]


def test_unreadable_struct_pages_are_said():
    lay = x86_layout()
    mem = StructPages(lay)
    checker = BuddyChecker(mem, lay, OFF_TYPE, OFF_PRIV, 0xFF000000, PGTY_BUDDY << 24, max_order=10)
    mem.put(8, PGTY_BUDDY << 24, 3)
    free, unread = checker.free_ranges(0, PAGES + 100, chunk=1024)
    assert free == [(8, 16)]
    assert unread == [(4096, PAGES + 100)]


class Types:
    """The type interface buddy_checker reads (DwarfTypes or Btf), with these enumerators."""

    def __init__(self, **enums) -> None:
        self.enums = enums

    def offsetof(self, name: str, member: str) -> int:
        return {"page_type": OFF_TYPE, "private": OFF_PRIV}[member]

    def enum_value(self, name: str):
        return self.enums.get(name)


def test_each_era_is_told_by_its_enumerators():
    from inspect_vmemmap.source.kstructs import buddy_checker

    lay = x86_layout()
    for types, era in ((Types(PGTY_buddy=PGTY_BUDDY), "6.11+"),
                       (Types(PG_buddy=0x40000000, PAGE_TYPE_BASE=0x80000000), "6.9"),
                       (Types(PG_buddy=0x80, PAGE_TYPE_BASE=0xF0000000), "6.1"),
                       (Types(), "6.1")):
        c = buddy_checker(StructPages(lay), types, lay)
        assert (c.mask, c.value) == ERAS[era][:2], era
        assert c.is_buddy(ERAS[era][2]) and not any(c.is_buddy(v) for v in ERAS[era][3])
