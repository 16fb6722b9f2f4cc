"""The ranged re-check (live/recheck.py) against the whole check, on simulated kernels.

For random layouts of tests/kernelsim.py (boot RAM, hot-added blocks, two nodes, HugeTLB
folios in the three HVO eras, memmap_on_memory blocks, ZONE_DEVICE page maps), healthy or
with a fault written into their page tables or mem_section, the re-check of a window of
sections gives exactly what the whole check gives there (recheck.restrict), and reads only
that window's mem_section entries and page tables.
"""

from __future__ import annotations

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from inspect_vmemmap.bulkread import MAX_GAP
from inspect_vmemmap.check import run_check
from inspect_vmemmap.live.recheck import check_window, restrict, widen, window_vaddrs
from inspect_vmemmap.memory import PhysRanges
from inspect_vmemmap.model import predict
from inspect_vmemmap.vmemmap import NodeMap
from tests import kernelsim as ks
from tests.synth import SynthKernel
from tests.unit.test_model_properties import _observe, layouts


def _full(k: SynthKernel):
    """What ``check`` finds on the whole simulated kernel (as commands.Analysis.check)."""
    sections, vm, leaves = _observe(k)
    res = run_check(k.inputs, sections, leaves, mem=k.mem, unknown=vm.unknown())
    return list(sections.findings) + vm.findings + res.findings, res


def _key(f):
    return (f.kind, f.severity, f.section, f.pfn_start, f.pfn_end, f.vaddr, f.vaddr_end)


def _same(k: SynthKernel, w, known_tails=None):
    lay = k.layout
    full, res = _full(k)
    wc = check_window(k.mem, lay, k.inputs, NodeMap(k.inputs.nodes), w, PhysRanges(k.inputs.ram),
                      known_tails=res.shared_tails if known_tails is None else known_tails)
    want = sorted(map(_key, restrict(full, lay, wc.window)))
    got = sorted(map(_key, wc.findings))
    assert got == want, (w, wc.window, [f.to_json() for f in wc.findings],
                         [f.to_json() for f in restrict(full, lay, wc.window)])
    return wc, full


class _Counting:
    """The simulated memory, counting what is read (address, size)."""

    def __init__(self, mem) -> None:
        self.mem = mem
        self.reads = []

    def read(self, address: int, size: int, physical: bool = False) -> bytes:
        self.reads.append((address, size, physical))
        return self.mem.read(address, size, physical)


def _fault(k: SynthKernel, data) -> str:
    """Write one fault into the simulated kernel; :return: what was done."""
    lay = k.layout
    what = data.draw(st.sampled_from(["none", "drop-leaf", "remap-leaf", "readonly", "flags"]))
    if what == "none" or not k.leaves:
        return "none"
    va = data.draw(st.sampled_from(sorted(k.leaves)))
    size, addr = k.leaves[va]
    entry = k.mem.read_u64(addr)
    if what == "drop-leaf":
        k.mem.write_u64(addr, 0)
    elif what == "remap-leaf":  # onto a page no one else maps
        k.tables.map(va, k.alloc(size, 0), size)
    elif what == "readonly":
        k.mem.write_u64(addr, entry & ~ks._PAGE_RW)
    else:  # a section's online bit flipped in mem_section
        nr = data.draw(st.sampled_from(k.present_sections))
        ms = k.sim._ms(nr)
        ms[0] ^= ks.SECTION_IS_ONLINE
        lay.mem_section_addr = k.sim.write_mem_section()
    return what


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(layouts(), st.data())
def test_a_window_recheck_finds_what_the_whole_check_finds_there(inp, data):
    k = SynthKernel(inp)
    _fault(k, data)
    present = k.present_sections
    # one section, as a 2M folio's or a block's event has; and a run of them
    nr = data.draw(st.sampled_from(present))
    _same(k, (nr, nr))
    a = data.draw(st.sampled_from(present))
    b = data.draw(st.sampled_from([s for s in present if s >= a]))
    _same(k, (a, b))


@settings(max_examples=15, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(layouts(), st.data())
def test_a_window_recheck_reads_only_its_window(inp, data):
    """mem_section: the root pointer and entries of its sections; page tables: those met
    on the way to its struct pages (at most one table per level above a PTE table, plus
    the PTE tables of its split PMDs)."""
    k = SynthKernel(inp)
    lay = k.layout
    nr = data.draw(st.sampled_from(k.present_sections))
    mem = _Counting(k.mem)
    w = widen(predict(inp), lay, (nr, nr))
    wc = check_window(mem, lay, inp, NodeMap(inp.nodes), (nr, nr), PhysRanges(inp.ram))
    assert wc.window == w and wc.walks == 1
    va0, va1 = window_vaddrs(lay, w)
    nsec = w[1] - w[0] + 1
    sections_bytes = sum(s for a, s, phys in mem.reads if not phys and not va0 <= a < va1)
    # a root pointer per root it touches, its sections' entries and their subsection maps;
    # the maps are read as one coalesced run (bulkread.read_many), which may take in the gap
    # between two of them, at most MAX_GAP bytes each
    assert sections_bytes <= 8 * 2 + nsec * (lay.mem_section_size + 8) + (nsec - 1) * MAX_GAP
    tables = [(a, s) for a, s, phys in mem.reads if phys]
    pte_tables = len({va >> 21 for va, (size, _) in k.leaves.items() if size == 4096 and va0 <= va < va1})
    assert len(tables) <= (lay.pgtable_levels - 1) + (-(-(va1 - va0) // (1 << 30))) + pte_tables


def test_an_alias_to_a_page_outside_the_window_is_left_to_the_full_check():
    """What a window cannot see: a leaf in it remapped onto a page that a leaf outside it
    maps. The whole check finds the alias; the window's re-check finds nothing (the page
    tables outside it are not walked). watch --interval's full check is there for this."""
    from tests.unit.test_model_properties import SEC, Inputs, x86_layout

    lay = x86_layout()
    inp = Inputs(layout=lay, ram=[(0, 4 * SEC)], boot_ram=[(0, 4 * SEC)], nodes=[(0, 0, 4 * SEC >> 12)])
    k = SynthKernel(inp)
    va1, va3 = lay.pfn_to_page(1 * SEC >> 12), lay.pfn_to_page(3 * SEC >> 12)
    size, addr = k.leaves[va1]
    k.tables.map(va3, k.mem.read_u64(addr) & ks.PTE_PFN_MASK, size)
    full, _ = _full(k)
    assert [(f.kind, f.section) for f in full if f.severity == "error"] == [("alias", 3)]
    wc = check_window(k.mem, lay, inp, NodeMap(inp.nodes), (3, 3), PhysRanges(inp.ram))
    assert [f for f in wc.findings if f.severity == "error"] == []


def test_watch_reads_each_run_of_touched_sections_once():
    """Events in the same or neighbouring sections share one ranged read; one without a
    range gets a full read; ``ranged=False`` reads everything for all (live.watch.Watcher)."""
    from types import SimpleNamespace

    from inspect_vmemmap.live.events import Tracker
    from inspect_vmemmap.live.watch import Watcher
    from tests.unit.test_watch import E, Lay, R, choose, K612

    probes, _ = choose(K612)
    by, tr = {p.function: p for p in probes}, Tracker(probes)
    lay = Lay()
    one, free = by["__hugetlb_vmemmap_optimize_folio"], by["vmemmap_free"]
    lines = []
    for i, pfn in enumerate([3 * 32768, 3 * 32768 + 512, 4 * 32768, 9 * 32768]):
        lines += [E(one, 10 * i + 1, 1, 9, lay.pfn_to_page(pfn)), R(one, 10 * i + 2, 1)]
    lines += [E(free, 100, 1, 0, 0), R(free, 101, 1)]  # no range
    calls = tr.feed(lines)
    w = Watcher(SimpleNamespace(layout=lay), lambda obj, what: None)
    got = [(win, len(items)) for win, items in w.groups([(c, 0) for c in calls])]
    assert got == [(None, 1), ((3, 4), 3), ((9, 9), 1)]
    w.ranged = False
    assert [(win, len(items)) for win, items in w.groups([(c, 0) for c in calls])] == [(None, 5)]
