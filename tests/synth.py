"""Hand-built x86_64 page tables and mem_section arrays in synthetic physical memory."""

from __future__ import annotations

import struct

from inspect_vmemmap.layout import KernelLayout
from tests.synthmem import SyntheticMemory

P, RW, USER, A, D, PSE, G = 1, 2, 4, 0x20, 0x40, 0x80, 0x100
NX = 1 << 63
PAGE_KERNEL = 0x8000000000000163
PAGE_KERNEL_LARGE = 0x80000000000001E3
PAGE_KERNEL_RO = 0x8000000000000161
TABLE = 0x67


class X86Tables:
    """Builds x86_64 page tables with ``levels`` 4 or 5 in a SyntheticMemory."""

    def __init__(self, mem: SyntheticMemory, levels: int = 4, table_pool: int = 0x100000) -> None:
        self.mem = mem
        self.levels = levels
        self.shifts = (48, 39, 30, 21, 12) if levels == 5 else (39, 30, 21, 12)
        self.next_table = table_pool
        self.root = self.alloc()

    def alloc(self) -> int:
        phys = self.next_table
        self.next_table += 4096
        self.mem.page(phys)
        return phys

    def entry_addr(self, table: int, va: int, depth: int) -> int:
        return table + ((va >> self.shifts[depth]) & 511) * 8

    def get(self, addr: int) -> int:
        return struct.unpack("<Q", self.mem.read(addr, 8, True))[0]

    def map(self, va: int, phys: int, size: int, flags: int = None) -> int:
        """Map one leaf of ``size`` (4K, 2M or 1G); returns the entry's physical address."""
        leaf_depth = {1 << 12: self.levels - 1, 1 << 21: self.levels - 2, 1 << 30: self.levels - 3}[size]
        if flags is None:
            flags = PAGE_KERNEL if size == 4096 else PAGE_KERNEL_LARGE
        table = self.root
        for depth in range(leaf_depth):
            addr = self.entry_addr(table, va, depth)
            e = self.get(addr)
            if not e:
                nt = self.alloc()
                self.mem.write_u64(addr, nt | TABLE)
                table = nt
            else:
                table = e & 0x000FFFFFFFFFF000
        addr = self.entry_addr(table, va, leaf_depth)
        self.mem.write_u64(addr, phys | flags)
        return addr

    def entry_of(self, va: int, depth: int) -> int:
        """Physical address of the entry for ``va`` at ``depth`` (tables must exist)."""
        table = self.root
        for d in range(depth):
            table = self.get(self.entry_addr(table, va, d)) & 0x000FFFFFFFFFF000
        return self.entry_addr(table, va, depth)


def x86_layout(levels: int = 4, **kw) -> KernelLayout:
    defaults = dict(
        arch="x86_64", page_size=4096, pgtable_levels=levels,
        vmemmap_base=0xFFD4000000000000 if levels == 5 else 0xFFFFEA0000000000,
        struct_page_size=64, section_size_bits=27, max_physmem_bits=52 if levels == 5 else 46,
        section_flags={"PRESENT": 0, "HAS_MEM_MAP": 1, "ONLINE": 2, "EARLY": 3, "ZONE_DEVICE": 4},
        section_map_last_bit=5, mem_section_addr=0, sparsemem_extreme=True,
        nr_section_roots=(1 << (46 - 27)) // 128, sections_per_root=128, mem_section_size=32,
    )
    defaults.update(kw)
    return KernelLayout(**defaults)


def build_sections(mem: SyntheticMemory, layout: KernelLayout, sections: dict, pool: int = 0x4000000) -> None:
    """Write a SPARSEMEM_EXTREME mem_section array.

    ``sections``: nr -> (low flag bits, subsection_map or None). Valid sections get the
    coded mem_map ``vmemmap_base``. ``layout.mem_section_addr`` is set to the variable.
    """
    virt = mem.virt_base
    spr, size = layout.sections_per_root, layout.mem_section_size
    roots_phys = pool
    pool += ((layout.nr_section_roots * 8 + 4095) // 4096) * 4096
    mem.write(roots_phys, bytes(layout.nr_section_roots * 8))
    root_pages = {}
    for nr, (flags, submap) in sorted(sections.items()):
        ri = nr // spr
        if ri not in root_pages:
            root_pages[ri] = pool
            mem.write(pool, bytes(spr * size))
            mem.write_u64(roots_phys + ri * 8, virt + pool)
            pool += spr * size
        smm = flags
        if flags & 2:
            smm |= layout.vmemmap_base
        usage = 0
        if submap is not None:
            usage = pool
            mem.write(usage, bytes(64))
            mem.write_u64(usage + 16, submap)
            pool += 64
            usage += virt
        at = root_pages[ri] + (nr % spr) * size
        mem.write_u64(at, smm)
        mem.write_u64(at + 8, usage)
    layout.mem_section_addr = virt + roots_phys


# -- a whole synthetic kernel, simulated from what it was given ---------------------------------

BACKING_BASE = 0x40_0000_0000  # 256 GiB: RAM ranges, one per node, that back the vmemmap
BACKING_SIZE = 1 << 30


class _SimTables:
    """The page tables of a :class:`tests.kernelsim.Kernel`, for tests that damage them:
    ``get``/``entry_of`` read them, ``map`` writes a leaf with the simulation's own encoding."""

    def __init__(self, k) -> None:
        self.k = k
        self.root = k.root

    def get(self, addr: int) -> int:
        return self.k.mem.read_u64(addr)

    def entry_of(self, va: int, depth: int) -> int:
        return self.k._entry(va, depth, populate=False)

    def map(self, va: int, phys: int, size: int, flags: int = None) -> int:
        from tests import kernelsim as ks

        if size == 1 << 30:  # a 1G direct-map leaf (synthcore): a PUD entry
            at = self.k._entry(va, len(self.k.shifts) - 3)
            self.k.mem.write_u64(at, phys | (ks.PAGE_KERNEL_LARGE if flags is None else flags))
            return at
        prot = flags if flags is not None else ks.PAGE_KERNEL if size == 4096 else ks.PAGE_KERNEL_LARGE
        self.k._set_leaf(va, size, phys, prot)
        return self.k.entries[va][1]


class SynthKernel:
    """A synthetic x86_64 kernel for model :class:`Inputs`: the inputs say what the
    kernel was given (the firmware's memory map per node, memory hot-added with or without
    memmap_on_memory, memory blocks offlined, ZONE_DEVICE page maps, HugeTLB folios and
    whether HVO optimised them); :class:`tests.kernelsim.Kernel` then does what the kernel
    does with them, step by step. Nothing here calls the model: the model must predict what
    the simulation built.

    ``mem``, ``layout`` (the inputs' layout, its ``mem_section_addr`` and ``pgtable_root``
    set), ``tables``, ``leaves`` (vaddr -> (size, entry address)) and ``sim`` (the
    simulated kernel, with its :class:`tests.kernelsim.Truth`).
    """

    def __init__(self, inputs, shared_tails: bool = False) -> None:
        from tests import kernelsim as ks

        self.inputs = inp = inputs
        lay = self.layout = inp.layout
        assert lay.arch == "x86_64" and lay.page_size == 4096
        era = "7.2" if inp.hvo_shared_tails else "6.12"
        if lay.kernel_release.split(".0-sim")[0] in ("6.1", "6.12", "7.2"):  # a simulation's own release
            era = lay.kernel_release.split(".0-sim")[0]
        hosted = list(inp.hosted_blocks or ())
        if any(hb.altmap.free >= hb.end_pfn - hb.start_pfn for hb in hosted):
            assert era != "7.2", "6.1's memmap_on_memory altmaps with 7.2's HVO"
            era = "6.1"
        k = self.sim = ks.Kernel(era, lay.pgtable_levels, hvo=True, memmap_on_memory=inp.memmap_on_memory or "enable",
                                 pageblock_order=inp.pageblock_order or 9)
        nodes = list(inp.nodes)

        def nid_of(pfn):
            inner = [(s, n) for n, s, e in nodes if s <= pfn < e]
            return max(inner)[1] if inner else 0

        def split_by_node(a, b):
            """[a, b) bytes into (nid, start, end) pieces at node-span edges."""
            cuts = sorted({a, b} | {e << 12 for _, s, e in nodes if a < e << 12 < b}
                          | {s << 12 for _, s, e in nodes if a < s << 12 < b})
            return [(nid_of(x >> 12), x, y) for x, y in zip(cuts, cuts[1:])]

        boot = _merge(inp.boot_ram if inp.boot_ram is not None else inp.ram)
        memblocks = [m for a, b in boot for m in split_by_node(a, b)]
        folios = [ks.Folio(f.head_pfn, f.order, f.nid if f.nid is not None else nid_of(f.head_pfn),
                           f.zone if f.zone is not None else ks.ZONE_NORMAL) for f in inp.folios]
        k.boot(memblocks, fixed_folios=folios, optimize=False)
        # HVO per folio: those marked optimized were allocated while it was on
        # (vm.hugetlb_optimize_vmemmap), the others while it was off
        for f, want in zip(k.folios, inp.folios):
            k.hvo_enabled = want.optimized
            k.hugetlb_vmemmap_optimize(f)
        k.hvo_enabled = True
        # memory hot-added: memmap_on_memory blocks, and the rest
        for hb in hosted:
            size = (hb.end_pfn - hb.start_pfn) << 12
            ok = k.add_memory(nid_of(hb.start_pfn), hb.start_pfn << 12, size, memmap_on_memory=True, block_size=size)
            assert ok, "memmap_on_memory hot-add failed"
            got = k.blocks[-1]
            assert (got.altmap.base_pfn, got.altmap.reserve, got.altmap.free) == \
                (hb.altmap.base_pfn, hb.altmap.reserve, hb.altmap.free), "the inputs' altmap is not the kernel's"
        hosted_ranges = [(hb.start_pfn << 12, hb.end_pfn << 12) for hb in hosted]
        for a, b in _subtract(_subtract(_merge(inp.ram), boot), _merge(hosted_ranges)):
            for nid, x, y in split_by_node(a, b):
                aligned = x % (1 << 27) == 0 and y % (1 << 27) == 0
                if aligned:
                    assert k.add_memory(nid, x, y - x)
                else:  # a sub-section hot-add (arch_add_memory() of a driver's range)
                    assert k._add_pages(nid, x >> 12, (y - x) >> 12, None)
                    k.resources.append((x, y))
                    k._grow_node(nid, x >> 12, y >> 12)
                    for nr in range(x >> 27, ((y - 1) >> 27) + 1):  # its memory blocks onlined
                        k.online_pages(nr << 15, 1 << 15)
        for a, b in inp.offline_blocks:
            k.offline_pages(a, b - a)
        for dm in inp.device_maps or ():
            am = None if dm.altmap is None else ks.Altmap(dm.altmap.base_pfn, dm.altmap.reserve, dm.altmap.free)
            dev = ks.Device(list(dm.ranges), dm.vmemmap_shift, am, nid_of(dm.ranges[0][0] >> 12),
                            dm.type or "MEMORY_DEVICE_GENERIC")
            assert k.memremap_pages(dev), "memremap_pages failed"
        lay.mem_section_addr = k.write_mem_section()
        lay.pgtable_root = k.root
        self.mem = k.mem
        self.tables = _SimTables(k)
        self.leaves = k.entries  # vaddr -> (size, entry address), live

    @property
    def present_sections(self):
        """The numbers of the sections the simulated kernel marked present."""
        from tests import kernelsim as ks

        return sorted(nr for nr, ms in self.sim.sections.items() if ms[0] & ks.SECTION_MARKED_PRESENT)

    def alloc(self, size: int, nid) -> int:
        """A free block of node ``nid`` (for tests that remap a leaf somewhere else)."""
        p = self.sim.alloc.alloc(nid or 0, size)
        assert p is not None
        return p


def _merge(iv):
    out = []
    for a, b in sorted(i for i in iv if i[1] > i[0]):
        if out and a <= out[-1][1]:
            out[-1][1] = max(out[-1][1], b)
        else:
            out.append([a, b])
    return [(a, b) for a, b in out]


def _subtract(a, b):
    out = []
    for s, e in a:
        cur = [(s, e)]
        for x, y in b:
            cur = [(p, min(q, x)) for p, q in cur if p < x] + [(max(p, y), q) for p, q in cur if q > y]
        out += [(p, q) for p, q in cur if q > p]
    return sorted(out)


def backing_range(nid: int):
    """Physical [start, end) of node ``nid``'s vmemmap backing RAM."""
    start = BACKING_BASE + nid * BACKING_SIZE
    return start, start + BACKING_SIZE


def with_backing_ram(ram, nr_nodes: int = 1):
    """The RAM list plus the ranges the synthetic vmemmap is backed from."""
    return sorted(list(ram) + [backing_range(n) for n in range(nr_nodes)])


# -- arm64 translation tables ------------------------------------------------------------------

# Descriptor values the kernel writes (arch/arm64/include/asm/pgtable-prot.h, 7.2):
# PAGE_KERNEL = PROT_NORMAL | PTE_DIRTY = VALID|PAGE(bit 1)|AF|SH|PXN|UXN|WRITE(DBM)|DIRTY(55),
# AttrIndx MT_NORMAL (0)
ARM64_PAGE_KERNEL = 0x00E8000000000703
# PAGE_KERNEL_RO = (PROT_NORMAL & ~PTE_WRITE) | PTE_RDONLY | PTE_DIRTY
ARM64_PAGE_KERNEL_RO = 0x00E0000000000783
# pmd_set_huge(PAGE_KERNEL): bits[1:0] = 01 (mk_pmd_sect_prot)
ARM64_SECT_KERNEL = 0x00E8000000000701
# pmd/pud/p4d/pgd_populate for init_mm: TYPE_TABLE | TABLE_AF | TABLE_UXN (asm/pgalloc.h)
ARM64_TABLE = 0x1000000000000403
ARM64_SH = 0x300  # SH bits: 0 in kernel entries when LPA2 is on (PTE_MAYBE_SHARED)
ARM64_CONT = 1 << 52
ARM64_RDONLY = 1 << 7
ARM64_DBM = 1 << 51


class Arm64Spec:
    """The geometry of arm64 kernel translation tables, worked out here from the kernel's
    definitions (arch/arm64/include/asm/pgtable-hwdef.h), not from the product's paging
    format: ``ARM64_HW_PGTABLE_LEVELS(va) = (va - 4) / (PAGE_SHIFT - 3)``,
    ``ARM64_HW_PGTABLE_LEVEL_SHIFT(n) = (PAGE_SHIFT - 3) * (4 - n) + 3``, PTRS_PER_PGD
    ``1 << (va - PGDIR_SHIFT)``; LPA2 by default for 4K/16K pages with 52-bit PA."""

    def __init__(self, page_size: int, va_bits: int, pa_bits: int = 48, lpa2=None) -> None:
        self.page_size = page_size
        self.page_shift = page_size.bit_length() - 1
        self.va_bits, self.pa_bits = va_bits, pa_bits
        self.lpa2 = (page_size != 65536 and pa_bits == 52) if lpa2 is None else bool(lpa2)
        stride = self.page_shift - 3
        levels = (va_bits - 4) // stride
        self.shifts = tuple(stride * (4 - n) + 3 for n in range(4 - levels, 4))
        self.entries = (1 << (va_bits - self.shifts[0]),) + (1 << stride,) * (levels - 1)

    def output_address(self, entry: int) -> int:
        """__pte_to_phys() for each encoding (asm/pgtable.h)."""
        ps = self.page_shift
        if self.lpa2:  # PA[49:PAGE_SHIFT] in place, PA[51:50] in bits [9:8]
            return (entry & (((1 << 50) - 1) & ~((1 << ps) - 1))) | ((entry >> 8) & 3) << 50
        if self.page_size == 65536 and self.pa_bits == 52:  # PA[51:48] in bits [15:12]
            return (entry & (((1 << 48) - 1) & ~0xFFFF)) | ((entry >> 12) & 0xF) << 48
        return entry & (((1 << 48) - 1) & ~((1 << ps) - 1))


class Arm64Tables:
    """Builds arm64 kernel translation tables for an :class:`Arm64Spec` in a SyntheticMemory."""

    def __init__(self, mem: SyntheticMemory, fmt, table_pool: int = 0x100000) -> None:
        self.mem = mem
        self.fmt = fmt
        self.page_size = fmt.page_size
        self.next_table = table_pool
        self.root = self.alloc()

    def alloc(self) -> int:
        phys = self.next_table
        self.next_table += self.page_size
        self.mem.write(phys, bytes(self.page_size))
        return phys

    def encode(self, phys: int) -> int:
        """__phys_to_pte_val (6.1 form: PA[49:48] not mirrored with 64K pages)."""
        f = self.fmt
        low = phys & (((1 << 50) - 1) & ~(self.page_size - 1))
        if f.lpa2:
            return (low & ((1 << 50) - 1)) | ((phys >> 50) & 3) << 8
        if f.page_size == 65536 and f.pa_bits == 52:
            return (low & ((1 << 48) - 1)) | ((phys >> 48) & 0xF) << 12
        return low

    def entry_addr(self, table: int, va: int, depth: int) -> int:
        return table + ((va >> self.fmt.shifts[depth]) & (self.fmt.entries[depth] - 1)) * 8

    def get(self, addr: int) -> int:
        return struct.unpack("<Q", self.mem.read(addr, 8, True))[0]

    def next_of(self, entry: int) -> int:
        return self.fmt.output_address(entry)

    def map(self, va: int, phys: int, size: int, flags: int = None) -> int:
        """Map one page or block of ``size``; returns the entry's physical address."""
        depth = self.fmt.shifts.index(size.bit_length() - 1)
        last = depth == len(self.fmt.shifts) - 1
        if flags is None:
            flags = ARM64_PAGE_KERNEL if last else ARM64_SECT_KERNEL
            if self.fmt.lpa2:
                flags &= ~ARM64_SH
        table = self.root
        for d in range(depth):
            addr = self.entry_addr(table, va, d)
            e = self.get(addr)
            if not e:
                nt = self.alloc()
                self.mem.write_u64(addr, self.encode(nt) | ARM64_TABLE)
                table = nt
            else:
                table = self.next_of(e)
        addr = self.entry_addr(table, va, depth)
        self.mem.write_u64(addr, self.encode(phys) | flags)
        return addr

    def entry_of(self, va: int, depth: int) -> int:
        """Physical address of the entry for ``va`` at ``depth`` (tables must exist)."""
        table = self.root
        for d in range(depth):
            table = self.next_of(self.get(self.entry_addr(table, va, d)))
        return self.entry_addr(table, va, depth)
