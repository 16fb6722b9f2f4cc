"""The Python API (issue 17): ``inspect_vmemmap.analyze(prog)`` on a drgn program the user
set up gives the objects and the very document ``check --json`` prints for the same file."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from tests import schema
from tests.recorded import FIXTURES, unpack

#: one of each architecture
API_FIXTURES = ("6.1-la57-hvo", "6.12-arm64-16k-va47")


@pytest.fixture(scope="module", params=API_FIXTURES)
def core(request, tmp_path_factory):
    return request.param, unpack(request.param, tmp_path_factory.mktemp("api"))


def test_analyze_users_program_is_check_json(core):
    import drgn

    import inspect_vmemmap

    name, path = core
    prog = drgn.Program()  # the user's own program object, as in a drgn script
    prog.set_core_dump(str(path))
    report = inspect_vmemmap.analyze(prog)
    p = subprocess.run([sys.executable, "-m", "inspect_vmemmap", "check", "--core", str(path), "--json"],
                       capture_output=True, text=True, timeout=120)
    assert p.returncode == 0, p.stderr
    assert report.to_json() == json.loads(p.stdout)
    schema.validate(report.to_json(), "check")
    # the objects say what the document says
    expected = json.loads((FIXTURES / f"{name}.expected.json").read_text())["check"]
    assert report.to_json() == expected
    assert report.summary == expected["summary"] and report.exit_status == 0 and report.errors == []
    assert [s.nr for s in report.sections] == [s["nr"] for s in expected["sections"]["list"]]
    assert [hex(r.start) for r in report.vmemmap.ranges] == [r["start"] for r in expected["vmemmap"]["ranges"]]
    assert report.hvo == expected["hvo"] and report.layout.arch == expected["target"]["arch"]
    assert report.target.program is prog
    assert isinstance(report, inspect_vmemmap.Report) and "0 errors" in repr(report)
    # a copy: the caller may change it
    report.to_json()["summary"]["errors"] = 99
    assert report.summary["errors"] == 0


def test_analyze_prints_check_text(core):
    import drgn
    from rich.console import Console

    import inspect_vmemmap

    _, path = core
    prog = drgn.Program()
    prog.set_core_dump(str(path))
    con = Console(width=1000, no_color=True, record=True, file=open("/dev/null", "w"))
    inspect_vmemmap.analyze(prog).print(con)
    lines = con.export_text().splitlines()
    assert lines[1].startswith("consistent")


def test_analyze_needs_a_kernel_program():
    import drgn

    import inspect_vmemmap
    from inspect_vmemmap.errors import AnalysisError

    with pytest.raises(AnalysisError, match="not a Linux kernel"):
        inspect_vmemmap.analyze(drgn.Program())


def test_cli_does_not_import_the_api():
    """The command line starts without the API module (nor drgn before it opens a target)."""
    code = "import sys, inspect_vmemmap.cli; print('inspect_vmemmap.api' in sys.modules, 'drgn' in sys.modules)"
    p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert p.stdout.split() == ["False", "False"], p.stderr


def test_readme_drgn_script_runs(core, tmp_path, monkeypatch):
    """The README's drgn script, with ``prog`` as drgn gives it to a script."""
    import re
    from pathlib import Path

    import drgn

    _, path = core
    readme = (Path(__file__).resolve().parents[2] / "README.md").read_text()
    code = re.search(r"```python\n(.*?)```", readme, re.S).group(1)
    assert "inspect_vmemmap.analyze(prog)" in code
    prog = drgn.Program()
    prog.set_core_dump(str(path))
    monkeypatch.chdir(tmp_path)
    exec(compile(code, "README.md", "exec"), {"prog": prog})
    doc = json.loads((tmp_path / "vmemmap.json").read_text())
    schema.validate(doc, "check")
