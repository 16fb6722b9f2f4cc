"""bpftrace, the tool ``watch`` runs (Debian's package ``bpftrace``): whether this machine
lets it trace, which probe points this kernel offers, and the running bpftrace process
(:class:`Bpftrace`) with its attach step."""

from __future__ import annotations

import os
import re
import select
import shutil
import signal
import subprocess
import threading
import time
from dataclasses import replace
from typing import List, Optional, Tuple

from inspect_vmemmap.live.probes import READY, Absent, Probe, program, select as select_probes

TRACEFS = ("/sys/kernel/tracing", "/sys/kernel/debug/tracing")


class WatchError(Exception):
    """Why watch cannot run or go on (one line; exit status 2)."""


def environment_problem() -> Optional[str]:
    if os.geteuid() != 0:
        return "watch needs root (it loads eBPF programs and reads /proc/kcore)"
    if shutil.which("bpftrace") is None:
        return "watch needs bpftrace: apt-get install bpftrace"
    return None


# --- what this kernel has -----------------------------------------------------------------


def traceable_functions() -> Optional[set]:
    """Functions fentry can attach to: ftrace's available_filter_functions, else the text
    symbols of /proc/kallsyms; None if neither can be read.

    A line is ``name`` or ``name [module]``: the file's words are taken whole (one split
    in C, not one per line: 170,000 lines took 4 s in a guest under TCG), and a
    ``[module]`` word is never a function's name."""
    for d in TRACEFS:
        try:
            with open(os.path.join(d, "available_filter_functions")) as f:
                return set(f.read().split())
        except OSError:
            continue
    try:
        with open("/proc/kallsyms") as f:
            return {p[2] for p in (line.split() for line in f) if len(p) >= 3 and p[1] in "tT"}
    except OSError:
        return None


def kprobe_functions() -> set:
    """Text symbols of /proc/kallsyms less the kprobe blacklist (debugfs), where a kprobe
    can go when ftrace cannot patch the function."""
    try:
        with open("/proc/kallsyms") as f:
            names = {p[2] for p in (line.split() for line in f) if len(p) >= 3 and p[1] in "tT"}
    except OSError:
        return set()
    try:
        with open("/sys/kernel/debug/kprobes/blacklist") as f:
            names -= {p[1] for p in (line.split() for line in f) if len(p) >= 2}
    except OSError:
        pass
    return names


def kernel_btf(target):
    """The running kernel's own BTF: the target's types when they came from it, else
    /sys/kernel/btf/vmlinux (a --vmlinux run reads DWARF; bpftrace needs the BTF all the same)."""
    from inspect_vmemmap.btf import Btf, BtfError

    types = getattr(target, "types", None)
    if callable(getattr(types, "real", None)):
        # answered from the per-build cache (kcache.RecordedTypes): the BTF behind it, parsed
        # once for both (in an arm64 guest under TCG each parse took 153 s)
        types = types.real()
    if isinstance(types, Btf):
        return types
    try:
        with open("/sys/kernel/btf/vmlinux", "rb") as f:
            return Btf.parse(f.read())
    except (OSError, BtfError):
        return None


def choose_probes(btf) -> Tuple[List[Probe], List[Absent]]:
    if btf is None:
        raise WatchError("watch needs the kernel's BTF (/sys/kernel/btf/vmlinux, CONFIG_DEBUG_INFO_BTF)")
    names = traceable_functions()
    kp: List[set] = []

    def kprobe_ok(fn: str) -> bool:  # read only for a function fentry cannot take (all of kallsyms)
        if not kp:
            kp.append(kprobe_functions())
        return fn in kp[0]

    return select_probes(btf.func_signature, (lambda fn: fn in names) if names is not None else (lambda fn: None),
                         kprobe_ok)


# --- bpftrace -----------------------------------------------------------------------------


class Bpftrace:
    """The bpftrace process: its stdout read here, its stderr kept by a thread."""

    def __init__(self, text: str, binary: str = "bpftrace") -> None:
        env = dict(os.environ, BPFTRACE_PERF_RB_PAGES="256")
        self.proc = subprocess.Popen([binary, "-B", "line", "-e", text], stdin=subprocess.DEVNULL,
                                     stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env,
                                     start_new_session=True)
        self.fd = self.proc.stdout.fileno()
        os.set_blocking(self.fd, False)
        self.buf = b""
        self.err: List[str] = []
        self._t = threading.Thread(target=self._drain_stderr, daemon=True)
        self._t.start()

    def _drain_stderr(self) -> None:
        for line in self.proc.stderr:
            self.err.append(line.decode(errors="replace").rstrip("\n"))

    def reason(self) -> str:
        self._t.join(timeout=2)
        lines = [l.strip() for l in self.err if l.strip() and not l.startswith("Attaching")]
        errs = [l for l in lines if "ERROR" in l or "rror" in l] or lines
        return errs[0] if errs else f"bpftrace exited with status {self.proc.returncode}"

    def _read(self, timeout: float) -> bool:
        r, _, _ = select.select([self.fd], [], [], max(timeout, 0))
        if not r:
            return False
        try:
            chunk = os.read(self.fd, 1 << 16)
        except BlockingIOError:
            return False
        if not chunk:
            return False
        self.buf += chunk
        return True

    def lines(self, timeout: float, quiet: float = 0.02, most: float = 0.2) -> List[str]:
        """Whatever bpftrace printed within ``timeout``, read on until it is ``quiet`` seconds
        or for at most ``most`` seconds more (under a steady stream of changes it is never
        quiet, and the changes read so far are waiting for their re-check)."""
        got = self._read(timeout)
        until = time.monotonic() + most
        while got and time.monotonic() < until:
            got = self._read(quiet)
        *full, self.buf = self.buf.split(b"\n")
        return [l.decode(errors="replace") for l in full]

    def wait_ready(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while True:
            for line in self.lines(0.2):
                if line.strip() == READY:
                    return
            if self.proc.poll() is not None:
                raise WatchError(f"bpftrace: {self.reason()}")
            if time.monotonic() > deadline:
                self.stop()
                raise WatchError(f"bpftrace did not attach its probes within {timeout:.0f}s")

    def alive(self) -> bool:
        return self.proc.poll() is None

    def stop(self) -> List[str]:
        """Stop bpftrace; :return: the lines it printed before it ended."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGINT)
        out: List[str] = []
        deadline = time.monotonic() + 10
        while self.proc.poll() is None and time.monotonic() < deadline:
            out += self.lines(0.1)
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()
        out += self.lines(0)
        if self.buf:
            out.append(self.buf.decode(errors="replace"))
            self.buf = b""
        return out


_ATTACH_FAILED = re.compile(r"Error attaching probe: '(?:kprobe|kretprobe|kfunc|kretfunc):(?:vmlinux:)?([\w.]+)'")


def attach(probes: List[Probe], absent: List[Absent], timeout: float,
           binary: str = "bpftrace") -> Tuple[Bpftrace, List[Probe], List[Absent]]:
    """Start bpftrace on ``probes``; a function the kernel refuses a probe on (6.1 takes no
    kretprobe on its .meminit.text functions) is listed as absent with bpftrace's reason and
    the rest attached again. :return: ``(bpftrace, the probes attached, the absent)``."""
    absent = list(absent)
    while True:
        bt = Bpftrace(program(probes), binary)
        try:
            bt.wait_ready(timeout)
            return bt, probes, absent
        except WatchError as e:
            m = _ATTACH_FAILED.search(str(e))
            if m is None or not any(p.function == m.group(1) for p in probes):
                raise
            absent.append(Absent(m.group(1), f"the kernel refused the probe ({str(e).removeprefix('bpftrace: ')})"))
            probes = [replace(p, id=i) for i, p in enumerate(q for q in probes if q.function != m.group(1))]
            if not probes:
                raise


# --- events -------------------------------------------------------------------------------
