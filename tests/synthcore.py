"""Synthetic sparse ELF vmcores of any size, built by the model's rules.

A kernel of ``size`` bytes of RAM split evenly over ``nodes`` NUMA nodes: the mem_section
array, the vmemmap page tables (PMD blocks, each node's memmap on that node's own memory,
as vmemmap_populate() allocates it), node_data with each node's span, and a direct map of
the low memory that holds them; a VMCOREINFO note with what the kernel's own
crash_save_vmcoreinfo() would say. Only the pages that hold something are in the file, so
a 4 TiB kernel is a few MiB. No DWARF or BTF: the tool opens it from VMCOREINFO alone.
"""

from __future__ import annotations

from pathlib import Path
from typing import List, Tuple

import tests.synth as synth
from tests.elfcore import write_elf_core
from inspect_vmemmap.model import Inputs

GiB = 1 << 30
START_KERNEL_MAP = 0xFFFFFFFF80000000
NODE_DATA = 0x7000000  # node_data[], node_online_map and the pglist_data, in the direct map
OFF_START, OFF_SPAN = 0x100, 0x110  # pglist_data.node_start_pfn, .node_spanned_pages


def synthetic_kernel(size: int, nodes: int = 2):
    """:return: ``(SynthKernel, ram ranges, node spans)``."""
    saved = synth.BACKING_SIZE, synth.backing_range
    try:
        return _synthetic_kernel(size, nodes)
    finally:  # tests.synth's placement of the backing is for this kernel only
        synth.BACKING_SIZE, synth.backing_range = saved


def _synthetic_kernel(size: int, nodes: int):
    per = size // nodes
    # each node's memmap (1/64 of its RAM) comes from the top of the node's own RAM
    synth.BACKING_SIZE = max(per // 32, 1 << 30)
    spans: List[Tuple[int, int, int]] = []
    ram: List[Tuple[int, int]] = []
    for n in range(nodes):
        ram.append((per * n, per * (n + 1)))
        spans.append((n, (per * n) >> 12, (per * (n + 1)) >> 12))
    lay = synth.x86_layout()
    # backing_range(n) must lie in node n's RAM: its last BACKING_SIZE bytes
    backing = [end - synth.BACKING_SIZE for _, end in ram]
    synth.backing_range = lambda nid: (backing[nid or 0], backing[nid or 0] + synth.BACKING_SIZE)
    inp = Inputs(layout=lay, ram=ram, boot_ram=ram, nodes=spans)
    return synth.SynthKernel(inp), ram, spans


def write_synthetic_core(path: Path, size: int, nodes: int = 2) -> dict:
    """Write the core; :return: what it holds (sections, node spans, pages written)."""
    k, ram, spans = synthetic_kernel(size, nodes)
    lay, mem = k.layout, k.mem
    virt = mem.virt_base
    for g in range(2):  # the direct map of the low 2 GiB: tables, sections, node data
        k.tables.map(virt + g * GiB, g * GiB, GiB)
    mem.write(NODE_DATA, bytes(4096 * (nodes + 2)))
    for n, s, e in spans:
        pg = NODE_DATA + 4096 * (n + 1)
        mem.write_u64(NODE_DATA + 8 * n, virt + pg)
        mem.write_u64(pg + OFF_START, s)
        mem.write_u64(pg + OFF_SPAN, e - s)
    online = NODE_DATA + 4096 * (nodes + 1)
    mem.write_u64(online, (1 << nodes) - 1)
    root = START_KERNEL_MAP + k.tables.root
    info = "\n".join([
        "OSRELEASE=6.12.0-synthetic",
        "PAGESIZE=4096",
        "KERNELOFFSET=0",
        "NUMBER(phys_base)=0",
        f"SYMBOL(swapper_pg_dir)={root:x}",
        f"SYMBOL(init_top_pgt)={root:x}",
        "NUMBER(pgtable_l5_enabled)=0",
        f"SYMBOL(mem_section)={lay.mem_section_addr:x}",
        f"LENGTH(mem_section)={lay.nr_section_roots}",
        f"SIZE(mem_section)={lay.mem_section_size}",
        f"NUMBER(SECTION_SIZE_BITS)={lay.section_size_bits}",
        f"NUMBER(MAX_PHYSMEM_BITS)={lay.max_physmem_bits}",
        f"SIZE(page)={lay.struct_page_size}",
        f"SYMBOL(vmemmap)={lay.vmemmap_base:x}",
        f"SYMBOL(node_data)={virt + NODE_DATA:x}",
        f"LENGTH(node_data)={nodes}",
        f"SYMBOL(node_online_map)={virt + online:x}",
        f"OFFSET(pglist_data.node_start_pfn)={OFF_START}",
        f"OFFSET(pglist_data.node_spanned_pages)={OFF_SPAN}",
    ]) + "\n"
    pages = {p >> 12: bytes(b) for p, b in mem.pages.items()}
    with open(path, "wb") as f:
        write_elf_core(f, "x86_64", info.encode(), pages)
    return {"sections": len(k.present_sections), "nodes": spans, "ram": ram, "pages": len(pages),
            "vmemmap_root": root}
