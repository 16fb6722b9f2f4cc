"""The command line as a user runs it: a subprocess of ``python -m inspect_vmemmap``, and
the check that bad input got one line on stderr and exit status 2."""

from __future__ import annotations

import subprocess
import sys


def run(*args, **kw) -> subprocess.CompletedProcess:
    """``inspect-vmemmap ARGS`` in a subprocess (text, both streams captured, 120 s)."""
    return subprocess.run([sys.executable, "-m", "inspect_vmemmap", *args], capture_output=True, text=True,
                          timeout=120, **kw)


def one_line(p: subprocess.CompletedProcess, *words: str) -> str:
    """``p`` exited 2 with one line on stderr, no traceback and no internal error, holding
    each of ``words``: returns that line."""
    assert p.returncode == 2, (p.returncode, p.stdout[-2000:], p.stderr[-2000:])
    lines = p.stderr.strip().splitlines()
    assert len(lines) == 1, p.stderr
    assert "internal error" not in p.stderr and "Traceback" not in p.stderr, p.stderr
    for w in words:
        assert w in lines[0], lines[0]
    return lines[0]
