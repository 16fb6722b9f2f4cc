"""What each command computes for an opened :class:`~inspect_vmemmap.target.Target`,
as JSON documents plus the objects the text output needs. The CLI prints these; the
fixture recorder runs them on a recording target."""

from __future__ import annotations

from typing import List, Optional, Tuple

from inspect_vmemmap import report
from inspect_vmemmap.analysis import explain_pfn, load_map, load_sections
from inspect_vmemmap.dumpfile import name_filter
from inspect_vmemmap.findings import Finding
from inspect_vmemmap.vmemmap import NodeMap, VmemmapMap


class Progress:
    """Progress reporting: ``task(description, total)`` returns ``update(completed)``.
    This one shows nothing; the CLI passes a rich bar on a terminal."""

    def task(self, description: str, total: int):
        return lambda completed: None

    def close(self) -> None:
        pass


class Analysis:
    """Sections are read once; the map and the check are computed on demand, once."""

    def __init__(self, target, progress: Optional[Progress] = None) -> None:
        self.progress = progress or Progress()
        self.t = target
        self.nodes = NodeMap(target.node_spans())
        self.sections = load_sections(target.memory, target.layout, self.nodes)
        self._map: Optional[VmemmapMap] = None
        self._leaves: List[Tuple[int, int, int, bool]] = []

    def vmemmap(self) -> VmemmapMap:
        if self._map is None:
            t = self.t
            lay = t.layout
            leaves = self._leaves
            last = max(self.sections.sections) if len(self.sections) else 0
            lo, hi = lay.vmemmap_base, lay.pfn_to_page((last + 1) << lay.pfn_section_shift)
            update = self.progress.task("walking the vmemmap page tables", max(hi - lo, 1))

            def on_leaf(l) -> None:
                leaves.append((l.vaddr, l.size, l.phys, l.writable))
                if not len(leaves) & 1023:
                    update(l.vaddr - lo)

            self._map = load_map(t.memory, lay, self.sections, self.nodes, t.ram(), on_leaf=on_leaf)
            update(hi - lo)
        return self._map

    def sections_doc(self) -> Tuple[dict, List[Finding]]:
        findings = list(self.sections.findings)
        name_filter(findings, self.t)
        return report.document(self.t.to_json(), findings, sections=report.sections_json(self.sections)), findings

    def map_doc(self) -> Tuple[dict, List[Finding]]:
        vm = self.vmemmap()
        findings = list(self.sections.findings) + vm.findings
        name_filter(findings, self.t)
        return report.document(self.t.to_json(), findings, vmemmap=vm.to_json()), findings

    def pfn_doc(self, pfn: int) -> Tuple[dict, List[Finding]]:
        info, findings = explain_pfn(self.t.memory, self.t.layout, self.sections, self.nodes, pfn)
        name_filter(findings, self.t)
        return report.document(self.t.to_json(), findings, pfn=info), findings

    def check(self, deep: bool = False):
        """:return: ``(doc, findings, result, inputs, notes)``."""
        from inspect_vmemmap.check import run_check
        from inspect_vmemmap.target import buddy_checker, gather_inputs

        vm = self.vmemmap()
        notes: List[str] = []
        inputs = gather_inputs(self.t, notes)
        # a filtered dump may have left out the struct pages the HugeTLB pool lists run through
        hvo_unknown = next((n for n in notes if n.startswith("HugeTLB pools") and "excluded from the dump" in n), "")
        res = run_check(inputs, self.sections, self._leaves, buddy_checker(self.t), self.t.memory, deep,
                        unknown=vm.unknown(), hvo_unknown=hvo_unknown)
        findings = list(self.sections.findings) + vm.findings + res.findings
        filtered = name_filter(findings, self.t)
        target = self.t.to_json()
        if "dump" in target:
            # how much of the check the dump's filter kept it from doing
            target["dump"]["unreadable_findings"] = filtered
            target["dump"]["unread_inputs"] = [n for n in notes if "excluded from the dump" in n]
            target["dump"]["complete"] = not filtered and not target["dump"]["unread_inputs"]
        doc = report.document(target, findings, sections=report.sections_json(self.sections),
                              vmemmap=vm.to_json(), hvo=res.hvo)
        doc["assumptions"] = notes + [f"{k}: {v}" for k, v in self.t.layout.notes.items()]
        return doc, findings, res, inputs, notes
