"""The reference model's inputs: plain, JSON-serialisable facts about a kernel, read from
sources independent of what is checked (iomem, e820, node and zone spans, HugeTLB pools,
ZONE_DEVICE page maps, memmap_on_memory blocks). The sources gather them
(:mod:`inspect_vmemmap.source.gather`), ``check --save-layout`` writes them, ``model``
reads them back."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Dict, List, Optional, Tuple

from inspect_vmemmap.intervals import Interval
from inspect_vmemmap.layout import KernelLayout


@dataclass
class Folio:
    """One HugeTLB folio (mm/hugetlb.c hstate free and active lists)."""

    head_pfn: int
    order: int
    optimized: bool  # HPG_vmemmap_optimized in the head's (folio's) ->private
    nid: Optional[int] = None
    zone: Optional[int] = None


@dataclass
class Altmap:
    """struct vmem_altmap (include/linux/memremap.h) as the hot-add starts it: the memmap
    of the memory being added is allocated from its own pfns ``[base_pfn + reserve,
    base_pfn + reserve + free)`` (mm/sparse-vmemmap.c altmap_alloc_block_buf)."""

    base_pfn: int
    reserve: int
    free: int

    def to_json(self) -> dict:
        return {"base_pfn": self.base_pfn, "reserve": self.reserve, "free": self.free}

    @classmethod
    def from_json(cls, d: Optional[dict]) -> Optional["Altmap"]:
        return None if d is None else cls(int(d["base_pfn"]), int(d["reserve"]), int(d["free"]))


@dataclass
class DeviceMap:
    """One ZONE_DEVICE page map (struct dev_pagemap, include/linux/memremap.h), as
    mm/memremap.c's ``pgmap_array`` holds it."""

    #: physical byte ranges [start, end) (pgmap->ranges[], whose ends are inclusive)
    ranges: List[Interval]
    #: compound pages of 1 << vmemmap_shift pages (device-dax align > PAGE_SIZE)
    vmemmap_shift: int = 0
    #: the memmap on the device itself (PGMAP_ALTMAP_VALID: nvdimm pfn/dax mode "pmem")
    altmap: Optional[Altmap] = None
    #: enum memory_type, by name (MEMORY_DEVICE_GENERIC for device-dax, ...)
    type: Optional[str] = None

    def to_json(self) -> dict:
        return {"ranges": [[hex(a), hex(b)] for a, b in self.ranges], "vmemmap_shift": self.vmemmap_shift,
                "altmap": None if self.altmap is None else self.altmap.to_json(), "type": self.type}

    @classmethod
    def from_json(cls, d: dict) -> "DeviceMap":
        m = cls(ranges=_ranges(d.get("ranges", [])), vmemmap_shift=int(d.get("vmemmap_shift", 0)),
                altmap=Altmap.from_json(d.get("altmap")), type=d.get("type"))
        m.validate()
        return m

    def validate(self, max_physmem_bits: int = 64) -> None:
        """:raises ValueError: on what no kernel builds (empty or inverted ranges, ranges
        past the physical address space, a compound page larger than it)."""
        if not 0 <= self.vmemmap_shift < max_physmem_bits - 12:
            raise ValueError(f"device map: vmemmap_shift {self.vmemmap_shift}")
        for a, b in self.ranges:
            if not 0 <= a < b <= 1 << max_physmem_bits:
                raise ValueError(f"device map: range {a:#x}-{b:#x}")
        if self.altmap is not None and min(self.altmap.base_pfn, self.altmap.reserve, self.altmap.free) < 0:
            raise ValueError("device map: negative altmap")


@dataclass
class HostedBlock:
    """A hot-added memory block whose memmap is on its own first pages
    (memory_hotplug.memmap_on_memory), as its struct memory_block records it: since
    6.12 and 7.2 ``mem->altmap`` (one altmap per block), in 6.1 ``mem->nr_vmemmap_pages`` (the
    altmap started at the block with the whole block free)."""

    start_pfn: int
    end_pfn: int
    altmap: Altmap
    #: the vmemmap pages the kernel accounts to the block (online_memory_block() onlines
    #: the rest): altmap->free in 6.12 and 7.2, nr_vmemmap_pages in 6.1
    recorded_pages: int

    def to_json(self) -> dict:
        return {"start_pfn": self.start_pfn, "end_pfn": self.end_pfn, "altmap": self.altmap.to_json(),
                "recorded_pages": self.recorded_pages}

    @classmethod
    def from_json(cls, d: dict) -> "HostedBlock":
        b = cls(int(d["start_pfn"]), int(d["end_pfn"]), Altmap.from_json(d["altmap"]), int(d["recorded_pages"]))
        if not 0 <= b.start_pfn < b.end_pfn <= b.start_pfn + (1 << 30) \
                or min(b.altmap.base_pfn, b.altmap.reserve, b.altmap.free) < 0:
            raise ValueError(f"memory block pfn {b.start_pfn}-{b.end_pfn}: not a block")
        return b


def _ranges(lst) -> List[Interval]:
    return [(int(a, 0) if isinstance(a, str) else a, int(b, 0) if isinstance(b, str) else b) for a, b in lst]


@dataclass
class Inputs:
    """What the model needs, from sources independent of what is checked."""

    layout: KernelLayout
    #: "System RAM" resources (kernel/resource.c), physical byte ranges, boot and hot-added
    ram: List[Interval]
    #: RAM the firmware reported at boot (x86: e820_table; else None: all RAM is boot RAM)
    boot_ram: Optional[List[Interval]] = None
    #: (nid, start_pfn, end_pfn) from pglist_data
    nodes: List[Tuple[int, int, int]] = field(default_factory=list)
    folios: List[Folio] = field(default_factory=list)
    #: 7.1+: HVO tails map a per-zone shared page (struct zone::vmemmap_tails)
    hvo_shared_tails: bool = False
    #: memory block pfn ranges that are offline (sysfs state), for SECTION_IS_ONLINE
    offline_blocks: List[Interval] = field(default_factory=list)
    #: (nid, start_pfn, end_pfn, zone index) of every populated zone span (struct zone)
    zones: List[Tuple[int, int, int, int]] = field(default_factory=list)
    #: page->flags layout: {"nodes_shift": NODES_PGSHIFT, "nodes_width": .., "zones_shift": .., "zones_width": ..}
    page_flags: Optional[Dict[str, int]] = None
    #: ZONE_DEVICE page maps (mm/memremap.c pgmap_array); None: not read (then sections
    #: tainted ZONE_DEVICE are not compared and device memory's vmemmap is not predicted)
    device_maps: Optional[List[DeviceMap]] = None
    #: hot-added memory blocks with their memmap on themselves; None: not read
    hosted_blocks: Optional[List[HostedBlock]] = None
    #: memory_hotplug.memmap_on_memory: "off", "enable" or "force" (6.12, 7.2: memmap_mode;
    #: 6.1's bool memmap_on_memory gives "off"/"enable"); None: not read
    memmap_on_memory: Optional[str] = None
    #: pageblock_order (include/linux/pageblock-flags.h), for memmap_on_memory=force
    pageblock_order: Optional[int] = None
    #: boot memory the kernel keeps out of its linear map (memblock "nomap": on arm64 EFI
    #: runtime regions and firmware flash, iomem "reserved"), physical byte ranges: not RAM,
    #: but its sections are present from boot (Arch.nomap_resource)
    nomap: List[Interval] = field(default_factory=list)

    def to_json(self) -> dict:
        return {
            "layout": self.layout.to_json(),
            "ram": [[hex(a), hex(b)] for a, b in self.ram],
            "boot_ram": None if self.boot_ram is None else [[hex(a), hex(b)] for a, b in self.boot_ram],
            "nodes": [list(n) for n in self.nodes],
            "folios": [{"head_pfn": f.head_pfn, "order": f.order, "optimized": f.optimized, "nid": f.nid, "zone": f.zone}
                       for f in self.folios],
            "hvo_shared_tails": self.hvo_shared_tails,
            "offline_blocks": [list(b) for b in self.offline_blocks],
            "zones": [list(z) for z in self.zones],
            "page_flags": self.page_flags,
            "device_maps": None if self.device_maps is None else [m.to_json() for m in self.device_maps],
            "hosted_blocks": None if self.hosted_blocks is None else [b.to_json() for b in self.hosted_blocks],
            "memmap_on_memory": self.memmap_on_memory,
            "pageblock_order": self.pageblock_order,
            "nomap": [[hex(a), hex(b)] for a, b in self.nomap],
        }

    @classmethod
    def from_json(cls, d: dict) -> "Inputs":
        rng = _ranges
        dm, hb = d.get("device_maps"), d.get("hosted_blocks")
        return cls(
            layout=KernelLayout.from_json(d["layout"]),
            ram=rng(d.get("ram", [])),
            boot_ram=None if d.get("boot_ram") is None else rng(d["boot_ram"]),
            nomap=rng(d.get("nomap", [])),
            nodes=[tuple(n) for n in d.get("nodes", [])],
            folios=[Folio(**f) for f in d.get("folios", [])],
            hvo_shared_tails=bool(d.get("hvo_shared_tails", False)),
            offline_blocks=[tuple(b) for b in d.get("offline_blocks", [])],
            zones=[tuple(z) for z in d.get("zones", [])],
            page_flags=d.get("page_flags"),
            device_maps=None if dm is None else [DeviceMap.from_json(m) for m in dm],
            hosted_blocks=None if hb is None else [HostedBlock.from_json(b) for b in hb],
            memmap_on_memory=d.get("memmap_on_memory"),
            pageblock_order=d.get("pageblock_order"),
        )


@dataclass(frozen=True)
class Assumption:
    """An input of the model that could not be read, and what was assumed instead: data,
    never matched by its wording."""

    #: which input: "ram", "types", "boot_ram", "hugetlb_pools", "memory_blocks",
    #: "page_flags", "device_maps", "hosted_blocks"
    input: str
    #: what the user reads (``check``'s ``assumptions``)
    text: str
    #: the dump filter that left the input out, where one did
    excluded_by: Optional[str] = None

    def __str__(self) -> str:
        return self.text
