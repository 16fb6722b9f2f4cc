"""Bad input: one line on stderr naming the problem, exit status 2, never a traceback."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest


def run(*args, **kw):
    return subprocess.run([sys.executable, "-m", "inspect_vmemmap", *args], capture_output=True, text=True,
                          timeout=120, **kw)


def one_line(p, *words):
    assert p.returncode == 2, (p.returncode, p.stdout, p.stderr)
    lines = p.stderr.strip().splitlines()
    assert len(lines) == 1, p.stderr
    assert "Traceback" not in p.stderr
    for w in words:
        assert w in lines[0], lines[0]


@pytest.fixture
def files(tmp_path):
    rnd = tmp_path / "random.bin"
    rnd.write_bytes(os.urandom(65536))
    empty = tmp_path / "empty"
    empty.write_bytes(b"")
    return {"random": rnd, "empty": empty, "dir": tmp_path}


@pytest.mark.parametrize("cmd", ["sections", "map", "check"])
def test_not_a_core(files, cmd):
    one_line(run(cmd, "--core", str(files["random"])), "not a kernel crash dump")
    one_line(run(cmd, "--core", str(files["empty"])), "not a kernel crash dump")
    one_line(run(cmd, "--core", sys.executable), "not a kernel crash dump")  # an executable


def test_missing_and_directory(files):
    one_line(run("sections", "--core", str(files["dir"] / "nope")), "no such file")
    one_line(run("sections", "--core", str(files["dir"])), "directory")


def test_bad_arguments(files):
    one_line(run("pfn", "xyz", "--core", str(files["random"])), "PFN")
    one_line(run("frobnicate"), "No such command")
    one_line(run("sections", "--core", "a", "--qemu", "b"), "two different targets")


def test_bad_layout(files):
    one_line(run("model", str(files["random"])), "not a layout description")
    one_line(run("model", str(files["dir"] / "nope.json")), "nope.json")


def test_qemu_socket_that_is_not_there(files):
    one_line(run("sections", "--qemu", str(files["dir"] / "qmp.sock")), "QMP")


@pytest.mark.skipif(os.geteuid() == 0, reason="needs a non-root user")
def test_live_needs_root():
    one_line(run("sections"), "root")


def test_live_not_root_in_process(monkeypatch):
    from inspect_vmemmap.target import AnalysisError, open_target

    monkeypatch.setattr(os, "geteuid", lambda: 1000)
    with pytest.raises(AnalysisError, match="needs root"):
        open_target()
