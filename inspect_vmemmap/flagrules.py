"""Section flags the kernel cannot have set where they are (issue 15).

Apart from the model's comparison (check.run_check), which tolerates a
SECTION_TAINT_ZONE_DEVICE it did not predict because a taint outlives the device memory
that caused it: mm/memory_hotplug.c ``section_taint_zone_device()`` is called by
``move_pfn_range_to_zone()`` only for the sections where a ZONE_DEVICE range starts or
ends off a section boundary, the sections it shares with other memory, and
mm/sparse.c ``section_deactivate()`` clears section_mem_map (taint included) when a
section empties. A section that is RAM throughout never shared itself with a device: RAM
is added in whole memory blocks (sections), so no device range can have started or ended
in it, now or before, and the taint there is damage.
"""

from __future__ import annotations

from typing import List, Optional, Sequence, Tuple

from inspect_vmemmap.findings import Finding
from inspect_vmemmap.layout import KernelLayout
from inspect_vmemmap.intervals import merge, subtract


def ram_pfns(lay: KernelLayout, ram: Sequence[Tuple[int, int]]) -> List[Tuple[int, int]]:
    """System RAM byte ranges as pfn ranges, only whole pages."""
    shift = lay.page_shift
    page = 1 << shift
    return merge([((a + page - 1) >> shift, b >> shift) for a, b in ram if b > a])


def impossible_taint(lay: KernelLayout, nr: int, letters: str, early: bool,
                     ram: List[Tuple[int, int]]) -> Optional[Finding]:
    """An ``impossible-flag`` finding for a zone-device taint on section ``nr`` when the
    section is System RAM from its first pfn to its last (``ram`` from :func:`ram_pfns`)."""
    s0 = nr << lay.pfn_section_shift
    s1 = s0 + lay.pages_per_section
    if subtract([(s0, s1)], ram):
        return None
    return Finding("impossible-flag", None,
                   f"section {nr}: flags {letters} include SECTION_TAINT_ZONE_DEVICE, but the section is "
                   f"{'boot' if early else 'hot-added'} System RAM throughout (pfn {s0}-{s1 - 1}): no device memory can "
                   f"start or end in it, and only such a section is tainted (move_pfn_range_to_zone())",
                   section=nr, pfn_start=s0, pfn_end=s1 - 1, flag="zone_device")


def ram_unknown(nr_sections: int) -> Finding:
    """Neither iomem's System RAM nor the node spans could be read: the sections and the
    mappings are not compared with the model (missing information lowers what can be
    claimed; it raises no error)."""
    return Finding("unreadable", None,
                   f"System RAM could not be read (neither iomem nor the node spans): the {nr_sections} section(s) "
                   f"read and the vmemmap mappings are not compared with the model's")
