"""Bad input: one line on stderr naming the problem, exit status 2, never a traceback."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys

import pytest

from tests.cli import one_line, run


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
    one_line(run("model", str(files["random"])), "not a layout")
    one_line(run("model", str(files["dir"] / "nope.json")), "nope.json")


def test_qemu_socket_that_is_not_there(files):
    one_line(run("sections", "--qemu", str(files["dir"] / "qmp.sock")), "QMP")


def test_live_needs_root():
    """Not root: as root, the command runs in a new user namespace (unshare --user), where
    its uid is the overflow uid and it holds no capability over the real /proc/kcore; its
    files stay readable, since their owner is still who it is outside."""
    if os.geteuid() == 0:
        unshare = shutil.which("unshare")
        assert unshare, "unshare (util-linux) is needed to test the not-root refusal as root"
        p = subprocess.run([unshare, "--user", sys.executable, "-m", "inspect_vmemmap", "sections"],
                           capture_output=True, text=True, timeout=120)
    else:
        p = run("sections")
    one_line(p, "root")


def test_live_not_root_in_process(monkeypatch):
    from inspect_vmemmap.errors import AnalysisError
    from inspect_vmemmap.source import open_target

    monkeypatch.setattr(os, "geteuid", lambda: 1000)
    with pytest.raises(AnalysisError, match="needs root"):
        open_target()


# -- foreign input of other kinds (issue 5) --------------------------------------------------


def elf_core(path, vmcoreinfo: str, pages=((0x1000, bytes(4096)),)) -> None:
    """A minimal x86_64 ELF vmcore: a VMCOREINFO note and PT_LOAD segments."""
    import struct

    def note(name, ntype, desc):
        name += b"\0"
        pad = lambda b: b + b"\0" * (-len(b) % 4)  # noqa: E731
        return struct.pack("<III", len(name), len(desc), ntype) + pad(name) + pad(desc)

    n = note(b"VMCOREINFO", 0, vmcoreinfo.encode())
    phnum = 1 + len(pages)
    off = 64 + 56 * phnum
    with open(path, "wb") as f:
        f.write(b"\x7fELF" + bytes([2, 1, 1, 0]) + bytes(8))
        f.write(struct.pack("<HHIQQQIHHHHHH", 4, 62, 1, 0, 64, 0, 0, 64, 56, phnum, 0, 0, 0))
        f.write(struct.pack("<IIQQQQQQ", 4, 0, off, 0, 0, len(n), len(n), 0))
        data = off + len(n)
        for pa, page in pages:
            f.write(struct.pack("<IIQQQQQQ", 1, 7, data, pa, pa, len(page), len(page), 0))
            data += len(page)
        f.write(n)
        for _, page in pages:
            f.write(page)


#: a 6.1 x86_64 VMCOREINFO cut to what the layout decision reads, without SYMBOL(mem_section)
VMCOREINFO_NO_MEM_SECTION = """OSRELEASE=6.1.0-test
PAGESIZE=4096
SYMBOL(swapper_pg_dir)=ffffffff89410000
SYMBOL(_stext)=ffffffff87a00000
SYMBOL(init_top_pgt)=ffffffff89410000
NUMBER(phys_base)=0
KERNELOFFSET=6a00000
NUMBER(pgtable_l5_enabled)=0
SIZE(page)=64
NUMBER(SECTION_SIZE_BITS)=27
NUMBER(MAX_PHYSMEM_BITS)=46
"""
VMCOREINFO_SPARSE = VMCOREINFO_NO_MEM_SECTION + """SYMBOL(vmemmap)=ffffea0000000000
SYMBOL(mem_section)=ffff888004000000
LENGTH(mem_section)=4096
SIZE(mem_section)=16
"""


def test_user_space_core(tmp_path):
    """A process's core file (gdb's generate-core-file): an ELF core, but not a kernel's."""
    import shutil

    gdb = shutil.which("gdb")
    if gdb is None:
        pytest.skip("gdb is not installed")
    core = tmp_path / "user.core"
    sleeper = subprocess.Popen(["sleep", "60"])
    try:
        subprocess.run([gdb, "-batch", "-nx", "-ex", f"generate-core-file {core}", "-p", str(sleeper.pid)],
                       capture_output=True, timeout=60)
    finally:
        sleeper.kill()
        sleeper.wait()
    if not core.exists():
        pytest.skip("gdb could not attach (ptrace restricted)")
    one_line(run("check", "--core", str(core)), str(core), "VMCOREINFO")


def test_vmlinux_as_core(tmp_path):
    """A kernel image given where the dump belongs: the lab's cached vmlinux if there is
    one, else an ELF executable (ET_EXEC, like every vmlinux)."""
    import glob

    from inspect_vmemmap.lab.cache import cache_root

    cached = sorted(glob.glob(str(cache_root() / "kernels" / "*" / "vmlinux")))
    if cached:
        vmlinux = cached[0]
    else:
        vmlinux = tmp_path / "vmlinux"
        data = bytearray(open(sys.executable, "rb").read())
        data[16:18] = (2).to_bytes(2, "little")  # e_type ET_EXEC
        vmlinux.write_bytes(bytes(data))
    one_line(run("sections", "--core", str(vmlinux)), "not a kernel crash dump", "not an ELF core file")


def test_core_as_vmlinux(tmp_path):
    """Dump and debug info swapped: the dump has no DWARF for itself."""
    core = tmp_path / "vmcore"
    elf_core(core, VMCOREINFO_SPARSE)
    one_line(run("sections", "--core", str(core), "--vmlinux", str(core)), str(core), "debug info")


def test_kernel_without_sparsemem(tmp_path):
    """VMCOREINFO without SYMBOL(mem_section): a FLATMEM (or otherwise not
    SPARSEMEM_VMEMMAP) kernel, said in one line."""
    core = tmp_path / "vmcore"
    elf_core(core, VMCOREINFO_NO_MEM_SECTION)
    for args in (["--no-debuginfo"], []):
        one_line(run("check", "--core", str(core), *args), "SYMBOL(mem_section)", "SPARSEMEM")


def test_absurd_mem_section_length(tmp_path):
    """LENGTH(mem_section) far beyond what MAX_PHYSMEM_BITS allows: read up to the
    kernel's NR_SECTION_ROOTS, say so, and finish."""
    core = tmp_path / "vmcore"
    elf_core(core, VMCOREINFO_SPARSE.replace("LENGTH(mem_section)=4096", "LENGTH(mem_section)=1099511627776"))
    p = run("sections", "--core", str(core), "--no-debuginfo", "--json")
    assert p.returncode in (0, 1), p.stderr
    import json

    doc = json.loads(p.stdout)
    assert any("LENGTH(mem_section)" in f["message"] for f in doc["findings"])


@pytest.mark.parametrize("bad", ["SIZE(mem_section)=0", "SYMBOL(mem_section)=zzz", "SIZE(page)=0",
                                 "NUMBER(SECTION_SIZE_BITS)=60"])
def test_impossible_vmcoreinfo_values(tmp_path, bad):
    key = bad.split("=")[0]
    text = "\n".join(bad if line.startswith(key + "=") else line for line in VMCOREINFO_SPARSE.splitlines()) + "\n"
    core = tmp_path / "vmcore"
    elf_core(core, text)
    p = run("check", "--core", str(core), "--no-debuginfo")
    one_line(p, key)
    assert "internal error" not in p.stderr and "out of memory" not in p.stderr


# -- what a new user meets first (issue 17) --------------------------------------------------


@pytest.mark.parametrize("content, words", [
    (b"{}", ["no \"layout\" object", "check --save-layout"]),
    (b"[1, 2]", ["a JSON list", "not a layout"]),
    (b"{\"layout\": [1]}", ["\"layout\" is a JSON list"]),
    (b"{\"layout\": {\"arch\": \"x86_64\"}}", ["\"layout\" lacks", "page_size"]),
    (b"{\"layout\": {\"arch\": \"x86_64\", \"frob\": 1}}", ["does not know: frob"]),
    (b"{\"layo", ["not JSON (line 1"]),
    (bytes(range(128, 256)), ["not a text file"]),
    (b"\x7fELF\x02\x01\x01" + bytes(100), ["a crash dump, not a layout", "check --core"]),
    (b"{\"schema\": \"inspect-vmemmap/1\", \"target\": {}}", ["a `--json` report, not a layout"]),
])
def test_model_bad_input_in_words(tmp_path, content, words):
    f = tmp_path / "layout.json"
    f.write_bytes(content)
    p = run("model", str(f))
    one_line(p, str(f), *words)
    for python in ("KeyError", "UnicodeDecodeError", "AttributeError", "TypeError", "codec", "internal error"):
        assert python not in p.stderr, p.stderr


@pytest.mark.parametrize("fmt", ["xz", "gzip", "bzip2", "zstd"])
def test_compressed_core_is_read(tmp_path, fmt):
    """A dump compressed with xz, gzip, bzip2 or zstd gives what the plain one gives."""
    import bz2
    import gzip
    import lzma
    import shutil

    plain = tmp_path / "vmcore"
    elf_core(plain, VMCOREINFO_SPARSE)
    packed = tmp_path / f"vmcore.{fmt}"
    if fmt == "zstd":
        zstd = shutil.which("zstd")
        assert zstd, "zstd is not installed (scripts/setup installs it)"
        subprocess.run([zstd, "-q", str(plain), "-o", str(packed)], check=True)
    else:
        opener = {"xz": lzma.open, "gzip": gzip.open, "bzip2": bz2.open}[fmt]
        with open(plain, "rb") as src, opener(packed, "wb") as dst:
            shutil.copyfileobj(src, dst)
    want = run("sections", "--core", str(plain), "--no-debuginfo", "--json")
    got = run("sections", "--core", str(packed), "--no-debuginfo", "--json")
    assert want.returncode in (0, 1), want.stderr
    assert (got.returncode, got.stdout) == (want.returncode, want.stdout), got.stderr
    # cut short: one line naming the file and what is wrong
    data = packed.read_bytes()
    cut = tmp_path / f"cut.{fmt}"
    cut.write_bytes(data[: len(data) // 2])
    one_line(run("sections", "--core", str(cut), "--no-debuginfo"), str(cut), fmt)


def test_compressed_foreign_file_names_the_users_file(tmp_path, files):
    import lzma

    packed = tmp_path / "random.xz"
    with lzma.open(packed, "wb") as f:
        f.write(files["random"].read_bytes())
    p = run("sections", "--core", str(packed))
    one_line(p, f"{packed} (decompressed)", "not a kernel crash dump")
    assert "/tmp/inspect-vmemmap-" not in p.stderr


def test_temporary_copy_is_removed(tmp_path):
    import lzma

    plain = tmp_path / "vmcore"
    elf_core(plain, VMCOREINFO_SPARSE)
    packed = tmp_path / "vmcore.xz"
    packed.write_bytes(lzma.compress(plain.read_bytes()))
    env = dict(os.environ, TMPDIR=str(tmp_path / "t"))
    (tmp_path / "t").mkdir()
    p = run("sections", "--core", str(packed), "--no-debuginfo", env=env)
    assert p.returncode in (0, 1), p.stderr
    assert list((tmp_path / "t").iterdir()) == []


def test_closed_stdout_pipe_exits_0():
    """``map | head -1``: the reader had what it wanted; not "errors found" (1), no
    traceback. The pipe is made small so that the tool is still writing when it closes."""
    import fcntl

    core = os.path.join(os.path.dirname(__file__), "..", "..", "fixtures", "6.12-devdax.core.xz")
    for args in (["map", "--core", core], ["map", "--core", core, "--json"]):
        r, w = os.pipe()
        fcntl.fcntl(r, fcntl.F_SETPIPE_SZ, 4096)
        p = subprocess.Popen([sys.executable, "-m", "inspect_vmemmap", *args], stdout=w, stderr=subprocess.PIPE)
        os.close(w)
        assert os.read(r, 100)  # the first line, as head -1 reads it
        os.close(r)
        err = p.stderr.read().decode()
        assert p.wait(timeout=120) == 0, err
        assert "Traceback" not in err and "Broken pipe" not in err and "Exception ignored" not in err, err


def test_boot_names_the_series_it_knows():
    from inspect_vmemmap.lab.debian import SERIES

    one_line(run("boot", "--debian", "6.2"), "6.2", *SERIES)
    one_line(run("boot"), "--debian", *SERIES)
    p = run("boot", "--help")
    assert p.returncode == 0 and all(s in p.stdout for s in SERIES)


def test_pfn_text_in_words(tmp_path):
    """No '[not present]' swallowed as markup, no unexplained 'node -'."""
    plain = tmp_path / "vmcore"
    elf_core(plain, VMCOREINFO_SPARSE)
    p = run("pfn", "0x100000", "--core", str(plain), "--no-debuginfo")
    assert p.returncode in (0, 1), p.stderr
    line = next(l for l in p.stdout.splitlines() if l.startswith("pfn "))
    assert "section 32 (not present)" in line, line
    assert " , " not in line and "node -" not in line and "in no node's span" in line, line


DEMO = [os.path.join(os.path.dirname(__file__), "..", "..", "scripts", "demo")]


def test_demo_help_and_unknown_fixture():
    p = subprocess.run(DEMO + ["--help"], capture_output=True, text=True, timeout=60)
    assert p.returncode == 0 and "scripts/demo FIXTURE" in p.stdout and "no fixture" not in p.stderr
    p = subprocess.run(DEMO + ["nope"], capture_output=True, text=True, timeout=60)
    assert p.returncode == 2 and "no fixture nope" in p.stderr and "6.1-la57-hvo" in p.stderr
    p = subprocess.run([sys.executable, "-m", "inspect_vmemmap.lab.demo", "6.2"], capture_output=True, text=True)
    assert p.returncode == 2 and "6.12" in p.stderr


def test_check_text_on_a_pipe():
    """No colour legend without colours, sizes of one table in one unit, plurals."""
    import re

    core = os.path.join(os.path.dirname(__file__), "..", "..", "fixtures", "6.12-devdax.core.xz")
    p = run("check", "--core", core)
    assert p.returncode == 0, p.stderr
    assert "green early" not in p.stdout and "(# PMD blocks" in p.stdout
    assert not re.search(r"\b\d{4,}K\b", p.stdout), p.stdout  # 36.5M, not 37376K
    assert "1 device page map (altmap)" in p.stdout and "19 split PMDs" in p.stdout
