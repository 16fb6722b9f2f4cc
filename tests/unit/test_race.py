"""A running kernel changing underneath the check (issue 5): commands.confirmed_check reads a
running kernel again after errors and reports errors that did not hold still as races.

The kernel here is synthetic (tests/synth.py) and its memory changes between reads, or in
the middle of one, the way a hot-add changes it: the section is present before its struct
pages are mapped."""

from __future__ import annotations

import copy

import pytest

from inspect_vmemmap import commands, report
from inspect_vmemmap.analysis import load_map, load_sections
from inspect_vmemmap.check import run_check
from inspect_vmemmap.findings import exit_status
from inspect_vmemmap.memory import PhysRanges
from inspect_vmemmap.model import Inputs
from inspect_vmemmap.vmemmap import MappedLeaf, NodeMap
from tests.synth import SynthKernel, with_backing_ram, x86_layout

GiB = 1 << 30
SECTION = 5  # the section whose PMD a hot-add has not populated yet (pfn 5 << 15)


class ChangingMemory:
    """Serves reads from one of several memory images; ``state`` picks which, and
    ``switch_after`` (a number of reads) changes it in the middle of a read pass."""

    def __init__(self, states) -> None:
        self.states = states
        self.state = 0
        self.reads = 0
        self.switch_after = None

    def read(self, address: int, size: int, physical: bool = False) -> bytes:
        self.reads += 1
        if self.switch_after is not None and self.reads > self.switch_after:
            self.state, self.switch_after = self.state + 1, None
        return self.states[self.state].read(address, size, physical)


class SynthTarget:
    """What confirmed_check needs of a Target, over synthetic memory."""

    def __init__(self, inputs: Inputs, memory, source: str = "live") -> None:
        self.inputs = inputs
        self.layout = inputs.layout
        self.memory = memory
        self.source = source
        #: reads made of it: each a fresh Analysis (and so a fresh Reading of its facts)
        self.reads = 0

    def to_json(self) -> dict:
        return {"source": self.source, "arch": "x86_64"}


class SynthAnalysis:
    """commands.Analysis on the drgn-free core (the model's inputs are the kernel's own)."""

    def __init__(self, target: SynthTarget, progress=None) -> None:
        target.reads += 1
        self.t = target
        self.nodes = NodeMap(target.inputs.nodes)
        self.sections = load_sections(target.memory, target.layout, self.nodes)

    def check(self, deep: bool = False):
        inp = self.t.inputs
        leaves = []
        vm = load_map(self.t.memory, inp.layout, self.sections, self.nodes, PhysRanges(inp.ram),
                      on_leaf=lambda l: leaves.append(MappedLeaf.of(l)))
        res = run_check(inp, self.sections, leaves)
        findings = list(self.sections.findings) + vm.findings + res.findings
        doc = report.document(self.t.to_json(), findings, hvo=res.hvo)
        return doc, findings, res, inp, []


@pytest.fixture
def kernel(monkeypatch):
    """(inputs, after, before): a healthy 1 GiB kernel, and the same kernel a moment
    earlier, with section SECTION present but its PMD not yet populated."""
    monkeypatch.setattr(commands, "Analysis", SynthAnalysis)
    ram = [(0, GiB)]
    inp = Inputs(layout=x86_layout(), ram=with_backing_ram(ram), boot_ram=with_backing_ram(ram),
                 nodes=[(0, 0, GiB >> 12)])
    k = SynthKernel(inp)
    before = copy.deepcopy(k.mem)
    va = inp.layout.pfn_to_page(SECTION << 15)
    before.write_u64(k.leaves[va][1], 0)
    return inp, k.mem, before


def _kinds(findings):
    return sorted((f.kind, f.severity) for f in findings)


def test_error_that_goes_away_is_a_race(kernel):
    inp, after, before = kernel
    mem = ChangingMemory([before, after])
    t = SynthTarget(inp, mem)
    changed = []

    def between(n):
        changed.append(n)
        mem.state = 1  # the hot-add finished populating the section

    a, doc, findings, *_ = commands.confirmed_check(t, passes=3, between=between)
    assert changed == [1] and t.reads == 2
    assert doc["target"]["reads"] == 2
    assert _kinds(findings) == [("race", "warning")]
    (race,) = findings
    assert race.extra["was"] == "memmap-unmapped" and race.extra["seen_in"] == [1]
    assert race.section == SECTION and race.pfn_start == SECTION << 15
    assert "read 1 of 2 found it" in race.message
    assert exit_status(findings) == 0
    assert doc["summary"] == {"errors": 0, "warnings": 1, "infos": 0}


def test_change_in_the_middle_of_a_read(kernel):
    """The first read walks the old state up to the entry of section SECTION's PMD, then
    goes on in the new one: its one error does not come back in the second read."""
    inp, after, before = kernel
    entry = SynthKernel(inp).leaves[inp.layout.pfn_to_page(SECTION << 15)][1]
    probe = ChangingMemory([before])
    seen = []
    real_read = probe.read
    probe.read = lambda a, n, physical=False: (seen.append(physical and a <= entry < a + n), real_read(a, n, physical))[1]
    SynthAnalysis(SynthTarget(inp, probe)).check()
    mem = ChangingMemory([before, after])
    mem.switch_after = seen.index(True) + 1  # the reads up to that entry see the old state
    t = SynthTarget(inp, mem)
    a, doc, findings, *_ = commands.confirmed_check(t, passes=3)
    assert doc["target"]["reads"] == 2
    (race,) = findings
    assert race.kind == "race" and race.extra["was"] == "memmap-unmapped" and race.section == SECTION
    assert exit_status(findings) == 0


def test_error_that_holds_still_stands(kernel):
    inp, after, before = kernel
    t = SynthTarget(inp, ChangingMemory([before]))
    a, doc, findings, *_ = commands.confirmed_check(t, passes=3)
    assert doc["target"]["reads"] == 2  # confirmed by the second read, no third
    (f,) = findings
    assert f.kind == "memmap-unmapped" and f.severity == "error" and f.section == SECTION
    assert exit_status(findings) == 1


def test_error_that_keeps_changing(kernel):
    """A kernel that never holds still: every read differs; after N reads nothing is
    confirmed and each error seen is a race naming the reads that saw it."""
    inp, after, before = kernel
    other = copy.deepcopy(after)  # a different section not populated yet
    va = inp.layout.pfn_to_page(2 << 15)
    other.write_u64(SynthKernel(inp).leaves[va][1], 0)
    mem = ChangingMemory([before, other, before])
    t = SynthTarget(inp, mem)

    def between(n):
        mem.state = n

    a, doc, findings, *_ = commands.confirmed_check(t, passes=3, between=between)
    assert doc["target"]["reads"] == 3
    races = {(f.section, tuple(f.extra["seen_in"])) for f in findings}
    assert races == {(SECTION, (1, 3)), (2, (2,))}
    said = {f.section: f.message for f in findings}
    assert "read 1, 3 of 3 found it, read 2 did not" in said[SECTION]
    assert "read 2 of 3 found it; the last read did not" in said[2]
    assert all(f.kind == "race" and f.severity == "warning" for f in findings)
    assert exit_status(findings) == 0


def test_dumps_are_read_once(kernel):
    inp, after, before = kernel
    t = SynthTarget(inp, ChangingMemory([before]), source="vmcore")
    a, doc, findings, *_ = commands.confirmed_check(t, passes=3)
    assert t.reads == 1 and "reads" not in doc["target"]
    assert [f.kind for f in findings] == ["memmap-unmapped"]


def test_one_read_asked(kernel):
    inp, after, before = kernel
    t = SynthTarget(inp, ChangingMemory([before, after]))
    a, doc, findings, *_ = commands.confirmed_check(t, passes=1)
    assert doc["target"]["reads"] == 1
    assert [f.kind for f in findings] == ["memmap-unmapped"]
