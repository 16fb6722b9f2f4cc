"""The kernel's layout: every constant the decoders, walkers and model need.

One component decides it (:mod:`inspect_vmemmap.source.decide`, from VMCOREINFO and DWARF
or BTF, with each architecture's rules from :mod:`inspect_vmemmap.arch`); everything else
takes a :class:`KernelLayout` and stays free of drgn.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from functools import cached_property, lru_cache
from typing import Dict, FrozenSet, NamedTuple, Optional, Tuple


class SectionFlag(NamedTuple):
    """One flag in the low bits of ``mem_section.section_mem_map`` (include/linux/mmzone.h)."""

    name: str  # ours, as KernelLayout.section_flags and Section.flags spell it
    enumerator: str  # the kernel's SECTION_<X>_BIT (the anonymous enum, v6.0+)
    json: str  # the name the JSON and the model's predictions use
    letter: str  # crash's `kmem -n` STATE letter (memory.c); V is ours, for VMEMMAP_PREINIT
    #: the #define's bit before commit ed7802dd48f7 ("mm: memory_hotplug: enumerate all
    #: supported section flags", v6.0) turned them into an enum; None: an enumerator only
    historical_bit: Optional[int]
    since: str  # the commit that added it


#: Every section flag, in the order the STATE column and the JSON list them.
SECTION_FLAGS: Tuple[SectionFlag, ...] = (
    SectionFlag("PRESENT", "SECTION_MARKED_PRESENT_BIT", "present", "P", 0, "29751f6991e8 (v2.6.13)"),
    SectionFlag("HAS_MEM_MAP", "SECTION_HAS_MEM_MAP_BIT", "has_mem_map", "M", 1, "29751f6991e8 (v2.6.13)"),
    SectionFlag("ONLINE", "SECTION_IS_ONLINE_BIT", "online", "O", 2, "2d070eab2e82 (v4.13)"),
    SectionFlag("EARLY", "SECTION_IS_EARLY_BIT", "early", "E", 3, "326e1b8f83a4 (v5.3)"),
    SectionFlag("ZONE_DEVICE", "SECTION_TAINT_ZONE_DEVICE_BIT", "zone_device", "D", 4, "1f90a3477df3 (v5.12)"),
    # CONFIG_SPARSEMEM_VMEMMAP_PREINIT: read in Debian's 7.2 (x86 selects it); it takes
    # the next free bit, so SECTION_MAP_LAST_BIT moves
    SectionFlag("VMEMMAP_PREINIT", "SECTION_IS_VMEMMAP_PREINIT_BIT", "vmemmap_preinit", "V", None,
                "an enumerator only (after v6.0)"),
)
#: our name -> its record
SECTION_FLAG: Dict[str, SectionFlag] = {f.name: f for f in SECTION_FLAGS}

#: Section flag bits before they became an enum (see SectionFlag.historical_bit)
HISTORICAL_SECTION_FLAGS: Dict[str, int] = {f.name: f.historical_bit for f in SECTION_FLAGS
                                            if f.historical_bit is not None}
HISTORICAL_SECTION_MAP_LAST_BIT = 5


@lru_cache(maxsize=None)
def flag_json_names(flags: FrozenSet[str]) -> Tuple[str, ...]:
    """Our flag names -> the JSON's, in the table's order (for output only)."""
    return tuple(f.json for f in SECTION_FLAGS if f.name in flags)


@lru_cache(maxsize=None)
def flag_letters(flags: FrozenSet[str]) -> str:
    """Our flag names -> crash's STATE letters, in the table's order (for output only)."""
    return "".join(f.letter for f in SECTION_FLAGS if f.name in flags)


@dataclass
class KernelLayout:
    arch: str  # "x86_64" | "aarch64"
    page_size: int
    pgtable_levels: int
    vmemmap_base: int  # the address of pfn 0's struct page
    struct_page_size: int
    section_size_bits: int
    max_physmem_bits: int
    #: our flag name -> bit number
    section_flags: Dict[str, int]
    section_map_last_bit: int
    #: SPARSEMEM_EXTREME: the root array (the value of the mem_section pointer, as
    #: VMCOREINFO's SYMBOL(mem_section) says); static: the address of the array
    mem_section_addr: int
    sparsemem_extreme: bool
    nr_section_roots: int
    sections_per_root: int
    mem_section_size: int  # sizeof(struct mem_section)
    usage_offset: int = 8  # offsetof(struct mem_section, usage)
    subsection_map_offset: int = 16  # offsetof(struct mem_section_usage, subsection_map)
    subsection_shift: int = 21  # SUBSECTION_SHIFT (include/linux/mmzone.h)
    pgtable_root: int = 0  # physical address of the kernel's top-level page table
    sme_mask: int = 0
    #: arm64: the VA bits the kernel's tables translate at run time (vabits_actual, 64 -
    #: NUMBER(TCR_EL1_T1SZ)) and the compile-time CONFIG_ARM64_VA_BITS (NUMBER(VA_BITS));
    #: 0 on x86_64, where pgtable_levels says it all
    va_bits: int = 0
    kernel_va_bits: int = 0
    #: arm64: TCR_EL1.DS (FEAT_LPA2: 52-bit PA with 4K/16K pages, PA[51:50] in bits 9:8)
    lpa2: bool = False
    #: arm64: memstart_addr (NUMBER(PHYS_OFFSET), as an unsigned 64-bit value: it wraps
    #: negative for a 52-bit kernel on 48-bit hardware) and NUMBER(kimage_voffset)
    phys_offset: int = 0
    kimage_voffset: int = 0
    #: The virtual range that can hold struct pages, where the kernel says (arm64: from
    #: VMEMMAP_START, past what a 52-bit-VA kernel on a 48-bit CPU lends to vmalloc, to
    #: VMEMMAP_END); 0: from vmemmap_base for MAX_PHYSMEM_BITS worth of struct pages
    vmemmap_region_start: int = 0
    vmemmap_region_end: int = 0
    kernel_release: str = ""
    type_source: str = "dwarf"
    #: where each value came from, and anything assumed
    notes: Dict[str, str] = field(default_factory=dict)

    @cached_property
    def page_shift(self) -> int:
        return self.page_size.bit_length() - 1

    @cached_property
    def pfn_section_shift(self) -> int:
        return self.section_size_bits - self.page_shift

    @cached_property
    def pages_per_section(self) -> int:
        return 1 << self.pfn_section_shift

    @cached_property
    def section_map_mask(self) -> int:
        return ~((1 << self.section_map_last_bit) - 1) & (2**64 - 1)

    @cached_property
    def _section_flag_decodings(self) -> Dict[int, Tuple[FrozenSet[str], int]]:
        return {}

    def decode_section_flags(self, low: int) -> Tuple[FrozenSet[str], int]:
        """:return: the names of the flags set in ``low`` (section_mem_map's bits below
        section_map_last_bit) and the bits no flag names; decoded once per value."""
        decoded = self._section_flag_decodings.get(low)
        if decoded is None:
            known = 0
            for bit in self.section_flags.values():
                known |= 1 << bit
            decoded = self._section_flag_decodings[low] = (
                frozenset(name for name, bit in self.section_flags.items() if low >> bit & 1), low & ~known)
        return decoded

    @cached_property
    def subsections_per_section(self) -> int:
        return 1 << (self.section_size_bits - self.subsection_shift)

    @cached_property
    def pages_per_subsection(self) -> int:
        return 1 << (self.subsection_shift - self.page_shift)

    @property
    def vmemmap_end(self) -> int:
        """End of the part of the vmemmap that can hold struct pages (for MAX_PHYSMEM_BITS,
        and no further than the region's end where the kernel gives one)."""
        end = self.vmemmap_base + (1 << (self.max_physmem_bits - self.page_shift)) * self.struct_page_size
        return min(end, self.vmemmap_region_end) if self.vmemmap_region_end else end

    @property
    def vmemmap_start(self) -> int:
        """Start of the part of the vmemmap that can hold struct pages: pfn 0's struct page,
        or the region's start where the kernel gives one and pfn 0 lies below it."""
        return max(self.vmemmap_base, self.vmemmap_region_start)

    def pfn_to_page(self, pfn: int) -> int:
        return self.vmemmap_base + pfn * self.struct_page_size

    def page_to_pfn(self, addr: int) -> int:
        return (addr - self.vmemmap_base) // self.struct_page_size

    def to_json(self) -> dict:
        d = {k: v for k, v in asdict(self).items()}
        for k in _HEX_FIELDS:
            d[k] = hex(d[k])
        return d

    @classmethod
    def from_json(cls, d: dict) -> "KernelLayout":
        d = dict(d)
        for k in _HEX_FIELDS:
            if isinstance(d.get(k), str):
                d[k] = int(d[k], 16)
        return cls(**d)


#: KernelLayout fields written as hex strings in JSON
_HEX_FIELDS = ("vmemmap_base", "mem_section_addr", "pgtable_root", "sme_mask", "phys_offset", "kimage_voffset",
               "vmemmap_region_start", "vmemmap_region_end")


def flag_bits_from_enumerators(enumerators: Dict[str, int]) -> Optional[tuple]:
    """Section flag bits from the kernel's anonymous enum (v6.0+).

    :return: ``(flags, last_bit)`` or None if the enum is not there.
    """
    if "SECTION_MARKED_PRESENT_BIT" not in enumerators or "SECTION_MAP_LAST_BIT" not in enumerators:
        return None
    flags = {f.name: enumerators[f.enumerator] for f in SECTION_FLAGS if f.enumerator in enumerators}
    return flags, enumerators["SECTION_MAP_LAST_BIT"]
