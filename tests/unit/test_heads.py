"""check.heads: fake heads left by a HugeTLB vmemmap restore, on struct pages written as
the kernel's own steps write them (mm/hugetlb_vmemmap.c, include/linux/mm_types.h), not
by the code under test."""

from __future__ import annotations

import struct
from types import SimpleNamespace

from inspect_vmemmap.check.heads import fake_head_finding, fake_heads
from inspect_vmemmap.memory import FaultError

BASE = 0xffffea0000000000
SPS = 64
PAGE = 4096
PER = PAGE // SPS  # struct pages per vmemmap page
HEAD_BIT = 6  # PG_head in Debian 6.12's enum pageflags (any bit will do here)
HEAD = 0x8000  # the folio's head pfn: a 2M folio, 512 pfns
NR_RESET_STRUCT_PAGE = 3  # 6.1 mm/hugetlb_vmemmap.c

LAY = SimpleNamespace(struct_page_size=SPS, page_size=PAGE, pfn_section_shift=15,
                      pfn_to_page=lambda pfn: BASE + pfn * SPS)


class Mem:
    """The memmap of pfns [HEAD, HEAD + 1024), read through its virtual addresses."""

    def __init__(self) -> None:
        self.buf = bytearray(1024 * SPS)

    def read(self, addr: int, size: int, physical: bool = False) -> bytes:
        off = addr - LAY.pfn_to_page(HEAD)
        if off < 0 or off + size > len(self.buf):
            raise FaultError(addr, "outside")
        return bytes(self.buf[off:off + size])

    def page(self, pfn: int, flags: int, compound_head: int) -> None:
        struct.pack_into("<QQ", self.buf, (pfn - HEAD) * SPS, flags, compound_head)


def a_folio() -> Mem:
    """prep_compound_head()/prep_compound_tail(): PG_head on the head, compound_head =
    head | 1 on every tail."""
    m = Mem()
    m.page(HEAD, 1 << HEAD_BIT, 0)
    for t in range(1, 512):
        m.page(HEAD + t, 0, LAY.pfn_to_page(HEAD) | 1)
    return m


def restore(m: Mem, reset: bool) -> None:
    """vmemmap_restore_pte(): each tail vmemmap page filled with a copy of the first one
    (6.12.117: vmemmap_tail = vmemmap_head), then, in 6.1, reset_struct_pages()."""
    first = m.buf[0:PAGE]
    for k in range(1, 512 // PER):
        m.buf[k * PAGE:(k + 1) * PAGE] = first
        if reset:
            start = k * PAGE
            m.buf[start:start + NR_RESET_STRUCT_PAGE * SPS] = \
                m.buf[start + NR_RESET_STRUCT_PAGE * SPS:start + 2 * NR_RESET_STRUCT_PAGE * SPS]


def test_a_restore_that_resets_its_struct_pages_leaves_no_fake_head():
    m = a_folio()
    restore(m, reset=True)
    assert fake_heads(m, LAY, HEAD_BIT, (HEAD + 1, HEAD + 511)) == []


def test_a_restore_that_keeps_the_copied_head_leaves_one_per_vmemmap_page():
    m = a_folio()
    restore(m, reset=False)
    got = fake_heads(m, LAY, HEAD_BIT, (HEAD + 1, HEAD + 511))
    assert got == [HEAD + k * PER for k in range(1, 8)]
    f = fake_head_finding(LAY, got, "the folio").to_json()
    assert (f["kind"], f["severity"], f["pfn_start"], f["pfn_end"], f["count"]) == \
        ("fake-head", "error", HEAD + 64, HEAD + 448, 7)


def test_an_optimized_folios_tails_are_left_out_and_real_heads_are_no_fake():
    m = a_folio()
    restore(m, reset=False)  # what reading an optimized folio's read-only tails shows
    assert fake_heads(m, LAY, HEAD_BIT, (HEAD + 1, HEAD + 511), skip=[(HEAD, HEAD + 512)]) == []
    # the next 2M: order-6 compound pages, one per vmemmap page: real heads
    for k in range(8):
        h = HEAD + 512 + k * PER
        m.page(h, 1 << HEAD_BIT, 0)
        for t in range(1, PER):
            m.page(h + t, 0, LAY.pfn_to_page(h) | 1)
    assert fake_heads(m, LAY, HEAD_BIT, (HEAD + 512, HEAD + 1023)) == []


def test_what_cannot_be_read_is_left_out():
    m = a_folio()
    restore(m, reset=False)
    assert fake_heads(m, LAY, HEAD_BIT, (HEAD + 256, HEAD + 2047)) == [HEAD + k * PER for k in range(4, 8)]


def test_what_a_probe_read_at_the_restore_return_is_judged_alike():
    from inspect_vmemmap.check.heads import captured_fake_heads

    for reset, want in ((False, [HEAD + k * PER for k in range(1, 8)]), (True, [])):
        m = a_folio()
        restore(m, reset=reset)
        words = []
        for k in range(1, 8):  # what with_restore_capture's expressions read, as bpftrace prints them (signed)
            flags, = struct.unpack_from("<q", m.buf, k * PAGE)
            ch, = struct.unpack_from("<q", m.buf, k * PAGE + SPS + 8)
            words += [flags, ch]
        assert captured_fake_heads(LAY, HEAD_BIT, HEAD, words) == want


def test_the_restore_probe_prints_them_and_the_tracker_keeps_them():
    from inspect_vmemmap.live.events import Tracker
    from inspect_vmemmap.live.probes import CAPTURED_PAGES, program, with_restore_capture
    from tests.unit.test_watch import K612, choose

    probes = with_restore_capture(choose(K612)[0], PAGE, SPS)
    rest = next(p for p in probes if p.function == "__hugetlb_vmemmap_restore_folio")
    assert len(rest.captures) == 2 * CAPTURED_PAGES and not any(p.captures for p in probes if p is not rest)
    line = next(l for l in program(probes).splitlines() if l.startswith("kretfunc:vmlinux:__hugetlb_vmemmap_restore_folio "))
    assert "args->folio + 4096)" in line and f"args->folio + {4096 + SPS + 8})" in line
    tr = Tracker(probes)
    va = LAY.pfn_to_page(HEAD)
    done = tr.feed([f"E {rest.id} 10 3 103 {' '.join(['9', str(va - (1 << 64))][:len(rest.fields)])} sh",
                    f"R {rest.id} 20 3 0 " + " ".join(str(i) for i in range(2 * CAPTURED_PAGES))])
    assert [c.captured for c in done] == [tuple(range(2 * CAPTURED_PAGES))]
    # a return line without its words is not this probe's
    assert tr.feed([f"E {rest.id} 30 3 103 9 {va - (1 << 64)} sh", f"R {rest.id} 40 3 0"]) == []
