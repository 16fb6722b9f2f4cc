"""The reference model's inputs, read from a kernel: node and zone spans, RAM, the
HugeTLB pools, memory blocks, ZONE_DEVICE page maps, page->flags' layout, the buddy
allocator. No drgn: everything goes through a target's memory, its type information
(DWARF or BTF, one interface) and its symbols.

A :class:`Reading` is one read of a kernel's facts: a running kernel changes, so each
read of it (``check`` may read it again) is a new Reading over the same target.
"""

from __future__ import annotations

import struct
from typing import List, Optional, Tuple

from inspect_vmemmap.errors import one_line
from inspect_vmemmap.facts import Assumption, Inputs
from inspect_vmemmap.memory import FaultError, PhysRanges
from inspect_vmemmap.source import iomem, kstructs


class Reading:
    """One read of a target's plain facts; each is read once, when first asked for."""

    def __init__(self, target) -> None:
        self.target = target
        self._nodes: Optional[List[Tuple[int, int, int]]] = None
        self._sysram: Optional[iomem.SystemRam] = None
        self._ram: Optional[PhysRanges] = None

    def node_spans(self) -> List[Tuple[int, int, int]]:
        """:return: ``[(nid, start_pfn, end_pfn)]`` of each online node (pglist_data spans)."""
        if self._nodes is None:
            self._nodes = _node_spans(self.target)
        return self._nodes

    def iomem(self) -> iomem.SystemRam:
        """:return: what iomem says of System RAM (no ranges where it cannot be read)."""
        if self._sysram is None:
            t = self.target
            from inspect_vmemmap.arch import for_layout

            self._sysram = (iomem.system_ram(t.memory, t.types, t.symbol, for_layout(t.layout).nomap_resource)
                            if t.types is not None else iomem.SystemRam(()))
        return self._sysram

    def system_ram(self) -> List[Tuple[int, int]]:
        """:return: iomem's System RAM resources (empty where they cannot be read)."""
        return list(self.iomem().ranges)

    def ram(self) -> PhysRanges:
        """:return: physical RAM ranges ("System RAM" in iomem, else the node spans)."""
        if self._ram is None:
            ranges = self.system_ram()
            if not ranges:
                shift = self.target.layout.page_shift
                ranges = [(s << shift, e << shift) for _, s, e in self.node_spans()]
            self._ram = PhysRanges(ranges)
        return self._ram


def _excluded_by(e: BaseException) -> Optional[str]:
    return getattr(e, "excluded_by", None)


def gather_inputs(reading: Reading, notes: Optional[List[Assumption]] = None, memory=None) -> Inputs:
    """The reference model's inputs, read from sources independent of what is checked:
    iomem "System RAM", the firmware's e820 table, node spans, the HugeTLB pools, with
    DWARF or BTF type information (the same code for both).

    :param notes: receives an :class:`~inspect_vmemmap.facts.Assumption` for each input
        that could not be read.
    :param memory: what to read the kernel's structures through (default the target's
        memory; ``check`` gives a :class:`~inspect_vmemmap.mapped.VmemmapMemory`).
    :return: :class:`inspect_vmemmap.facts.Inputs`.
    """
    from inspect_vmemmap.arch import for_layout
    from inspect_vmemmap.vmemmap import NodeMap

    t = reading.target
    notes = notes if notes is not None else []
    types, symbol, mem, lay = t.types, t.symbol, memory or t.memory, t.layout
    ram = reading.ram()
    if not reading.system_ram():
        notes.append(Assumption("ram", "RAM ranges: node spans (iomem could not be read)"))
    elif reading.iomem().unread:
        notes.append(Assumption("ram", f"RAM ranges: iomem's, but {reading.iomem().unread} of its resources could "
                                       "not be read: System RAM under them is not known"))
    boot_ram = None
    folios: List = []
    shared_tails = False
    zone_list: List = []
    page_flags = None
    offline_blocks: List = []
    device_maps = hosted = mom_mode = pageblock_order = None
    if types is None:
        notes.append(Assumption("types", "no type information (no DWARF, no BTF): boot RAM, HugeTLB pools unknown; "
                                         "HVO remaps will show as unexplained"))
    else:
        boot_ram = kstructs.e820_ram(mem, types, symbol)
        managed = reading.iomem().driver_managed
        if boot_ram is None and managed:
            # no firmware table, but RAM a driver hot-added says so itself (source/iomem.py)
            boot_ram = [r for r in reading.iomem().ranges if r not in managed]
            notes.append(Assumption("boot_ram", f"boot RAM: no firmware RAM table read; System RAM treated as boot "
                                                f"memory but for {len(managed)} driver-managed range(s), hot-added "
                                                "by their driver (virtio-mem, dax/kmem)"))
        elif boot_ram is None:
            notes.append(Assumption("boot_ram", for_layout(lay).boot_ram_note))
        zones = kstructs.ZoneSpans(mem, types, _node_pgdats(t, reading.node_spans()))
        nid_of = NodeMap(reading.node_spans()).nid
        try:
            folios = kstructs.hugetlb_folios(mem, types, symbol, lay, nid_of, zones.zone)
        except kstructs.PartialPools as e:
            folios = e.folios
            notes.append(Assumption("hugetlb_pools", f"HugeTLB pools could not all be read ({one_line(e)}): "
                                                     f"{len(folios)} folios found", _excluded_by(e)))
        except (FaultError, KeyError) as e:
            notes.append(Assumption("hugetlb_pools", f"HugeTLB pools could not be read ({one_line(e)})",
                                    _excluded_by(e)))
        try:
            shared_tails = types.has_member("struct zone", "vmemmap_tails")
        except KeyError as e:  # a damaged type: which HVO era this is cannot be told
            shared_tails = False
            if folios:
                notes.append(Assumption("hugetlb_pools", f"HugeTLB folios found but where HVO maps their tails "
                                                         f"is unknown ({one_line(e)}): not compared"))
                folios = []
        zone_list = [(nid, s, e, z) for s, e, z, nid in zones.spans]
        try:
            blocks = kstructs.memory_block_states(mem, types, symbol, lay)
        except FaultError as e:
            blocks = None
            notes.append(Assumption("memory_blocks", f"memory blocks could not be read ({one_line(e)}): "
                                                     "all memory treated as online", _excluded_by(e)))
        else:
            if blocks is None:
                notes.append(Assumption("memory_blocks", "memory blocks: not read; all memory treated as online"))
        if blocks is not None:
            offline_blocks = [(a, b) for a, b, online in blocks if not online]
        page_flags = _page_flags_layout(t, types)
        if page_flags is None:
            notes.append(Assumption("page_flags", "page->flags layout unknown: struct pages' node and zone unchecked"))
        try:
            device_maps = kstructs.device_pagemaps(mem, types, symbol, lay.max_physmem_bits)
        except (FaultError, KeyError, ValueError) as e:
            notes.append(Assumption("device_maps", f"ZONE_DEVICE page maps could not be read ({one_line(e)}): "
                                                   "device memory's sections and vmemmap not predicted",
                                    _excluded_by(e)))
        try:
            hosted = kstructs.hosted_memory_blocks(mem, types, symbol, lay)
        except (FaultError, KeyError, ValueError) as e:
            notes.append(Assumption("hosted_blocks", f"memory blocks' memmap_on_memory altmaps could not be read "
                                                     f"({one_line(e)}): where their vmemmap lives is not predicted",
                                    _excluded_by(e)))
        mom_mode = kstructs.memmap_on_memory_mode(mem, types, symbol)
        pageblock_order = _pageblock_order(t)
    return Inputs(layout=lay, ram=ram.ranges, boot_ram=boot_ram, nodes=reading.node_spans(), folios=folios,
                  hvo_shared_tails=shared_tails, offline_blocks=offline_blocks,
                  zones=zone_list if types is not None else [],
                  page_flags=page_flags if types is not None else None,
                  device_maps=device_maps, hosted_blocks=hosted, memmap_on_memory=mom_mode,
                  pageblock_order=pageblock_order, nomap=list(reading.iomem().nomap))


def buddy_checker(t, memory=None) -> Optional[kstructs.BuddyChecker]:
    """:return: pfn -> free in the buddy allocator (see kstructs.buddy_checker), or None;
    reading through ``memory`` (default the target's)."""
    # NR_PAGE_ORDERS = MAX_PAGE_ORDER + 1 (VMCOREINFO LENGTH(zone.free_area)): 11 with 4K
    # pages, 12 with arm64's 16K (ARCH_FORCE_MAX_ORDER 11)
    orders = t.vmcoreinfo.length("zone.free_area")
    return None if t.types is None else kstructs.buddy_checker(memory or t.memory, t.types, t.layout,
                                                              max_order=orders - 1 if orders else 10)


def _node_data(t) -> Tuple[Optional[int], Optional[int]]:
    """The address of ``node_data`` (the array of pglist_data pointers) and its length,
    MAX_NUMNODES: x86 VMCOREINFO has SYMBOL(node_data) and LENGTH(node_data); elsewhere
    (arm64: drivers/base/arch_numa.c) the symbol comes from the ELF symbols or kallsyms and
    the length from DWARF's array type, else from struct hstate's per-node free lists
    (``hugepage_freelists[MAX_NUMNODES]``, include/linux/hugetlb.h) in DWARF or BTF.

    :return: ``(address, length)``, either None where unknown.
    """
    info = t.vmcoreinfo
    addr, n = info.symbol("node_data"), info.length("node_data")
    if addr is not None and n is not None:
        return addr, n
    addr = t.symbol("node_data")
    if addr is None:
        return None, None
    if t.lookup.has_dwarf:
        n = t.lookup.length("node_data")
    if n is None:
        n = _max_numnodes(t.types)
    return addr, n


def _max_numnodes(types) -> Optional[int]:
    """MAX_NUMNODES from struct hstate's per-node free lists, or None."""
    try:
        return types.member_size("struct hstate", "hugepage_freelists") // types.sizeof("struct list_head") \
            if types is not None else None
    except KeyError:
        return None


def _node_spans(t) -> List[Tuple[int, int, int]]:
    """Node spans from node_data and node_online_map, by VMCOREINFO offsets (DWARF if needed)."""
    info = t.vmcoreinfo
    mem = t.memory
    node_data, n = _node_data(t)
    off_start = info.offset("pglist_data.node_start_pfn")
    off_span = info.offset("pglist_data.node_spanned_pages")
    online = info.symbol("node_online_map")
    spans: List[Tuple[int, int, int]] = []
    if None in (node_data, n, off_start, off_span):
        # CONFIG_NUMA=n: contig_page_data
        pg = t.lookup.address("contig_page_data") if t.lookup.has_dwarf else None
        if pg is not None:
            try:
                start, = struct.unpack("<Q", mem.read(pg + t.types.offsetof("struct pglist_data", "node_start_pfn"), 8))
                span, = struct.unpack("<Q", mem.read(
                    pg + t.types.offsetof("struct pglist_data", "node_spanned_pages"), 8))
                return [(0, start, start + span)]
            except (FaultError, KeyError):
                pass
        return spans
    try:
        mask_words = (n + 63) // 64
        mask = 0
        if online is not None:
            for i, w in enumerate(struct.unpack(f"<{mask_words}Q", mem.read(online, mask_words * 8))):
                mask |= w << (64 * i)
        else:
            mask = (1 << n) - 1
        ptrs = struct.unpack(f"<{n}Q", mem.read(node_data, n * 8))
    except FaultError:
        return spans
    for nid in range(n):
        if not mask >> nid & 1 or not ptrs[nid]:
            continue
        try:
            start, = struct.unpack("<Q", mem.read(ptrs[nid] + off_start, 8))
            span, = struct.unpack("<Q", mem.read(ptrs[nid] + off_span, 8))
        except FaultError:
            continue
        spans.append((nid, start, start + span))
    return spans


def _pageblock_order(t) -> Optional[int]:
    """pageblock_order (include/linux/pageblock-flags.h): the variable where the kernel has
    one (CONFIG_HUGETLB_PAGE_SIZE_VARIABLE), else the PMD order capped by MAX_PAGE_ORDER
    (NR_PAGE_ORDERS - 1, VMCOREINFO LENGTH(zone.free_area)), which is what x86_64 and arm64
    define (HUGETLB_PAGE_ORDER / HPAGE_PMD_ORDER). 7.2 caps it by CONFIG_PAGE_BLOCK_MAX_ORDER
    instead, whose default (mm/Kconfig) is that same MAX_PAGE_ORDER: assumed. Only
    memmap_on_memory=force uses it."""
    addr = t.symbol("pageblock_order")
    if addr is not None:
        try:
            return struct.unpack("<I", t.memory.read(addr, 4))[0]
        except FaultError:
            pass
    orders = t.vmcoreinfo.length("zone.free_area")
    return min(t.layout.page_shift - 3, (orders or 11) - 1)


def _page_flags_layout(t, types) -> Optional[dict]:
    """page->flags node and zone fields, from MAX_NUMNODES (x86 VMCOREINFO
    LENGTH(node_data), else the length of struct hstate's per-node free lists) and
    MAX_NR_ZONES (enum zone_type's __MAX_NR_ZONES); ``head_bit``: PG_head (enum
    pageflags), where the kernel's types have it (check.heads)."""
    from inspect_vmemmap.model import page_flags_layout

    zones = types.enum_value("__MAX_NR_ZONES")
    nodes = t.vmcoreinfo.length("node_data")
    if nodes is None:
        nodes = _max_numnodes(types)
    if zones is None or nodes is None or (t.vmcoreinfo.offset("page.flags") or 0) != 0:
        return None
    out = page_flags_layout(nodes, zones)
    head = types.enum_value("PG_head")  # enum pageflags (include/linux/page-flags.h)
    if head is not None:
        out["head_bit"] = head
    return out


def _node_pgdats(t, spans: List[Tuple[int, int, int]]) -> List[Tuple[int, int]]:
    """(nid, address of pglist_data) of each node in ``spans``."""
    node_data, n = _node_data(t)
    if node_data is None or n is None:
        return []
    try:
        ptrs = struct.unpack(f"<{n}Q", t.memory.read(node_data, n * 8))
    except FaultError:
        return []
    return [(nid, ptrs[nid]) for nid, _, _ in spans if nid < n and ptrs[nid]]
