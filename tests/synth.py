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


# -- a whole synthetic kernel, built by the kernel's rules from model inputs ------------------

BACKING_BASE = 0x40_0000_0000  # 256 GiB: RAM ranges, one per node, that back the vmemmap
BACKING_SIZE = 1 << 30


class SynthKernel:
    """Sections and vmemmap page tables for :class:`inspect_vmemmap.model.Inputs`,
    populated the way x86_64 does it (PMD blocks for whole sections, base pages for
    sub-sections, HVO splitting the PMD and remapping tails read-only, ZONE_DEVICE
    compound pages with their tail vmemmap pages on one shared page, altmap-backed
    vmemmap of memmap_on_memory blocks and devices on the memory itself)."""

    def __init__(self, inputs, shared_tails: bool = False) -> None:
        from inspect_vmemmap.model import predict

        self.inputs = inputs
        lay = self.layout = inputs.layout
        self.mem = SyntheticMemory()
        self.tables = X86Tables(self.mem, lay.pgtable_levels)
        lay.pgtable_root = self.tables.root
        self._next = {}
        self.pred = predict(inputs)
        flags = {}
        for nr, sp in self.pred.sections.items():
            f = 0x3 | (0x4 if sp.online else 0) | (0x8 if sp.early else 0) | (0x10 if sp.zone_device else 0)
            bits = 0
            for a, b in sp.valid:
                for k in range((a - nr * lay.pages_per_section) // lay.pages_per_subsection,
                               (b - nr * lay.pages_per_section) // lay.pages_per_subsection):
                    bits |= 1 << k
            flags[nr] = (f, bits)
        build_sections(self.mem, lay, flags)
        self.leaves = {}  # vaddr -> (size, entry address)
        # vmemmap_populate_compound_pages(): own pages but where a run maps its target's page
        special = []
        for d in self.pred.device:
            if not d.dedup:
                continue
            tails = {}
            for a, b, t in d.runs():
                for v in range(a, b, 4096):
                    tails[v] = t
            for ra, rb in d.map.ranges:
                va, end = lay.pfn_to_page(ra >> 12), lay.pfn_to_page(rb >> 12)
                special.append((va, end))
                for v in range(va, end, 4096):
                    phys = (self.tables.get(self.leaves[tails[v]][1]) & 0x000FFFFFFFFFF000) if v in tails \
                        else self.alloc(4096, 0)
                    self.leaves[v] = (4096, self.tables.map(v, phys, 4096))
        # altmap allocations: where the model says, in the block sizes it says
        for h in self.pred.hosted:
            special.append((h.start, h.end))
            size = 1 << 21 if (h.end - h.start) % (1 << 21) == 0 and h.start % (1 << 21) == 0 else 4096
            for v in range(h.start, h.end, size):
                self.leaves[v] = (size, self.tables.map(v, h.phys + (v - h.start), size))
        for nr, sp in sorted(self.pred.sections.items()):
            for a, b in sp.valid:
                va, end = lay.pfn_to_page(a), lay.pfn_to_page(b)
                rest = [(va, end)]
                for x, y in special:
                    rest = [(p, min(q, x)) for p, q in rest if p < x] + [(max(p, y), q) for p, q in rest if q > y]
                for va, end in rest:
                    if end > va:
                        self._populate(va, end, sp.nid)
        shared = {}
        for h in self.pred.hvo:
            self.split(h.start)
            pages = [self.tables.get(self.leaves[h.start + k * 4096][1]) & 0x000FFFFFFFFFF000 for k in range(h.pages)]
            if h.tail_target == "head":
                target = pages[0]
            else:
                key = (h.folio.nid, h.folio.zone, h.folio.order)
                target = shared.setdefault(key, self.alloc(4096, h.folio.nid))
            for k in range(1, h.pages):
                self.tables.map(h.start + k * 4096, target, 4096, PAGE_KERNEL_RO)

    def _populate(self, va: int, end: int, nid) -> None:
        """PMD blocks for whole PMDs of a range that starts on one, base pages for the rest."""
        v = va // 4096 * 4096
        if va % (1 << 21) == 0:
            while end - v >= 1 << 21:
                self.leaves[v] = (1 << 21, self.tables.map(v, self.alloc(1 << 21, nid), 1 << 21))
                v += 1 << 21
        for v in range(v, end, 4096):
            self.leaves[v] = (4096, self.tables.map(v, self.alloc(4096, nid), 4096))

    def alloc(self, size: int, nid) -> int:
        """Backing from node ``nid``'s backing range (vmemmap_alloc_block_buf on the node)."""
        nid = nid or 0
        base = backing_range(nid)[0]
        nxt = self._next.get(nid, base)
        nxt = (nxt + size - 1) // size * size
        self._next[nid] = nxt + size
        assert nxt + size <= base + BACKING_SIZE
        return nxt

    def split(self, va: int) -> None:
        """vmemmap_split_pmd(): the PMD leaf over ``va`` becomes 512 PTEs to the same pages."""
        base = va & ~((1 << 21) - 1)
        if base not in self.leaves or self.leaves[base][0] != 1 << 21:
            return
        _, addr = self.leaves.pop(base)
        phys = self.tables.get(addr) & 0x000FFFFFFFE00000
        self.mem.write_u64(addr, 0)
        for k in range(512):
            self.leaves[base + k * 4096] = (4096, self.tables.map(base + k * 4096, phys + k * 4096, 4096))


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


class Arm64Tables:
    """Builds arm64 kernel translation tables for an :class:`Arm64Paging` in a SyntheticMemory."""

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
        return table + ((va >> self.fmt.shifts[depth]) & (self.fmt.table_entries(depth) - 1)) * 8

    def get(self, addr: int) -> int:
        return struct.unpack("<Q", self.mem.read(addr, 8, True))[0]

    def next_of(self, entry: int) -> int:
        return self.fmt.output_address(entry)[0]

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
