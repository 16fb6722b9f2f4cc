"""Hostile and partial input (issue 15), on the real fixtures: every input opened with a
bound, refused in one line with exit status 2, never a hang, never an internal error.

Each run has a subprocess timeout far above what it needs: a hang fails the test
instead of blocking the suite. Damaged copies of the fixtures are built here, in tmp."""

from __future__ import annotations

import json
import lzma
import math
import os
import re
import shutil
import socket
import struct
import subprocess
import sys
import threading
from pathlib import Path

import pytest

FIXTURES = Path(__file__).resolve().parent.parent.parent / "fixtures"


def run(*args, timeout=120, env=None):
    e = dict(os.environ, **(env or {}))
    return subprocess.run([sys.executable, "-m", "inspect_vmemmap", *args], capture_output=True, text=True,
                          timeout=timeout, env=e)


def one_line(p, *words):
    """Exit status 2, one line on stderr, no internal error, naming ``words``."""
    lines = p.stderr.strip().splitlines()
    assert p.returncode == 2, (p.returncode, p.stderr[-2000:])
    assert len(lines) == 1, p.stderr
    assert "internal error" not in p.stderr and "Traceback" not in p.stderr, p.stderr
    for w in words:
        assert w in lines[0], lines[0]
    return lines[0]


@pytest.fixture(scope="module")
def core(tmp_path_factory):
    path = tmp_path_factory.mktemp("hostile") / "7.2-hvo.core"
    with lzma.open(FIXTURES / "7.2-hvo.core.xz") as f, open(path, "wb") as out:
        shutil.copyfileobj(f, out)
    return path


@pytest.fixture(scope="module")
def layout(core, tmp_path_factory):
    path = tmp_path_factory.mktemp("hostile") / "layout.json"
    p = run("check", "--core", str(core), "--save-layout", str(path))
    assert p.returncode == 0, p.stderr
    return json.loads(path.read_text())


# -- files that are not files ------------------------------------------------------------------


@pytest.mark.parametrize("option", ["--core", "--vmlinux", "--vmcoreinfo", "model", "--save-layout"])
def test_a_fifo_is_refused_before_anything_opens_it(core, tmp_path, option):
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    if option == "model":
        args = ["model", str(fifo)]
    elif option == "--core":
        args = ["check", "--core", str(fifo)]
    else:
        args = ["check", "--core", str(core), option, str(fifo)]
    line = one_line(run(*args, timeout=60), "FIFO", option if option != "model" else "LAYOUT")
    assert str(fifo) in line


def test_save_layout_never_overwrites_an_input(core, tmp_path):
    before = core.stat()
    one_line(run("check", "--core", str(core), "--save-layout", str(core)), "--core", "refusing")
    link = tmp_path / "link"
    link.symlink_to(core)
    one_line(run("check", "--core", str(core), "--save-layout", str(link)), "--core")
    hard = tmp_path / "hard"
    os.link(core, hard)
    one_line(run("check", "--core", str(core), "--save-layout", str(hard)), "--core")
    assert core.stat().st_size == before.st_size and core.stat().st_mtime == before.st_mtime


def test_a_directory_or_socket_as_the_dump(tmp_path):
    one_line(run("check", "--core", str(tmp_path)), "directory")
    s = socket.socket(socket.AF_UNIX)
    s.bind(str(tmp_path / "s"))
    try:
        one_line(run("sections", "--core", str(tmp_path / "s")), "socket")
    finally:
        s.close()


# -- QMP sockets that never answer -------------------------------------------------------------


class Server:
    """A unix socket server that behaves badly: ``mode`` "silent" accepts and says
    nothing, "greeting" sends only the QMP greeting, "never" never accepts, "garbage"
    sends a line that is not JSON, "hangup" closes at once."""

    def __init__(self, path, mode):
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.bind(str(path))
        self.sock.listen(4)
        self.mode = mode
        self.conns = []
        self.stop = threading.Event()
        if mode != "never":
            threading.Thread(target=self.serve, daemon=True).start()

    def serve(self):
        self.sock.settimeout(0.2)
        while not self.stop.is_set():
            try:
                c, _ = self.sock.accept()
            except OSError:
                continue
            self.conns.append(c)
            if self.mode == "greeting":
                c.sendall(b'{"QMP": {"version": {}, "capabilities": []}}\r\n')
            elif self.mode == "garbage":
                c.sendall(b"SSH-2.0-OpenSSH_9.2\r\n")
            elif self.mode == "hangup":
                c.close()

    def close(self):
        self.stop.set()
        for c in self.conns:
            c.close()
        self.sock.close()


@pytest.mark.parametrize("mode,words", [("silent", ["no answer before its greeting"]),
                                        ("greeting", ["no answer to qmp_capabilities"]),
                                        ("never", ["no answer before its greeting"]),
                                        ("garbage", ["not a QMP socket"]),
                                        ("hangup", ["hung up"])])
def test_a_qmp_socket_that_does_not_answer(tmp_path, mode, words):
    path = tmp_path / "qmp.sock"
    srv = Server(path, mode)
    try:
        one_line(run("sections", "--qemu", str(path), timeout=60, env={"INSPECT_VMEMMAP_QMP_TIMEOUT": "1"}),
                 "--qemu", *words)
    finally:
        srv.close()


def test_qemu_on_a_regular_file_or_nothing(core, tmp_path):
    one_line(run("sections", "--qemu", str(core), timeout=60), "not a QMP socket")
    one_line(run("sections", "--qemu", str(tmp_path / "none"), timeout=60), "no such QMP socket")


def test_probe_qmp_accepts_a_qmp_server(tmp_path):
    """The probe negotiates like a client and hangs up: a server that answers passes."""
    from inspect_vmemmap.inputs import probe_qmp

    path = tmp_path / "q.sock"
    srv = socket.socket(socket.AF_UNIX)
    srv.bind(str(path))
    srv.listen(1)

    def serve():
        c, _ = srv.accept()
        c.sendall(b'{"QMP": {"version": {}, "capabilities": []}}\r\n')
        c.recv(4096)
        c.sendall(b'{"event": "RESUME", "timestamp": {}}\r\n{"return": {}}\r\n')
        c.close()

    threading.Thread(target=serve, daemon=True).start()
    probe_qmp(str(path), timeout=5)
    srv.close()


# -- model: the layout's schema and limits -----------------------------------------------------


def _model(tmp_path, doc, raw=None):
    f = tmp_path / "layout.json"
    f.write_text(raw if raw is not None else json.dumps(doc))
    return run("model", str(f), timeout=60)


def test_the_saved_layout_replays(layout, tmp_path):
    p = _model(tmp_path, layout)
    assert p.returncode == 0, p.stderr


def _with(layout, path, value):
    d = json.loads(json.dumps(layout))
    cur = d
    for k in path[:-1]:
        cur = cur[k]
    cur[path[-1]] = value
    return d


@pytest.mark.parametrize("path,value,words", [
    (("ram", 0, 1), 1.5, ["ram[0][1]", "integer"]),
    (("ram", 0), None, ["ram[0]", "list"]),
    (("ram",), {"a": 1}, ["ram", "list"]),
    (("ram", 0), [1, 2, 3], ["ram[0]", "list of 2"]),
    (("nodes", 0, 0), -1, ["nodes[0][0]"]),
    (("folios",), [{"head_pfn": 0, "order": -1, "optimized": True, "nid": 0, "zone": 0}], ["folios[0].order"]),
    (("folios",), [{"head_pfn": 0, "order": 99, "optimized": True, "nid": 0, "zone": 0}], ["folios[0].order"]),
    (("folios",), [{"head_pfn": 0, "order": 9, "optimized": "yes", "nid": 0, "zone": 0}], ["optimized"]),
    (("layout", "page_size"), None, ["layout.page_size"]),
    (("layout", "section_size_bits"), 3.0, ["layout.section_size_bits"]),
    (("layout", "page_size"), 8192, ["PAGESIZE", "8192"]),
    (("layout", "struct_page_size"), 63, ["SIZE(page)", "63"]),
    (("layout", "section_size_bits"), 20, ["SECTION_SIZE_BITS", "20"]),
    (("layout", "arch"), "vax", ["arch", "vax"]),
    (("memmap_on_memory",), 7, ["memmap_on_memory"]),
    (("device_maps",), [{"ranges": [["0x0", "0x1"]], "vmemmap_shift": -3}], ["vmemmap_shift"]),
])
def test_model_refuses_what_is_not_a_layout(layout, tmp_path, path, value, words):
    one_line(_model(tmp_path, _with(layout, path, value)), *words)


def test_model_refuses_nan_infinity_and_deep_nesting(layout, tmp_path):
    text = json.dumps(layout).replace('"nodes": [', '"nodes": [[NaN, 0, 1], ', 1)
    one_line(_model(tmp_path, None, raw=text), "NaN")
    text = json.dumps(layout).replace('"nodes": [', '"nodes": [[Infinity, 0, 1], ', 1)
    one_line(_model(tmp_path, None, raw=text), "Infinity")
    one_line(_model(tmp_path, None, raw="[" * 100000 + "]" * 100000), "nested")
    one_line(_model(tmp_path, None, raw="\xff\xfe"), "not a layout")
    one_line(_model(tmp_path, None, raw="[]"), "object")


@pytest.mark.parametrize("end", [1 << 52, (1 << 64) - 1, 1 << 70])
def test_model_with_ram_to_the_end_of_the_address_space(layout, tmp_path, end):
    """RAM (or device) ranges up to 2^52 and beyond: refused by the layout's own limits
    (MAX_PHYSMEM_BITS) or the model's (limits.MAX_SECTIONS), in bounded time."""
    d = _with(layout, ("ram",), layout["ram"] + [[hex(1 << 40), hex(end)]])
    one_line(_model(tmp_path, d), "ram" if end > 1 << layout["layout"]["max_physmem_bits"] else "sections")
    d = _with(layout, ("device_maps",), [{"ranges": [[hex(1 << 40), hex(end)]], "vmemmap_shift": 0}])
    one_line(_model(tmp_path, d))


# -- a corrupted iomem "System RAM" end in a real dump -----------------------------------------


def test_corrupted_system_ram_end_is_a_finding_not_a_loop(core, tmp_path, layout):
    """The end of the highest System RAM resource overwritten with 2^64 - 1 in a copy of
    the dump: one section-flags error naming the range, in bounded time."""
    a, b = (int(x, 16) for x in layout["ram"][-1])
    # struct resource {start, end, ...} holds the inclusive end; ours is exclusive
    needle = struct.pack("<QQ", a, b - 1)
    data = core.read_bytes()
    hits = [m.start() for m in re.finditer(re.escape(needle), data)]
    assert 1 <= len(hits) <= 4, hits  # the resource (and the copy e820 keeps of it)
    for at in hits:
        data = data[:at + 8] + struct.pack("<Q", (1 << 64) - 1) + data[at + 16:]
    bad = tmp_path / "bad.core"
    bad.write_bytes(data)
    p = run("check", "--core", str(bad), "--json", timeout=120)
    assert p.returncode == 1, p.stderr
    doc = json.loads(p.stdout)
    errs = [f for f in doc["findings"] if f["severity"] == "error"]
    assert [f["kind"] for f in errs] == ["section-flags"], errs
    assert int(errs[0]["phys"], 16) > b and "System RAM" in errs[0]["message"]
