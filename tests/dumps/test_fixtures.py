"""The fast tier on real kernels: small dumps recorded from lab guests (fixtures/, made by
scripts/make-fixtures) must give exactly what the full dumps gave."""

from __future__ import annotations

import json
import lzma
import subprocess
import sys

import pytest
from tests.recorded import FIXTURES, unpack

NAMES = sorted(p.name[: -len(".core.xz")] for p in FIXTURES.glob("*.core.xz"))


@pytest.fixture(scope="module", params=NAMES)
def fixture(request, tmp_path_factory):
    name = request.param
    core = unpack(name, tmp_path_factory.mktemp("fixtures"))
    expected = json.loads((FIXTURES / f"{name}.expected.json").read_text())
    return name, core, expected


def test_there_are_fixtures():
    assert {"6.1-la57-hvo", "6.12-numa2-hvo", "7.2-hvo"} <= set(NAMES)


def _optimized(expected) -> int:
    """HugeTLB folios the guest's HVO must have optimized: all of them where the
    architecture has HVO (x86_64, riscv64: the scenarios that allocate hugepages ask for
    it), none on arm64 (model.hvo_supported)."""
    from inspect_vmemmap import arch

    if not arch.get(expected["check"]["target"]["arch"]).hugetlb_vmemmap_optimize:
        return 0
    return expected["meta"]["guest"]["hugepages_total"]


def test_check_cli_matches(fixture):
    name, core, expected = fixture
    p = subprocess.run([sys.executable, "-m", "inspect_vmemmap", "check", "--core", str(core), "--no-debuginfo", "--json"],
                       capture_output=True, text=True, timeout=120)
    assert p.returncode == 0, p.stderr
    doc = json.loads(p.stdout)
    assert doc == expected["check"]
    assert doc["target"]["type_source"] == "btf"
    assert doc["summary"]["errors"] == 0
    assert doc["hvo"]["optimized_folios"] == _optimized(expected)


def test_every_command_matches(fixture):
    from inspect_vmemmap.commands import Analysis
    from inspect_vmemmap.source import open_target

    name, core, expected = fixture
    a = Analysis(open_target(core=str(core), no_debuginfo=True))
    assert a.sections_doc()[0] == expected["sections"]
    assert a.map_doc()[0] == expected["map"]
    for pfn, doc in expected["pfn"].items():
        assert a.pfn_doc(int(pfn))[0] == doc


def test_text_output(fixture):
    name, core, expected = fixture
    p = subprocess.run([sys.executable, "-m", "inspect_vmemmap", "check", "--core", str(core)],
                       capture_output=True, text=True, timeout=120)
    assert p.returncode == 0, p.stderr
    lines = p.stdout.splitlines()
    assert expected["meta"]["kernel_release"] in lines[0] and "types from btf" in lines[0]
    assert lines[1].startswith("consistent")
    assert f"HVO: {_optimized(expected)} optimized folios" in p.stdout


# -- independent truth beside the tool's JSON (scripts/fixture-truth) ---------------------------

TRUTHS = sorted(p.name[: -len(".truth.json")] for p in FIXTURES.glob("*.truth.json"))


def _arch(name: str) -> str:
    return json.loads((FIXTURES / f"{name}.expected.json").read_text())["check"]["target"]["arch"]


def test_every_fixture_has_its_truth():
    """tests/fixture_truth.py reads x86_64 and arm64 dumps (riscv64 not yet)."""
    assert TRUTHS == [n for n in NAMES if _arch(n) in ("x86_64", "aarch64")]


@pytest.mark.parametrize("name", TRUTHS)
def test_the_tool_agrees_with_independent_truth(name):
    """The tool's sections and vmemmap (its JSON, which the tests above tie to what it prints
    now) against tests/fixture_truth.py's own reading of the same dump; and that reading is
    still what the recorded truth file says."""
    from tests.fixture_truth import truth

    recorded = json.loads((FIXTURES / f"{name}.truth.json").read_text())
    assert truth(lzma.open(FIXTURES / f"{name}.core.xz").read()) == recorded
    expected = json.loads((FIXTURES / f"{name}.expected.json").read_text())
    ours = {str(s["nr"]): {"flags": s["flags"], "coded_mem_map": s["coded_mem_map"]}
            for s in expected["sections"]["sections"]["list"] if "present" in s["flags"]}
    assert ours == recorded["sections"]
    vm = expected["map"]["vmemmap"]
    assert {k: v for k, v in vm["leaves"].items() if v} == recorded["leaves"]
    for key in ("split_pmds", "readonly_ptes", "bytes_mapped"):
        assert vm[key] == recorded[key], key
