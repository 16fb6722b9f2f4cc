"""Buddy-allocator state of many pfns at once (issue 18): what
:meth:`inspect_vmemmap.source.kstructs.BuddyChecker.__call__` says of one pfn, with the
struct pages of every block head it looks at read in bulk, each vmemmap page once,
neighbouring pages in one read, in address order. ``check`` asks this of the first page
backing each vmemmap leaf: with thousands of HVO folios, tens of thousands of leaves,
whose block heads lie on a few thousand vmemmap pages."""

from __future__ import annotations

from bisect import bisect_right
from typing import Dict, Iterable, List, Optional, Set, Tuple

from inspect_vmemmap.memory import FaultError


def free_of(checker, pfns: Iterable[int], max_read: int = 1 << 20) -> Set[int]:
    """The pfns of ``pfns`` that are free, as ``checker`` (a BuddyChecker) says one by
    one, with their block heads' struct pages read in bulk: each vmemmap page they are on
    read once, neighbouring pages in one read (at most ``max_read`` bytes), in address
    order. A read that fails is retried page by page.

    One by one, pfn is free when for some order o its block head ``pfn & ~(2**o - 1)`` is
    PageBuddy with an order of at least o, every head before it read. So a PageBuddy head h
    of order k frees exactly ``[h, h + 2**m)``, m = min(k, max_order, h's alignment): the
    union of those blocks, with the pfns that have an unreadable head decided one by one."""
    lay = checker.layout
    page, base, sps = lay.page_size, lay.vmemmap_base, lay.struct_page_size
    lo, span, top = checker.lo, checker.span, checker.max_order
    pfns = set(pfns)
    masks = [~((1 << o) - 1) for o in range(top + 1)]
    heads = sorted({pfn & m for pfn in pfns for m in masks})
    need = set()
    for h in heads:
        a = base + h * sps + lo
        need.add(a // page)
        need.add((a + span - 1) // page)
    got = _read_pages(checker.mem, sorted(need), page, max_read)
    o_type, o_priv = checker.off_type - lo, checker.off_priv - lo
    blocks: List[Tuple[int, int]] = []
    unread = set()
    for h in heads:
        raw = _raw(got, base + h * sps + lo, span, page)
        if raw is None:
            unread.add(h)
        elif checker.is_buddy(int.from_bytes(raw[o_type:o_type + 4], "little")):
            k = min(int.from_bytes(raw[o_priv:o_priv + 8], "little"), top)
            align = (h & -h).bit_length() - 1 if h else top
            blocks.append((h, h + (1 << min(k, align))))
    free = set()
    starts = [a for a, _ in blocks]
    for pfn in pfns:
        if unread and any(pfn & m in unread for m in masks):
            if checker(pfn):  # an unreadable head on the way: as one by one
                free.add(pfn)
            continue
        i = bisect_right(starts, pfn) - 1
        # blocks may nest (a stale order on a head inside a bigger free block): any holds
        while i >= 0 and pfn - starts[i] < 1 << top:
            if pfn < blocks[i][1]:
                free.add(pfn)
                break
            i -= 1
    return free


def _read_pages(mem, pages: List[int], page: int, max_read: int) -> Dict[int, bytes]:
    """Virtual pages (numbers) read in runs of neighbours: page number -> its bytes."""
    got: Dict[int, bytes] = {}
    i, n = 0, len(pages)
    while i < n:
        j = i + 1
        while j < n and pages[j] == pages[j - 1] + 1 and (j - i) * page < max_read:
            j += 1
        try:
            buf = mem.read(pages[i] * page, (j - i) * page)
        except FaultError:
            for p in pages[i:j]:
                try:
                    got[p] = mem.read(p * page, page)
                except FaultError:
                    pass
        else:
            for k, p in enumerate(pages[i:j]):
                got[p] = buf[k * page:(k + 1) * page]
        i = j
    return got


def _raw(got: Dict[int, bytes], addr: int, size: int, page: int) -> Optional[bytes]:
    """``size`` bytes at ``addr`` from the pages read, or None where one of them was not."""
    p, off = divmod(addr, page)
    if off + size <= page:
        b = got.get(p)
        return None if b is None else b[off:off + size]
    parts = [got.get(q) for q in range(p, (addr + size - 1) // page + 1)]
    return None if None in parts else b"".join(parts)[off:off + size]
