"""What a crash dump file holds and what it left out, from its own headers (no drgn).

- kdump-compressed (makedumpfile's default format, crash's "diskdump"): ``struct
  disk_dump_header`` in block 0, ``struct kdump_sub_header`` in block 1 (``dump_level``
  since header_version 1), then two bitmaps of one bit per pfn: the 1st says which pfns
  /proc/vmcore had (RAM the capture kernel saw), the 2nd which were written. A pfn in the
  1st and not in the 2nd was excluded by the filter (makedumpfile's diskdump_mod.h;
  makedumpfile.c write_kdump_header, write_kdump_bitmap). Zero pages excluded by dump
  level bit 1 stay in the 2nd bitmap: they are written as one shared zero page.
- ELF (QEMU's dump-guest-memory, /proc/vmcore, makedumpfile -E): the PT_LOAD segments.
  makedumpfile -E -d N writes no dump level; a run of at least 256 excluded pages ends a
  segment's file data early (``p_filesz < p_memsz``, makedumpfile.c write_elf_pages_cyclic;
  shorter runs are written with their data). drgn reads that tail as zeros, so
  :class:`ExcludingMemory` makes reads of excluded pages fail as they do in a
  kdump-compressed dump instead of returning zeros that would look like empty page tables.
"""

from __future__ import annotations

import struct
from bisect import bisect_right
from typing import Dict, List, Optional, Tuple

from inspect_vmemmap.intervals import merge, subtract
from inspect_vmemmap.memory import FaultError

#: dump level bits (makedumpfile.h DL_EXCLUDE_*; makedumpfile(8) -d)
DUMP_LEVEL_BITS = (
    (1, "zero"),
    (2, "cache"),
    (4, "private cache"),
    (8, "user data"),
    (16, "free"),
)
# disk_dump_header.status (diskdump_mod.h)
_DH_ZLIB, _DH_LZO, _DH_SNAPPY, _DH_INCOMPLETE, _DH_EXCLUDED_VMEMMAP, _DH_ZSTD = 0x1, 0x2, 0x4, 0x8, 0x10, 0x20
_FLATTENED_SIGNATURE = b"makedumpfile\0"


def excluded_classes(dump_level: int) -> List[str]:
    """Page classes a makedumpfile dump level excludes (``-d 31``: all five)."""
    if dump_level & 4:
        dump_level |= 2  # -d 4 excludes non-private cache as well (makedumpfile(8)'s table)
    return [name for bit, name in DUMP_LEVEL_BITS if dump_level & bit]


class DumpFile:
    """A dump's format and which pfns it left out: RAM pages that are not in the file.

    kdump-compressed: the two bitmaps, kept as they are (a bit per pfn: 32 MiB each for
    1 TiB of RAM); ELF: ``[start, end)`` pfn runs of the PT_LOAD tails without file data.
    """

    def __init__(self, fmt: str, page_size: int = 4096) -> None:
        self.format = fmt  # "kdump-compressed" | "elf" | "flattened" | "unknown"
        self.page_size = page_size
        self.compression: Optional[str] = None
        self.dump_level: Optional[int] = None
        self.excluded_vmemmap = False  # makedumpfile -e
        self.incomplete = False
        self.split: Optional[Tuple[int, int]] = None  # makedumpfile --split: this file's pfn range
        self.ram_pages: Optional[int] = None  # RAM pages the dump knows of (kdump: the 1st bitmap)
        self.dumped_pages = 0
        self._excluded_pages = 0
        self._runs: List[Tuple[int, int]] = []  # ELF: excluded pfn runs
        self._starts: List[int] = []
        self._bitmaps: Optional[Tuple[bytes, bytes]] = None  # kdump: (1st, 2nd)

    # -- queries -------------------------------------------------------------------------

    @property
    def has_excluded(self) -> bool:
        return self._excluded_pages > 0

    @property
    def filtered(self) -> bool:
        """Whether the dump left out RAM pages (by a filter, or truncation) or says it filters."""
        return self.has_excluded or bool(self.dump_level)

    @property
    def worth_saying(self) -> bool:
        """Whether a report should describe this dump: a kdump-compressed one, or one that
        left pages out (a complete ELF vmcore is just memory)."""
        return self.format not in ("elf", "unknown") or self.filtered

    def excluded_pages(self) -> int:
        return self._excluded_pages

    def is_excluded(self, phys: int) -> bool:
        """Whether the page at physical address ``phys`` was RAM that the dump left out."""
        return self.overlaps_excluded(phys, 1)

    def overlaps_excluded(self, phys: int, size: int) -> bool:
        """Whether any page of physical ``[phys, phys + size)`` was excluded."""
        if not self._excluded_pages or size <= 0:
            return False
        ps = self.page_size
        a, b = phys // ps, (phys + size + ps - 1) // ps
        if self._bitmaps is not None:
            b1, b2 = self._bitmaps
            lo, hi = a >> 3, min((b + 7) >> 3, len(b1))
            if lo >= hi:
                return False
            x = int.from_bytes(b1[lo:hi], "little") & ~int.from_bytes(b2[lo:hi], "little")
            x >>= a - (lo << 3)
            return bool(x & ((1 << (b - a)) - 1))
        i = max(0, bisect_right(self._starts, a) - 1)
        while i < len(self._runs) and self._runs[i][0] < b:
            if self._runs[i][1] > a:
                return True
            i += 1
        return False

    def filter_text(self) -> str:
        """Who left pages out, for messages: ``makedumpfile -d 31 (zero, cache, ...)``."""
        if self.dump_level is not None:
            classes = [f"{', '.join(excluded_classes(self.dump_level))} pages"] if self.dump_level else []
            if self.excluded_vmemmap:
                classes.append("the struct pages of excluded pages")
            return (f"makedumpfile -d {self.dump_level}{' -e' if self.excluded_vmemmap else ''}"
                    + (f" ({'; '.join(classes)})" if classes else ""))
        if self.format == "elf":
            return "makedumpfile -E -d N (an ELF dump whose segments leave pages out; it names no dump level)"
        return f"the {self.format} dump"

    def to_json(self) -> dict:
        d: dict = {"format": self.format}
        if self.compression:
            d["compression"] = self.compression
        if self.format == "kdump-compressed" or self.dump_level is not None:
            d["dump_level"] = self.dump_level
            d["excluded_classes"] = excluded_classes(self.dump_level or 0)
            d["excluded_vmemmap"] = self.excluded_vmemmap
        if self.incomplete:
            d["incomplete"] = True
        if self.split:
            d["split_pfns"] = list(self.split)
        if self.ram_pages is not None:
            d["ram_pages"] = self.ram_pages
        d["dumped_pages"] = self.dumped_pages
        d["excluded_pages"] = self._excluded_pages
        d["filter"] = self.filter_text() if self.filtered else None
        return d


def read_dump_file(path: str, page_size: int = 4096) -> DumpFile:
    """:return: what ``path``'s headers say (format ``unknown`` when neither ELF nor kdump).
    ``page_size``: the kernel's, for an ELF dump (a kdump-compressed one says it)."""
    with open(path, "rb") as f:
        head = f.read(4096)
        if head[:8] in (b"KDUMP   ", b"DISKDUMP"):
            return _read_kdump(f, head)
        if head[:4] == b"\x7fELF":
            return _read_elf(f, head, page_size)
        if head.startswith(_FLATTENED_SIGNATURE):
            return DumpFile("flattened")
    return DumpFile("unknown")


def _read_kdump(f, head: bytes) -> DumpFile:
    """disk_dump_header and kdump_sub_header as a 64-bit makedumpfile writes them."""
    if len(head) < 464:
        return DumpFile("unknown")
    version, = struct.unpack_from("<i", head, 8)
    status, block_size, sub_hdr_size, bitmap_blocks, max_mapnr = struct.unpack_from("<IiiII", head, 424)
    if not 512 <= block_size <= 1 << 20 or block_size & (block_size - 1) or not 0 <= sub_hdr_size < 1 << 20:
        return DumpFile("unknown")
    d = DumpFile("kdump-compressed", block_size)
    for bit, name in ((_DH_ZSTD, "zstd"), (_DH_SNAPPY, "snappy"), (_DH_LZO, "lzo"), (_DH_ZLIB, "zlib")):
        if status & bit:
            d.compression = name
    d.excluded_vmemmap = bool(status & _DH_EXCLUDED_VMEMMAP)
    d.incomplete = bool(status & _DH_INCOMPLETE)
    f.seek(block_size)
    sub = f.read(104)
    if version >= 1 and len(sub) >= 16:
        d.dump_level = struct.unpack_from("<i", sub, 8)[0]
    if version >= 2 and len(sub) >= 32 and struct.unpack_from("<i", sub, 12)[0]:
        start, end = struct.unpack_from("<QQ", sub, 16)
        if version >= 6 and len(sub) >= 104:
            start, end = struct.unpack_from("<QQ", sub, 80)
        d.split = (start, end)
    if version >= 6 and len(sub) >= 104:
        max_mapnr = struct.unpack_from("<Q", sub, 96)[0] or max_mapnr
    f.seek((1 + sub_hdr_size) * block_size)
    size = bitmap_blocks * block_size
    if not 0 < size <= 1 << 34:
        return d
    bm = f.read(size)
    half = len(bm) // 2
    if half * 2 != size:
        d.incomplete = True
        return d
    nbytes = min(half, (max_mapnr + 7) // 8)
    b1, b2 = bm[:nbytes], bm[half:half + nbytes]
    i1, i2 = int.from_bytes(b1, "little"), int.from_bytes(b2, "little")
    d.ram_pages = i1.bit_count()
    d.dumped_pages = (i1 & i2).bit_count()
    d._excluded_pages = (i1 & ~i2).bit_count()
    d._bitmaps = (b1, b2)
    return d


def _read_elf(f, head: bytes, page_size: int) -> DumpFile:
    if head[4] != 2 or head[5] != 1:  # 64-bit little-endian only (x86_64, aarch64)
        return DumpFile("elf")
    phoff, = struct.unpack_from("<Q", head, 0x20)
    phentsize, phnum = struct.unpack_from("<HH", head, 0x36)
    if phnum == 0xFFFF or phentsize < 56:  # PN_XNUM: the count is in section 0's sh_info
        shoff, = struct.unpack_from("<Q", head, 0x28)
        f.seek(shoff + 44)
        phnum, = struct.unpack("<I", f.read(4))
    f.seek(phoff)
    table = f.read(phentsize * phnum)
    d = DumpFile("elf", page_size)
    ps = page_size
    loads, tails = [], []
    for i in range(len(table) // max(phentsize, 1)):
        p_type, _flags, _off, _vaddr, paddr, filesz, memsz = struct.unpack_from("<IIQQQQQ", table, i * phentsize)
        if p_type != 1:
            continue
        if filesz:
            loads.append((paddr // ps, (paddr + filesz + ps - 1) // ps))
        if memsz > filesz:
            # whole pages only: the partial last page of a RAM range has no data in any dump
            tails.append(((paddr + filesz + ps - 1) // ps, (paddr + memsz) // ps))
    in_dump = merge(loads)
    d._runs = subtract(merge(tails), in_dump)
    d._starts = [a for a, _ in d._runs]
    d.dumped_pages = sum(b - a for a, b in in_dump)
    d._excluded_pages = sum(b - a for a, b in d._runs)
    return d


def describe(path: str, page_size: int = 4096) -> Optional[DumpFile]:
    """:func:`read_dump_file`, or None when the file cannot be read or parsed."""
    try:
        return read_dump_file(path, page_size)
    except (OSError, struct.error, ValueError):
        return None


class ExcludedTable(Exception):
    """A translation went through a page-table page the dump excluded."""

    def __init__(self, phys: int) -> None:
        super().__init__(f"page table at phys {phys:#x}")
        self.phys = phys


class ExcludingMemory:
    """:class:`~inspect_vmemmap.memory.Memory` over a dump's memory that refuses to read
    pages the dump excluded, saying which filter excluded them (a makedumpfile ELF dump
    would give zeros; a kdump-compressed one a bare "Excluded page"), and remembers each
    such read in ``hits`` (``(address, physical)``).

    Virtual addresses are translated with the kernel's own page tables (``translate``: a
    function vaddr -> ``(leaf vaddr, leaf size, phys)`` or None, raising
    :class:`ExcludedTable`), one lookup per leaf.
    """

    def __init__(self, inner, dump: DumpFile, translate) -> None:
        self.inner = inner
        self.dump = dump
        self.translate = translate
        self.hits: List[Tuple[int, bool]] = []
        self._leaves: Dict[Tuple[int, int], Optional[Tuple[int, int, int]]] = {}
        self._sizes: List[int] = []

    def _leaf(self, va: int) -> Optional[Tuple[int, int, int]]:
        for size in self._sizes:
            hit = self._leaves.get((size, va // size))
            if hit is not None:
                return hit
        leaf = self.translate(va)
        if leaf is not None:
            size = leaf[1]
            if size not in self._sizes:
                self._sizes.append(size)
                self._sizes.sort(reverse=True)
            self._leaves[(size, va // size)] = leaf
        return leaf

    def _excluded(self, phys: int, size: int) -> bool:
        return self.dump.overlaps_excluded(phys, size)

    def excludes(self, va: int, end: int) -> bool:
        """Whether virtual ``[va, end)`` touches a page the dump excluded: a page-table page
        on the way to it, or a page it maps (only as far as the tables map it)."""
        while va < end:
            try:
                leaf = self._leaf(va)
            except ExcludedTable:
                return True
            if leaf is None:
                return False  # not mapped as far as the tables say: the inner read decides
            lva, lsize, lphys = leaf
            n = min(end, lva + lsize) - va
            if self._excluded(lphys + (va - lva), n):
                return True
            va += n
        return False

    def read(self, address: int, size: int, physical: bool = False) -> bytes:
        if self.dump.has_excluded and (self._excluded(address, size) if physical
                                       else self.excludes(address, address + size)):
            self.hits.append((address, physical))
            text = self.dump.filter_text()
            raise FaultError(address, physical, f"excluded from the dump by {text}", excluded_by=text)
        return self.inner.read(address, size, physical)


def filtering_memory(inner, dump: Optional[DumpFile], layout):
    """The memory to read a dump through: ``inner`` itself, or, where the dump left pages
    out, an :class:`ExcludingMemory` over it that translates virtual addresses with the
    kernel's own page tables (``layout``'s architecture and root)."""
    if dump is None or not dump.has_excluded:
        return inner
    from inspect_vmemmap.arch import for_layout
    from inspect_vmemmap.pgtable import translate

    fmt = for_layout(layout).paging(layout)
    root = layout.pgtable_root

    def leaf(va: int):
        steps = translate(inner, fmt, root, va)
        for st in steps:
            if dump.overlaps_excluded(st.table_phys, 8):
                raise ExcludedTable(st.table_phys)
        last = steps[-1] if steps else None
        if last is None or last.kind != "leaf":
            return None
        return va & ~(last.size - 1), last.size, last.phys

    return ExcludingMemory(inner, dump, leaf)


def name_filter(findings, dump: Optional[DumpFile], mem) -> int:
    """Say in each ``unreadable`` finding whose memory the dump's filter left out that it
    did (``excluded_by`` and the message); idempotent.

    :param mem: the memory the findings were read through (an :class:`ExcludingMemory`
        remembers the virtual reads it refused).
    :return: how many findings name the filter.
    """
    if dump is None or not dump.has_excluded:
        return 0
    hits = [a for a, physical in getattr(mem, "hits", ()) if not physical]
    text = dump.filter_text()
    n = 0
    for f in findings:
        if f.kind != "unreadable":
            continue
        if f.extra.get("excluded_by"):  # e.g. HVO unknown for want of the pools the filter left out
            n += 1
            continue
        excluded = False
        if f.phys is not None:
            excluded = dump.overlaps_excluded(f.phys, 1)
        if not excluded and f.vaddr is not None:
            end = f.vaddr_end if f.vaddr_end is not None else f.vaddr + 1
            excluded = any(f.vaddr <= a < end for a in hits)
            if not excluded and isinstance(mem, ExcludingMemory):
                excluded = mem.excludes(f.vaddr, end)
        if excluded:
            f.extra["excluded_by"] = text
            f.message += f" (excluded from the dump by {text})"
            n += 1
    return n
