"""What a dump file left out, from its headers (inspect_vmemmap.source.dumpfile), on hand-built
kdump-compressed and ELF headers laid out as makedumpfile writes them; reads of what was
left out fail and name the filter; transient states are named (check/)."""

from __future__ import annotations

import struct

import pytest

from inspect_vmemmap.check.flags import _section_transient
from inspect_vmemmap.check.hvo import _hvo_transient
from inspect_vmemmap.source.dumpfile import ExcludingMemory, excluded_classes, name_filter, read_dump_file
from inspect_vmemmap.findings import Finding
from inspect_vmemmap.memory import FaultError
from inspect_vmemmap.vmemmap import MappedLeaf
from tests.synthmem import SyntheticMemory

BS = 4096


def kdump_file(path, ram, dumped, level=31, status=0x2, version=6, max_mapnr=256):
    """disk_dump_header, kdump_sub_header and the two bitmaps (no page data)."""
    head = bytearray(BS)
    head[:8] = b"KDUMP   "
    struct.pack_into("<i", head, 8, version)
    head[12 + 65:12 + 65 + 5] = b"Linux"
    bitmap_blocks = 2  # one block per bitmap
    struct.pack_into("<IiiII", head, 424, status, BS, 1, bitmap_blocks, max_mapnr)
    sub = bytearray(BS)
    struct.pack_into("<Qii", sub, 0, 0, level, 0)
    struct.pack_into("<QQQ", sub, 80, 0, 0, max_mapnr)

    def bitmap(pfns):
        b = bytearray(BS)
        for p in pfns:
            b[p >> 3] |= 1 << (p & 7)
        return bytes(b)

    with open(path, "wb") as f:
        f.write(head + sub + bitmap(ram) + bitmap(dumped))
    return path


def elf_file(path, loads):
    """A 64-bit ELF core with PT_LOADs ``(paddr, filesz, memsz)`` (no data)."""
    ehdr = bytearray(64)
    ehdr[:8] = b"\x7fELF\x02\x01\x01\x00"
    struct.pack_into("<HHIQQQIHHHHHH", ehdr, 16, 4, 62, 1, 0, 64, 0, 0, 64, 56, len(loads), 0, 0, 0)
    ph = b"".join(struct.pack("<IIQQQQQQ", 1, 7, 0, 0, pa, fs, ms, 0) for pa, fs, ms in loads)
    with open(path, "wb") as f:
        f.write(bytes(ehdr) + ph)
    return path


def test_kdump_header(tmp_path):
    ram = range(1, 200)
    dumped = [p for p in ram if p % 3]  # every third pfn excluded
    d = read_dump_file(str(kdump_file(tmp_path / "k", ram, dumped, status=0x2 | 0x10)))
    assert d.format == "kdump-compressed" and d.compression == "lzo" and d.dump_level == 31
    assert d.excluded_vmemmap and not d.incomplete
    assert d.ram_pages == 199 and d.dumped_pages == len(dumped) and d.excluded_pages() == 199 - len(dumped)
    assert d.is_excluded(3 * BS) and not d.is_excluded(4 * BS) and not d.is_excluded(0)
    assert not d.is_excluded(250 * BS)  # not RAM: not "excluded"
    assert d.overlaps_excluded(5 * BS, 2 * BS) and not d.overlaps_excluded(4 * BS, 2 * BS)
    assert d.filter_text() == ("makedumpfile -d 31 -e (zero, cache, private cache, user data, free pages; "
                               "the struct pages of excluded pages)")
    j = d.to_json()
    assert j["excluded_classes"] == ["zero", "cache", "private cache", "user data", "free"] and j["filter"]


def test_kdump_unfiltered(tmp_path):
    d = read_dump_file(str(kdump_file(tmp_path / "k", range(10), range(10), level=0, status=0x1)))
    assert d.compression == "zlib" and d.dump_level == 0 and not d.filtered
    assert d.worth_saying  # a kdump-compressed dump is always described
    assert d.to_json()["filter"] is None and d.to_json()["excluded_pages"] == 0


def test_elf_tails(tmp_path):
    # makedumpfile -E: a segment whose file data ends before its memory does, then a
    # partial last page of a RAM range (no data in any dump: not "excluded")
    d = read_dump_file(str(elf_file(tmp_path / "e", [(0x1000, 0x9e000, 0x9ec00), (0x100000, 0x10000, 0x120000),
                                                      (0x300000, 0x1000, 0x1000)])))
    assert d.format == "elf" and d.dump_level is None
    assert d.excluded_pages() == (0x120000 - 0x10000) // BS
    assert d.is_excluded(0x110000) and not d.is_excluded(0x10f000) and not d.is_excluded(0x9f000)
    assert "makedumpfile -E" in d.filter_text() and d.worth_saying
    full = read_dump_file(str(elf_file(tmp_path / "q", [(0, 0x100000, 0x100000)])))
    assert not full.filtered and not full.worth_saying


def test_excluding_memory_names_the_filter(tmp_path):
    d = read_dump_file(str(kdump_file(tmp_path / "k", range(1, 64), [p for p in range(1, 64) if p != 5])))
    inner = SyntheticMemory()
    for p in range(1, 64):
        inner.write(p * BS, bytes(BS))
    # virtual 0x10000000 + n maps phys n through 2M leaves; 0x20000000 goes through an excluded table
    from inspect_vmemmap.source.dumpfile import ExcludedTable

    def leaf(va):
        if va >= 0x20000000:
            raise ExcludedTable(5 * BS)
        return va & ~0x1FFFFF, 0x200000, (va & ~0x1FFFFF) - 0x10000000

    mem = ExcludingMemory(inner, d, leaf)
    assert mem.read(4 * BS, 8, True) == bytes(8)
    with pytest.raises(FaultError, match="excluded from the dump by makedumpfile -d 31"):
        mem.read(5 * BS + 8, 8, True)
    with pytest.raises(FaultError, match="excluded"):
        mem.read(0x10000000 + 4 * BS, 2 * BS)
    with pytest.raises(FaultError, match="excluded"):
        mem.read(0x20000000, 8)
    assert (5 * BS + 8, True) in mem.hits and (0x20000000, False) in mem.hits

    class T:
        pass

    t = T()
    t.dump, t.memory = d, mem
    table = Finding("unreadable", None, "pte table at phys 0x5000 could not be read", phys=5 * BS)
    pages = Finding("unreadable", None, "struct pages could not be read", vaddr=0x10000000 + 5 * BS,
                    vaddr_end=0x10000000 + 6 * BS)
    other = Finding("unreadable", None, "struct pages could not be read", vaddr=0x10000000 + 7 * BS,
                    vaddr_end=0x10000000 + 8 * BS)
    assert name_filter([table, pages, other], t.dump, t.memory) == 2
    assert table.extra["excluded_by"].startswith("makedumpfile -d 31") and "excluded from the dump" in table.message
    assert pages.extra["excluded_by"] and "excluded_by" not in other.extra
    assert name_filter([table, pages, other], t.dump, t.memory) == 2 and table.message.count("excluded from") == 1  # idempotent


def test_excluded_classes():
    assert excluded_classes(1) == ["zero"]
    assert excluded_classes(4) == ["cache", "private cache"]
    assert excluded_classes(17) == ["zero", "free"]


def test_transient_hvo_states():
    head = MappedLeaf(0x1000, 4096, 0x9000, True)
    # PMD split, every tail still writable on its own page: remap started or restore finishing
    assert "every tail still writable" in _hvo_transient(8, head, list(range(1, 8)), False, True)
    # a read-only prefix (optimising) or suffix (restoring)
    assert "5 of 7 tails remapped" in _hvo_transient(8, head, [6, 7], False, True)
    assert "3 of 7" in _hvo_transient(8, head, [1, 2, 3, 4], False, True)
    # one writable tail in the middle, or a read-only tail elsewhere: not a step of a remap
    assert _hvo_transient(8, head, [3], False, True) == ""
    assert _hvo_transient(8, head, [6, 7], True, True) == ""
    # flagged, PMD not split yet: the remap had not started
    assert "had not started" in _hvo_transient(8, None, [], True, False)
    assert _hvo_transient(8, MappedLeaf(0x1000, 4096, 0x9000, False), [6, 7], False, True) == ""


def test_transient_section_states():
    assert "hot-add in progress" in _section_transient({"PRESENT"}, {"PRESENT", "HAS_MEM_MAP", "ONLINE"})
    assert "onlining or offlining" in _section_transient({"PRESENT", "HAS_MEM_MAP"}, {"PRESENT", "HAS_MEM_MAP", "ONLINE"})
    assert _section_transient({"PRESENT", "HAS_MEM_MAP", "ONLINE"}, {"PRESENT", "HAS_MEM_MAP", "ONLINE", "EARLY"}) == ""
