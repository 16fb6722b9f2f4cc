"""Struct pages' contents where HVO rewrites them: a vmemmap page a restore filled must
not begin with a copy of the folio's head (``fake-head``).

HVO maps the tail vmemmap pages of an optimized folio onto one page, and restoring its
vmemmap copies that page into a fresh page for each of them (mm/hugetlb_vmemmap.c
vmemmap_restore_pte()). Where the page copied is the folio's own first vmemmap page,
whose first struct page is the head, every copy begins with a copy of the head: 6.1
rewrites those struct pages as tails after the copy (reset_struct_pages(),
NR_RESET_STRUCT_PAGE); 7.1+ copies the zone's shared tail page, which holds no head
(vmemmap_get_tail()); Debian's 6.12.117 copies the first page (``vmemmap_tail =
vmemmap_head`` in __hugetlb_vmemmap_optimize_folio()) and resets nothing. A struct page
that begins a vmemmap page, has PG_head and whose next struct page is a tail of another
head is what the kernel calls a fake head (include/linux/page-flags.h
page_fixed_fake_head()): what an optimized folio's read-only tails show, wrong anywhere
else: the page allocator takes it for a compound head and refuses to free the folio
("BUG: Bad page state ... corrupted mapping in tail page"), whose memory is then lost.

Read here: the first two struct pages of every vmemmap page of a pfn range (a folio a
check found not optimized; the range of an ``hvo-restore`` event whose probe could not read
them itself), or judged as the restore's probe read them at its return
(:func:`captured_fake_heads`; live.probes.with_restore_capture): the free that follows a
restore clears every tail's flags (mm/page_alloc.c free_pages_prepare()), so a read after
it finds nothing left of the copied heads, only the lost memory.
``page->flags`` is the first word of struct page (VMCOREINFO OFFSET(page.flags) 0, as
source.gather requires for page_flags) and a tail's ``compound_head`` the second
(include/linux/mm_types.h: the first word of the union after flags; bit 0 set in a tail).
"""

from __future__ import annotations

import struct
from typing import List, Optional, Sequence, Tuple

from inspect_vmemmap.findings import Finding
from inspect_vmemmap.intervals import Interval
from inspect_vmemmap.memory import FaultError

#: the most struct page bytes one read takes
_CHUNK = 1 << 21
_MASK = (1 << 64) - 1


def _fake(flags: int, compound_head: int, head_bit: int, addr: int) -> bool:
    """Whether the struct page at ``addr`` with these ``flags``, followed by one with this
    ``compound_head``, is a fake head (page_fixed_fake_head())."""
    return bool(flags >> head_bit & 1) and bool(compound_head & 1) and compound_head - 1 != addr


def fake_heads(mem, lay, head_bit: int, pfns: Tuple[int, int], skip: Sequence[Interval] = ()) -> List[int]:
    """:param pfns: the range (first, last pfn).
    :param skip: pfn intervals ``[a, b)`` to leave out (optimized folios, whose tails are
        meant to show fake heads).
    :return: the pfns of the range whose struct page begins a vmemmap page and is a fake
        head. What cannot be read is left out (the page-table walk reports it)."""
    sps = lay.struct_page_size
    per = lay.page_size // sps if lay.page_size % sps == 0 else 0
    if per < 2:
        return []
    first = -(-pfns[0] // per) * per
    out: List[int] = []
    p = first
    while p <= pfns[1]:
        n = min(_CHUNK // sps // per * per, ((pfns[1] - p) // per + 1) * per)
        va = lay.pfn_to_page(p)
        try:
            buf: Optional[bytes] = mem.read(va, n * sps)
        except FaultError:  # each vmemmap page's first two struct pages alone
            buf = None
        for i in range(0, n, per):
            q = p + i
            if any(a <= q < b for a, b in skip):
                continue
            if buf is not None:
                two, at = buf, i * sps
            else:
                try:
                    two, at = mem.read(va + i * sps, 2 * sps), 0
                except FaultError:
                    continue
            flags, = struct.unpack_from("<Q", two, at)
            ch, = struct.unpack_from("<Q", two, at + sps + 8)
            if _fake(flags, ch, head_bit, va + i * sps):
                out.append(q)
        p += n
    return out


def captured_fake_heads(lay, head_bit: int, head_pfn: int, words: Sequence[int]) -> List[int]:
    """:param words: for the 1st, 2nd, ... vmemmap page after the head's, its first struct
        page's ``flags`` and the next struct page's ``compound_head``, as a probe read them
        at a restore's return (live.probes.with_restore_capture; signed as bpftrace prints).
    :return: the pfns of those struct pages that are fake heads."""
    sps = lay.struct_page_size
    per = lay.page_size // sps
    out = []
    for k in range(len(words) // 2):
        pfn = head_pfn + (k + 1) * per
        if _fake(words[2 * k] & _MASK, words[2 * k + 1] & _MASK, head_bit, lay.pfn_to_page(pfn)):
            out.append(pfn)
    return out


def fake_head_finding(lay, found: List[int], what: str) -> Optional[Finding]:
    """One ``fake-head`` finding over the pfns of :func:`fake_heads` (None: none), ``what``
    saying whose struct pages they are."""
    if not found:
        return None
    return Finding("fake-head", None,
                   f"{len(found)} struct page{'s' if len(found) != 1 else ''} at the start of a vmemmap page of {what} "
                   f"(pfn {found[0]}{'' if len(found) == 1 else f'-{found[-1]}'}) "
                   f"{'are copies' if len(found) != 1 else 'is a copy'} of a head page (PG_head set, the next struct "
                   f"page a tail of another head): a vmemmap restore that left the copied head in place "
                   f"(mm/hugetlb_vmemmap.c vmemmap_restore_pte()); the page allocator will refuse to free it",
                   section=found[0] >> lay.pfn_section_shift, pfn_start=found[0], pfn_end=found[-1], count=len(found))


def check_folio_heads(obs, mem) -> List[Finding]:
    """Every HugeTLB folio the pools hold that is not vmemmap-optimized: its vmemmap pages
    must begin with tails (a folio restored, or never optimized)."""
    pf = obs.inputs.page_flags or {}
    bit = pf.get("head_bit")
    if mem is None or bit is None:
        return []
    lay = obs.layout
    out: List[Finding] = []
    for f in obs.inputs.folios:
        if f.optimized or f.order < 1:
            continue
        found = fake_heads(mem, lay, bit, (f.head_pfn + 1, f.head_pfn + (1 << f.order) - 1))
        fd = fake_head_finding(lay, found, f"the HugeTLB folio at pfn {f.head_pfn} (order {f.order}, not optimized)")
        if fd is not None:
            out.append(fd)
    return out
