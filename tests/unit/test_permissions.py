"""Effective permissions (issue 15): x86 RW and U/S ANDed over every level and NX ORed;
arm64 AP with APTable/PXNTable/UXNTable. On hand-built tables: the walker's effective
bits, ``map``'s ranges, and the ``permissions`` finding at the entry that causes it,
with no other error in ``check``."""

from __future__ import annotations

import pytest

from inspect_vmemmap.analysis import explain_pfn, load_map, load_sections
from inspect_vmemmap.check import run_check
from inspect_vmemmap.layout import KernelLayout
from inspect_vmemmap.facts import Folio, Inputs
from inspect_vmemmap.memory import PhysRanges
from inspect_vmemmap.pgtable import DENY_WRITE, effective, translate, walk
from inspect_vmemmap.pgtable.arm64 import Arm64Paging
from inspect_vmemmap.pgtable.x86_64 import X86_64Paging
from inspect_vmemmap.sections import SectionTable
from inspect_vmemmap.vmemmap import MappedLeaf, NodeMap, map_vmemmap
from tests.synth import NX, RW, USER, Arm64Spec, Arm64Tables, SynthKernel, X86Tables, backing_range, with_backing_ram, x86_layout
from tests.synthmem import SyntheticMemory

K4, M2, G1 = 1 << 12, 1 << 21, 1 << 30
SEC = 1 << 27
X86_BASE = 0xFFFFEA0000000000
ARM_BASE = 0xFFFFFC0000000000


# -- the walker ---------------------------------------------------------------------------------


def _x86_tables():
    mem = SyntheticMemory()
    t = X86Tables(mem, 4)
    t.map(X86_BASE, 0x200000, M2)
    for i in range(4):
        t.map(X86_BASE + M2 + i * K4, 0x600000 + i * K4, K4)
    return mem, t


def test_x86_healthy_tables_grant_what_the_leaf_says():
    mem, t = _x86_tables()
    evs = list(walk(mem, X86_64Paging(4), t.root, X86_BASE, X86_BASE + G1))
    assert all(e.writable and e.leaf_writable and e.denied_by is None for e in evs)
    assert all("NX" in e.attrs and "USR" not in e.attrs for e in evs)


@pytest.mark.parametrize("depth", [0, 1, 2])
def test_x86_rw_cleared_in_a_table_entry_makes_everything_below_read_only(depth):
    mem, t = _x86_tables()
    va = X86_BASE + M2  # under the PMD table entry at depth 2 (the PTE table)
    addr = t.entry_of(va, depth)
    e = t.get(addr)
    mem.write_u64(addr, e & ~RW)
    fmt = X86_64Paging(4)
    evs = list(walk(mem, fmt, t.root, X86_BASE, X86_BASE + G1))
    under = [e for e in evs if depth < 2 or e.vaddr >= va]
    assert under and all(not e.writable and e.leaf_writable for e in under)
    level, table_phys, index, entry, eva, size = under[0].denied_by
    assert (level, table_phys + 8 * index, entry) == (fmt.names[depth], addr, e & ~RW)
    assert eva <= under[0].vaddr and under[-1].vaddr + under[-1].size <= eva + size
    # translate agrees
    steps = translate(mem, fmt, t.root, va)
    assert effective(fmt, steps)[0] is False
    # a table entry with RW keeps it, whatever is above it
    if depth == 2:
        assert [e.writable for e in evs if e.vaddr < va] == [True]


def test_x86_user_and_nx_are_anded_and_ored():
    mem, t = _x86_tables()
    fmt = X86_64Paging(4)
    pte = t.entry_of(X86_BASE + M2, 3)
    mem.write_u64(pte, (t.get(pte) | USER) & ~NX)
    (leaf,) = [e for e in walk(mem, fmt, t.root, X86_BASE + M2, X86_BASE + M2 + K4)]
    assert "USR" in leaf.attrs and "NX" not in leaf.attrs
    # U/S clear in the PMD table entry: no user access below, whatever the leaf says
    pmd = t.entry_of(X86_BASE + M2, 2)
    mem.write_u64(pmd, t.get(pmd) & ~USER)
    (leaf,) = [e for e in walk(mem, fmt, t.root, X86_BASE + M2, X86_BASE + M2 + K4)]
    assert "USR" not in leaf.attrs and leaf.writable
    # NX in the PUD entry: nothing below executable
    pud = t.entry_of(X86_BASE + M2, 1)
    mem.write_u64(pud, t.get(pud) | NX)
    (leaf,) = [e for e in walk(mem, fmt, t.root, X86_BASE + M2, X86_BASE + M2 + K4)]
    assert "NX" in leaf.attrs


def _arm_tables():
    mem = SyntheticMemory()
    f = Arm64Paging(4096, 48, 48)
    t = Arm64Tables(mem, Arm64Spec(4096, 48, 48))
    t.map(ARM_BASE, 0x40200000, M2)
    for i in range(4):
        t.map(ARM_BASE + M2 + i * K4, 0x40600000 + i * K4, K4)
    return mem, f, t


APTABLE_RO, APTABLE_NO_EL0, PXNTABLE, UXNTABLE = 1 << 62, 1 << 61, 1 << 59, 1 << 60
AP_EL0, PXN, UXN = 1 << 6, 1 << 53, 1 << 54


@pytest.mark.parametrize("depth", [0, 1, 2])
def test_arm64_aptable_read_only(depth):
    mem, f, t = _arm_tables()
    va = ARM_BASE + M2
    addr = t.entry_of(va, depth)
    mem.write_u64(addr, t.get(addr) | APTABLE_RO)
    evs = list(walk(mem, f, t.root, ARM_BASE, ARM_BASE + G1))
    under = [e for e in evs if depth < 2 or e.vaddr >= va]
    assert under and all(not e.writable and e.leaf_writable for e in under)
    assert all(e.inherited & DENY_WRITE for e in under)
    assert under[0].denied_by[0] == f.names[depth]
    assert "DBM" not in under[0].attrs  # DBM is named for a leaf that is itself read-only


def test_arm64_el0_and_execute_hierarchy():
    mem, f, t = _arm_tables()
    va = ARM_BASE + M2
    pte = t.entry_of(va, 3)
    mem.write_u64(pte, (t.get(pte) | AP_EL0) & ~(PXN | UXN))
    (leaf,) = walk(mem, f, t.root, va, va + K4)
    assert "USR" in leaf.attrs and "NX" not in leaf.attrs and "UXN" in leaf.attrs  # the tables' UXNTable
    pmd = t.entry_of(va, 2)
    mem.write_u64(pmd, t.get(pmd) | APTABLE_NO_EL0 | PXNTABLE)
    (leaf,) = walk(mem, f, t.root, va, va + K4)
    assert "USR" not in leaf.attrs and "NX" in leaf.attrs and leaf.writable


# -- map and check on synthetic kernels ---------------------------------------------------------


def _x86_kernel(folios=()):
    boot = [(0, 4 * SEC)]
    ram = with_backing_ram(boot, 1)
    b0, b1 = backing_range(0)
    inp = Inputs(layout=x86_layout(4), ram=ram, boot_ram=ram, nodes=[(0, 0, 4 * SEC >> 12), (0, b0 >> 12, b1 >> 12)],
                 folios=list(folios))
    return SynthKernel(inp)


def _check(k):
    lay = k.layout
    nodes = NodeMap(k.inputs.nodes)
    sections = load_sections(k.mem, lay, nodes)
    leaves = []
    vm = load_map(k.mem, lay, sections, nodes, PhysRanges(k.inputs.ram),
                  on_leaf=lambda l: leaves.append(MappedLeaf.of(l)))
    res = run_check(k.inputs, sections, leaves, unknown=vm.unknown())
    errors = [f for f in sections.findings + vm.findings + res.findings if f.severity == "error"]
    return vm, res, errors


def test_healthy_synthetic_kernel_has_no_permission_finding():
    k = _x86_kernel([Folio(head_pfn=SEC >> 12, order=9, optimized=True, nid=0, zone=2)])
    vm, res, errors = _check(k)
    assert errors == [] and res.hvo["optimized_folios"] == 1


@pytest.mark.parametrize("depth,name", [(0, "pgd"), (1, "pud"), (2, "pmd")])
def test_rw_cleared_above_the_leaves_is_one_finding_at_that_entry(depth, name):
    """HVO split the PMD over section 1's first folio; RW cleared at each level above it:
    one ``permissions`` finding at that entry, no hvo-inconsistent for the folio's
    (now read-only) head and no read-only run."""
    k = _x86_kernel([Folio(head_pfn=SEC >> 12, order=9, optimized=True, nid=0, zone=2)])
    lay = k.layout
    va = lay.pfn_to_page(SEC >> 12)
    addr = k.tables.entry_of(va, depth)
    k.mem.write_u64(addr, k.tables.get(addr) & ~RW)
    vm, res, errors = _check(k)
    assert [f.kind for f in errors] == ["permissions"], [f.message for f in errors]
    (f,) = errors
    assert f.extra["level"] == name and f.extra["access"] == ["read-only"]
    assert f.extra["table_phys"] + 8 * f.extra["index"] == addr
    assert f.vaddr <= va < f.vaddr_end
    if depth == 2:  # the PTE table: exactly the split PMD's 2M
        assert (f.vaddr, f.vaddr_end) == (va, va + M2)
    # map shows the leaves as they take effect
    ro = [r for r in vm.ranges if not r.writable]
    assert any(r.start <= va < r.end for r in ro)
    assert res.hvo["optimized_folios"] == 1


def test_user_bit_on_a_leaf_and_nx_cleared():
    k = _x86_kernel()
    lay = k.layout
    va = lay.pfn_to_page(2 * SEC >> 12)  # section 2: a 2M PMD block
    size, addr = k.leaves[va]
    assert size == M2
    k.mem.write_u64(addr, k.tables.get(addr) | USER)
    va2 = lay.pfn_to_page(3 * SEC >> 12)
    size2, addr2 = k.leaves[va2]
    k.mem.write_u64(addr2, k.tables.get(addr2) & ~NX)
    vm, res, errors = _check(k)
    assert sorted((f.kind, f.vaddr, f.vaddr_end, tuple(f.extra["access"])) for f in errors) == [
        ("permissions", va, va + M2, ("user",)), ("permissions", va2, va2 + M2, ("executable",))]
    assert errors[0].section in (2, 3) and {f.extra["level"] for f in errors} == {"pmd"}


def test_no_nx_anywhere_is_a_cpu_without_nx_not_a_finding():
    k = _x86_kernel()
    for size, addr in k.leaves.values():
        k.mem.write_u64(addr, k.tables.get(addr) & ~NX)
    vm, res, errors = _check(k)
    assert errors == []


def test_pfn_shows_effective_permissions():
    k = _x86_kernel()
    lay = k.layout
    nodes = NodeMap(k.inputs.nodes)
    sections = load_sections(k.mem, lay, nodes)
    va = lay.pfn_to_page(SEC >> 12)
    addr = k.tables.entry_of(va, 1)
    k.mem.write_u64(addr, k.tables.get(addr) & ~RW)
    info, _ = explain_pfn(k.mem, lay, sections, nodes, SEC >> 12)
    assert info["backing"]["writable"] is False


def _arm_layout():
    return KernelLayout(arch="aarch64", page_size=4096, pgtable_levels=4, vmemmap_base=ARM_BASE, struct_page_size=64,
                        section_size_bits=27, max_physmem_bits=48,
                        section_flags={"PRESENT": 0, "HAS_MEM_MAP": 1, "ONLINE": 2, "EARLY": 3, "ZONE_DEVICE": 4},
                        section_map_last_bit=5, mem_section_addr=0, sparsemem_extreme=True, nr_section_roots=16,
                        sections_per_root=128, mem_section_size=32, va_bits=48, kernel_va_bits=48)


@pytest.mark.parametrize("bits,clear,access", [
    (AP_EL0, 0, ["user"]), (0, PXN, ["executable"]), (0, UXN, ["user-executable"])])
def test_arm64_leaf_permissions_found_at_the_leaf(bits, clear, access):
    mem, f, t = _arm_tables()
    va = ARM_BASE + M2 + K4
    pte = t.entry_of(va, 3)
    # UXN cleared: the kernel's tables carry UXNTable, which keeps it; a table without it
    pmd = t.entry_of(va, 2)
    mem.write_u64(pmd, t.get(pmd) & ~UXNTABLE)
    for d in (0, 1):
        a = t.entry_of(va, d)
        mem.write_u64(a, t.get(a) & ~UXNTABLE)
    mem.write_u64(pte, (t.get(pte) | bits) & ~clear)
    lay = _arm_layout()
    lay.pgtable_root = t.root
    vm = map_vmemmap(mem, f, lay, SectionTable(lay), NodeMap([]), start=ARM_BASE, end=ARM_BASE + G1)
    (fd,) = vm.findings
    assert fd.kind == "permissions" and fd.extra["access"] == access and fd.extra["level"] == "pte"
    assert (fd.vaddr, fd.vaddr_end) == (va, va + K4)


def test_arm64_uxn_cleared_under_uxntable_is_not_effective():
    """The kernel's tables carry UXNTable: a leaf without UXN is damage, named as a
    warning at the leaf, but nothing is executable."""
    mem, f, t = _arm_tables()
    va = ARM_BASE + M2 + K4
    pte = t.entry_of(va, 3)
    mem.write_u64(pte, t.get(pte) & ~UXN)
    lay = _arm_layout()
    lay.pgtable_root = t.root
    vm = map_vmemmap(mem, f, lay, SectionTable(lay), NodeMap([]), start=ARM_BASE, end=ARM_BASE + G1)
    (fd,) = vm.findings
    assert (fd.kind, fd.severity, fd.extra["effective"], fd.extra["access"]) == (
        "permissions", "warning", False, ["user-executable"])
    assert (fd.vaddr, fd.vaddr_end) == (va, va + K4)


def test_arm64_aptable_finding_at_the_table_entry():
    mem, f, t = _arm_tables()
    va = ARM_BASE + M2
    pmd = t.entry_of(va, 2)
    mem.write_u64(pmd, t.get(pmd) | APTABLE_RO)
    lay = _arm_layout()
    lay.pgtable_root = t.root
    vm = map_vmemmap(mem, f, lay, SectionTable(lay), NodeMap([]), start=ARM_BASE, end=ARM_BASE + G1)
    (fd,) = vm.findings
    assert fd.kind == "permissions" and fd.extra["level"] == "pmd" and fd.extra["access"] == ["read-only"]
    assert (fd.vaddr, fd.vaddr_end) == (va, va + 4 * K4) and "APTable[1]" in fd.message


# -- impossible section flags -------------------------------------------------------------------


def test_zone_device_taint_on_a_section_that_is_ram_throughout():
    from inspect_vmemmap.sections import read_sections

    k = _x86_kernel()
    lay = k.layout
    s = read_sections(k.mem, lay).get(2)
    k.mem.write_u64(s.addr - k.mem.virt_base, s.section_mem_map | 0x10)  # SECTION_TAINT_ZONE_DEVICE
    vm, res, errors = _check(k)
    assert [(f.kind, f.section) for f in errors] == [("impossible-flag", 2)], [f.message for f in errors]
    assert "PMOED" in errors[0].message


def test_zone_device_taint_where_ram_ends_inside_the_section_is_tolerated():
    """A section only partly RAM may keep the taint of device memory removed since."""
    boot = [(0, 2 * SEC + SEC // 2)]
    ram = with_backing_ram(boot, 1)
    b0, b1 = backing_range(0)
    k = SynthKernel(Inputs(layout=x86_layout(4), ram=ram, boot_ram=ram,
                           nodes=[(0, 0, 3 * SEC >> 12), (0, b0 >> 12, b1 >> 12)]))
    from inspect_vmemmap.sections import read_sections

    s = read_sections(k.mem, k.layout).get(2)
    k.mem.write_u64(s.addr - k.mem.virt_base, s.section_mem_map | 0x10)
    vm, res, errors = _check(k)
    assert errors == []
