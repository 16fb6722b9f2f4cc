"""The per-build cache (inspect_vmemmap/kcache.py) on a real running kernel.

A ``check --no-debuginfo`` of the live guest through QMP writes the record of its build;
what it holds is compared with what is known of the build from outside the tool: the
build ID of Debian's vmlinux (its GNU build-id note, through drgn), each symbol's offset
from ``_stext`` and each type answer from the vmlinux's DWARF (drgn). A second run on the
same build answers from the record: its document equals the first run's and a run with
the cache off, and the record is not written again (nothing was missing from it). A crash
dump of the same build never writes one.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import drgn
import pytest

from tests.kernel.conftest import cli_json

pytestmark = pytest.mark.kernel


def _check(booted, cache, target: str = "qemu", off: bool = False) -> dict:
    env = {k: v for k, v in os.environ.items() if k != "INSPECT_VMEMMAP_NO_CACHE"}
    env["INSPECT_VMEMMAP_CACHE"] = str(cache)
    if off:
        env["INSPECT_VMEMMAP_NO_CACHE"] = "1"
    tgt = ["--qemu", str(booted.guest.qmp_socket)] if target == "qemu" else ["--core", str(booted.core)]
    p = subprocess.run([sys.executable, "-m", "inspect_vmemmap", "check", *tgt, "--no-debuginfo", "--json"],
                       capture_output=True, text=True, timeout=600, env=env)
    assert p.returncode in (0, 1) and "Traceback" not in p.stderr, p.stderr
    return cli_json(p.stdout, "check")


def _truth(prog: drgn.Program, method: str, args: list):
    """The answer to a type question from the vmlinux's DWARF (drgn)."""
    if method == "sizeof":
        return drgn.sizeof(prog.type(args[0]))
    if method == "offsetof":
        return drgn.offsetof(prog.type(args[0]), args[1])
    if method == "member_size":
        return drgn.sizeof(prog.type(args[0]).member(args[1]).type)
    if method == "has_member":
        return prog.type(args[0]).has_member(args[1])
    if method == "enum_value":
        return prog.constant(args[0]).value_()
    return None


@pytest.mark.parametrize("booted", ["6.12-numa2-hvo"], indirect=True)
def test_a_running_kernels_record_is_its_builds_and_a_second_run_answers_from_it(booted, tmp_path):
    cache = tmp_path / "cache"
    first = _check(booted, cache)
    records = sorted((cache / "kernels").glob("*.json"))
    prog = booted.prog()
    build_id = prog.main_module().build_id.hex()
    assert [r.name for r in records] == [f"{build_id}.json"]
    rec = json.loads(records[0].read_text())
    assert rec["build_id"] == build_id and rec["release"] == booted.guest.kernel.release and rec["has_types"]
    stext = prog.symbol("_stext").address
    assert rec["symbols"], rec
    for name, off in rec["symbols"].items():
        try:
            want = prog.symbol(name).address - stext
        except LookupError:
            want = None
        assert off == want, name
    checked = 0
    for key, (status, value) in rec["types"].items():
        method, args, _kw = json.loads(key)
        if method == "enumerators":
            continue
        if status == "ok":
            assert _truth(prog, method, args) == value, key
            checked += 1
        else:  # the kernel has no such type, member or enumerator: neither has its DWARF
            with pytest.raises(LookupError):
                _truth(prog, method, args)
    assert checked >= 10, rec["types"]

    mtime = records[0].stat().st_mtime_ns
    second = _check(booted, cache)
    assert records[0].stat().st_mtime_ns == mtime  # answered from the record: nothing to add
    without = _check(booted, cache, off=True)
    for doc in (second, without):
        assert doc["target"]["type_source"] == first["target"]["type_source"] == "btf"
        assert {k: v for k, v in doc.items() if k != "target"} == \
               {k: v for k, v in first.items() if k != "target"}


@pytest.mark.parametrize("booted", ["6.12-numa2-hvo"], indirect=True)
def test_a_crash_dump_never_writes_a_record(booted, tmp_path):
    cache = tmp_path / "cache"
    doc = _check(booted, cache, target="core")
    assert doc["target"]["source"] == "vmcore" and doc["target"]["type_source"] == "btf"
    assert not (cache / "kernels").exists() or not list((cache / "kernels").glob("*.json"))
