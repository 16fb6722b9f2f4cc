"""docs/schema.json: every command's ``--json`` on every fixture validates against it, and
the schema is strict enough to notice a field nobody documented."""

from __future__ import annotations

import copy
import json
import subprocess
import sys

import pytest

from tests import schema
from tests.dumps.test_fixtures import fixture  # noqa: F401  (the decompressed fixtures)


def _start(*args) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "inspect_vmemmap", *args], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)


def _doc(p: subprocess.Popen, what: str) -> dict:
    out, err = p.communicate(timeout=180)
    assert p.returncode == 0, (what, p.returncode, err)
    return json.loads(out)


def test_every_command_json_validates(fixture, tmp_path):  # noqa: F811
    """check, sections, map, pfn and model, through the CLI, two at a time (they only read
    the file). One recorded pfn per fixture: test_fixtures compares all of them."""
    name, core, expected = fixture
    layout = tmp_path / "layout.json"
    common = ["--core", str(core), "--no-debuginfo", "--json"]
    pfn = sorted(expected["pfn"], key=int)[-1]
    runs = [("check", ["check", *common, "--save-layout", str(layout)]), ("sections", ["sections", *common]),
            ("map", ["map", *common]), ("pfn", ["pfn", pfn, *common]), ("model", ["model", str(layout), "--json"])]
    docs = {}
    for i in range(0, len(runs) - 1, 2):
        started = [(what, _start(*args)) for what, args in runs[i:i + 2]]
        docs.update((what, _doc(p, what)) for what, p in started)
    docs["model"] = _doc(_start(*runs[-1][1]), "model")  # reads the layout check wrote
    for what, doc in docs.items():
        schema.validate(doc, what)
    assert set(docs) == set(schema.COMMANDS) - {"boot"}
    # what the schema was checked on is what the full dump gave, not a lookalike
    assert docs["check"] == expected["check"] and docs["pfn"] == expected["pfn"][pfn]


def test_recorded_documents_validate():
    """The recorded documents of every fixture (the full dumps' output) too."""
    from tests.dumps.test_fixtures import FIXTURES, NAMES

    for name in NAMES:
        expected = json.loads((FIXTURES / f"{name}.expected.json").read_text())
        for cmd in ("check", "sections", "map"):
            schema.validate(expected[cmd], cmd)
        for doc in expected["pfn"].values():
            schema.validate(doc, "pfn")


def _recorded(cmd: str) -> dict:
    from tests.dumps.test_fixtures import FIXTURES

    return json.loads((FIXTURES / "6.1-la57-hvo.expected.json").read_text())[cmd]


@pytest.mark.parametrize("change", [
    lambda d: d["target"].update(undocumented=1),
    lambda d: d.update(extra_part={}),
    lambda d: d["target"].update(vmemmap_base="ffb79b2c40000000"),  # not 0x hex
    lambda d: d["sections"]["list"][0].update(flags=["present", "hot"]),
    lambda d: d["vmemmap"]["ranges"][0].update(holds="something"),
    lambda d: d["findings"].append({"kind": "made-up", "severity": "error", "message": "x"}),
    lambda d: d["findings"].append({"kind": "alias", "severity": "fatal", "message": "x"}),
    lambda d: d["summary"].pop("infos"),
    lambda d: d.pop("assumptions"),
])
def test_schema_is_strict(change):
    doc = copy.deepcopy(_recorded("check"))
    change(doc)
    assert schema.errors(doc, "check")


def test_findings_of_every_kind_validate():
    """Each kind of the vocabulary (findings.KINDS) with the fields the code gives it."""
    from inspect_vmemmap.findings import KINDS, Finding

    doc = copy.deepcopy(_recorded("check"))
    for kind in KINDS:
        doc["findings"].append(Finding(kind, None, f"a {kind}", section=3, pfn_start=1, pfn_end=2, vaddr=0x1000,
                                       vaddr_end=0x2000, phys=0x3000).to_json())
    doc["findings"].append(Finding("bad-entry", None, "m", level="pmd", entry=0x8000000000000e3, table_phys=0x1000,
                                   index=5).to_json())
    doc["findings"].append(Finding("race", None, "m", was="alias", seen_in=[1, 3]).to_json())
    doc["findings"].append(Finding("unreadable", None, "m", excluded_by="makedumpfile -d 31").to_json())
    doc["findings"].append(Finding("memmap-unmapped", None, "m", transient=True).to_json())
    schema.validate(doc, "check")
    assert {f["kind"] for f in doc["findings"]} >= set(KINDS)
    # the schema's vocabulary is the code's: no kind the code lacks
    assert set(schema.schema()["$defs"]["finding"]["properties"]["kind"]["enum"]) == set(KINDS)


def test_boot_document_validates():
    """boot --json is check's document plus guest, as lab/boot.py's guest_json builds it
    (the real-kernel tests validate real ones)."""
    from types import SimpleNamespace

    from inspect_vmemmap.lab.account import GuestAccount
    from inspect_vmemmap.lab.boot import guest_json
    from inspect_vmemmap.lab.guest import Dimm, GuestSpec

    acc = GuestAccount(release="6.12.117+deb13-amd64", cmdline="console=ttyS0", mem_total_kb=1954708,
                       nodes=[0], node_mem_total_kb={0: 1954708}, memory_block_size=128 << 20,
                       memory_blocks={0: "online", 8: "offline"}, nr_hugepages={2048: 8}, cpu_flags=["la57"])
    guest = SimpleNamespace(account=acc, boot_seconds=8.64, spec=GuestSpec(arch="x86_64"),
                            dimms=[Dimm("ivm-hp-dimm0", "ivm-hp-mem0", 1 << 32, 1 << 30, None)])
    doc = dict(copy.deepcopy(_recorded("check")), guest=guest_json(guest, "qemu"))
    schema.validate(doc, "boot")
    doc.pop("guest")
    assert schema.errors(doc, "boot")


def test_watch_is_filled_in():
    """The places kept for watch (its JSON lines, target.race_detection, a race's event,
    boot --watch) are filled in, closed like the rest."""
    text = schema.SCHEMA_FILE.read_text()
    assert "PLACEHOLDER" not in text
    defs = schema.schema()["$defs"]
    for d in ("watch_probe", "watch_check", "watch_end", "boot_watch"):
        assert defs[d]["additionalProperties"] is False, d
    assert defs["finding"]["properties"]["event"]["additionalProperties"] is False
    assert defs["target"]["properties"]["race_detection"]["enum"] == ["ebpf", "reread"]
