"""What backs the vmemmap: System RAM (``backing-outside-ram``), allocated pages
(``backing-free``), one page per struct page unless HVO or ZONE_DEVICE dedup explains the
sharing (``alias``), and memory of the section's own node (``offnode-memmap``)."""

from __future__ import annotations

from bisect import bisect_right
from collections import defaultdict
from typing import Callable, Dict, List, Optional, Tuple

from inspect_vmemmap.check.observed import Explained, Observed
from inspect_vmemmap.findings import Finding
from inspect_vmemmap.intervals import coalesce, merge
from inspect_vmemmap.memory import PhysRanges
from inspect_vmemmap.vmemmap import NodeMap


def check_backing(obs: Observed, explained: Explained, backing_free: Optional[Callable[[int], bool]] = None,
                  deep: bool = False) -> List[Finding]:
    """:param backing_free: returns whether a physical pfn is free in the buddy allocator
        (None: that check is skipped); under ``deep``, every page that backs the vmemmap
        is checked in bulk where it can (``free_ranges``), else the first of each leaf."""
    lay = obs.layout
    shift = lay.page_shift
    ram = PhysRanges(obs.inputs.ram)
    nodes = NodeMap(obs.inputs.nodes)
    backed: List[Tuple[int, int, int]] = []  # (phys, phys end, vaddr) of leaves in RAM
    outside: List[Tuple[int, int, int]] = []  # (vaddr, size, phys)
    offnode: List[Tuple[int, int, int, int]] = []  # (vaddr, size, the section's node, the backing's)
    free: List[Tuple[int, int, int]] = []  # (vaddr, size, phys)
    bulk = deep and hasattr(backing_free, "free_ranges")
    know_ram = bool(ram)  # no RAM list at all: nothing can be said about backing
    at_once = backing_free is not None and not bulk and hasattr(backing_free, "free_of")
    for va, size, phys, _ in obs.leaves:
        if know_ram and not ram.covers(phys, phys + size) and va not in explained.placed:
            outside.append((va, size, phys))
            continue
        backed.append((phys, phys + size, va))
        sp = obs.pred.sections.get(obs.section_of(va))
        bn = nodes.nid(phys >> shift)
        if sp is not None and sp.nid is not None and bn is not None and bn != sp.nid:
            offnode.append((va, size, sp.nid, bn))
        if backing_free is not None and not bulk and not at_once and backing_free(phys >> shift):
            free.append((va, size, phys))
    if at_once:  # the first page of each leaf, all asked at once: their struct pages read in bulk
        first_free = backing_free.free_of(phys >> shift for phys, _, _ in backed)
        free = [(va, end - phys, phys) for phys, end, va in backed if phys >> shift in first_free]
    if bulk:
        free = _free_backing(backing_free, backed, shift)
    out: List[Finding] = []
    for kind, items, why in (("backing-outside-ram", outside, "which is not System RAM"),
                             ("backing-free", free, "which is free in the buddy allocator")):
        for va, size, phys in _runs(items):
            end = va + size
            sec, p0, p1 = obs.span(va, end)
            out.append(Finding(kind, None,
                               f"vmemmap {va:#x}-{end:#x} (struct pages of pfn {p0}-{p1}) is backed by phys "
                               f"{phys:#x}-{phys + size:#x}, {why}",
                               section=sec, pfn_start=p0, pfn_end=p1, vaddr=va, vaddr_end=end, phys=phys))
    out.extend(_aliases(obs, explained, backed))
    for va, size, want, got in coalesce(offnode):
        sec, p0, p1 = obs.span(va, va + size)
        out.append(Finding("offnode-memmap", None,
                           f"struct pages of pfn {p0}-{p1} (node {want}) live in memory of node {got}",
                           section=sec, pfn_start=p0, pfn_end=p1, vaddr=va, vaddr_end=va + size))
    return out


def _aliases(obs: Observed, explained: Explained, backed: List[Tuple[int, int, int]]) -> List[Finding]:
    """One alias finding per run of consecutive shared pages mapped by consecutive
    addresses, counting only the mappings nothing explains."""
    lay = obs.layout
    shift = lay.page_shift
    aliases: List[Tuple[int, int, int]] = []  # (the second vaddr, page size, phys)
    for pfn, vas in _shared_pages(backed, shift):
        if len(vas) - explained.aliases.get(pfn, 0) > 1:
            aliases.append((sorted(vas)[1], lay.page_size, pfn << shift))
    out: List[Finding] = []
    for va, size, phys in _runs(aliases):
        end = va + size
        sec, p0, p1 = obs.span(va, end)
        out.append(Finding("alias", None,
                           f"phys {phys:#x}-{phys + size:#x} also backs vmemmap {va:#x}-{end:#x} (struct pages of pfn "
                           f"{p0}-{p1}) and neither HVO nor ZONE_DEVICE dedup explains it", section=sec, pfn_start=p0,
                           pfn_end=p1, vaddr=va, vaddr_end=end, phys=phys))
    return out


def _runs(items: List[Tuple[int, int, int]]) -> List[Tuple[int, int, int]]:
    """``(vaddr, size, phys)`` merged where both addresses continue the previous item."""
    return coalesce(sorted(items), lambda run, item: run[2] + run[1] == item[2])


def _free_backing(buddy, backed: List[Tuple[int, int, int]], shift: int) -> List[Tuple[int, int, int]]:
    """Under --deep: every page that backs the vmemmap, not only the first of each leaf,
    against the buddy allocator (their struct pages read in bulk; those that cannot be read
    go unchecked: a filtered dump leaves out struct pages of excluded pages, which the
    vmemmap's backing is not).

    :return: ``(vaddr, size, phys)`` of the vmemmap backed by free pages.
    """
    pfns = merge((a >> shift, b >> shift) for a, b, _ in backed)
    free: List[Tuple[int, int]] = []
    for a, b in pfns:
        free.extend(buddy.free_ranges(a, b)[0])
    if not free:
        return []
    free = [(a << shift, b << shift) for a, b in merge(free)]
    ends = [b for _, b in free]
    out = []
    for phys, end, va in backed:
        i = bisect_right(ends, phys)
        while i < len(free) and free[i][0] < end:
            x, y = max(phys, free[i][0]), min(end, free[i][1])
            out.append((va + (x - phys), y - x, x))
            i += 1
    return sorted(out)


def _shared_pages(backed: List[Tuple[int, int, int]], shift: int) -> List[Tuple[int, List[int]]]:
    """Physical pages that more than one leaf maps: sort the leaves' backing by address
    and sweep, so the cost grows with the number of leaves, not of pages.

    :return: ``[(pfn, [vaddr of each mapping of that page])]``.
    """
    backed = sorted(backed)
    out = []
    i = 0
    n = len(backed)
    while i < n:
        # a cluster of overlapping backing ranges
        j = i + 1
        end = backed[i][1]
        while j < n and backed[j][0] < end:
            end = max(end, backed[j][1])
            j += 1
        if j - i > 1:
            per: Dict[int, List[int]] = defaultdict(list)
            for a, b, va in backed[i:j]:
                for p in range(a >> shift, b >> shift):
                    per[p].append(va + ((p << shift) - a))
            out.extend((p, vas) for p, vas in sorted(per.items()) if len(vas) > 1)
        i = j
    return out
