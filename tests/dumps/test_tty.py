"""Tables on a real terminal never hide data (issue 17): ``map`` and ``sections`` on a
pseudo-terminal of 80 and 120 columns print no ``…``, and every address, pfn and state
of the piped output (where tables take the width they need) appears whole."""

from __future__ import annotations

import fcntl
import os
import re
import struct
import subprocess
import sys
import termios

import pytest
from tests.recorded import unpack


ANSI = re.compile(r"\x1b\[[0-9;?]*[A-Za-z]|\x1b\][^\x07]*\x07|\r")
#: x86_64 5-level with HVO tails ((xN) backing), x86_64 4-level with ZONE_DEVICE (partial
#: subsections, many ranges), arm64 16K 3-level (the longest FLAGS)
TTY_FIXTURES = ("6.1-la57-hvo", "6.12-devdax", "6.12-arm64-16k-va47")


def on_tty(args, columns: int) -> str:
    """Run the CLI with stdout on a pty of ``columns`` x 50; its output without escapes."""
    master, slave = os.openpty()
    fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", 50, columns, 0, 0))
    env = {k: v for k, v in os.environ.items() if k not in ("COLUMNS", "LINES", "NO_COLOR")}
    env["TERM"] = "xterm-256color"
    p = subprocess.Popen([sys.executable, "-m", "inspect_vmemmap", *args], stdout=slave, stderr=subprocess.PIPE,
                         stdin=subprocess.DEVNULL, env=env)
    os.close(slave)
    chunks = []
    while True:
        try:
            data = os.read(master, 65536)
        except OSError:  # EIO: the child closed the pty
            break
        if not data:
            break
        chunks.append(data)
    os.close(master)
    _, err = p.communicate(timeout=120)
    assert p.returncode == 0, err
    return ANSI.sub("", b"".join(chunks).decode())


def piped(args) -> str:
    p = subprocess.run([sys.executable, "-m", "inspect_vmemmap", *args], capture_output=True, text=True, timeout=120)
    assert p.returncode == 0, p.stderr
    return p.stdout


def _table_tokens(text: str) -> set:
    """Every word of the table rows (the lines that start with an address or a section number)."""
    out = set()
    for line in text.splitlines():
        if re.match(r"\s*(0x[0-9a-f]{8,}|\d+\s+[0-9a-f]{16})\b", line):
            out.update(line.split())
    return out


@pytest.fixture(scope="module", params=TTY_FIXTURES)
def core(request, tmp_path_factory):
    return unpack(request.param, tmp_path_factory.mktemp("tty"))


@pytest.mark.parametrize("command", ["map", "sections"])
def test_tables_fit_without_hiding(core, command):
    args = [command, "--core", str(core)]
    full = piped(args)
    want = _table_tokens(full)
    assert want
    for columns in (80, 120):
        out = on_tty(args, columns)
        assert "…" not in out, f"{command} at {columns} columns cut a cell:\n{out}"
        got = set(out.split())
        missing = want - got
        if "not shown at" in out:  # optional columns left out (and said so): their words may be gone
            missing = {w for w in missing if re.fullmatch(r"0x[0-9a-f]+|[0-9a-f]{16}|\d+|[PMOEDV]+", w)}
        assert not missing, f"{command} at {columns} columns lost {sorted(missing)[:10]}:\n{out}"
        for line in out.splitlines():
            assert len(line) <= columns, f"{command} at {columns} columns: a line of {len(line)}:\n{line}"


def test_layout_drops_optional_columns_then_folds():
    from inspect_vmemmap.tables import Column, human_size, layout, plural

    cols = [Column("A"), Column("B", optional=True), Column("C"), Column("D")]
    rows = [["a" * 10, "b" * 10, "c" * 10, "d" * 10]]
    assert layout(cols, rows, 46) == ([0, 1, 2, 3], 1)  # 4 x 10 + 3 x 2
    assert layout(cols, rows, 45) == ([0, 2, 3], 1)  # B left out
    assert layout(cols, rows, 33) == ([0, 1, 2, 3], 2)  # A B / C D, folded: nothing left out
    assert layout(cols, rows, 21) == ([0, 1, 2, 3], 4)  # one column a line
    assert layout(cols, rows, 5) == ([0, 1, 2, 3], 4)  # cells run on
    assert [plural(n, "split PMD") for n in (0, 1, 2)] == ["0 split PMDs", "1 split PMD", "2 split PMDs"]
    assert [human_size(n) for n in (0, 4096, 20 << 20, 37376 << 10, 35056 << 10)] == \
        ["0", "4K", "20M", "36.5M", "~34.23M"]
