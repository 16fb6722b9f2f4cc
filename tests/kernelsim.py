"""A step-by-step simulation of how Linux builds an x86_64 kernel's vmemmap.

This is the independent half of the property tests: it does what the kernel does, in the
kernel's order, written from the kernel source (Debian's linux-source 6.1.176, 6.12.117
and 7.2.13; file and function named at each step), and imports nothing from
``inspect_vmemmap``: its own bit constants, its own page-table code, its own mem_section
encoding, its own allocators. The reference model (``inspect_vmemmap.model``) states the
same rules as predictions; the property tests make the two meet.

What is simulated, in order (:meth:`Kernel.boot`, then the runtime steps):

- boot: ``memblocks_present()`` -> ``memory_present()`` per memblock range (mm/sparse.c:
  sections marked present, ``SECTION_IS_ONLINE``, the node in the map bits);
  ``sparse_init()`` -> ``sparse_init_nid()`` per node run of sections, each section's
  whole memmap by ``__populate_section_memmap(pfn, PAGES_PER_SECTION)`` from the node's
  ``sparse_buffer`` (mm/sparse.c), then ``sparse_init_one_section(..., SECTION_IS_EARLY)``
  (mm/internal.h) with the coded mem_map; ``sparse_init_subsection_map()`` per memblock
  range (mm/mm_init.c, mm/sparse-vmemmap.c);
- ``vmemmap_populate()`` (arch/x86/mm/init_64.c): base pages below a section's memmap
  (with a NULL altmap), else ``vmemmap_populate_hugepages()`` (mm/sparse-vmemmap.c): a
  PMD_SIZE block per PMD, from the altmap if there is one (no fallback), else from the
  node, falling back to ``vmemmap_populate_basepages()`` when the node has no PMD_SIZE
  block;
- hot-add: ``__add_pages()`` section chunk by section chunk (mm/memory_hotplug.c) ->
  ``sparse_add_section()`` -> ``section_activate()`` (``fill_subsection_map()``, reuse of
  an early section's memmap, ``populate_section_memmap()``), ``__section_mark_present()``,
  ``sparse_init_one_section(..., 0)``; then ``online_pages()`` -> ``online_mem_sections()``;
  memmap_on_memory altmaps as ``create_altmaps_and_memory_blocks()`` (6.12, 7.2) or
  ``add_memory_resource()`` (6.1) make them, allocated by ``altmap_alloc_block_buf()``;
- ZONE_DEVICE: ``memremap_pages()`` -> ``pagemap_range()`` (mm/memremap.c) ->
  ``arch_add_memory()`` with the pgmap, ``vmemmap_can_optimize()`` (include/linux/mm.h)
  choosing ``vmemmap_populate_compound_pages()`` (mm/sparse-vmemmap.c, with
  ``reuse_compound_section()``), then ``move_pfn_range_to_zone()``'s
  ``section_taint_zone_device()`` (mm/memory_hotplug.c);
- HugeTLB: folios allocated top-down at boot (``alloc_bootmem_huge_page()``, memblock) and
  optimised by ``hugetlb_vmemmap_optimize()`` (6.1) / ``__hugetlb_vmemmap_optimize_folio()``
  (6.12, 7.2) in mm/hugetlb_vmemmap.c: the PMD split into PTEs (``vmemmap_split_pmd``), the
  head remapped (6.12, 7.2: onto a copy) and the tails read-only onto the reuse page (6.1:
  the head's own page; 6.12: the copy; 7.2: the zone's ``vmemmap_tails[]`` page).

The result is a physical memory image (the page tables and the mem_section array in it)
and the kernel's own account of what it did (:attr:`Kernel.truth`).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Dict, List, Optional, Tuple

# -- x86_64 constants (arch/x86/include/asm/{page_types,sparsemem,pgtable_64_types}.h) -------
PAGE_SHIFT = 12
PAGE_SIZE = 1 << PAGE_SHIFT
SECTION_SIZE_BITS = 27
PFN_SECTION_SHIFT = SECTION_SIZE_BITS - PAGE_SHIFT
PAGES_PER_SECTION = 1 << PFN_SECTION_SHIFT
SUBSECTION_SHIFT = 21  # include/linux/mmzone.h
PAGES_PER_SUBSECTION = 1 << (SUBSECTION_SHIFT - PAGE_SHIFT)
SUBSECTIONS_PER_SECTION = 1 << (SECTION_SIZE_BITS - SUBSECTION_SHIFT)
SIZEOF_STRUCT_PAGE = 64
PMD_SHIFT = 21
PMD_SIZE = 1 << PMD_SHIFT
PUD_SIZE = 1 << 30
PTRS_PER_TABLE = 512
VMEMMAP_START = {4: 0xFFFFEA0000000000, 5: 0xFFD4000000000000}
PAGE_OFFSET = 0xFFFF888000000000  # the direct map (4-level; KASLR off)
MAX_PHYSMEM_BITS = {4: 46, 5: 52}

# page-table entry bits (arch/x86/include/asm/pgtable_types.h)
_PAGE_PRESENT, _PAGE_RW, _PAGE_USER = 1 << 0, 1 << 1, 1 << 2
_PAGE_ACCESSED, _PAGE_DIRTY, _PAGE_PSE, _PAGE_GLOBAL = 1 << 5, 1 << 6, 1 << 7, 1 << 8
_PAGE_NX = 1 << 63
PTE_PFN_MASK = ((1 << 52) - 1) & ~(PAGE_SIZE - 1)
# _PAGE_TABLE = __PP|__RW|_USR|___A|___D (pmd/pud/p4d/pgd_populate, asm/pgalloc.h)
_PAGE_TABLE = _PAGE_PRESENT | _PAGE_RW | _PAGE_USER | _PAGE_ACCESSED | _PAGE_DIRTY
# __PAGE_KERNEL = __PP|__RW|___A|__NX|___D|___G
PAGE_KERNEL = _PAGE_PRESENT | _PAGE_RW | _PAGE_ACCESSED | _PAGE_NX | _PAGE_DIRTY | _PAGE_GLOBAL
# __PAGE_KERNEL_LARGE = __PAGE_KERNEL | _PSE
PAGE_KERNEL_LARGE = PAGE_KERNEL | _PAGE_PSE
# __PAGE_KERNEL_RO: 6.12 and 7.2 __PP|___A|__NX|___G; 6.1 also ___D
PAGE_KERNEL_RO = {"6.1": _PAGE_PRESENT | _PAGE_ACCESSED | _PAGE_NX | _PAGE_DIRTY | _PAGE_GLOBAL,
                  "6.12": _PAGE_PRESENT | _PAGE_ACCESSED | _PAGE_NX | _PAGE_GLOBAL,
                  "7.2": _PAGE_PRESENT | _PAGE_ACCESSED | _PAGE_NX | _PAGE_GLOBAL}

# section_mem_map bits (include/linux/mmzone.h enum, CONFIG_ZONE_DEVICE=y)
SECTION_MARKED_PRESENT = 1 << 0
SECTION_HAS_MEM_MAP = 1 << 1
SECTION_IS_ONLINE = 1 << 2
SECTION_IS_EARLY = 1 << 3
SECTION_TAINT_ZONE_DEVICE = 1 << 4
SECTION_MAP_LAST_BIT = 5
SECTION_MAP_MASK = ~((1 << SECTION_MAP_LAST_BIT) - 1) & ((1 << 64) - 1)
SECTION_NID_SHIFT = SECTION_MAP_LAST_BIT
# struct mem_section: section_mem_map, usage, page_ext, pad (CONFIG_PAGE_EXTENSION): 32 bytes
SIZEOF_MEM_SECTION = 32
SECTIONS_PER_ROOT = PAGE_SIZE // SIZEOF_MEM_SECTION
# struct mem_section_usage: struct rcu_head rcu (16 bytes), then subsection_map
USAGE_SUBSECTION_MAP_OFFSET = 16

# low memory the simulation keeps for itself: the kernel's early page tables and the
# mem_section array (memblock allocations the vmemmap does not care where they are)
TABLE_POOL = (0x100000, 0x4000000)
SECTION_POOL = (0x4000000, 0x6000000)

ZONE_NORMAL, ZONE_MOVABLE, ZONE_DEVICE = 2, 3, 4


def nr_mem_sections(levels: int) -> int:
    return 1 << (MAX_PHYSMEM_BITS[levels] - SECTION_SIZE_BITS)


def nr_section_roots(levels: int) -> int:
    return -(-nr_mem_sections(levels) // SECTIONS_PER_ROOT)


class Memory:
    """Sparse physical memory of 4K pages; virtual reads through the direct map."""

    def __init__(self, virt_base: int = PAGE_OFFSET) -> None:
        self.page_size = PAGE_SIZE
        self.virt_base = virt_base
        self.pages: Dict[int, bytearray] = {}

    def page(self, phys: int) -> bytearray:
        base = phys - phys % PAGE_SIZE
        p = self.pages.get(base)
        if p is None:
            p = self.pages[base] = bytearray(PAGE_SIZE)
        return p

    def write(self, address: int, data: bytes, physical: bool = True) -> None:
        phys = address if physical else address - self.virt_base
        while data:
            p = self.page(phys)
            off = phys % PAGE_SIZE
            n = min(len(data), PAGE_SIZE - off)
            p[off:off + n] = data[:n]
            data, phys = data[n:], phys + n

    def write_u64(self, address: int, value: int, physical: bool = True) -> None:
        self.write(address, (value & ((1 << 64) - 1)).to_bytes(8, "little"), physical)

    def read_u64(self, phys: int) -> int:
        return int.from_bytes(self.read(phys, 8, True), "little")

    def remove(self, phys: int) -> None:
        self.pages.pop(phys - phys % PAGE_SIZE, None)

    def read(self, address: int, size: int, physical: bool = False) -> bytes:
        from inspect_vmemmap.memory import FaultError  # the Memory protocol's one exception

        phys = address if physical else address - self.virt_base
        if not physical and not 0 <= phys < 1 << 52:
            raise FaultError(address, physical, "outside the direct map")
        out = bytearray()
        while size > 0:
            base = phys - phys % PAGE_SIZE
            p = self.pages.get(base)
            if p is None:
                raise FaultError(address, physical)
            off = phys - base
            n = min(size, PAGE_SIZE - off)
            out += p[off:off + n]
            size, phys = size - n, phys + n
        return bytes(out)


class Allocator:
    """Free physical memory per node: memblock at boot, the buddy allocator after (both
    hand out the node's highest free, aligned block here: memblock allocates top-down,
    and where the buddy allocator puts a page is its own business)."""

    def __init__(self) -> None:
        self.free: Dict[int, List[List[int]]] = {}  # nid -> sorted [start, end)

    def add(self, nid: int, start: int, end: int) -> None:
        self.free.setdefault(nid, []).append([start, end])
        self.free[nid].sort()

    def reserve(self, start: int, end: int) -> None:
        for nid, runs in self.free.items():
            out = []
            for a, b in runs:
                if b <= start or a >= end:
                    out.append([a, b])
                    continue
                if a < start:
                    out.append([a, start])
                if end < b:
                    out.append([end, b])
            self.free[nid] = out

    def alloc(self, nid: int, size: int, align: Optional[int] = None) -> Optional[int]:
        align = align or size
        runs = self.free.get(nid, [])
        for i in range(len(runs) - 1, -1, -1):
            a, b = runs[i]
            p = (b - size) // align * align
            if p >= a:
                pieces = ([[a, p]] if p > a else []) + ([[p + size, b]] if p + size < b else [])
                runs[i:i + 1] = pieces
                return p
        return None


@dataclass
class Altmap:
    """struct vmem_altmap (include/linux/memremap.h)."""

    base_pfn: int
    reserve: int
    free: int
    alloc: int = 0
    align: int = 0


@dataclass
class Device:
    """A ZONE_DEVICE page map a driver asks memremap_pages() for."""

    ranges: List[Tuple[int, int]]  # physical [start, end)
    vmemmap_shift: int = 0
    altmap: Optional[Altmap] = None
    nid: int = 0
    type: str = "MEMORY_DEVICE_GENERIC"


@dataclass
class Folio:
    """A HugeTLB folio as hugetlb.c keeps it."""

    pfn: int
    order: int
    nid: int
    zone: int = ZONE_NORMAL
    optimized: bool = False  # HPG_vmemmap_optimized


@dataclass
class HotBlock:
    """A memory block hot-added with memmap_on_memory."""

    start_pfn: int
    end_pfn: int
    altmap: Altmap
    nr_vmemmap_pages: int  # 6.1's mem->nr_vmemmap_pages; 6.12, 7.2 keep mem->altmap


@dataclass
class Truth:
    """What the simulated kernel did, by its own account."""

    #: section nr -> section_mem_map flag bits
    section_flags: Dict[int, int] = field(default_factory=dict)
    #: section nr -> subsection_map
    subsection_map: Dict[int, int] = field(default_factory=dict)
    #: vmemmap va -> (size, phys, writable) of every leaf, after everything
    leaves: Dict[int, Tuple[int, int, bool]] = field(default_factory=dict)
    #: optimised folios: head va -> the phys its tail vmemmap pages map
    hvo: Dict[int, int] = field(default_factory=dict)
    #: ZONE_DEVICE compound pages whose tail vmemmap is shared, and the PTEs that share
    compound_pages: int = 0
    shared_ptes: int = 0
    #: (vmemmap start, end, phys) allocated from an altmap
    altmap_backed: List[Tuple[int, int, int]] = field(default_factory=list)
    #: populated vmemmap from the node's allocator: va -> nid the backing came from
    backing_nid: Dict[int, int] = field(default_factory=dict)


class Kernel:
    """One simulated x86_64 kernel (4- or 5-level paging)."""

    def __init__(self, era: str = "6.12", levels: int = 4, hvo: bool = True,
                 memmap_on_memory: str = "enable", pageblock_order: int = 9) -> None:
        assert era in ("6.1", "6.12", "7.2")
        self.era = era
        self.levels = levels
        self.hvo_enabled = hvo  # hugetlb_free_vmemmap=on
        self.memmap_mode = memmap_on_memory
        self.pageblock_order = pageblock_order
        self.vmemmap_start = VMEMMAP_START[levels]
        self.shifts = (48, 39, 30, 21, 12) if levels == 5 else (39, 30, 21, 12)
        self.mem = Memory()
        self.alloc = Allocator()
        self._tables = list(TABLE_POOL)
        self.root = self._table_page()
        self.sections: Dict[int, List[int]] = {}  # nr -> [section_mem_map, subsection_map, nid]
        self.memblocks: List[Tuple[int, int, int]] = []  # (nid, start, end) physical
        self.resources: List[Tuple[int, int]] = []  # "System RAM"
        self.node_spans: Dict[int, List[int]] = {}  # nid -> [start_pfn, end_pfn)
        self.folios: List[Folio] = []
        self.devices: List[Device] = []
        self.blocks: List[HotBlock] = []
        self.offline: List[Tuple[int, int]] = []
        self.zone_tails: Dict[Tuple[int, int, int], int] = {}  # (nid, zone, order) -> phys
        self.truth = Truth()
        self.entries: Dict[int, Tuple[int, int]] = {}  # leaf va -> (size, entry phys)
        self.pmd_exhausted: set = set()  # nids whose buddy allocator has no PMD_SIZE block
        self.booted = False

    # -- pieces of the kernel's page-table code ------------------------------------------

    def _table_page(self) -> int:
        """vmemmap_alloc_block_zero(PAGE_SIZE): a zeroed page for a table."""
        p = self._tables[0]
        assert p + PAGE_SIZE <= self._tables[1], "table pool exhausted"
        self._tables[0] += PAGE_SIZE
        self.mem.write(p, bytes(PAGE_SIZE))
        return p

    def _index(self, va: int, depth: int) -> int:
        return (va >> self.shifts[depth]) & (PTRS_PER_TABLE - 1)

    def _entry(self, va: int, depth: int, populate: bool = True) -> Optional[int]:
        """The entry's physical address at ``depth`` for ``va``, populating the tables above
        it (vmemmap_pgd/p4d/pud/pmd_populate: a zeroed page, _PAGE_TABLE)."""
        table = self.root
        for d in range(depth):
            at = table + self._index(va, d) * 8
            e = self.mem.read_u64(at)
            if not e & _PAGE_PRESENT:
                if not populate:
                    return None
                t = self._table_page()
                self.mem.write_u64(at, t | _PAGE_TABLE)
                table = t
            else:
                assert not e & _PAGE_PSE or d == len(self.shifts) - 1, "walking through a leaf"
                table = e & PTE_PFN_MASK
        return table + self._index(va, depth) * 8

    def _set_leaf(self, va: int, size: int, phys: int, prot: int) -> None:
        depth = {PAGE_SIZE: len(self.shifts) - 1, PMD_SIZE: len(self.shifts) - 2}[size]
        at = self._entry(va, depth)
        self.mem.write_u64(at, phys | prot)
        self.entries[va] = (size, at)
        self.truth.leaves[va] = (size, phys, bool(prot & _PAGE_RW))

    def _pmd(self, va: int) -> int:
        return self._entry(va, len(self.shifts) - 2)

    def _pte_present(self, va: int) -> bool:
        pmd = self.mem.read_u64(self._pmd(va))
        if not pmd & _PAGE_PRESENT:
            return False
        if pmd & _PAGE_PSE:
            return True
        return bool(self.mem.read_u64((pmd & PTE_PFN_MASK) + self._index(va, len(self.shifts) - 1) * 8) & _PAGE_PRESENT)

    def _pte_phys(self, va: int) -> int:
        pmd = self.mem.read_u64(self._pmd(va))
        if pmd & _PAGE_PSE:
            return (pmd & PTE_PFN_MASK & ~(PMD_SIZE - 1)) + va % PMD_SIZE // PAGE_SIZE * PAGE_SIZE
        return self.mem.read_u64((pmd & PTE_PFN_MASK) + self._index(va, len(self.shifts) - 1) * 8) & PTE_PFN_MASK

    # -- allocators (mm/sparse-vmemmap.c) -----------------------------------------------

    def _vmemmap_alloc_block(self, size: int, nid: int) -> Optional[int]:
        """vmemmap_alloc_block(): alloc_pages_node() once slab is up, memblock before."""
        if self.booted and size == PMD_SIZE and nid in self.pmd_exhausted:
            return None
        p = self.alloc.alloc(nid, size)
        if p is None:  # the node has nothing: alloc_pages_node() falls back to any node
            for other in sorted(self.alloc.free):
                p = self.alloc.alloc(other, size)
                if p is not None:
                    break
        return p

    def _altmap_alloc_block_buf(self, size: int, altmap: Altmap) -> Optional[int]:
        """altmap_alloc_block_buf()."""
        pfn = altmap.base_pfn + altmap.reserve + altmap.alloc + altmap.align  # vmem_altmap_next_pfn
        nr_pfns = size >> PAGE_SHIFT
        nr_align = nr_pfns & -nr_pfns  # 1UL << find_first_bit(&nr_pfns, BITS_PER_LONG)
        nr_align = -(-pfn // nr_align) * nr_align - pfn  # ALIGN(pfn, nr_align) - pfn
        allocated = altmap.alloc + altmap.align
        nr_free = altmap.free - allocated if altmap.free > allocated else 0  # vmem_altmap_nr_free
        if nr_pfns + nr_align > nr_free:
            return None
        altmap.alloc += nr_pfns
        altmap.align += nr_align
        return (pfn + nr_align) << PAGE_SHIFT

    def _vmemmap_alloc_block_buf(self, size: int, nid: int, altmap: Optional[Altmap]) -> Optional[int]:
        if altmap is not None:
            return self._altmap_alloc_block_buf(size, altmap)
        buf = self._sparse_buffer_alloc(size)
        return buf if buf is not None else self._vmemmap_alloc_block(size, nid)

    def _sparse_buffer_alloc(self, size: int) -> Optional[int]:
        """sparse_buffer_alloc(): from the node's boot buffer while sparse_init_nid() runs."""
        if self._sparsemap is None:
            return None
        start, end = self._sparsemap
        p = -(-start // size) * size
        if p + size > end:
            return None
        self._sparsemap = (p + size, end)
        return p

    _sparsemap: Optional[Tuple[int, int]] = None

    # -- vmemmap population ------------------------------------------------------------

    def _populate_basepages(self, start: int, end: int, nid: int, altmap: Optional[Altmap],
                            reuse: Optional[int] = None) -> bool:
        """vmemmap_populate_range(): a PTE per page not yet mapped (vmemmap_pte_populate)."""
        for va in range(start, end, PAGE_SIZE):
            at = self._entry(va, len(self.shifts) - 1)
            if self.mem.read_u64(at) & _PAGE_PRESENT:
                continue
            if reuse is None:
                p = self._vmemmap_alloc_block_buf(PAGE_SIZE, nid, altmap)
                if p is None:
                    return False
                if altmap is not None:
                    self._note_altmap(va, va + PAGE_SIZE, p)
                else:
                    self.truth.backing_nid[va] = self._nid_of_phys(p)
            else:
                p = reuse
            self._set_leaf(va, PAGE_SIZE, p, PAGE_KERNEL)
        return True

    def _populate_hugepages(self, start: int, end: int, nid: int, altmap: Optional[Altmap]) -> bool:
        """vmemmap_populate_hugepages()."""
        addr = start
        while addr < end:
            nxt = min((addr + PMD_SIZE) // PMD_SIZE * PMD_SIZE, end)  # pmd_addr_end
            pmd_at = self._pmd(addr)
            pmd = self.mem.read_u64(pmd_at)
            if not pmd & _PAGE_PRESENT:  # pmd_none
                p = self._vmemmap_alloc_block_buf(PMD_SIZE, nid, altmap)
                if p is not None:
                    # vmemmap_set_pmd(): pfn_pte(.., PAGE_KERNEL_LARGE), the whole PMD
                    base = addr // PMD_SIZE * PMD_SIZE
                    self._set_leaf(base, PMD_SIZE, p, PAGE_KERNEL_LARGE)
                    if altmap is not None:
                        self._note_altmap(base, base + PMD_SIZE, p)
                    else:
                        self.truth.backing_nid[base] = self._nid_of_phys(p)
                    addr = nxt
                    continue
                if altmap is not None:
                    return False  # "No fallback"
            elif pmd & _PAGE_PSE:  # vmemmap_check_pmd(): already a leaf
                addr = nxt
                continue
            if not self._populate_basepages(addr, nxt, nid, altmap):
                return False
            addr = nxt
        return True

    def _vmemmap_populate(self, start: int, end: int, nid: int, altmap: Optional[Altmap]) -> bool:
        """vmemmap_populate(), arch/x86/mm/init_64.c (X86_FEATURE_PSE)."""
        if end - start < PAGES_PER_SECTION * SIZEOF_STRUCT_PAGE:
            return self._populate_basepages(start, end, nid, None)
        return self._populate_hugepages(start, end, nid, altmap)

    def _note_altmap(self, start: int, end: int, phys: int) -> None:
        t = self.truth.altmap_backed
        if t and t[-1][1] == start and t[-1][2] + (t[-1][1] - t[-1][0]) == phys:
            t[-1] = (t[-1][0], end, t[-1][2])
        else:
            t.append((start, end, phys))

    def _nid_of_phys(self, phys: int) -> Optional[int]:
        for nid, a, b in self.memblocks:
            if a <= phys < b:
                return nid
        return None

    def pfn_to_page(self, pfn: int) -> int:
        return self.vmemmap_start + pfn * SIZEOF_STRUCT_PAGE

    def _vmemmap_can_optimize(self, altmap: Optional[Altmap], dev: Optional[Device]) -> bool:
        """6.12, 7.2: vmemmap_can_optimize() (include/linux/mm.h; x86_64 selects
        ARCH_WANT_OPTIMIZE_DAX_VMEMMAP): a pgmap, no altmap, a power-of-2 struct page and
        more than VMEMMAP_RESERVE_NR (2) vmemmap pages per compound page. 6.1:
        __populate_section_memmap()'s own test, more than one page per compound page."""
        if dev is None or altmap is not None or SIZEOF_STRUCT_PAGE & (SIZEOF_STRUCT_PAGE - 1):
            return False
        nr = 1 << dev.vmemmap_shift
        if self.era == "6.1":
            return nr > 1
        return (nr * SIZEOF_STRUCT_PAGE) >> PAGE_SHIFT > 2

    def _populate_compound_pages(self, start_pfn: int, start: int, end: int, nid: int, dev: Device,
                                 range_start_pfn: int) -> bool:
        """vmemmap_populate_compound_pages() with reuse_compound_section()."""
        nr_pages = 1 << dev.vmemmap_shift
        offset = start_pfn - range_start_pfn
        if offset % nr_pages and nr_pages > PAGES_PER_SUBSECTION:
            # compound_section_tail_page(): the page the vmemmap page before maps
            reuse = self._pte_phys(start - PAGE_SIZE)
            self.truth.shared_ptes += (end - start) // PAGE_SIZE
            return self._populate_basepages(start, end, nid, None, reuse)
        size = min(end - start, nr_pages * SIZEOF_STRUCT_PAGE)
        for addr in range(start, end, size):
            last = addr + size
            if not self._populate_basepages(addr, addr + PAGE_SIZE, nid, None):  # the head page
                return False
            if not self._populate_basepages(addr + PAGE_SIZE, addr + 2 * PAGE_SIZE, nid, None):
                return False
            tail = self._pte_phys(addr + PAGE_SIZE)
            if not self._populate_basepages(addr + 2 * PAGE_SIZE, last, nid, None, tail):
                return False
            self.truth.compound_pages += 1
            self.truth.shared_ptes += max(0, (last - addr) // PAGE_SIZE - 2)
        return True

    def _populate_section_memmap(self, pfn: int, nr_pages: int, nid: int, altmap: Optional[Altmap],
                                 dev: Optional[Device], range_start_pfn: int = 0) -> bool:
        """__populate_section_memmap() (mm/sparse-vmemmap.c)."""
        assert pfn % PAGES_PER_SUBSECTION == 0 and nr_pages % PAGES_PER_SUBSECTION == 0
        start = self.pfn_to_page(pfn)
        end = start + nr_pages * SIZEOF_STRUCT_PAGE
        if self._vmemmap_can_optimize(altmap, dev):
            return self._populate_compound_pages(pfn, start, end, nid, dev, range_start_pfn)
        return self._vmemmap_populate(start, end, nid, altmap)

    # -- sections -----------------------------------------------------------------------

    def _ms(self, nr: int) -> List[int]:
        """__nr_to_section() after sparse_index_init()."""
        return self.sections.setdefault(nr, [0, 0, None])

    def _init_one_section(self, nr: int, flags: int) -> None:
        """sparse_init_one_section() (mm/internal.h): the coded mem_map in the map bits."""
        ms = self._ms(nr)
        coded = (self.pfn_to_page(nr * PAGES_PER_SECTION) - nr * PAGES_PER_SECTION * SIZEOF_STRUCT_PAGE) \
            & ((1 << 64) - 1)
        assert coded & ~SECTION_MAP_MASK == 0
        ms[0] &= ~SECTION_MAP_MASK
        ms[0] |= coded | flags | SECTION_HAS_MEM_MAP

    @staticmethod
    def _subsection_mask(pfn: int, nr_pages: int) -> int:
        """subsection_mask_set()."""
        idx = (pfn % PAGES_PER_SECTION) // PAGES_PER_SUBSECTION
        end = ((pfn + nr_pages - 1) % PAGES_PER_SECTION) // PAGES_PER_SUBSECTION
        return ((1 << (end - idx + 1)) - 1) << idx

    # -- boot ---------------------------------------------------------------------------

    def boot(self, memblocks: List[Tuple[int, int, int]], hugepages: List[Tuple[int, int]] = (),
             fixed_folios: List[Folio] = (), optimize: bool = True) -> None:
        """From the firmware's memory map (``(nid, start, end)``, physical bytes) to a
        running kernel: sparse_init(), boot-time HugeTLB pages (``(nid, count)`` 2M pages,
        or ``fixed_folios`` at given pfns), their HVO, the memory resources."""
        self.memblocks = sorted(memblocks, key=lambda m: m[1])
        for nid, a, b in self.memblocks:
            self.alloc.add(nid, a, b)
            self.resources.append((a, b))
            span = self.node_spans.setdefault(nid, [a >> PAGE_SHIFT, b >> PAGE_SHIFT])
            span[0], span[1] = min(span[0], a >> PAGE_SHIFT), max(span[1], b >> PAGE_SHIFT)
        self.alloc.reserve(*TABLE_POOL)
        self.alloc.reserve(*SECTION_POOL)
        self.alloc.reserve(0, 0x100000)  # the first MB: real mode, BIOS (arch/x86 reserve_real_mode)
        # boot-time hugepages come from memblock before sparse_init() (mm/hugetlb.c
        # hugetlb_hstate_alloc_pages() -> alloc_bootmem_huge_page(): memblock, top-down)
        for f in fixed_folios:
            self.alloc.reserve(f.pfn << PAGE_SHIFT, (f.pfn + (1 << f.order)) << PAGE_SHIFT)
            self.folios.append(Folio(f.pfn, f.order, f.nid, f.zone))
        for nid, count in hugepages:
            for _ in range(count):
                p = self.alloc.alloc(nid, PMD_SIZE)
                assert p is not None, "no memory for a boot-time hugepage"
                self.folios.append(Folio(p >> PAGE_SHIFT, 9, nid))
        # memblocks_present() -> memory_present()
        for nid, a, b in self.memblocks:
            start = (a >> PAGE_SHIFT) & ~(PAGES_PER_SECTION - 1)
            for pfn in range(start, -(-b >> PAGE_SHIFT), PAGES_PER_SECTION):
                ms = self._ms(pfn >> PFN_SECTION_SHIFT)
                ms[2] = nid  # set_section_nid()
                if not ms[0]:
                    ms[0] = (nid << SECTION_NID_SHIFT) | SECTION_IS_ONLINE
                    ms[0] |= SECTION_MARKED_PRESENT  # __section_mark_present()
        # sparse_init(): runs of present sections with one early nid -> sparse_init_nid()
        present = sorted(nr for nr, ms in self.sections.items() if ms[0] & SECTION_MARKED_PRESENT)
        runs: List[Tuple[int, List[int]]] = []
        for nr in present:
            nid = self.sections[nr][0] >> SECTION_NID_SHIFT  # sparse_early_nid()
            if runs and runs[-1][0] == nid:
                runs[-1][1].append(nr)
            else:
                runs.append((nid, [nr]))
        # section_map_size() = ALIGN(sizeof(struct page) * PAGES_PER_SECTION, PMD_SIZE)
        map_size = -(-SIZEOF_STRUCT_PAGE * PAGES_PER_SECTION // PMD_SIZE) * PMD_SIZE
        for nid, nrs in runs:
            # sparse_buffer_init(): memmap_alloc(map_count * section_map_size(),
            # section_map_size(), ..., nid, exact_nid=true)
            buf = self.alloc.alloc(nid, len(nrs) * map_size, map_size)
            self._sparsemap = None if buf is None else (buf, buf + len(nrs) * map_size)
            for nr in nrs:
                ok = self._populate_section_memmap(nr * PAGES_PER_SECTION, PAGES_PER_SECTION, nid, None, None)
                assert ok, f"sparse_init_nid: node {nid} memory map backing failed"
                self._init_one_section(nr, SECTION_IS_EARLY)
            if self._sparsemap is not None:  # sparse_buffer_fini(): the rest back to memblock
                a, b = self._sparsemap
                if b > a:
                    self.alloc.add(nid, a, b)
            self._sparsemap = None
        # sparse_init_subsection_map() per memblock range (mm/mm_init.c memmap_init)
        for nid, a, b in self.memblocks:
            pfn, nr_pages = a >> PAGE_SHIFT, (b >> PAGE_SHIFT) - (a >> PAGE_SHIFT)
            while nr_pages > 0:
                pfns = min(nr_pages, PAGES_PER_SECTION - pfn % PAGES_PER_SECTION)
                self._ms(pfn >> PFN_SECTION_SHIFT)[1] |= self._subsection_mask(pfn, pfns)
                pfn, nr_pages = pfn + pfns, nr_pages - pfns
        self.booted = True
        if optimize:  # hugetlb_vmemmap_optimize_folio() as the pool is filled
            for f in self.folios:
                self.hugetlb_vmemmap_optimize(f)

    # -- HVO (mm/hugetlb_vmemmap.c) ------------------------------------------------------

    def hugetlb_vmemmap_optimize(self, f: Folio) -> bool:
        if not self.hvo_enabled or f.optimized:  # vmemmap_should_optimize_folio()
            return False
        vmemmap_size = (1 << f.order) * SIZEOF_STRUCT_PAGE  # hugetlb_vmemmap_size()
        if vmemmap_size - PAGE_SIZE <= 0:  # hugetlb_vmemmap_optimizable()
            return False
        start = self.pfn_to_page(f.pfn)
        end = start + vmemmap_size
        # vmemmap_pmd_entry(): not for a self-hosted memmap (memmap_on_memory)
        if any(a <= self._pte_phys(start) < a + (e - s) for s, e, a in self.truth.altmap_backed):
            return False
        for va in range(start // PMD_SIZE * PMD_SIZE, end, PMD_SIZE):
            self._split_pmd(va)
        head_old = self._pte_phys(start)
        ro = PAGE_KERNEL_RO[self.era]
        if self.era == "6.1":
            # vmemmap_remap_free(start + RESERVE, end, reuse = start): the tails onto the
            # head's own page, PAGE_KERNEL_RO; the head untouched
            tail = head_old
        else:
            if self.era == "7.2":  # vmemmap_get_tail(): one page per zone and order
                key = (f.nid, f.zone, f.order)
                if key not in self.zone_tails:
                    self.zone_tails[key] = self._vmemmap_alloc_block(PAGE_SIZE, f.nid)
                tail = self.zone_tails[key]
            head = self._vmemmap_alloc_block(PAGE_SIZE, f.nid)  # alloc_pages_node(nid), a copy
            if self.era == "6.12":
                tail = head
            self._set_leaf(start, PAGE_SIZE, head, PAGE_KERNEL)  # vmemmap_remap_pte, nr_walked 0
            self.truth.backing_nid[start] = self._nid_of_phys(head)
        for va in range(start + PAGE_SIZE, end, PAGE_SIZE):
            self._set_leaf(va, PAGE_SIZE, tail, ro)
            self.truth.backing_nid.pop(va, None)
        f.optimized = True  # folio_set_hugetlb_vmemmap_optimized()
        self.truth.hvo[start] = tail
        return True

    def _split_pmd(self, va: int) -> None:
        """vmemmap_split_pmd(): a PMD leaf becomes a PTE table of 512 PAGE_KERNEL PTEs onto
        the same pages (pte_alloc_one_kernel, pmd_populate_kernel)."""
        at = self._pmd(va)
        pmd = self.mem.read_u64(at)
        if not pmd & _PAGE_PRESENT or not pmd & _PAGE_PSE:
            return
        head = pmd & PTE_PFN_MASK & ~(PMD_SIZE - 1)
        base = va // PMD_SIZE * PMD_SIZE
        nid = self.truth.backing_nid.pop(base, None)
        t = self._table_page()
        for i in range(PTRS_PER_TABLE):
            self.mem.write_u64(t + i * 8, (head + i * PAGE_SIZE) | PAGE_KERNEL)
        self.mem.write_u64(at, t | _PAGE_TABLE)
        del self.entries[base]
        del self.truth.leaves[base]
        for i in range(PTRS_PER_TABLE):
            v = base + i * PAGE_SIZE
            self.entries[v] = (PAGE_SIZE, t + i * 8)
            self.truth.leaves[v] = (PAGE_SIZE, head + i * PAGE_SIZE, True)
            if nid is not None:
                self.truth.backing_nid[v] = nid

    # -- hot-add (mm/memory_hotplug.c) --------------------------------------------------

    def _add_pages(self, nid: int, pfn: int, nr_pages: int, altmap: Optional[Altmap],
                   dev: Optional[Device] = None) -> bool:
        """__add_pages(): sparse_add_section() for each section chunk."""
        range_start = pfn
        end = pfn + nr_pages
        while pfn < end:
            n = min(end - pfn, PAGES_PER_SECTION - pfn % PAGES_PER_SECTION)
            if not self._sparse_add_section(nid, pfn, n, altmap, dev, range_start):
                return False
            pfn += n
        return True

    def _sparse_add_section(self, nid: int, pfn: int, nr_pages: int, altmap, dev, range_start) -> bool:
        nr = pfn >> PFN_SECTION_SHIFT
        ms = self._ms(nr)  # sparse_index_init()
        # section_activate() -> fill_subsection_map()
        mask = self._subsection_mask(pfn, nr_pages)
        assert not ms[1] & mask, "fill_subsection_map: -EEXIST"
        ms[1] |= mask
        early = bool(ms[0] & SECTION_IS_EARLY)
        if not (nr_pages < PAGES_PER_SECTION and early):
            if not self._populate_section_memmap(pfn, nr_pages, nid, altmap, dev, range_start):
                return False
        ms[0] |= SECTION_MARKED_PRESENT  # __section_mark_present()
        if ms[2] is None:
            ms[2] = nid
        self._init_one_section(nr, 0)
        return True

    def _grow_node(self, nid: int, start_pfn: int, end_pfn: int) -> None:
        """move_pfn_range_to_zone() -> resize_pgdat_range()."""
        span = self.node_spans.setdefault(nid, [start_pfn, end_pfn])
        span[0], span[1] = min(span[0], start_pfn), max(span[1], end_pfn)

    def online_pages(self, start_pfn: int, nr_pages: int) -> None:
        """online_pages() -> online_mem_sections(): every section the range's stride
        touches gets SECTION_IS_ONLINE."""
        for pfn in range(start_pfn, start_pfn + nr_pages, PAGES_PER_SECTION):
            self.sections[pfn >> PFN_SECTION_SHIFT][0] |= SECTION_IS_ONLINE

    def offline_pages(self, start_pfn: int, nr_pages: int) -> None:
        """offline_pages() -> offline_mem_sections()."""
        for pfn in range(start_pfn, start_pfn + nr_pages, PAGES_PER_SECTION):
            self.sections[pfn >> PFN_SECTION_SHIFT][0] &= ~SECTION_IS_ONLINE
        self.offline.append((start_pfn, start_pfn + nr_pages))

    def add_memory(self, nid: int, start: int, size: int, memmap_on_memory: bool = False,
                   block_size: int = 1 << SECTION_SIZE_BITS, online: bool = True) -> bool:
        """add_memory() -> add_memory_resource(): the resource, the sections, onlined block
        by block (memory blocks' state, or auto-online)."""
        pfn, nr = start >> PAGE_SHIFT, size >> PAGE_SHIFT
        assert start % block_size == 0 and size % block_size == 0, "add_memory: check_hotplug_memory_range"
        self.alloc.add(nid, start, start + size)
        self.alloc.reserve(start, start + size)  # not free until onlined
        if memmap_on_memory:
            block_pages = block_size >> PAGE_SHIFT
            # memory_block_memmap_on_memory_pages(): PFN_UP(memmap size), pageblock-aligned
            # in force mode (6.12, 7.2)
            mm_pages = -(-block_pages * SIZEOF_STRUCT_PAGE // PAGE_SIZE)
            if self.memmap_mode == "force":
                pb = 1 << self.pageblock_order
                mm_pages = -(-mm_pages // pb) * pb
            if self.era == "6.1":
                # 6.1 add_memory_resource(): one altmap for the one-block hot-add,
                # .free = PHYS_PFN(size); the block keeps nr_vmemmap_pages = mhp_altmap.alloc
                assert size == block_size, "6.1 mhp_supports_memmap_on_memory(): one block"
                am = Altmap(pfn, 0, nr)
                if not self._add_pages(nid, pfn, nr, am):
                    return False
                self.blocks.append(HotBlock(pfn, pfn + nr, am, am.alloc))
            else:
                # create_altmaps_and_memory_blocks(): an altmap per block
                for b in range(pfn, pfn + nr, block_pages):
                    am = Altmap(b, 0, mm_pages)
                    if not self._add_pages(nid, b, block_pages, am):
                        return False
                    self.blocks.append(HotBlock(b, b + block_pages, am, mm_pages))
        elif not self._add_pages(nid, pfn, nr, None):
            return False
        self.resources.append((start, start + size))
        self._grow_node(nid, pfn, pfn + nr)
        if online:
            for b in range(pfn, pfn + nr, block_size >> PAGE_SHIFT):
                self.online_pages(b, block_size >> PAGE_SHIFT)
            free_from = start
            for hb in self.blocks:  # the memmap pages stay reserved (mhp_init_memmap_on_memory)
                if hb.start_pfn << PAGE_SHIFT == start:
                    free_from = (hb.start_pfn + hb.altmap.alloc + hb.altmap.align) << PAGE_SHIFT
            self.alloc.add(nid, free_from, start + size)
        return True

    def memremap_pages(self, dev: Device) -> bool:
        """memremap_pages() -> pagemap_range() per range: arch_add_memory() with the pgmap
        (only range 0 may have the altmap), then move_pfn_range_to_zone(ZONE_DEVICE)."""
        for i, (a, b) in enumerate(dev.ranges):
            pfn, nr = a >> PAGE_SHIFT, (b - a) >> PAGE_SHIFT
            altmap = dev.altmap if i == 0 else None
            if not self._add_pages(dev.nid, pfn, nr, altmap, dev):
                return False
            self._grow_node(dev.nid, pfn, pfn + nr)
            if pfn % PAGES_PER_SECTION:  # section_taint_zone_device()
                self.sections[pfn >> PFN_SECTION_SHIFT][0] |= SECTION_TAINT_ZONE_DEVICE
            if (pfn + nr) % PAGES_PER_SECTION:
                self.sections[(pfn + nr) >> PFN_SECTION_SHIFT][0] |= SECTION_TAINT_ZONE_DEVICE
        self.devices.append(dev)
        return True

    def alloc_hugepage(self, nid: int) -> Optional[Folio]:
        """A runtime 2M HugeTLB page (nr_hugepages): the buddy allocator, then HVO."""
        p = self.alloc.alloc(nid, PMD_SIZE)
        if p is None:
            return None
        f = Folio(p >> PAGE_SHIFT, 9, nid)
        self.folios.append(f)
        self.hugetlb_vmemmap_optimize(f)
        return f

    def free_page(self) -> int:
        """A page of node 0 no one maps (for faults)."""
        return self._vmemmap_alloc_block(PAGE_SIZE, 0)

    # -- the image ----------------------------------------------------------------------

    def write_mem_section(self) -> int:
        """The SPARSEMEM_EXTREME mem_section array (sparse_index_init(): a root page per
        SECTIONS_PER_ROOT sections, the roots array from memblocks_present()).

        :return: the value of the ``mem_section`` pointer (a direct-map address)."""
        pool = SECTION_POOL[0]
        roots = pool
        nroots = nr_section_roots(self.levels)
        pool += -(-nroots * 8 // PAGE_SIZE) * PAGE_SIZE
        self.mem.write(roots, bytes(nroots * 8))
        root_pages: Dict[int, int] = {}
        for nr, (smm, submap, _) in sorted(self.sections.items()):
            if not smm:
                continue
            ri = nr // SECTIONS_PER_ROOT
            if ri not in root_pages:
                root_pages[ri] = pool
                self.mem.write(pool, bytes(PAGE_SIZE))
                self.mem.write_u64(roots + ri * 8, PAGE_OFFSET + pool)
                pool += PAGE_SIZE
            usage = pool
            pool += 64
            self.mem.write(usage, bytes(64))
            self.mem.write_u64(usage + USAGE_SUBSECTION_MAP_OFFSET, submap)
            at = root_pages[ri] + (nr % SECTIONS_PER_ROOT) * SIZEOF_MEM_SECTION
            self.mem.write_u64(at, smm)
            self.mem.write_u64(at + 8, PAGE_OFFSET + usage)
            self.truth.section_flags[nr] = smm & ~SECTION_MAP_MASK
            self.truth.subsection_map[nr] = submap
            assert pool <= SECTION_POOL[1]
        return PAGE_OFFSET + roots

    def zones(self) -> List[Tuple[int, int, int, int]]:
        return []
