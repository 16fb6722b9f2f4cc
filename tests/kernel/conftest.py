"""The real-kernel tier: Debian kernels booted by the lab under QEMU (TCG).

Each scenario boots once per test session, takes an ELF vmcore through QMP and keeps the
guest running for the tests that attach to it live.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

from inspect_vmemmap.lab import GuestSpec, boot_guest

#: the scenarios of issue 2, by name
SCENARIOS = {
    "6.1-la57-hvo": GuestSpec(debian="6.1", mem="1G", hugepages=16, hvo=True, la57=True),
    "6.12-numa2-hvo": GuestSpec(debian="6.12", mem="1G", numa=2, la57=False, hugepages=8, hvo=True),
    "7.2-hvo": GuestSpec(debian="7.2", mem="1G", hugepages=8, hvo=True),
}


@dataclass
class Booted:
    name: str
    spec: GuestSpec
    guest: object
    core: Path
    vmlinux: Path
    _prog: object = None

    def prog(self):
        """drgn on this guest's dump with its debug info (ground truth for the tests)."""
        if self._prog is None:
            from tests.kernel.independent import open_dump

            self._prog = open_dump(str(self.core), str(self.vmlinux))
        return self._prog

    def run(self, *args: str, target: str = "core", core: Path = None, check_status: bool = True) -> dict:
        """Run the CLI with --json against this guest's dump (another dump with ``core``,
        or the live guest through QMP with ``target="qemu"``) and parse it."""
        tgt = ["--core", str(core or self.core)] if target == "core" else ["--qemu", str(self.guest.qmp_socket)]
        cmd = [sys.executable, "-m", "inspect_vmemmap", *args, *tgt, "--vmlinux", str(self.vmlinux), "--json"]
        p = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
        if check_status:
            assert p.returncode in (0, 1), f"{cmd} exited {p.returncode}: {p.stderr}"
            assert not p.stderr.strip() or "Traceback" not in p.stderr, p.stderr
        return json.loads(p.stdout)


@pytest.fixture(scope="session", params=sorted(SCENARIOS))
def booted(request, tmp_path_factory):
    name = request.param
    spec = SCENARIOS[name]
    work = tmp_path_factory.mktemp(name)
    with boot_guest(spec, workdir=work) as guest:
        core = guest.dump(work / "vmcore")
        yield Booted(name, spec, guest, core, guest.kernel.vmlinux)
        try:
            os.unlink(core)
        except OSError:
            pass
