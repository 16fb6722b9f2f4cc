"""The lab's Debian vmlinux files: their BTF (inspect_vmemmap.btf) against their own DWARF
(through drgn), every named struct, union, enum and typedef.

The kernels come through the lab (inspect_vmemmap.lab.fetch_debian_kernel: the current
release of each series, resolved by apt, in the cache INSPECT_VMEMMAP_CACHE or
XDG_CACHE_HOME names), so the sweep runs on a fresh machine like every kernel test.
"""

from __future__ import annotations

import struct
from typing import Dict, List, Optional, Tuple

import drgn
import pytest

from inspect_vmemmap.btf import Btf, BtfError
from inspect_vmemmap.lab import fetch_debian_kernel

SERIES = ("6.1", "6.12", "7.2")


def elf_section(path: str, wanted: str) -> Optional[bytes]:
    """The contents of one section of a 64-bit ELF file, read by seeking (vmlinux with DWARF
    is hundreds of megabytes); ``None`` if it has no such section."""
    with open(path, "rb") as f:
        ehdr = f.read(64)
        if ehdr[:4] != b"\x7fELF" or ehdr[4] != 2:
            raise ValueError(f"{path} is not a 64-bit ELF file")
        e = "<" if ehdr[5] == 1 else ">"
        (shoff,) = struct.unpack_from(e + "Q", ehdr, 0x28)
        shentsize, shnum, shstrndx = struct.unpack_from(e + "HHH", ehdr, 0x3A)
        f.seek(shoff)
        table = f.read(shentsize * shnum)

        def header(i: int) -> Tuple[int, int, int]:
            name, _, _, _, offset, size = struct.unpack_from(e + "IIQQQQ", table, i * shentsize)
            return name, offset, size

        _, names_off, names_size = header(shstrndx)
        f.seek(names_off)
        names = f.read(names_size)
        for i in range(shnum):
            name, offset, size = header(i)
            if names[name:names.index(b"\0", name)].decode() == wanted:
                f.seek(offset)
                return f.read(size)
    return None


#: what to ask of each kernel; absent on some releases is fine as long as BTF and DWARF agree
SIZES = ["struct page", "struct folio", "struct mem_section", "struct mem_section_usage", "struct pglist_data",
         "pg_data_t", "struct zone", "struct list_head", "pgd_t", "p4d_t", "pud_t", "pmd_t", "pte_t", "pgprot_t",
         "struct vmem_altmap", "struct dev_pagemap", "memdesc_flags_t", "atomic_t", "struct free_area",
         "struct per_cpu_pages", "struct zonelist", "struct page_ext", "struct memory_block", "long unsigned int"]
OFFSETS = [("struct page", m) for m in (
    "flags", "lru", "buddy_list", "pcp_list", "mapping", "index", "__folio_index", "private", "compound_head",
    "compound_info", "pp_magic", "pgmap", "zone_device_data", "_mapcount", "page_type", "_refcount", "memcg_data",
    "lru.prev", "flags.f")] + [
    ("struct folio", m) for m in ("flags", "lru", "mapping", "index", "_folio_nr_pages", "_nr_pages",
                                  "_large_mapcount", "_entire_mapcount")] + [
    ("struct mem_section", "section_mem_map"), ("struct mem_section", "usage"), ("struct mem_section", "page_ext"),
    ("struct mem_section_usage", "subsection_map"), ("struct mem_section_usage", "pageblock_flags")] + [
    ("struct pglist_data", m) for m in ("node_zones", "node_zonelists", "nr_zones", "node_start_pfn",
                                        "node_present_pages", "node_spanned_pages", "node_id",
                                        "node_zones[1].zone_start_pfn", "node_zones[3].spanned_pages")] + [
    ("pg_data_t", "node_start_pfn")] + [
    ("struct zone", m) for m in ("zone_start_pfn", "spanned_pages", "present_pages", "name", "zone_pgdat",
                                 "free_area", "free_area[3].nr_free")] + [
    ("struct vmem_altmap", m) for m in ("base_pfn", "end_pfn", "reserve", "free", "align", "alloc")] + [
    ("struct dev_pagemap", m) for m in ("altmap", "type", "flags", "nr_range", "range")]
ENUMERATORS = ["SECTION_MARKED_PRESENT_BIT", "SECTION_HAS_MEM_MAP_BIT", "SECTION_IS_ONLINE_BIT",
               "SECTION_IS_EARLY_BIT", "SECTION_TAINT_ZONE_DEVICE_BIT", "SECTION_IS_VMEMMAP_PREINIT_BIT",
               "SECTION_MAP_LAST_BIT", "ZONE_DMA", "ZONE_DMA32", "ZONE_NORMAL", "ZONE_MOVABLE", "ZONE_DEVICE",
               "__MAX_NR_ZONES", "PG_locked", "PG_head", "PG_reserved", "PG_slab", "PG_buddy", "PG_hwpoison",
               "PG_private", "__NR_PAGEFLAGS", "PGTY_buddy", "PGTY_table", "PGTY_slab", "PAGE_TYPE_BASE",
               "MEMORY_DEVICE_PRIVATE", "MEMORY_DEVICE_FS_DAX", "MIGRATE_MOVABLE", "MIGRATE_TYPES",
               "NR_FREE_PAGES", "MEMORY_HOTPLUG_MIN_BOOTMEM_TYPE"]


def _answer(call):
    """A value, or "absent" for a lookup that found nothing."""
    try:
        value = call()
    except (KeyError, LookupError, TypeError):  # drgn: TypeError for a member of a non-struct
        return "absent"
    return "absent" if value is None else value


@pytest.mark.parametrize("series", SERIES)
def test_vmlinux_btf_agrees_with_dwarf(series):
    path = str(fetch_debian_kernel(series, "x86_64").vmlinux)
    blob = elf_section(path, ".BTF")
    assert blob is not None, f"{path} has no .BTF section (Debian builds with CONFIG_DEBUG_INFO_BTF)"
    btf = Btf.parse(blob)
    assert Btf.blob_size(blob) == len(blob)

    prog = drgn.Program(drgn.Platform(drgn.Architecture.X86_64,
                                      drgn.PlatformFlags.IS_64_BIT | drgn.PlatformFlags.IS_LITTLE_ENDIAN))
    prog.extra_module(path, 0, create=True).try_file(path, force=True)
    ours: Dict[str, object] = {}
    theirs: Dict[str, object] = {}
    for name in SIZES:
        ours[f"sizeof {name}"] = _answer(lambda: btf.sizeof(name))
        theirs[f"sizeof {name}"] = _answer(lambda: drgn.sizeof(prog.type(name)))
    for type_name, path_ in OFFSETS:
        key = f"offsetof {type_name} {path_}"
        ours[key] = _answer(lambda: btf.offsetof(type_name, path_))
        theirs[key] = _answer(lambda: drgn.offsetof(prog.type(type_name), path_))
    for name in ENUMERATORS:
        ours[name] = _answer(lambda: btf.enum_value(name))
        theirs[name] = _answer(lambda: prog.constant(name).value_())
    assert ours == theirs
    assert sum(v != "absent" for v in ours.values()) > 60  # mostly present, not a vacuous match

    # The sweep: every struct/union/enum/typedef name that BTF has once, with every named
    # member of the structs and unions.
    compared = 0
    mismatches = []
    btf_only: List[str] = []
    done = set()
    for tid in range(1, len(btf) + 1):
        kind, name = btf.kind(tid), btf.name(tid)
        if kind not in ("struct", "union", "enum", "enum64", "typedef") or not name or (kind, name) in done:
            continue
        done.add((kind, name))
        c_name = name if kind == "typedef" else f"{'enum' if kind == 'enum64' else kind} {name}"
        if len(btf.find_all(c_name, "typedef" if kind == "typedef" else None)) != 1:
            continue  # several types of one name: DWARF's pick is arbitrary
        try:
            dtype = prog.type(c_name)
        except LookupError:
            btf_only.append(c_name)  # e.g. types in objects built without -g; none of ours
            continue
        compared += 1
        if kind in ("enum", "enum64"):
            if dtype.enumerators is not None and btf.enumerators(c_name) != {e.name: e.value for e in dtype.enumerators}:
                mismatches.append((c_name, "enumerators"))
            continue
        try:
            dsize = drgn.sizeof(dtype)
        except TypeError:  # function typedefs, incomplete types
            with pytest.raises(BtfError):
                btf.sizeof(tid)
            continue
        if btf.sizeof(tid) != dsize:
            mismatches.append((c_name, btf.sizeof(tid), dsize))
        if kind in ("struct", "union"):
            for m in btf.members(tid):
                if m.name:
                    try:
                        dm = dtype.member(m.name)
                    except LookupError:
                        mismatches.append((c_name, m.name, "not in DWARF"))
                        continue
                    compared += 1
                    if (m.bit_offset, m.bitfield_size) != (dm.bit_offset, dm.bit_field_size or 0):
                        mismatches.append((c_name, m.name, m.bit_offset, dm.bit_offset))
    assert not mismatches, mismatches[:20]
    assert compared > 40000 and len(btf_only) < compared / 100, btf_only[:20]
