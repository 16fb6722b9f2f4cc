"""Issue 15 on real kernels: permission damage written into a real dump in place (and
restored afterwards), each found at its place as a ``permissions`` finding and no other
error; a zone-device taint on a boot section that is RAM throughout as ``impossible-flag``.

Which entry to damage comes from a naive walk by drgn (tests/kernel/independent.py), not
from the code under test."""

from __future__ import annotations

import pytest

from tests import schema
from tests.kernel import independent as ind
from tests.kernel.conftest import errors
from tests.kernel.test_check import MUTABLE, _geometry, _pmd_leaf_section, _pte_section, _section_addr, mutable, on  # noqa: F401,E501

pytestmark = pytest.mark.kernel

#: the names of the levels from the top, as the kernel (and the finding) calls them
NAMES = {5: ("pgd", "p4d", "pud", "pmd", "pte"), 4: ("pgd", "pud", "pmd", "pte"), 3: ("pgd", "pmd", "pte"),
         2: ("pgd", "pte")}


def _check(booted, *extra):
    import json
    import subprocess
    import sys

    p = subprocess.run([sys.executable, "-m", "inspect_vmemmap", "check", "--core", str(booted.core),
                        "--vmlinux", str(booted.vmlinux), "--json", *extra], capture_output=True, text=True, timeout=600)
    assert p.returncode in (0, 1) and "Traceback" not in p.stderr, p.stderr
    doc = json.loads(p.stdout)
    schema.validate(doc, "check")
    return p.returncode, doc


def _deny_write(prog, e: int) -> int:
    """A table entry that takes writes away below it: x86 R/W clear, arm64 APTable[1] set."""
    return e | (1 << 62) if ind.is_arm64(prog) else e & ~2


def _perm(doc):
    return [f for f in doc["findings"] if f["kind"] == "permissions"]


def _at(f, addr):
    return int(f["table_phys"], 16) + 8 * f["index"] == addr


#: (scenario, table depth) of every table level above the leaves that each mutable dump
#: has: 5 levels on 6.1 (LA57) and on arm64 4K with a 52-bit VA, 3 on arm64 16K/47-bit.
#: The PMD that points to a PTE table (depth levels - 2) needs a section mapped by base
#: pages: 6.1's HVO splits one, arm64 16K has only those; arm64 4K without HVO has none.
WRITE_SITES = [("6.1-la57-hvo", d) for d in range(4)] + [("6.12-arm64-numa2", d) for d in range(3)] \
    + [("6.12-arm64-16k-va47", d) for d in range(2)]
#: (scenario, execute-never bit) of each architecture's bits
EXEC_SITES = [("6.1-la57-hvo", "nx")] + [(n, b) for n in ("6.12-arm64-numa2", "6.12-arm64-16k-va47")
                                         for b in ("pxn", "uxn")]


@pytest.mark.parametrize("booted,depth", WRITE_SITES, indirect=["booted"])
def test_table_entry_without_write_permission(mutable, depth):
    """R/W cleared (x86) or APTable[1] set (arm64) in each table level above the leaves,
    down to a PMD that points to a PTE table."""
    booted, prog, core = mutable
    n = ind.levels(prog)
    assert depth <= n - 2, f"{n} levels, no table at depth {depth}"
    nr, va = _pte_section(prog) if depth == n - 2 else _pmd_leaf_section(prog) if n > 3 else _pte_section(prog)
    addr, e = ind.entry_addr(prog, va, depth)
    assert e & 1 and not (depth == n - 2 and ind.is_block(prog, e))
    core.write_u64(addr, _deny_write(prog, e))
    rc, doc = _check(booted)
    assert rc == 1
    assert [f["kind"] for f in errors(doc)] == ["permissions"], errors(doc)
    (f,) = _perm(doc)
    assert f["level"] == NAMES[n][depth] and _at(f, addr) and f["access"] == ["read-only"]
    assert int(f["vaddr"], 16) <= va < int(f["vaddr_end"], 16)
    # map shows the leaves below as they take effect: read-only
    m = booted.run("map", check_status=False)
    hit = [r for r in m["vmemmap"]["ranges"] if int(r["start"], 16) <= va < int(r["end"], 16)]
    assert len(hit) == 1 and hit[0]["writable"] is False


@on(MUTABLE)
def test_user_accessible_leaf(mutable):
    """x86 U/S on a vmemmap leaf (the tables above are _PAGE_TABLE, with U/S), arm64 AP[1]
    (EL0 access): found at the leaf."""
    booted, prog, core = mutable
    n = ind.levels(prog)
    nr, va = _pmd_leaf_section(prog) if n > 3 else _pte_section(prog)
    depth = n - 2 if n > 3 else n - 1
    addr, e = ind.entry_addr(prog, va, depth)
    core.write_u64(addr, e | (1 << 6 if ind.is_arm64(prog) else 1 << 2))
    rc, doc = _check(booted)
    assert rc == 1
    assert [f["kind"] for f in errors(doc)] == ["permissions"], errors(doc)
    (f,) = _perm(doc)
    assert f["access"] == ["user"] and f["level"] == NAMES[n][depth] and f["section"] == nr
    assert int(f["vaddr"], 16) <= va < int(f["vaddr_end"], 16)


@pytest.mark.parametrize("booted,bit", EXEC_SITES, indirect=["booted"])
def test_execute_never_cleared(mutable, bit):
    """x86 NX, arm64 PXN cleared on one leaf: executable, an error at the leaf. arm64 UXN
    cleared: the kernel's tables carry UXNTable, so nothing is executable from user
    mode; the damage is a warning at the leaf and no error."""
    booted, prog, core = mutable
    assert ind.is_arm64(prog) != (bit == "nx"), f"{bit} is not this architecture's bit"
    n = ind.levels(prog)
    nr, va = _pmd_leaf_section(prog) if n > 3 else _pte_section(prog)
    depth = n - 2 if n > 3 else n - 1
    addr, e = ind.entry_addr(prog, va, depth)
    core.write_u64(addr, e & ~(1 << {"nx": 63, "pxn": 53, "uxn": 54}[bit]))
    rc, doc = _check(booted)
    (f,) = _perm(doc)
    assert f["level"] == NAMES[n][depth] and f["section"] == nr
    assert int(f["vaddr"], 16) <= va < int(f["vaddr_end"], 16)
    if bit == "uxn":
        assert rc == 0 and errors(doc) == []
        assert f["severity"] == "warning" and f["effective"] is False and f["access"] == ["user-executable"]
    else:
        assert rc == 1 and [x["kind"] for x in errors(doc)] == ["permissions"], errors(doc)
        assert f["access"] == ["executable"]


@on(MUTABLE)
def test_zone_device_taint_on_boot_ram(mutable):
    """SECTION_TAINT_ZONE_DEVICE on a boot section that is RAM throughout (state PMOED)."""
    booted, prog, core = mutable
    present = _geometry(prog)[3]
    nr = present[3]
    addr, smm = _section_addr(prog, nr)
    core.write_u64(addr, smm | 1 << prog["SECTION_TAINT_ZONE_DEVICE_BIT"].value_())
    rc, doc = _check(booted)
    assert rc == 1
    assert [(f["kind"], f["section"]) for f in errors(doc)] == [("impossible-flag", nr)], errors(doc)
