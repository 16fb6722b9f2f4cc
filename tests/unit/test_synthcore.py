"""Synthetic ELF vmcores (tests/synthcore.py, used by scripts/bench synthetic) through the
whole tool: drgn opens them, the layout comes from VMCOREINFO alone, and check finds what
the model built, nothing more."""

from __future__ import annotations

import json
import subprocess
import sys

from tests.kernel.independent import ElfCore
from tests.synthcore import write_synthetic_core

GiB = 1 << 30


def _check(core):
    p = subprocess.run([sys.executable, "-m", "inspect_vmemmap", "check", "--core", str(core), "--no-debuginfo",
                        "--json"], capture_output=True, text=True, timeout=120)
    assert "Traceback" not in p.stderr, p.stderr
    return p.returncode, json.loads(p.stdout)


def test_synthetic_core_is_consistent(tmp_path):
    core = tmp_path / "s.core"
    info = write_synthetic_core(core, 64 * GiB)
    rc, doc = _check(core)
    assert rc == 0 and doc["summary"] == {"errors": 0, "warnings": 0, "infos": 0}, doc["findings"]
    assert doc["target"]["type_source"] == "vmcoreinfo"
    assert doc["sections"]["present"] == info["sections"] == 512
    assert doc["vmemmap"]["leaves"]["2M"] == 512  # 1 GiB of struct pages on PMD blocks
    assert core.stat().st_size < 1 << 20


def test_synthetic_core_with_a_pmd_cleared(tmp_path):
    """A fault at scale is found and placed exactly: section 300's PMD made empty."""
    import drgn

    from tests.synth import x86_layout
    from tests.synthcore import START_KERNEL_MAP

    core = tmp_path / "s.core"
    info = write_synthetic_core(core, 64 * GiB)
    prog = drgn.Program()
    prog.set_core_dump(str(core))
    va = x86_layout().vmemmap_base + (300 << 15) * 64
    table = info["vmemmap_root"] - START_KERNEL_MAP  # 4-level: PGD, PUD, then the PMD
    for shift in (39, 30):
        table = prog.read_u64(table + ((va >> shift) & 511) * 8, True) & 0x000FFFFFFFFFF000
    ElfCore(str(core)).write_u64(table + ((va >> 21) & 511) * 8, 0)
    rc, doc = _check(core)
    assert rc == 1
    (f,) = doc["findings"]
    assert (f["kind"], f["section"], f["pfn_start"], f["pfn_end"]) == \
        ("memmap-unmapped", 300, 300 << 15, (301 << 15) - 1)
