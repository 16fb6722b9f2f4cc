"""The Python API, for a drgn session: :func:`analyze` on a ``drgn.Program`` the user
already holds (the drgn REPL, a drgn script, a crash-like session).

    >>> import inspect_vmemmap
    >>> report = inspect_vmemmap.analyze(prog)
    >>> report.summary
    {'errors': 0, 'warnings': 0, 'infos': 0}
    >>> report.to_json() == json.loads(<the output of check --json on the same target>)
    True

This module does not import drgn: the program is handed to the adapter
(inspect_vmemmap/source/drgn.py), as the command line's is.
"""

from __future__ import annotations

import copy
from typing import List, Optional

from inspect_vmemmap.findings import Finding, exit_status


class Report:
    """What ``check`` found, as objects; :meth:`to_json` is the document ``check --json``
    prints for the same target (docs/CONTRACT.md, docs/schema.json)."""

    def __init__(self, analysis, doc: dict, findings: List[Finding], result, inputs, notes) -> None:
        self._analysis = analysis
        self._doc = doc
        #: the opened kernel (:class:`inspect_vmemmap.source.target.Target`)
        self.target = analysis.t
        #: its layout (:class:`inspect_vmemmap.layout.KernelLayout`)
        self.layout = analysis.t.layout
        #: the mem_section table (:class:`inspect_vmemmap.sections.SectionTable`; iterate for sections)
        self.sections = analysis.sections
        #: what the page tables map (:class:`inspect_vmemmap.vmemmap.VmemmapMap`: ``.ranges``, ``.leaves``)
        self.vmemmap = analysis.vmemmap()
        #: every :class:`~inspect_vmemmap.findings.Finding` (``kind``, ``severity``, ``message``, where)
        self.findings = findings
        #: the model's inputs as read from the kernel (what ``check --save-layout`` writes)
        self.inputs = inputs
        #: inputs that could not be read and what was assumed instead
        self.assumptions = notes
        self.hvo: dict = result.hvo
        self.device_dedup: Optional[dict] = result.device_dedup
        self.self_hosted: Optional[dict] = result.self_hosted
        self._result = result

    @property
    def summary(self) -> dict:
        """``{"errors": n, "warnings": n, "infos": n}``."""
        return dict(self._doc["summary"])

    @property
    def errors(self) -> List[Finding]:
        return [f for f in self.findings if f.severity == "error"]

    @property
    def exit_status(self) -> int:
        """What ``check`` would exit with: 0 nothing wrong, 1 at least one error."""
        return exit_status(self.findings)

    def to_json(self) -> dict:
        """The ``check --json`` document (a copy: change it freely)."""
        return copy.deepcopy(self._doc)

    def print(self, console=None) -> None:
        """The text report ``check`` prints (on a rich ``console``; default: stdout)."""
        from inspect_vmemmap import report

        report.print_check_report(console or report.stdout_console(), self._analysis, self._doc, self.findings,
                                  self._result, self.assumptions)

    def __repr__(self) -> str:
        s = self.summary
        return (f"<inspect_vmemmap.Report {self.layout.kernel_release} {self.layout.arch} ({self.target.source}): "
                f"{s['errors']} errors, {s['warnings']} warnings>")


def analyze(prog, *, deep: bool = False, reads: int = 3, dump_path: Optional[str] = None) -> Report:
    """``check`` on a ``drgn.Program`` the caller already set up: a crash dump
    (``set_core_dump``), the running kernel (``set_kernel``) or a QEMU guest
    (``set_qemu_qmp``), with or without debug info loaded.

    The program's loaded DWARF is used where it has it, else the kernel's own BTF (drgn's
    kallsyms symbol finder is registered on it for that, as the command line does); no
    other debug info is searched for or loaded. ``deep`` and ``reads`` are ``check``'s
    ``--deep`` and ``--reads`` (a running kernel is read again after errors).
    ``dump_path``: the dump file, where the program's own ``core_dump_path`` is not it.

    :raises inspect_vmemmap.errors.AnalysisError: with a one-line reason.
    """
    from inspect_vmemmap.commands import confirmed_check
    from inspect_vmemmap.source import drgn as adapter
    from inspect_vmemmap.source.target import target_from_program

    source, path = adapter.program_source(prog)
    target = target_from_program(prog, source, dump_path=dump_path or path, load_debug_info=False)
    a, doc, findings, res, inputs, notes = confirmed_check(target, deep, None, reads)
    return Report(a, doc, findings, res, inputs, notes)
