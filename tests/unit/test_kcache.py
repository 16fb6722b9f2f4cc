"""The per-build cache (inspect_vmemmap/kcache.py, issue 18): a record is used only for the
build it was made on, anything unusable is ignored without an error, and answering from
it changes nothing in what the tool prints."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from inspect_vmemmap import kcache
from tests.recorded import unpack

ROOT = Path(__file__).resolve().parents[2]
BUILD = "b1d7a9114053a488ef493f85f85e9fc75ba9f632"


class FakeTypes:
    """Type information that counts the questions it answers."""

    source = "btf"

    def __init__(self):
        self.asked = 0

    def sizeof(self, name):
        self.asked += 1
        if name == "struct page":
            return 64
        raise KeyError(name)

    def enumerators(self, enum_name=None, *, containing=None):
        self.asked += 1
        return {"A": 1, "B": 2}

    def func_signature(self, name):
        return (["x"], False)


@pytest.fixture
def cache(tmp_path, monkeypatch):
    monkeypatch.delenv("INSPECT_VMEMMAP_NO_CACHE", raising=False)
    monkeypatch.delenv("INSPECT_VMEMMAP_CACHE", raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    return tmp_path / "inspect-vmemmap" / "kernels"


def _record_once(release="6.12.117+deb13-amd64", stext=0xFFFFFFFF81000000):
    real = FakeTypes()
    rec = kcache.KernelRecord.open(BUILD, release)
    types = kcache.recorded_types(rec, lambda: real)
    assert types.sizeof("struct page") == 64
    with pytest.raises(KeyError):
        types.sizeof("struct nothing")
    assert types.enumerators(containing="A") == {"A": 1, "B": 2}
    syms = kcache.RecordedSymbols(rec, stext, {"hstates": stext + 0x1000, "gone": None}.get)
    assert syms("hstates") == stext + 0x1000
    assert syms("gone") is None
    rec.save()
    return real


def test_a_second_run_answers_from_the_record_and_moves_symbols_with_kaslr(cache):
    _record_once()
    assert (cache / f"{BUILD}.json").exists()
    rec = kcache.KernelRecord.open(BUILD, "6.12.117+deb13-amd64")

    def never():
        raise AssertionError("the record holds the answer")

    types = kcache.recorded_types(rec, never)
    assert types.sizeof("struct page") == 64
    with pytest.raises(KeyError):
        types.sizeof("struct nothing")
    assert types.enumerators(containing="A") == {"A": 1, "B": 2}
    other_boot = 0xFFFFFFFFA0000000  # another KASLR offset: the same offsets from _stext
    syms = kcache.RecordedSymbols(rec, other_boot, lambda name: never())
    assert syms("hstates") == other_boot + 0x1000
    assert syms("gone") is None


def test_a_question_the_record_lacks_loads_the_real_thing_and_is_recorded(cache):
    _record_once()
    real = FakeTypes()
    rec = kcache.KernelRecord.open(BUILD, "6.12.117+deb13-amd64")
    types = kcache.recorded_types(rec, lambda: real)
    assert types.sizeof("struct page") == 64 and real.asked == 0
    assert types.func_signature("f") == (["x"], False)  # not a Types question: the real one's
    with pytest.raises(KeyError):
        types.sizeof("struct other")
    assert real.asked == 1
    rec.save()
    again = kcache.recorded_types(kcache.KernelRecord.open(BUILD, "6.12.117+deb13-amd64"), lambda: None)
    with pytest.raises(KeyError):
        again.sizeof("struct other")


@pytest.mark.parametrize("content", [
    b"", b"{", b"\xff\xfe garbage", b"[]", b'"text"', b"null",
    json.dumps({"format": kcache.FORMAT, "build_id": "0" * 40, "release": "6.12.117+deb13-amd64",
                "has_types": True, "types": {}, "symbols": {}}).encode(),  # another build's
    json.dumps({"format": kcache.FORMAT + 1, "build_id": BUILD, "release": "6.12.117+deb13-amd64",
                "has_types": True, "types": {}, "symbols": {}}).encode(),  # another format
    json.dumps({"format": kcache.FORMAT, "build_id": BUILD, "release": "6.1.0-50-amd64",
                "has_types": True, "types": {}, "symbols": {}}).encode(),  # another release
    json.dumps({"format": kcache.FORMAT, "build_id": BUILD, "release": "6.12.117+deb13-amd64",
                "has_types": True, "types": {"k": "not an answer"}, "symbols": {}}).encode(),
    json.dumps({"format": kcache.FORMAT, "build_id": BUILD, "release": "6.12.117+deb13-amd64",
                "has_types": True, "types": {}, "symbols": {"hstates": "0x10"}}).encode(),
])
def test_a_corrupt_or_foreign_record_is_ignored_and_replaced(cache, content):
    cache.mkdir(parents=True)
    (cache / f"{BUILD}.json").write_bytes(content)
    rec = kcache.KernelRecord.open(BUILD, "6.12.117+deb13-amd64")
    assert rec.types == {} and rec.symbols == {} and rec.has_types is None
    real = _record_once()
    assert real.asked == 3  # everything asked of the real thing
    doc = json.loads((cache / f"{BUILD}.json").read_text())
    assert doc["build_id"] == BUILD and doc["types"]


def test_an_unwritable_cache_is_no_error(tmp_path, monkeypatch):
    blocker = tmp_path / "file"
    blocker.write_text("")
    monkeypatch.delenv("INSPECT_VMEMMAP_NO_CACHE", raising=False)
    monkeypatch.setenv("INSPECT_VMEMMAP_CACHE", str(blocker))  # kernels/ cannot be made under a file
    _record_once()


def test_no_build_id_or_cache_off_means_no_record(cache, monkeypatch):
    assert kcache.KernelRecord.open(None, "x") is None
    assert kcache.KernelRecord.open("not hex", "x") is None
    monkeypatch.setenv("INSPECT_VMEMMAP_NO_CACHE", "1")
    assert kcache.KernelRecord.open(BUILD, "x") is None


def _check_json(core: Path, env: dict) -> str:
    p = subprocess.run([sys.executable, "-m", "inspect_vmemmap", "check", "--core", str(core), "--no-debuginfo",
                        "--json"], capture_output=True, text=True, env=env)
    assert p.returncode in (0, 1), p.stderr
    return p.stdout


@pytest.fixture
def fixture_core(tmp_path):
    return unpack("6.12-numa2-hvo", tmp_path)


@pytest.fixture
def counted_open(monkeypatch, tmp_path):
    """open(core, as_running): the 6.12 fixture opened as a dump, or as a running kernel
    (what writes records), with the record saved as at the process's end; ``calls``
    counts the BTF loads and kallsyms registrations."""
    import atexit

    from inspect_vmemmap.source import drgn as adapter
    from inspect_vmemmap.source.target import target_from_program

    monkeypatch.delenv("INSPECT_VMEMMAP_NO_CACHE", raising=False)
    monkeypatch.delenv("INSPECT_VMEMMAP_CACHE", raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    at_exit, calls = [], {"btf": 0, "kallsyms": 0}
    monkeypatch.setattr(atexit, "register", at_exit.append)
    load_btf, register = adapter.load_btf, adapter._register_kallsyms

    def counting_btf(*a):
        calls["btf"] += 1
        return load_btf(*a)

    def counting_kallsyms(*a):
        calls["kallsyms"] += 1
        return register(*a)

    monkeypatch.setattr(adapter, "load_btf", counting_btf)
    monkeypatch.setattr(adapter, "_register_kallsyms", counting_kallsyms)

    def open_(core: Path, as_running: bool):
        from inspect_vmemmap.commands import confirmed_check

        prog = adapter.open_core(str(core), None)
        t = target_from_program(prog, "qemu" if as_running else "vmcore", no_debuginfo=True, dump_path=str(core))
        doc = confirmed_check(t)[1]
        for save in at_exit:
            save()
        at_exit.clear()
        return doc

    open_.calls = calls
    return open_


def _records(tmp_path):
    return sorted((tmp_path / "xdg" / "inspect-vmemmap" / "kernels").glob("*.json"))


def test_a_dump_never_writes_a_record(fixture_core, counted_open, tmp_path):
    counted_open(fixture_core, as_running=False)
    assert _records(tmp_path) == []


def test_a_recorded_build_opens_without_kallsyms_or_btf(fixture_core, counted_open, tmp_path):
    """A running kernel's open loads kallsyms and the BTF and records; a dump of the same
    build then answers everything `check` asks from the record, loading neither, and
    gives the same document."""
    calls = counted_open.calls
    first = counted_open(fixture_core, as_running=True)
    assert calls["btf"] == 1 and calls["kallsyms"] >= 1
    assert [r.name for r in _records(tmp_path)] == [f"{BUILD}.json"]
    calls.update(btf=0, kallsyms=0)
    second = counted_open(fixture_core, as_running=False)
    assert calls == {"btf": 0, "kallsyms": 0}
    assert json.dumps(first["sections"], sort_keys=True) == json.dumps(second["sections"], sort_keys=True)
    assert json.dumps(first["findings"], sort_keys=True) == json.dumps(second["findings"], sort_keys=True)


def test_answers_from_the_cache_print_what_a_run_without_it_prints(fixture_core, counted_open, tmp_path):
    """The 6.12 fixture checked by the CLI without the cache, then with a record a running
    kernel of its build wrote: byte-identical JSON, and the record left as it was."""
    import os

    base = {k: v for k, v in os.environ.items() if k not in ("INSPECT_VMEMMAP_CACHE", "INSPECT_VMEMMAP_NO_CACHE")}
    off = _check_json(fixture_core, dict(base, INSPECT_VMEMMAP_NO_CACHE="1"))
    counted_open(fixture_core, as_running=True)
    rec = _records(tmp_path)[0]
    doc = json.loads(rec.read_text())
    assert doc["has_types"] is True and doc["types"] and doc["symbols"]
    on = _check_json(fixture_core, dict(base, XDG_CACHE_HOME=str(tmp_path / "xdg")))
    assert off == on
    assert json.loads(rec.read_text()) == doc


def test_a_kernel_without_btf_is_not_recorded_as_such(cache):
    """A dump that lost its BTF says nothing about the build: nothing is written, and the
    next run tries again."""
    rec = kcache.KernelRecord.open(BUILD, "6.12.117+deb13-amd64")
    assert kcache.recorded_types(rec, lambda: None) is None
    kcache.RecordedSymbols(rec, 0, {"hstates": 0x1000}.get)("hstates")
    rec.save()
    assert not (cache / f"{BUILD}.json").exists()
    again = kcache.KernelRecord.open(BUILD, "6.12.117+deb13-amd64")
    assert kcache.recorded_types(again, FakeTypes) is not None
