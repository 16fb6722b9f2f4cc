"""What every family of checks looks at, gathered once: the model's prediction for the
inputs, the sections and the vmemmap leaves the kernel built, and what one family
explains for another."""

from __future__ import annotations

from bisect import bisect_right
from collections import defaultdict
from typing import Dict, Iterator, List, Sequence, Set, Tuple

from inspect_vmemmap.facts import Inputs
from inspect_vmemmap.intervals import Interval, merge
from inspect_vmemmap.model import Prediction
from inspect_vmemmap.sections import SectionTable
from inspect_vmemmap.vmemmap import MappedLeaf


class Observed:
    """The kernel's sections and vmemmap leaves next to the model's prediction."""

    def __init__(self, inputs: Inputs, pred: Prediction, sections: SectionTable, leaves: Sequence[MappedLeaf],
                 unknown: Sequence[Interval]) -> None:
        self.inputs = inputs
        self.layout = inputs.layout
        self.pred = pred
        self.sections = sections
        #: every leaf, in address order
        self.leaves = leaves
        #: virtual ranges whose mapping could not be read, merged
        self.unknown: List[Interval] = merge(unknown)
        #: what the leaves map, merged
        self.mapped: List[Interval] = merge((l.vaddr, l.vaddr + l.size) for l in leaves)
        #: the base-page leaves by virtual address
        self.by_va: Dict[int, MappedLeaf] = {l.vaddr: l for l in leaves if l.size == self.layout.page_size}
        self._starts: List[int] = []
        #: 7.1+ HVO shared tail pages known beforehand, and those check_hvo used
        self.known_tails: Dict[tuple, int] = {}
        self.shared_tails: Dict[tuple, int] = {}

    def span(self, a: int, b: int) -> Tuple[int, int, int]:
        """:return: (section, first pfn, last pfn) of the struct pages in virtual [a, b)."""
        lay = self.layout
        p0 = lay.page_to_pfn(a)
        p1 = lay.page_to_pfn(b - 1)
        return p0 >> lay.pfn_section_shift, p0, p1

    def section_of(self, va: int) -> int:
        """:return: the section whose struct pages are at virtual ``va``."""
        return self.layout.page_to_pfn(va) >> self.layout.pfn_section_shift

    def leaves_over(self, start: int, end: int) -> Iterator[MappedLeaf]:
        """The leaves from the one that holds ``start`` (or the first after it) while they
        start before ``end``; the first may end before ``start`` where nothing maps it."""
        if not self._starts:
            self._starts = [l.vaddr for l in self.leaves]
        i = max(bisect_right(self._starts, start) - 1, 0)
        leaves = self.leaves
        while i < len(leaves) and leaves[i].vaddr < end:
            yield leaves[i]
            i += 1


class Explained:
    """What one family of checks explains for the others."""

    def __init__(self) -> None:
        #: physical pfn -> extra mappings of it explained (HVO tails, ZONE_DEVICE dedup) or
        #: already reported (misplaced backing): not reported again as ``alias``
        self.aliases: Dict[int, int] = defaultdict(int)
        #: vaddrs of leaves backed where an altmap places them (device memory is not System
        #: RAM, and is not reported as such)
        self.placed: Set[int] = set()
