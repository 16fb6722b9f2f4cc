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
    # arm64 (issue 6), -M virt -cpu max under TCG. The max CPU has FEAT_LPA2, so Debian's
    # 52-bit-VA kernels (4K and 16K) run with 52 bits; lpa2=False gives a 48-bit CPU, where
    # they run with 48 (47 with 16K pages) and lend the bottom of the vmemmap region to
    # vmalloc. arm64 has no HVO: hvo=True asks for it and must find none.
    "6.12-arm64-numa2": GuestSpec(debian="6.12", arch="aarch64", mem="1G", numa=2, hugepages=8, hvo=True),
    "6.12-arm64-16k": GuestSpec(debian="6.12", arch="aarch64", flavour="arm64-16k", mem="1G"),
    "6.12-arm64-16k-va47": GuestSpec(debian="6.12", arch="aarch64", flavour="arm64-16k", mem="1G", lpa2=False),
    "7.2-arm64": GuestSpec(debian="7.2", arch="aarch64", mem="1G"),
    "7.2-arm64-va48": GuestSpec(debian="7.2", arch="aarch64", mem="1G", lpa2=False, hugepages=4),
}


def cli_json(stdout: str, command: str) -> dict:
    """Parse a command's ``--json`` output and validate it against docs/schema.json."""
    from tests import schema

    doc = json.loads(stdout)
    schema.validate(doc, command)
    return doc


def errors(doc: dict) -> list:
    """The error findings of a --json document."""
    return [f for f in doc["findings"] if f["severity"] == "error"]


@dataclass
class Booted:
    name: str
    spec: GuestSpec
    guest: object
    core: Path
    vmlinux: Path
    _prog: object = None

    @property
    def hvo(self) -> bool:
        """Whether the guest's HugeTLB folios must be vmemmap-optimized (x86_64 only: arm64
        has no HVO, see inspect_vmemmap.model.hvo_supported)."""
        return self.spec.hvo and self.spec.arch == "x86_64"

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
        return cli_json(p.stdout, args[0])


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
