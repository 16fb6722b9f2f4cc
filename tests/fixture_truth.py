"""Independent truth about a fixture dump, read with nothing from inspect_vmemmap: its own
ELF reader, the VMCOREINFO note's text, the naive page-table walks of tests/naivewalk.py
(x86_64 4/5-level, arm64 from the Arm ARM's VMSAv8-64 descriptors) and the mem_section
encoding with the kernel's own bit numbers (include/linux/mmzone.h, enum SECTION_*_BIT;
SECTION_IS_VMEMMAP_PREINIT_BIT 5 where 7.2 configures it).

``scripts/fixture-truth`` writes it beside the tool's JSON as fixtures/NAME.truth.json;
tests/dumps/test_fixtures.py compares the tool with it.
"""

from __future__ import annotations

import struct
from collections import Counter
from typing import Dict, List, Tuple

from tests import naivewalk as nw

START_KERNEL_MAP = 0xFFFFFFFF80000000
ADDR = nw.X86_ADDR
FLAG_BITS = ["present", "has_mem_map", "online", "early", "zone_device", "vmemmap_preinit"]


class Dump:
    def __init__(self, data: bytes) -> None:
        self.data = data
        assert data[:4] == b"\x7fELF" and data[4] == 2
        phoff, = struct.unpack_from("<Q", data, 32)
        phentsize, phnum = struct.unpack_from("<HH", data, 54)
        self.loads: List[Tuple[int, int, int]] = []
        self.info: Dict[str, str] = {}
        for i in range(phnum):
            p_type, _, off, _, pa, filesz, _, _ = struct.unpack_from("<IIQQQQQQ", data, phoff + i * phentsize)
            if p_type == 1:
                self.loads.append((pa, filesz, off))
            elif p_type == 4:
                self._notes(data[off:off + filesz])
        self.loads.sort()

    def _notes(self, blob: bytes) -> None:
        pos = 0
        while pos + 12 <= len(blob):
            namesz, descsz, _ = struct.unpack_from("<III", blob, pos)
            name = blob[pos + 12:pos + 12 + namesz].rstrip(b"\0")
            desc_at = pos + 12 + (namesz + 3) // 4 * 4
            desc = blob[desc_at:desc_at + descsz]
            if name == b"VMCOREINFO":
                for line in desc.decode(errors="replace").splitlines():
                    k, sep, v = line.partition("=")
                    if sep:
                        self.info[k] = v
            pos = desc_at + (descsz + 3) // 4 * 4

    def phys(self, addr: int, n: int) -> bytes:
        for pa, size, off in self.loads:
            if pa <= addr and addr + n <= pa + size:
                return self.data[off + addr - pa:off + addr - pa + n]
        raise KeyError(hex(addr))

    def u64(self, addr: int) -> int:
        return struct.unpack("<Q", self.phys(addr, 8))[0]

    @property
    def arm64(self) -> bool:
        return "NUMBER(kimage_voffset)" in self.info

    # -- arm64 paging (TTBR1) -----------------------------------------------------------

    def _a64(self) -> nw.Arm64Geometry:
        return nw.arm64_geometry(int(self.info["PAGESIZE"]).bit_length() - 1,
                                 int(self.info["NUMBER(TCR_EL1_T1SZ)"], 0),
                                 int(self.info["NUMBER(MAX_PHYSMEM_BITS)"]))

    def _a64_leaves(self, start: int, end: int):
        root = (int(self.info["SYMBOL(swapper_pg_dir)"], 16) - int(self.info["NUMBER(kimage_voffset)"], 0)) % (1 << 64)
        return nw.arm64_leaves(self.u64, root, self._a64(), start, end)

    # -- x86_64 paging ------------------------------------------------------------------

    @property
    def levels(self) -> int:
        return 5 if int(self.info.get("NUMBER(pgtable_l5_enabled)", "0")) else 4

    @property
    def shifts(self) -> List[int]:
        return nw.x86_shifts(self.levels)

    @property
    def root(self) -> int:
        phys_base = int(self.info["NUMBER(phys_base)"]) % (1 << 64)
        return (int(self.info["SYMBOL(init_top_pgt)"], 16) - START_KERNEL_MAP + phys_base) % (1 << 64)

    def translate(self, va: int) -> int:
        if self.arm64:
            (leaf,) = [(v, size, p) for v, size, p, _ in self._a64_leaves(va, va + 1)] or [None]
            assert leaf is not None, f"{va:#x} not mapped"
            return leaf[2] + va - leaf[0]
        table = self.root
        for depth, shift in enumerate(self.shifts):
            e = self.u64(table + ((va >> shift) & 511) * 8)
            assert e & 1, f"{va:#x} not mapped"
            if depth == len(self.shifts) - 1 or (e & 0x80 and depth >= len(self.shifts) - 3):
                size = 1 << shift
                return (e & ADDR & ~(size - 1)) + va % size
            table = e & ADDR
        raise AssertionError("unreachable")

    def leaves(self, start: int, end: int) -> List[Tuple[int, int, int, bool]]:
        if self.arm64:
            return self._a64_leaves(start, end)
        return nw.x86_leaves(self.u64, self.root, self.levels, start, end)

    # -- sparsemem ----------------------------------------------------------------------

    def sections(self) -> Dict[int, Tuple[List[str], int]]:
        """nr -> (flag names, coded mem_map) of every present section."""
        size = int(self.info["SIZE(mem_section)"])
        per_root = 4096 // size
        roots_va = int(self.info["SYMBOL(mem_section)"], 16)
        out = {}
        for r in range(int(self.info["LENGTH(mem_section)"])):
            root = self.u64(self.translate(roots_va + 8 * r))
            if not root:
                continue
            for k in range(per_root):
                smm = self.u64(self.translate(root + k * size))
                if smm & 1:
                    names = [n for b, n in enumerate(FLAG_BITS) if smm & (1 << b)]
                    out[r * per_root + k] = (names, smm & ~((1 << len(FLAG_BITS)) - 1))
        return out


def truth(data: bytes) -> dict:
    d = Dump(data)
    secs = d.sections()
    # VMCOREINFO's SYMBOL(vmemmap) (6.12+); 6.1 has none, and then the one value every
    # section's coded mem_map has (sparse_init_one_section(): mem_map - section start pfn,
    # which with SPARSEMEM_VMEMMAP is vmemmap itself)
    coded = {c for _, c in secs.values()}
    base = int(d.info["SYMBOL(vmemmap)"], 16) if "SYMBOL(vmemmap)" in d.info else coded.pop()
    assert "SYMBOL(vmemmap)" in d.info or not coded, "sections with different coded mem_maps"
    shift = int(d.info["NUMBER(SECTION_SIZE_BITS)"]) - (int(d.info["PAGESIZE"]).bit_length() - 1)
    spg = int(d.info["SIZE(page)"])
    first, last = min(secs), max(secs)
    start, end = base + (first << shift) * spg, base + ((last + 1) << shift) * spg
    leaves = d.leaves(start, end)
    labels = {4096: "4K", 1 << 14: "16K", 1 << 16: "64K", 1 << 21: "2M", 1 << 25: "32M", 1 << 29: "512M",
              1 << 30: "1G"}
    pmd_shift = 2 * (int(d.info["PAGESIZE"]).bit_length() - 1) - 3
    page = int(d.info["PAGESIZE"])
    return {
        "source": "tests/fixture_truth.py: the dump's VMCOREINFO, mem_section and page tables read without the tool",
        "kernel_release": d.info.get("OSRELEASE"),
        "sections": {str(nr): {"flags": names, "coded_mem_map": hex(coded)} for nr, (names, coded) in sorted(secs.items())},
        "walked": [hex(start), hex(end)],
        "leaves": dict(sorted(Counter(labels[s] for _, s, _, _ in leaves).items())),
        # a PMD's worth of vmemmap in base pages where it could be one block: only with 4K
        # pages (arm64 16K/64K vmemmap_populate() always takes base pages)
        "split_pmds": len({va >> pmd_shift for va, s, _, _ in leaves if s == page}) if page == 4096 else 0,
        "readonly_ptes": sum(1 for *_, w in leaves if not w),
        "bytes_mapped": sum(s for _, s, _, _ in leaves),
    }
