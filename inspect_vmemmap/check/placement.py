"""What is mapped against what must be: struct pages of valid pfns that are not mapped
(``memmap-unmapped``) and vmemmap mapped where no section needs it (``stray-mapping``),
against the model's required and allowed ranges (model.predict())."""

from __future__ import annotations

from typing import List

from inspect_vmemmap.check.observed import Observed
from inspect_vmemmap.findings import Finding
from inspect_vmemmap.intervals import subtract
from inspect_vmemmap.vmemmap import size_label


def check_placement(obs: Observed) -> List[Finding]:
    """Ranges whose mapping could not be read are not reported as unmapped: nobody knows."""
    out: List[Finding] = []
    for a, b in subtract(subtract(obs.pred.required, obs.mapped), obs.unknown):
        sec, p0, p1 = obs.span(a, b)
        out.append(Finding("memmap-unmapped", None,
                           f"struct pages of pfn {p0}-{p1} (section {sec}) at {a:#x}-{b:#x} are not mapped",
                           section=sec, pfn_start=p0, pfn_end=p1, vaddr=a, vaddr_end=b))
    # without any System RAM (neither iomem nor node spans read) nothing is allowed:
    # unknown, not stray (flags.check_section_flags says so once)
    for a, b in subtract(obs.mapped, obs.pred.allowed) if obs.inputs.ram else ():
        sec, p0, p1 = obs.span(a, b)
        out.append(Finding("stray-mapping", None,
                           f"{a:#x}-{b:#x} ({size_label(b - a)}) is mapped but holds struct pages of pfn {p0}-{p1}, "
                           f"which no section needs", section=sec, pfn_start=p0, pfn_end=p1, vaddr=a, vaddr_end=b))
    return out
