"""Kernel structures the reference model reads as inputs, decoded from raw memory with
type information from either DWARF or the kernel's own BTF. No drgn here.

``types`` is anything with ``sizeof(type)``, ``offsetof(type, member)``,
``member_size(type, member)``, ``has_member(type, member)`` and ``enum_value(name)``
(:class:`inspect_vmemmap.btf.Btf` has them; the drgn adapter wraps DWARF to match).
``symbol(name)`` returns a symbol's address or None.
"""

from __future__ import annotations

import struct
from typing import Callable, List, Optional, Tuple

from inspect_vmemmap.bulkread import read_many
from inspect_vmemmap.layout import KernelLayout
from inspect_vmemmap.memory import FaultError, Memory
from inspect_vmemmap.intervals import merge

_MAX_LIST = 1 << 22  # a corrupt list must end: at most this many entries (4M folios)


def _u64(mem: Memory, addr: int) -> int:
    return struct.unpack("<Q", mem.read(addr, 8))[0]


def _u32(mem: Memory, addr: int) -> int:
    return struct.unpack("<I", mem.read(addr, 4))[0]


def read_cstring(mem: Memory, addr: int, limit: int = 64) -> str:
    """:return: the NUL-terminated string at ``addr`` (at most ``limit`` bytes)."""
    try:
        raw = mem.read(addr, limit)
    except FaultError:
        # a short string near the end of a page: read byte-wise up to the boundary
        raw = bytearray()
        for i in range(limit):
            try:
                raw += mem.read(addr + i, 1)
            except FaultError:
                break
    return bytes(raw).split(b"\0", 1)[0].decode(errors="replace")


def e820_ram(mem: Memory, types, symbol: Callable[[str], Optional[int]]) -> Optional[List[Tuple[int, int]]]:
    """E820_TYPE_RAM entries of the firmware's memory map (arch/x86/kernel/e820.c
    ``e820_table_firmware``): the RAM there was at boot, before any hot-add.

    :return: physical ``[start, end)`` ranges, or None where there is no such table.
    """
    var = symbol("e820_table_firmware")
    if var is None:
        return None
    try:
        table = _u64(mem, var)
        n = _u32(mem, table + types.offsetof("struct e820_table", "nr_entries"))
        entries = table + types.offsetof("struct e820_table", "entries")
        esize = types.sizeof("struct e820_entry")
        cap = types.member_size("struct e820_table", "entries") // esize
        o_addr = types.offsetof("struct e820_entry", "addr")
        o_size = types.offsetof("struct e820_entry", "size")
        o_type = types.offsetof("struct e820_entry", "type")
        out = []
        for i in range(min(n, cap)):
            e = entries + i * esize
            if _u32(mem, e + o_type) == 1:  # E820_TYPE_RAM
                a = _u64(mem, e + o_addr)
                out.append((a, a + _u64(mem, e + o_size)))
        return out
    except (FaultError, KeyError):
        return None


class ZoneSpans:
    """Zone spans of every node: ``(start_pfn, end_pfn, zone index, nid)`` (struct zone);
    empty zones are left out."""

    def __init__(self, mem: Memory, types, node_pgdats: List[Tuple[int, int]]) -> None:
        self.spans: List[Tuple[int, int, int]] = []
        try:
            zsize = types.sizeof("struct zone")
            o_zones = types.offsetof("struct pglist_data", "node_zones")
            o_nr = types.offsetof("struct pglist_data", "nr_zones")
            o_start = types.offsetof("struct zone", "zone_start_pfn")
            o_span = types.offsetof("struct zone", "spanned_pages")
            for nid, pgdat in node_pgdats:
                for z in range(min(_u32(mem, pgdat + o_nr), 8)):
                    zone = pgdat + o_zones + z * zsize
                    s = _u64(mem, zone + o_start)
                    n = _u64(mem, zone + o_span)
                    if n:
                        self.spans.append((s, s + n, z, nid))
        except (FaultError, KeyError):
            pass

    def zone(self, pfn: int) -> Optional[int]:
        for s, e, z, _ in self.spans:
            if s <= pfn < e:
                return z
        return None


class PartialPools(Exception):
    """Some HugeTLB pool lists could not be followed to their end (a struct page on the way
    could not be read): ``folios`` holds those found, the message the first failure."""

    def __init__(self, folios: list, error: FaultError) -> None:
        super().__init__(str(error))
        self.folios = folios
        self.excluded_by = error.excluded_by


def hugetlb_folios(mem: Memory, types, symbol: Callable[[str], Optional[int]], layout: KernelLayout,
                   nid_of: Callable[[int], Optional[int]], zone_of: Callable[[int], Optional[int]]) -> list:
    """Every HugeTLB folio on the hstates' free lists and active list (mm/hugetlb.c),
    with its HPG_vmemmap_optimized bit: in the head page's ->private on 6.1, in
    folio->private (the same word) since the folio conversion.

    :return: a list of :class:`inspect_vmemmap.model.Folio`.
    :raises PartialPools: with the folios of the lists that could be read, when others
        could not (a filtered dump); FaultError when the hstates cannot be read.
    """
    from inspect_vmemmap.facts import Folio

    hstates = symbol("hstates")
    nmax = symbol("hugetlb_max_hstate")
    bit = types.enum_value("HPG_vmemmap_optimized")
    if hstates is None and symbol("iomem_resource") is None:
        # no symbol table at all (no DWARF, and drgn's kallsyms loader failed): a kernel
        # without HugeTLB cannot be told from pools that could not be found
        raise KeyError("no kernel symbols (kallsyms could not be read): hstates not found")
    if hstates is None or nmax is None or bit is None:
        return []
    hsize = types.sizeof("struct hstate")
    o_order = types.offsetof("struct hstate", "order")
    o_active = types.offsetof("struct hstate", "hugepage_activelist")
    o_free = types.offsetof("struct hstate", "hugepage_freelists")
    lh = types.sizeof("struct list_head")
    nfree = types.member_size("struct hstate", "hugepage_freelists") // lh
    o_lru = types.offsetof("struct page", "lru")
    o_priv = types.offsetof("struct page", "private")
    sps = layout.struct_page_size
    base = layout.vmemmap_base
    lo = min(o_lru, o_priv)
    span = max(o_lru, o_priv) + 8 - lo
    out = []
    seen = set()
    broken: List[FaultError] = []
    n = _u32(mem, nmax)
    for i in range(min(n, 16)):
        h = hstates + i * hsize
        order = _u32(mem, h + o_order)
        heads = [h + o_active] + [h + o_free + k * lh for k in range(nfree)]
        firsts = [None] + _list_firsts(mem, h + o_free, nfree, lh)
        for head, first in zip(heads, firsts):
            node = first if first is not None else _u64(mem, head)
            steps = 0
            try:
                while node and node != head and steps < _MAX_LIST:
                    steps += 1
                    page = node - o_lru
                    pfn = (page - base) // sps
                    if pfn in seen:
                        break
                    seen.add(pfn)
                    # ->private and lru.next in one read (one struct page: never two pages)
                    try:
                        raw = mem.read(page + lo, span)
                    except FaultError:  # read them apart, to fail where reading them apart does
                        opt = bool(_u64(mem, page + o_priv) >> bit & 1)
                        nxt = _u64(mem, node)
                    else:
                        opt = bool(int.from_bytes(raw[o_priv - lo:o_priv - lo + 8], "little") >> bit & 1)
                        nxt = int.from_bytes(raw[o_lru - lo:o_lru - lo + 8], "little")
                    out.append(Folio(pfn, order, opt, nid_of(pfn), zone_of(pfn)))
                    node = nxt
            except FaultError as e:  # this list ends here for us; the others may be whole
                broken.append(e)
    if broken:
        raise PartialPools(out, broken[0])
    return out


def _list_firsts(mem: Memory, base: int, count: int, stride: int) -> List[Optional[int]]:
    """The ``next`` pointers of ``count`` list heads laid side by side from ``base`` (an
    hstate's per-node free lists: MAX_NUMNODES of them, 1024 in Debian's kernels, nearly
    all empty), in one read; None for a head that could not be read."""
    try:
        raw = mem.read(base, count * stride)
    except FaultError:  # read them apart, to fail where reading them apart does
        return [int.from_bytes(b, "little") if b is not None else None
                for b in read_many(mem, [(base + k * stride, 8) for k in range(count)])]
    if stride % 8 == 0:
        return list(struct.unpack(f"<{count * stride // 8}Q", raw)[::stride // 8])
    return [int.from_bytes(raw[k * stride:k * stride + 8], "little") for k in range(count)]


class BuddyChecker:
    """Whether pfns are free in the buddy allocator: PageBuddy on the pfn or on an aligned
    block head whose order (page_private, buddy_order() in mm/internal.h) covers it.

    PageBuddy is ``page_type & mask == value`` (include/linux/page-flags.h), by era:
    since 6.11 ``page_type >> 24 == PGTY_buddy`` (enum pagetype); 6.9 and 6.10
    ``(page_type & (PAGE_TYPE_BASE | PG_buddy)) == PAGE_TYPE_BASE`` with the enumerators
    0x80000000 and 0x40000000 ("mm: allow reuse of the lower 16 bit of the page type with
    an actual type"); before, the same test with 0xf0000000 and 0x80 (#defines, later
    enumerators of the same values). See :func:`buddy_checker`.
    """

    def __init__(self, mem: Memory, layout: KernelLayout, off_type: int, off_priv: int,
                 mask: int, value: int, max_order: int) -> None:
        self.mem = mem
        self.layout = layout
        self.max_order = max_order
        self.mask, self.value = mask, value
        self.lo = min(off_type, off_priv)
        self.span = max(off_type + 4, off_priv + 8) - self.lo
        self.off_type, self.off_priv = off_type, off_priv
        # bulk scans: for each byte of page_type the test looks at, a table that maps the
        # byte to 1 where it passes (page_type is a little-endian u32)
        self._columns = []
        for k in range(4):
            m, v = mask >> 8 * k & 0xFF, value >> 8 * k & 0xFF
            if m:
                self._columns.append((k, bytes(int(b & m == v) for b in range(256))))

    def is_buddy(self, pt: int) -> bool:
        return pt & self.mask == self.value

    def __call__(self, pfn: int) -> bool:
        """:return: whether ``pfn`` is free (False where its struct pages cannot be read)."""
        return self._block(pfn) is not None

    def _block(self, pfn: int) -> Optional[Tuple[int, int]]:
        """:return: the free block ``[head, end)`` that holds ``pfn``, or None."""
        read, lo, span = self.mem.read, self.lo, self.span
        o_type, o_priv = self.off_type - lo, self.off_priv - lo
        last = -1
        buddy, order = False, 0
        # one read per distinct block head: an aligned pfn is its own head for many orders
        for o in range(self.max_order + 1):
            head = pfn & ~((1 << o) - 1)
            if head != last:
                last = head
                try:
                    raw = read(self.layout.pfn_to_page(head) + lo, span)
                except FaultError:
                    return None
                buddy = self.is_buddy(int.from_bytes(raw[o_type:o_type + 4], "little"))
                order = int.from_bytes(raw[o_priv:o_priv + 8], "little")
            if buddy and order >= o:
                return head, head + (1 << min(order, self.max_order))
        return None

    def free_of(self, pfns, max_read: int = 1 << 20) -> set:
        """The pfns of ``pfns`` that are free, as :meth:`__call__` says, read in bulk
        (:func:`inspect_vmemmap.source.bulkbuddy.free_of`)."""
        from inspect_vmemmap.source.bulkbuddy import free_of

        return free_of(self, pfns, max_read)

    def free_ranges(self, start: int, end: int, chunk: int = 1 << 15) -> Tuple[List[Tuple[int, int]], List[Tuple[int, int]]]:
        """Every free pfn in ``[start, end)``, reading the struct pages in bulk: a column of
        page_type bytes is tested at C speed, only possible buddies one by one.

        :return: ``(free, unread)``: pfn ranges free in the buddy allocator, and ranges whose
            struct pages could not be read.
        """
        lay = self.layout
        sps = lay.struct_page_size
        free: List[Tuple[int, int]] = []
        unread: List[Tuple[int, int]] = []
        first = self._block(start)  # a block that starts before the range
        if first is not None:
            free.append((start, min(first[1], end)))
            start = min(first[1], end)
        for c in range(start, end, chunk):
            n = min(chunk, end - c)
            try:
                buf = self.mem.read(lay.pfn_to_page(c), n * sps)
            except FaultError:
                unread.append((c, c + n))
                continue
            hits = self._candidates(buf, n, sps)
            if hits is None:
                continue
            i = hits.find(1)
            while i >= 0:
                at = i * sps
                pt = int.from_bytes(buf[at + self.off_type:at + self.off_type + 4], "little")
                if self.is_buddy(pt):
                    order = min(int.from_bytes(buf[at + self.off_priv:at + self.off_priv + 8], "little"),
                                self.max_order)
                    free.append((c + i, min(c + i + (1 << order), end)))
                i = hits.find(1, i + 1)
        return merge(free), unread

    def _candidates(self, buf: bytes, n: int, sps: int) -> Optional[bytes]:
        """:return: one byte per struct page in ``buf``, 1 where its page_type passes the
        PageBuddy test byte by byte (the AND of the columns, as one big integer); None
        where none does."""
        acc = None
        for k, table in self._columns:
            col = buf[self.off_type + k::sps][:n].translate(table)
            if 1 not in col:
                return None
            acc = int.from_bytes(col, "little") if acc is None else acc & int.from_bytes(col, "little")
            if not acc:
                return None
        return bytes([1]) * n if acc is None else acc.to_bytes(n, "little")


def buddy_checker(mem: Memory, types, layout: KernelLayout, max_order: int = 10) -> Optional[BuddyChecker]:
    """:return: a :class:`BuddyChecker`; None without the needed types."""
    try:
        off_type = types.offsetof("struct page", "page_type")
        off_priv = types.offsetof("struct page", "private")
    except KeyError:
        return None
    pgty = types.enum_value("PGTY_buddy")
    if pgty is not None:
        mask, value = 0xFF000000, pgty << 24
    else:
        base, bit = types.enum_value("PAGE_TYPE_BASE"), types.enum_value("PG_buddy")
        if base is None or bit is None or bit >> 32 or base >> 32:
            base, bit = 0xF0000000, 0x80  # the #defines
        mask, value = base | bit, base
    return BuddyChecker(mem, layout, off_type, off_priv, mask, value, max_order)


def xarray_entries(mem: Memory, types, xa: int, limit: int = 1 << 20) -> List[int]:
    """The pointer entries of the xarray at ``xa`` (include/linux/xarray.h: an internal
    entry ``> 4096`` with low bits 10 is a node, ``entry - 2``; value entries have bit 0
    set). Bounded by ``limit`` entries and by visiting each node once.

    :return: the entries, in index order.
    """
    o_head = types.offsetof("struct xarray", "xa_head")
    o_slots = types.offsetof("struct xa_node", "slots")
    nslots = types.member_size("struct xa_node", "slots") // 8
    out: List[int] = []
    seen = set()

    def visit(entry: int) -> None:
        if not entry or entry & 1 or len(out) >= limit:
            return
        if entry & 3 == 2:
            if entry <= 4096:
                return  # retry, zero or sibling entries
            node = entry - 2
            if node in seen:
                return
            seen.add(node)
            for slot in struct.unpack(f"<{nslots}Q", mem.read(node + o_slots, nslots * 8)):
                visit(slot)
            return
        out.append(entry)

    visit(_u64(mem, xa + o_head))
    return out


def memory_block_states(mem: Memory, types, symbol: Callable[[str], Optional[int]],
                        layout: KernelLayout) -> Optional[List[Tuple[int, int, bool]]]:
    """Every memory block (drivers/base/memory.c ``memory_blocks``) as ``(start_pfn,
    end_pfn, online)``: what /sys/devices/system/memory/memoryN/state says.

    MEM_OFFLINE is enumerator 2 of enum memory_block_state since 6.x's conversion, and the
    #define ``1 << 2`` before it (include/linux/memory.h).

    :return: the blocks, or None where the kernel has none (or no types for them).
    :raises FaultError: where they cannot be read (a filtered or truncated dump).
    """
    xa = symbol("memory_blocks")
    spb_addr = symbol("sections_per_block")
    if xa is None or spb_addr is None:
        return None
    try:
        offline = types.enum_value("MEM_OFFLINE")
        if offline is None:
            offline = 1 << 2
        o_start = types.offsetof("struct memory_block", "start_section_nr")
        o_state = types.offsetof("struct memory_block", "state")
    except KeyError:
        return None
    spb = _u32(mem, spb_addr)
    pps = layout.pages_per_section
    out = []
    for mb, (start, state) in _block_fields(mem, types, xa, ((o_start, 8), (o_state, 4))):
        start *= pps
        out.append((start, start + spb * pps, state != offline))
    return out


def _block_fields(mem: Memory, types, xa: int, fields: Tuple[Tuple[int, int], ...]) -> List[Tuple[int, tuple]]:
    """Each memory block's address with its little-endian ``(offset, size)`` fields, read
    in bulk (issue 18: 1024 blocks on 1 TiB, a read per field before): one span per
    block, neighbouring blocks in one read (bulkread.read_many). Where a span or the list
    cannot be read, the fields are read one by one, in order, so the same read fails."""
    lo = min(o for o, _ in fields)
    hi = max(o + n for o, n in fields)

    def one_by_one(mb: int) -> tuple:
        return tuple(int.from_bytes(mem.read(mb + o, n), "little") for o, n in fields)

    try:
        blocks = list(xarray_entries(mem, types, xa))
    except FaultError:  # as the loop one by one: what it reads before the failure, then the failure
        return [(mb, one_by_one(mb)) for mb in xarray_entries(mem, types, xa)]
    out = []
    for mb, raw in zip(blocks, read_many(mem, [(mb + lo, hi - lo) for mb in blocks])):
        if raw is None:
            out.append((mb, one_by_one(mb)))
        else:
            out.append((mb, tuple(int.from_bytes(raw[o - lo:o - lo + n], "little") for o, n in fields)))
    return out


#: PGMAP_ALTMAP_VALID (include/linux/memremap.h: a #define, 1 << 0 in 6.1, 6.12 and 7.2)
PGMAP_ALTMAP_VALID = 1
#: enum memory_type's enumerators (include/linux/memremap.h), named in the model's input
MEMORY_TYPES = ("MEMORY_DEVICE_PRIVATE", "MEMORY_DEVICE_COHERENT", "MEMORY_DEVICE_FS_DAX",
                "MEMORY_DEVICE_GENERIC", "MEMORY_DEVICE_PCI_P2PDMA")


def _altmap(mem: Memory, types, addr: int):
    from inspect_vmemmap.facts import Altmap

    return Altmap(_u64(mem, addr + types.offsetof("struct vmem_altmap", "base_pfn")),
                  _u64(mem, addr + types.offsetof("struct vmem_altmap", "reserve")),
                  _u64(mem, addr + types.offsetof("struct vmem_altmap", "free")))


def device_pagemaps(mem: Memory, types, symbol: Callable[[str], Optional[int]],
                    max_physmem_bits: int = 52) -> Optional[list]:
    """Every ZONE_DEVICE page map: mm/memremap.c's ``pgmap_array`` xarray, where
    pagemap_range() stores each map over its ranges' pfns (xa_store_range(), so one map
    fills many slots). struct dev_pagemap (include/linux/memremap.h, the same members in
    6.1, 6.12 and 7.2): ``ranges[nr_range]`` (struct range, inclusive ends) in a union
    with ``range``, ``vmemmap_shift``, and ``altmap`` valid when ``flags`` has
    PGMAP_ALTMAP_VALID.

    :return: a list of :class:`inspect_vmemmap.model.DeviceMap`, or None where the kernel
        has no ``pgmap_array`` (no CONFIG_ZONE_DEVICE).
    :raises FaultError, KeyError: when the maps cannot be read; ValueError when one is
        not a page map any kernel builds (a corrupt dump).
    """
    from inspect_vmemmap.facts import DeviceMap

    xa = symbol("pgmap_array")
    if xa is None:
        return None
    o_shift = types.offsetof("struct dev_pagemap", "vmemmap_shift")
    o_flags = types.offsetof("struct dev_pagemap", "flags")
    o_nr = types.offsetof("struct dev_pagemap", "nr_range")
    o_type = types.offsetof("struct dev_pagemap", "type")
    o_alt = types.offsetof("struct dev_pagemap", "altmap")
    o_range = types.offsetof("struct dev_pagemap", "range")
    rsize = types.sizeof("struct range")
    r_start = types.offsetof("struct range", "start")
    r_end = types.offsetof("struct range", "end")
    names = {}
    for n in MEMORY_TYPES:
        v = types.enum_value(n)
        if v is not None:
            names[v] = n
    out = []
    seen = set()
    for pgmap in xarray_entries(mem, types, xa):
        if pgmap in seen:
            continue
        seen.add(pgmap)
        nr = struct.unpack("<i", mem.read(pgmap + o_nr, 4))[0]
        if not 0 < nr <= 4096:  # device-dax: one range per mapping (struct dev_dax ranges[])
            raise ValueError(f"page map at {pgmap:#x}: nr_range {nr}")
        ranges = []
        for i in range(nr):
            r = pgmap + o_range + i * rsize
            ranges.append((_u64(mem, r + r_start), _u64(mem, r + r_end) + 1))
        flags = _u32(mem, pgmap + o_flags)
        t = _u32(mem, pgmap + o_type)
        dm = DeviceMap(ranges=ranges, vmemmap_shift=_u64(mem, pgmap + o_shift),
                       altmap=_altmap(mem, types, pgmap + o_alt) if flags & PGMAP_ALTMAP_VALID else None,
                       type=names.get(t, str(t)))
        try:
            dm.validate(max_physmem_bits)
        except ValueError as e:
            raise ValueError(f"page map at {pgmap:#x}: {e}") from None
        out.append(dm)
    return out


def hosted_memory_blocks(mem: Memory, types, symbol: Callable[[str], Optional[int]],
                         layout: KernelLayout) -> Optional[list]:
    """The memory blocks (drivers/base/memory.c ``memory_blocks``) whose memmap is on
    their own first pages (memory_hotplug.memmap_on_memory), by what struct memory_block
    records (include/linux/memory.h): in 6.12 and 7.2 a pointer to the block's own
    ``altmap``, in 6.1 ``nr_vmemmap_pages`` (the block's one-block hot-add used an altmap
    at the block's start with the whole block free: add_memory_resource()).

    :return: a list of :class:`inspect_vmemmap.model.HostedBlock`; [] where blocks have
        neither member (no memmap_on_memory); None where the blocks cannot be found.
    :raises FaultError, KeyError: when they cannot be read; ValueError when the block size
        is not one any kernel uses (a corrupt dump).
    """
    from inspect_vmemmap.facts import Altmap, HostedBlock

    xa = symbol("memory_blocks")
    spb_addr = symbol("sections_per_block")
    if xa is None or spb_addr is None:
        return None
    spb = _u32(mem, spb_addr)
    pps = layout.pages_per_section
    if not 0 < spb * pps <= 1 << (40 - layout.page_shift):  # blocks of a section .. 1 TiB
        raise ValueError(f"sections_per_block {spb}")
    o_start = types.offsetof("struct memory_block", "start_section_nr")
    if types.has_member("struct memory_block", "altmap"):
        o_alt, o_nr = types.offsetof("struct memory_block", "altmap"), None
    elif types.has_member("struct memory_block", "nr_vmemmap_pages"):
        o_alt, o_nr = None, types.offsetof("struct memory_block", "nr_vmemmap_pages")
    else:
        return []
    out = []
    for mb, (start, value) in _block_fields(mem, types, xa, ((o_start, 8), (o_alt if o_nr is None else o_nr, 8))):
        start *= pps
        end = start + spb * pps
        if o_alt is not None:
            if value:
                a = _altmap(mem, types, value)
                out.append(HostedBlock(start, end, a, a.free))
        elif value:
            out.append(HostedBlock(start, end, Altmap(start, 0, end - start), value))
    return out


def memmap_on_memory_mode(mem: Memory, types, symbol: Callable[[str], Optional[int]]) -> Optional[str]:
    """memory_hotplug.memmap_on_memory (mm/memory_hotplug.c): in 6.12 and 7.2 ``memmap_mode``,
    an int of the anonymous enum MEMMAP_ON_MEMORY_{DISABLE, ENABLE, FORCE}; in 6.1 the
    bool ``memmap_on_memory``.

    :return: "off", "enable" or "force"; None where neither variable is there (no
        CONFIG_MHP_MEMMAP_ON_MEMORY) or it cannot be read.
    """
    addr = symbol("memmap_mode")
    try:
        if addr is not None:
            v = _u32(mem, addr)
            force = types.enum_value("MEMMAP_ON_MEMORY_FORCE")
            enable = types.enum_value("MEMMAP_ON_MEMORY_ENABLE")
            return {0: "off", 1 if enable is None else enable: "enable",
                    2 if force is None else force: "force"}.get(v)
        addr = symbol("memmap_on_memory")
        if addr is not None:
            return "enable" if mem.read(addr, 1)[0] else "off"
    except FaultError:
        return None
    return None
