"""What each command computes for an opened :class:`~inspect_vmemmap.target.Target`,
as JSON documents plus the objects the text output needs. The CLI prints these; the
fixture recorder runs them on a recording target."""

from __future__ import annotations

from typing import List, Optional, Tuple

from inspect_vmemmap import report
from inspect_vmemmap.analysis import explain_pfn, load_map, load_sections
from inspect_vmemmap.findings import Finding
from inspect_vmemmap.vmemmap import NodeMap, VmemmapMap


class Analysis:
    """Sections are read once; the map and the check are computed on demand, once."""

    def __init__(self, target) -> None:
        self.t = target
        self.nodes = NodeMap(target.node_spans())
        self.sections = load_sections(target.memory, target.layout, self.nodes)
        self._map: Optional[VmemmapMap] = None
        self._leaves: List[Tuple[int, int, int, bool]] = []

    def vmemmap(self) -> VmemmapMap:
        if self._map is None:
            t = self.t
            leaves = self._leaves
            self._map = load_map(t.memory, t.layout, self.sections, self.nodes, t.ram(),
                                 on_leaf=lambda l: leaves.append((l.vaddr, l.size, l.phys, l.writable)))
        return self._map

    def sections_doc(self) -> Tuple[dict, List[Finding]]:
        findings = list(self.sections.findings)
        return report.document(self.t.to_json(), findings, sections=report.sections_json(self.sections)), findings

    def map_doc(self) -> Tuple[dict, List[Finding]]:
        vm = self.vmemmap()
        findings = list(self.sections.findings) + vm.findings
        return report.document(self.t.to_json(), findings, vmemmap=vm.to_json()), findings

    def pfn_doc(self, pfn: int) -> Tuple[dict, List[Finding]]:
        info, findings = explain_pfn(self.t.memory, self.t.layout, self.sections, self.nodes, pfn)
        return report.document(self.t.to_json(), findings, pfn=info), findings

    def check(self, deep: bool = False):
        """:return: ``(doc, findings, result, inputs, notes)``."""
        from inspect_vmemmap.check import run_check
        from inspect_vmemmap.target import buddy_checker, gather_inputs

        vm = self.vmemmap()
        notes: List[str] = []
        inputs = gather_inputs(self.t, notes)
        res = run_check(inputs, self.sections, self._leaves, buddy_checker(self.t), self.t.memory, deep)
        findings = list(self.sections.findings) + vm.findings + res.findings
        doc = report.document(self.t.to_json(), findings, sections=report.sections_json(self.sections),
                              vmemmap=vm.to_json(), hvo=res.hvo)
        doc["assumptions"] = notes + [f"{k}: {v}" for k, v in self.t.layout.notes.items()]
        return doc, findings, res, inputs, notes
