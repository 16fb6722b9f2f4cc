"""riscv64 (issue 19) without a kernel: the layout rules from real VMCOREINFO values, the
address space lent to drgn, the model's riscv64 rules, and the QMP pieces for guests
without a vmcoreinfo device.

The VMCOREINFO values are those of Debian's 6.12.117+deb13-riscv64 booted by the lab under
``qemu-system-riscv64 -M virt -cpu rv64`` in Sv57, and with ``no5lvl`` and ``no4lvl``.
"""

from __future__ import annotations

import struct

import pytest

from inspect_vmemmap.arch import KernelLookup, get
from inspect_vmemmap.errors import AnalysisError
from inspect_vmemmap.memory import FaultError
from inspect_vmemmap.source.qemu import ram_ranges
from inspect_vmemmap.source.vmcoreinfo import VmcoreInfo, find_vmcoreinfo_in_ram

_COMMON = {"PAGESIZE": "4096", "SIZE(page)": "64", "NUMBER(SECTION_SIZE_BITS)": "27",
           "NUMBER(MAX_PHYSMEM_BITS)": "56", "SYMBOL(swapper_pg_dir)": "ffffffff81dcb000",
           "NUMBER(phys_ram_base)": "2147483648", "NUMBER(KERNEL_LINK_ADDR)": "0xffffffff80000000",
           "NUMBER(va_kernel_pa_offset)": "0xfffffffeffe00000"}

#: mode -> (VMCOREINFO entries, levels, SYMBOL(vmemmap), SYMBOL(mem_section))
REAL = {
    "sv57": ({"NUMBER(PAGE_OFFSET)": "0xff60000000000000", "NUMBER(VA_BITS)": "57",
              "NUMBER(VMEMMAP_START)": "0xff1c000000000000", "NUMBER(VMEMMAP_END)": "0xff20000000000000"},
             5, 0xFF1BFFFFFE000000, 0xFF6000003DC00000),
    "sv48": ({"NUMBER(PAGE_OFFSET)": "0xffffaf8000000000", "NUMBER(VA_BITS)": "48",
              "NUMBER(VMEMMAP_START)": "0xffff8d8000000000", "NUMBER(VMEMMAP_END)": "0xffff8f8000000000"},
             4, 0xFFFF8D7FFE000000, 0xFFFFAF803DC00000),
    "sv39": ({"NUMBER(PAGE_OFFSET)": "0xffffffd600000000", "NUMBER(VA_BITS)": "39",
              "NUMBER(VMEMMAP_START)": "0xffffffc500000000", "NUMBER(VMEMMAP_END)": "0xffffffc600000000"},
             3, 0xFFFFFFC4FE000000, 0xFFFFFFD63DC00000),
}


class Symbols(KernelLookup):
    def __init__(self, names, values=None):
        self.names = names
        self.values = values or {}

    def symbol(self, name):
        return self.names.get(name)

    def value(self, name):
        return self.values.get(name)


class Word:
    """Memory holding one u64 at one address."""

    def __init__(self, address, value):
        self.address, self.value = address, value

    def read(self, address, size, physical=False):
        if address != self.address or physical:
            raise FaultError(address, physical, "unmapped")
        return struct.pack("<Q", self.value)


def info(mode, **extra):
    return VmcoreInfo({**_COMMON, **REAL[mode][0], **extra})


@pytest.mark.parametrize("mode", sorted(REAL))
def test_layout_fields_from_real_vmcoreinfo(mode):
    arch = get("riscv64")
    _, levels, vmemmap, mem_section = REAL[mode]
    notes = {}
    f = arch.layout_fields(info(mode), 4096, KernelLookup(), None, notes)
    assert f["pgtable_levels"] == levels and f["va_bits"] == int(REAL[mode][0]["NUMBER(VA_BITS)"])
    assert f["max_physmem_bits"] == 56
    # satp's swapper_pg_dir: SYMBOL(swapper_pg_dir) - va_kernel_pa_offset (the same image in every mode)
    assert f["pgtable_root"] == 0xFFFFFFFF81DCB000 - 0xFFFFFFFEFFE00000 == 0x81FCB000
    assert f["vmemmap_region_start"] == int(REAL[mode][0]["NUMBER(VMEMMAP_START)"], 16)
    assert f["vmemmap_region_end"] == int(REAL[mode][0]["NUMBER(VMEMMAP_END)"], 16)
    assert f"Sv{f['va_bits']}" in notes["va_bits"]
    # without SYMBOL(vmemmap): VMEMMAP_START - vmemmap_start_pfn struct pages, the variable
    # read at its kallsyms address (6.12: 0x80000, RAM at 2 GiB rounded down to a section)
    syms = Symbols({"vmemmap_start_pfn": 0xFFFFFFFF81D00000, "swapper_pg_dir": 1})
    base, where = arch.vmemmap_base(info(mode), syms, Word(0xFFFFFFFF81D00000, 0x80000), f)
    assert base == vmemmap and "vmemmap_start_pfn (kallsyms)" in where
    # or from DWARF (7.2: 0, rounded down to MAX_FOLIO_VMEMMAP_ALIGN's 16 GiB)
    base, where = arch.vmemmap_base(info(mode), Symbols({}, {"vmemmap_start_pfn": 0}), None, f)
    assert base == int(REAL[mode][0]["NUMBER(VMEMMAP_START)"], 16) and "debug info" in where
    # a kernel without that variable had pfn 0 at VMEMMAP_START
    base, _ = arch.vmemmap_base(info(mode), Symbols({"swapper_pg_dir": 1}), None, f)
    assert base == int(REAL[mode][0]["NUMBER(VMEMMAP_START)"], 16)
    # no symbols at all: not decided here (decoded from the sections)
    assert arch.vmemmap_base(info(mode), KernelLookup(), None, f) == (None, "")
    # SPARSEMEM_EXTREME roots in the linear map, below the kernel image
    assert arch.mem_section_is_root_array(info(mode), mem_section)
    assert not arch.mem_section_is_root_array(info(mode), 0xFFFFFFFF81D00000)


def test_impossible_configurations_are_one_line_reasons():
    arch = get("riscv64")
    with pytest.raises(AnalysisError, match="not Sv39, Sv48 or Sv57"):
        arch.layout_fields(info("sv39", **{"NUMBER(VA_BITS)": "42"}), 4096, KernelLookup(), None, {})
    with pytest.raises(AnalysisError, match="4K only"):
        arch.layout_fields(info("sv39"), 16384, KernelLookup(), None, {})
    entries = {k: v for k, v in {**_COMMON, **REAL["sv39"][0]}.items() if k != "NUMBER(VA_BITS)"}
    with pytest.raises(AnalysisError, match="VA_BITS"):
        arch.layout_fields(VmcoreInfo(entries), 4096, KernelLookup(), None, {})


def test_population_rules():
    """vmemmap_populate() is vmemmap_populate_hugepages() for every range (arch/riscv/mm/
    init.c); PMD blocks from an altmap; HVO and DAX dedup exist; HVO tails stay writable."""
    from inspect_vmemmap.layout import KernelLayout

    arch = get("riscv64")
    lay = KernelLayout(arch="riscv64", page_size=4096, pgtable_levels=3, vmemmap_base=REAL["sv39"][2],
                       struct_page_size=64, section_size_bits=27, max_physmem_bits=56, section_flags={},
                       section_map_last_bit=5, mem_section_addr=0, sparsemem_extreme=True, nr_section_roots=1,
                       sections_per_root=1, mem_section_size=32)
    assert arch.vmemmap_block(lay, True) == arch.vmemmap_block(lay, False) == 2 << 20
    assert arch.altmap_block(lay, True) == arch.altmap_block(lay, False) == 2 << 20
    assert arch.hugetlb_vmemmap_optimize and arch.dax_vmemmap_optimize
    assert not arch.hvo_tails_readonly and get("x86_64").hvo_tails_readonly
    fmt = arch.paging(lay)
    assert fmt.levels == 3 and fmt.names == ("pgd", "pmd", "pte") and fmt.pmd_blocks(lay)


def test_kernel_address_space_translations():
    """The linear map (pa + PAGE_OFFSET - phys_ram_base), the kernel image (va -
    va_kernel_pa_offset) and, for the rest, a walk of swapper_pg_dir."""
    ram = {}

    def read_phys(address, size):
        out = b""
        for a in range(address, address + size):
            if a >> 12 not in ram:
                raise FaultError(a, True, "no RAM")
            out += bytes([ram[a >> 12][a & 0xFFF]])
        return out

    def page(phys, data=b""):
        ram[phys >> 12] = bytearray(data.ljust(4096, b"\0"))
        return ram[phys >> 12]

    root = 0x81FCB000
    page(root)
    pmd = page(0x80100000)
    pte = page(0x80101000)
    # the vmemmap's first struct pages (Sv39: VMEMMAP_START 0xffffffc500000000) at 0x80200000
    vmem = 0xFFFFFFC500000000
    i, j = ((vmem >> 30) & 511) * 8, ((vmem >> 21) & 511) * 8
    ram[root >> 12][i:i + 8] = struct.pack("<Q", (0x80100000 >> 12) << 10 | 1)
    pmd[j:j + 8] = struct.pack("<Q", (0x80101000 >> 12) << 10 | 1)
    pte[0:8] = struct.pack("<Q", (0x80200000 >> 12) << 10 | 0xC7)  # V R W A D
    page(0x80200000, b"struct page")
    page(0x80000000, b"linear")
    page(0x81FFF000, b"kernel image")  # 0xffffffff81dff000 - va_kernel_pa_offset
    segments = get("riscv64").kernel_address_space(info("sv39"), read_phys, static=True)
    assert len(segments) == 3

    def read(va, n):
        for start, size, fn in reversed(segments):  # later ones take precedence
            if start <= va < start + size:
                return fn(va, n)
        raise AssertionError(f"{va:#x} in no segment")

    assert read(0xFFFFFFD600000000, 6) == b"linear"
    assert read(0xFFFFFFFF81DFF000, 12) == b"kernel image"
    assert read(vmem, 11) == b"struct page"
    with pytest.raises(FaultError, match="not mapped"):
        read(vmem + (4 << 20), 8)
    # x86_64 and arm64: drgn translates itself
    assert get("x86_64").kernel_address_space(info("sv39"), read_phys) == []


MTREE = """FlatView #0
 AS "I/O", root: io
 Root memory region: io
  0000000000000000-000000000000ffff (prio 0, i/o): io

FlatView #1
 AS "memory", root: system
 AS "cpu-memory-0", root: system
 Root memory region: system
  0000000000001000-000000000000ffff (prio 0, rom): riscv_virt_board.mrom
  0000000010000000-0000000010000007 (prio 0, i/o): serial
  0000000080000000-00000000bfffffff (prio 0, ram): riscv_virt_board.ram
  0000000100000000-000000013fffffff (prio 0, ram): ivm-hp-mem0

FlatView #2
 AS "virtio-pci", root: bus master container
  0000000080000000-00000000bfffffff (prio 0, ram): riscv_virt_board.ram
"""


def test_guest_ram_from_info_mtree():
    assert ram_ranges(MTREE) == [(0x80000000, 0xC0000000), (0x100000000, 0x140000000)]


def test_vmcoreinfo_found_in_ram():
    text = b"OSRELEASE=6.12.117+deb13-riscv64\nPAGESIZE=4096\nSYMBOL(swapper_pg_dir)=ffffffff81dcb000\n"
    mem = bytearray(4 << 20)
    mem[0x1000:0x1010] = b"OSRELEASE=noise\0"  # a stray copy without the rest
    at = (1 << 20) - 20  # across a chunk boundary
    mem[at:at + len(text) + 1] = text + b"\0"

    def read(address, size):
        off = address - 0x80000000
        return bytes(mem[off:off + size])

    assert find_vmcoreinfo_in_ram(read, [(0x80000000, 0x80000000 + len(mem))]) == text
    assert find_vmcoreinfo_in_ram(read, [(0x80000000, 0x80002000)]) is None
