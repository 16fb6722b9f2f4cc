"""arm64 (issue 6) without a kernel: the layout decision from real VMCOREINFO values, the
paging format it selects, the model's arm64 rules, and the lab's arm64 pieces.

The VMCOREINFO values are those of Debian kernels booted by the lab under
``qemu-system-aarch64 -M virt -cpu max`` (with and without ``lpa2=off``).
"""

from __future__ import annotations

import gzip

import pytest

from inspect_vmemmap.analysis import paging_format
from inspect_vmemmap.layout import KernelLayout
from inspect_vmemmap.model import Folio, Inputs, hvo_supported, predict
from inspect_vmemmap.pgtable.arm64 import Arm64Paging
from inspect_vmemmap.arch import KernelLookup, get
from inspect_vmemmap.source.vmcoreinfo import VmcoreInfo

_COMMON = {"NUMBER(VMEMMAP_END)": "0xffffffffc0000000", "SIZE(page)": "64", "NUMBER(VA_BITS)": "52"}

#: name -> (VMCOREINFO entries, expected: va_bits, levels, lpa2, root, region start)
REAL = {
    # 6.12.117+deb13-arm64 on the LPA2 CPU: 52-bit VA, 5 levels
    "6.12-4k-lpa2": ({
        "PAGESIZE": "4096", "NUMBER(MAX_PHYSMEM_BITS)": "52", "NUMBER(PHYS_OFFSET)": "0x40000000",
        "NUMBER(TCR_EL1_T1SZ)": "0xc", "NUMBER(VMEMMAP_START)": "0xffffc1ffc0000000",
        "NUMBER(kimage_voffset)": "0xffffab7dd9200000", "SYMBOL(swapper_pg_dir)": "ffffab7e1b128000",
        "SYMBOL(vmemmap)": "ffffc1ffbf000000"},
        (52, 5, True, 0x41F28000, 0xFFFFC1FFC0000000)),
    # the same kernel with -cpu max,lpa2=off: 48-bit VA, memstart_addr wrapped negative
    "6.12-4k-va48": ({
        "PAGESIZE": "4096", "NUMBER(MAX_PHYSMEM_BITS)": "48", "NUMBER(PHYS_OFFSET)": "0xfff1000040000000",
        "NUMBER(TCR_EL1_T1SZ)": "0x10", "NUMBER(VMEMMAP_START)": "0xffffc1ffc0000000",
        "NUMBER(kimage_voffset)": "0xffffb5d289c00000", "SYMBOL(swapper_pg_dir)": "ffffb5d2cbb28000",
        "SYMBOL(vmemmap)": "fffffdffbf000000"},
        (48, 4, False, 0x41F28000, 0xFFFFFDFFC0000000)),
    # 6.12.117+deb13-arm64-16k on the LPA2 CPU: 52-bit VA, 4 levels
    "6.12-16k-lpa2": ({
        "PAGESIZE": "16384", "NUMBER(MAX_PHYSMEM_BITS)": "52", "NUMBER(PHYS_OFFSET)": "0x40000000",
        "NUMBER(TCR_EL1_T1SZ)": "0xc", "NUMBER(VMEMMAP_START)": "0xfffff03fc0000000",
        "NUMBER(kimage_voffset)": "0xffffe08a24000000", "SYMBOL(swapper_pg_dir)": "ffffe08a65f64000",
        "SYMBOL(vmemmap)": "fffff03fbfc00000"},
        (52, 4, True, 0x41F64000, 0xFFFFF03FC0000000)),
    # ... with lpa2=off: 47-bit VA, 3 levels
    "6.12-16k-va47": ({
        "PAGESIZE": "16384", "NUMBER(MAX_PHYSMEM_BITS)": "48", "NUMBER(PHYS_OFFSET)": "0xfff0800040000000",
        "NUMBER(TCR_EL1_T1SZ)": "0x11", "NUMBER(VMEMMAP_START)": "0xfffff03fc0000000",
        "NUMBER(kimage_voffset)": "0xffffdf5ac4a00000", "SYMBOL(swapper_pg_dir)": "ffffdf5b06964000",
        "SYMBOL(vmemmap)": "ffffffbfbfc00000"},
        (47, 3, False, 0x41F64000, 0xFFFFFFBFC0000000)),
    # 7.2.13+deb14-arm64 with lpa2=off
    "7.2-4k-va48": ({
        "PAGESIZE": "4096", "NUMBER(MAX_PHYSMEM_BITS)": "48", "NUMBER(PHYS_OFFSET)": "0xfff1000040000000",
        "NUMBER(TCR_EL1_T1SZ)": "0x10", "NUMBER(VMEMMAP_START)": "0xffffc1ffc0000000",
        "NUMBER(kimage_voffset)": "0xffffbaeb1d000000", "SYMBOL(swapper_pg_dir)": "ffffbaeb5f703000",
        "SYMBOL(vmemmap)": "fffffdffbf000000"},
        (48, 4, False, 0x42703000, 0xFFFFFDFFC0000000)),
}


@pytest.mark.parametrize("name", sorted(REAL))
def test_layout_from_real_vmcoreinfo(name):
    entries, (va, levels, lpa2, root, region) = REAL[name]
    info = VmcoreInfo({**_COMMON, **entries})
    notes = {}
    arm = get("aarch64").layout_fields(info, int(entries["PAGESIZE"]), KernelLookup(), None, notes)
    vmemmap, _ = get("aarch64").vmemmap_base(info, KernelLookup(), None, arm)
    assert (arm["va_bits"], arm["kernel_va_bits"], arm["pgtable_levels"], arm["lpa2"]) == (va, 52, levels, lpa2)
    assert arm["pgtable_root"] == root
    assert arm["vmemmap_region_start"] == region and arm["vmemmap_region_end"] == 0xFFFFFFFFC0000000
    # the pre-6.12 formula (VMEMMAP_START - memstart_addr's pfn) gives the kernel's own SYMBOL(vmemmap)
    assert vmemmap == info.symbol("vmemmap")
    # the region starts at the struct page of the first byte of RAM (PHYS_OFFSET on the
    # 52-bit CPU; 0x40000000 on virt either way)
    page_shift = int(entries["PAGESIZE"]).bit_length() - 1
    assert arm["vmemmap_region_start"] == info.symbol("vmemmap") + (0x40000000 >> page_shift) * 64
    assert ("vmemmap_region" in notes) == (va < 52)


def _layout(name: str) -> KernelLayout:
    entries, _ = REAL[name]
    info = VmcoreInfo({**_COMMON, **entries})
    page_size = int(entries["PAGESIZE"])
    arm = get("aarch64").layout_fields(info, page_size, KernelLookup(), None, {})
    vmemmap, _ = get("aarch64").vmemmap_base(info, KernelLookup(), None, arm)
    return KernelLayout(
        arch="aarch64", page_size=page_size, pgtable_levels=arm["pgtable_levels"], vmemmap_base=vmemmap,
        struct_page_size=64, section_size_bits=27, max_physmem_bits=arm["max_physmem_bits"],
        section_flags={"PRESENT": 0, "HAS_MEM_MAP": 1, "ONLINE": 2, "EARLY": 3, "ZONE_DEVICE": 4},
        section_map_last_bit=5, mem_section_addr=0xFFFF00003FDDE340, sparsemem_extreme=True,
        nr_section_roots=(1 << (arm["max_physmem_bits"] - 27)) // (page_size // 32),
        sections_per_root=page_size // 32, mem_section_size=32, pgtable_root=arm["pgtable_root"],
        **{k: v for k, v in arm.items() if k not in ("pgtable_levels", "max_physmem_bits", "pgtable_root")})


@pytest.mark.parametrize("name", sorted(REAL))
def test_layout_json_roundtrip_and_paging(name):
    lay = _layout(name)
    again = KernelLayout.from_json(lay.to_json())
    assert again == lay
    assert lay.to_json()["phys_offset"] == hex(lay.phys_offset)
    fmt = paging_format(lay)
    assert isinstance(fmt, Arm64Paging)
    assert (fmt.va_bits, fmt.levels, fmt.lpa2, fmt.pa_bits) == (lay.va_bits, lay.pgtable_levels, lay.lpa2,
                                                                lay.max_physmem_bits)
    # the walked region never reaches below the region (vmalloc) nor above VMEMMAP_END
    assert lay.vmemmap_start == lay.vmemmap_region_start > lay.vmemmap_base
    assert lay.vmemmap_end <= 0xFFFFFFFFC0000000


def test_model_granularity_4k_and_16k():
    # 4K: a whole section's memmap (2 MiB) is one PMD block; 16K: base pages only
    for name, gran in (("6.12-4k-va48", 2 << 20), ("6.12-16k-va47", 16384)):
        lay = _layout(name)
        pps = lay.pages_per_section
        # RAM 1 GiB at 0x40000000 plus a 2 MiB hot-added piece in a later section
        inp = Inputs(layout=lay, ram=[(0x40000000, 0x80000000), (0x90000000, 0x90200000)],
                     boot_ram=[(0x40000000, 0x80000000)], nodes=[(0, 0x40000000 >> lay.page_shift,
                                                                  0x90200000 >> lay.page_shift)])
        pred = predict(inp)
        assert sorted(pred.sections) == list(range(8, 16)) + [18]
        full = [(a, b) for a, b in pred.allowed if b - a >= pps * 64]
        assert full == [(lay.pfn_to_page(8 * pps), lay.pfn_to_page(16 * pps))]
        assert all(a % gran == 0 and b % gran == 0 for a, b in full)
        # the hot-added subsection range is rounded to base pages only
        part = [(a, b) for a, b in pred.allowed if (a, b) not in full]
        assert len(part) == 1 and (part[0][1] - part[0][0]) % lay.page_size == 0
        assert part[0][1] - part[0][0] < pps * 64


def test_no_hvo_on_arm64():
    lay = _layout("6.12-4k-lpa2")
    assert not hvo_supported(lay)
    folio = Folio(head_pfn=0x50000, order=9, optimized=True, nid=0, zone=0)
    inp = Inputs(layout=lay, ram=[(0x40000000, 0x80000000)], nodes=[(0, 0x40000, 0x80000)], folios=[folio])
    (h,) = predict(inp).hvo
    assert h.tail_target == "unsupported"

    from inspect_vmemmap.check import run_check
    from inspect_vmemmap.vmemmap import MappedLeaf
    from inspect_vmemmap.sections import SectionTable

    # every struct page mapped by RW PMD blocks, as the kernel left them
    start, end = lay.pfn_to_page(0x40000), lay.pfn_to_page(0x80000)
    leaves = [MappedLeaf(va, 2 << 20, 0x7E000000 + (va - start), True) for va in range(start, end, 2 << 20)]
    res = run_check(inp, SectionTable(lay), leaves)
    hv = [f for f in res.findings if f.kind == "hvo-inconsistent"]
    assert len(hv) == 1 and hv[0].pfn_start == 0x50000 and "aarch64" in hv[0].message
    assert res.hvo["optimized_folios"] == 0


# -- the lab ---------------------------------------------------------------------------


def test_zboot_unpack_gzip():
    from inspect_vmemmap.lab.debian import parse_zboot_header, unpack_zboot

    image = bytearray(4096)
    image[56:60] = b"ARM\x64"
    payload = gzip.compress(bytes(image))
    head = bytearray(0x100)
    head[0:2] = b"MZ"
    head[4:8] = b"zimg"
    head[8:12] = (0x100).to_bytes(4, "little")
    head[12:16] = len(payload).to_bytes(4, "little")
    head[24:29] = b"gzip\0"
    data = bytes(head) + payload
    assert parse_zboot_header(data) == (0x100, len(payload), "gzip")
    assert unpack_zboot(data) == bytes(image)
    # a plain arm64 Image (Debian's vmlinuz: an EFI-stub Image, "MZ" but no "zimg")
    assert parse_zboot_header(b"MZ@\xfa" + bytes(60)) is None
    assert unpack_zboot(bytes(image)) is None


def test_qemu_argv_aarch64(tmp_path):
    from inspect_vmemmap.lab.arch import ARCHES
    from inspect_vmemmap.lab.guest import GuestSpec, kernel_cmdline, qemu_argv

    info = ARCHES["aarch64"]
    spec = GuestSpec(debian="6.12", arch="aarch64", flavour="arm64-16k", mem="1G", lpa2=False, numa=2)
    argv = qemu_argv(spec, info, "qemu-system-aarch64", tmp_path / "Image", tmp_path / "initrd",
                     tmp_path / "q.sock", tmp_path / "c.sock", tmp_path / "console.log")
    assert argv[argv.index("-cpu") + 1] == "max,pauth-impdef=on,lpa2=off"
    assert argv[argv.index("-machine") + 1] == "virt"
    assert "vmcoreinfo" in argv
    assert kernel_cmdline(spec, info).startswith("console=ttyAMA0")
    assert info.cpu_arg(None, None) == "max,pauth-impdef=on"
    assert "arm64-16k" in info.flavours and info.qemu_package == "qemu-system-arm"
