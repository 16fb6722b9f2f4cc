"""Hostile and partial input (issue 15), on the real fixtures: every input opened with a
bound, refused in one line with exit status 2, never a hang, never an internal error.

Each run has a subprocess timeout far above what it needs: a hang fails the test
instead of blocking the suite. Damaged copies of the fixtures are built here, in tmp."""

from __future__ import annotations

import json
import os
import re
import socket
import struct
import subprocess
import sys
import threading

import pytest

from tests import schema
from tests.cli import one_line
from tests.recorded import unpack



def run(*args, timeout=120, env=None):
    e = dict(os.environ, **(env or {}))
    return subprocess.run([sys.executable, "-m", "inspect_vmemmap", *args], capture_output=True, text=True,
                          timeout=timeout, env=e)


@pytest.fixture(scope="module")
def core(tmp_path_factory):
    return unpack("7.2-hvo", tmp_path_factory.mktemp("hostile"))


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
    one_line(_model(tmp_path, None, raw="\xff\xfe"), "layout")
    one_line(_model(tmp_path, None, raw="[]"), "not a layout")


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
    schema.validate(doc, "check")
    errs = [f for f in doc["findings"] if f["severity"] == "error"]
    assert [f["kind"] for f in errs] == ["section-flags"], errs
    assert int(errs[0]["phys"], 16) > b and "System RAM" in errs[0]["message"]


# -- truncated dumps ---------------------------------------------------------------------------


@pytest.mark.parametrize("fraction", [0.01, 0.3, 0.6])
def test_a_dump_cut_short_with_no_section_left_is_refused(core, tmp_path, fraction):
    cut = tmp_path / "cut.core"
    data = core.read_bytes()
    cut.write_bytes(data[:int(len(data) * fraction)])
    one_line(run("check", "--core", str(cut), timeout=120), "truncated", "no section")


@pytest.mark.parametrize("fraction", [0.9, 0.99])
def test_a_truncated_dump_is_named_and_incomplete(core, tmp_path, fraction):
    data = core.read_bytes()
    cut = tmp_path / "cut.core"
    cut.write_bytes(data[:int(len(data) * fraction)])
    p = run("check", "--core", str(cut), "--json", timeout=120)
    assert p.returncode in (0, 1), p.stderr
    doc = json.loads(p.stdout)
    schema.validate(doc, "check")
    dump = doc["target"]["dump"]
    assert dump["truncated"] is True and dump["complete"] is False
    assert dump["file_bytes"] == len(data[:int(len(data) * fraction)]) and dump["expected_bytes"] == len(data)
    assert dump["missing"] and dump["missing_bytes"] > 0
    assert [f for f in doc["findings"] if f["severity"] == "error"] == []
    text = run("check", "--core", str(cut), timeout=120)
    assert "INCOMPLETE" in text.stdout and "TRUNCATED" in text.stdout


def test_a_whole_dump_is_not_truncated(core):
    from inspect_vmemmap.truncation import elf_truncation

    assert elf_truncation(str(core)) is None


# -- VMCOREINFO: impossible values refused by key, damage that loses kallsyms tolerated ---------


def _edit(core, tmp_path, old: bytes, new: bytes):
    assert len(old) == len(new)
    data = core.read_bytes()
    assert data.count(old) == 1, old
    out = tmp_path / "edited.core"
    out.write_bytes(data.replace(old, new))
    return out


@pytest.mark.parametrize("old,new,words", [
    (b"PAGESIZE=4096", b"PAGESIZE=8192", ["PAGESIZE=8192"]),
    (b"SIZE(page)=64", b"SIZE(page)=63", ["SIZE(page)=63"]),
    (b"LENGTH(mem_section)=262144", b"LENGTH(mem_section)=-00001", ["LENGTH(mem_section)=-1"]),
    (b"NUMBER(SECTION_SIZE_BITS)=27", b"NUMBER(SECTION_SIZE_BITS)=15", ["SECTION_SIZE_BITS", "15"]),
    (b"NUMBER(SECTION_SIZE_BITS)=27", b"NUMBER(SECTION_SIZE_BITS)=20", ["SECTION_SIZE_BITS", "20"]),
    (b"SIZE(mem_section)=32", b"SIZE(mem_section)=99", ["SIZE(mem_section)=99"]),
])
def test_impossible_vmcoreinfo_values_are_refused_by_name(core, tmp_path, old, new, words):
    one_line(run("check", "--core", str(_edit(core, tmp_path, old, new))), *words)


@pytest.mark.parametrize("old,new", [
    (b"SYMBOL(kallsyms_names)=", b"SYMBOL(xallsyms_names)="),  # as kernels before v6.0 write it
    (b"SIZE(list_head)=16", b"SIZE(list_head)=1\xe9"),  # one non-ASCII byte: drgn's loader gives up
])
def test_a_healthy_dump_that_loses_kallsyms_keeps_btf_and_has_no_error(core, tmp_path, old, new):
    data = core.read_bytes()
    if old.startswith(b"SYMBOL(kallsyms"):
        data = data.replace(b"SYMBOL(kallsyms_", b"SYMBOL(xallsyms_")
    else:
        assert data.count(old) == 1
        data = data.replace(old, new)
    edited = tmp_path / "edited.core"
    edited.write_bytes(data)
    p = run("check", "--core", str(edited), "--json")
    assert p.returncode == 0, p.stderr
    doc = json.loads(p.stdout)
    schema.validate(doc, "check")
    assert doc["target"]["type_source"] == "btf"
    assert doc["summary"]["errors"] == 0
    assert any("HugeTLB pools could not be read" in a for a in doc["assumptions"])


def test_osrelease_against_init_uts_ns():
    from types import SimpleNamespace

    from inspect_vmemmap.errors import AnalysisError
    from inspect_vmemmap.inputs import _same_release

    uts = bytes(65) + b"(none)".ljust(65, b"\0") + b"7.2.13+deb14-amd64".ljust(65, b"\0")

    class Mem:
        def read(self, addr, size, physical=False):
            return uts[addr - 0x1000:addr - 0x1000 + size]

    class Info:
        def __init__(self, release):
            self.release = release

        def get(self, key):
            return self.release

        def symbol(self, name):
            return 0x1000

        def offset(self, name):
            return 0

    _same_release(SimpleNamespace(vmcoreinfo=Info("7.2.13+deb14-amd64"), memory=Mem()))
    with pytest.raises(AnalysisError, match="OSRELEASE=2.6.32 is not this kernel: its init_uts_ns says 7.2.13"):
        _same_release(SimpleNamespace(vmcoreinfo=Info("2.6.32"), memory=Mem()))


# -- BTF with a corrupted member name offset ---------------------------------------------------


@pytest.mark.parametrize("name", ["struct page", "struct hstate", "struct resource", "struct pglist_data",
                                  "struct zone", "struct memory_block", "struct mem_section"])
def test_a_corrupted_btf_member_name_is_not_an_internal_error(core, tmp_path, name):
    """One member name offset of a type the check reads points outside the string
    section: that input is missing (an assumption or a warning); the healthy dump gets
    no error."""
    from inspect_vmemmap.btf import Btf

    data = bytearray(core.read_bytes())
    hdr = struct.pack("<HBBI", 0xEB9F, 1, 0, 24)
    at = data.find(hdr)
    while True:
        assert at >= 0, "the kernel's BTF must be in the fixture"
        _, _, _, hl, toff, tlen, soff, slen = struct.unpack_from("<HBBIIIII", data, at)
        try:
            btf = Btf.parse(bytes(data[at:at + hl + max(toff + tlen, soff + slen)]))
            btf.sizeof("struct page")
            break
        except Exception:
            at = data.find(hdr, at + 1)
    tid = btf.find(name)
    struct.pack_into("<I", data, at + btf._offsets[tid] + 12, 0x7FFFFFF0)  # its first member's name_off
    bad = tmp_path / "btf.core"
    bad.write_bytes(bytes(data))
    p = run("check", "--core", str(bad))
    assert "internal error" not in p.stderr and "Traceback" not in p.stderr, p.stderr
    assert p.returncode == 0, p.stdout[-3000:]


def test_arm64_va_bits_refused_by_name(tmp_path):
    core = unpack("7.2-arm64-va48", tmp_path)
    one_line(run("check", "--core", str(_edit(core, tmp_path, b"NUMBER(VA_BITS)=52", b"NUMBER(VA_BITS)=99"))),
             "NUMBER(VA_BITS)=99")
