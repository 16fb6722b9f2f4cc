"""Buddy-allocator state of many pfns at once (issue 18): what
:meth:`inspect_vmemmap.source.kstructs.BuddyChecker.__call__` says of one pfn, with the
struct pages of every block head it looks at read in bulk, each vmemmap page once,
neighbouring pages in one read, in address order. ``check`` asks this of the first page
backing each vmemmap leaf: with thousands of HVO folios, tens of thousands of leaves,
whose heads lie on a few thousand vmemmap pages."""

from __future__ import annotations

from typing import Dict, Iterable, List, Optional, Set

from inspect_vmemmap.memory import FaultError


def free_of(checker, pfns: Iterable[int], max_read: int = 1 << 20) -> Set[int]:
    """The pfns of ``pfns`` that are free, as ``checker`` (a BuddyChecker) says one by one, with
    their block heads' struct pages read in bulk: each vmemmap page they are on read
    once, neighbouring pages in one read (at most ``max_read`` bytes), in address order.
    A read that fails is retried page by page; a pfn whose heads' page cannot be read
    is not free, as one by one."""
    lay = checker.layout
    page = lay.page_size
    lo, span = checker.lo, checker.span
    pfns = sorted(set(pfns))
    heads = {}  # pfn -> [(order, head)], the distinct heads in the order _block reads them
    need = set()
    for pfn in pfns:
        hs, last = [], -1
        for o in range(checker.max_order + 1):
            head = pfn & ~((1 << o) - 1)
            if head != last:
                last = head
                hs.append((o, head))
                a = lay.pfn_to_page(head) + lo
                need.update(range(a // page, (a + span - 1) // page + 1))
        heads[pfn] = hs
    got = _read_pages(checker.mem, sorted(need), page, max_read)
    free = set()
    for pfn in pfns:
        buddy, order, hs, k = False, 0, heads[pfn], 0
        for o in range(checker.max_order + 1):
            if k < len(hs) and hs[k][0] == o:
                raw = _raw(got, lay.pfn_to_page(hs[k][1]) + lo, span, page)
                k += 1
                if raw is None:
                    break
                buddy = checker.is_buddy(int.from_bytes(raw[checker.off_type - lo:checker.off_type - lo + 4], "little"))
                order = int.from_bytes(raw[checker.off_priv - lo:checker.off_priv - lo + 8], "little")
            if buddy and order >= o:
                free.add(pfn)
                break
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
