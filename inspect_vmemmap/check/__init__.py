"""``check``: compare what the kernel built (sections, page-table leaves) with what the
reference model predicts, and check what backs the vmemmap. No drgn here.

One module per family of findings, each over the same :class:`Observed` inputs gathered
first: :mod:`.flags` (section flags, struct pages' node and zone), :mod:`.placement`
(unmapped and stray vmemmap), :mod:`.hvo` (HugeTLB vmemmap optimisation), :mod:`.device`
(ZONE_DEVICE dedup and altmap-backed vmemmap) and :mod:`.backing` (RAM, buddy, aliases,
nodes). HVO and device run before backing: they say which sharing and which placement
of the backing the model explains (:class:`Explained`), and backing reports the rest.
"""

from __future__ import annotations

from typing import Callable, List, Optional, Sequence

from inspect_vmemmap.check.backing import check_backing
from inspect_vmemmap.check.device import check_device
from inspect_vmemmap.check.flags import check_page_node_zone, check_section_flags
from inspect_vmemmap.check.heads import check_folio_heads
from inspect_vmemmap.check.hvo import check_hvo
from inspect_vmemmap.check.observed import Explained, Observed
from inspect_vmemmap.check.placement import check_placement
from inspect_vmemmap.facts import Assumption, Inputs
from inspect_vmemmap.findings import Finding
from inspect_vmemmap.intervals import Interval
from inspect_vmemmap.model import Prediction, predict
from inspect_vmemmap.sections import SectionTable
from inspect_vmemmap.vmemmap import MappedLeaf

__all__ = ["CheckResult", "run_check"]


class CheckResult:
    def __init__(self) -> None:
        self.findings: List[Finding] = []
        self.hvo = {"optimized_folios": 0, "remapped_ptes": 0, "freed_bytes": 0}
        self.prediction: Optional[Prediction] = None
        #: ZONE_DEVICE compound pages whose tail vmemmap is deduplicated as the model says
        self.device_dedup = {"compound_pages": 0, "remapped_ptes": 0, "saved_bytes": 0}
        #: vmemmap backed by an altmap where the model says: memmap_on_memory blocks, devices
        self.self_hosted = {"memory_blocks": 0, "device_maps": 0, "bytes": 0}
        #: 7.1+ HVO: the page each (node, zone, order)'s tails map (check.hvo._shared_tails)
        self.shared_tails: dict = {}


def run_check(inputs: Inputs, sections: SectionTable, leaves: Sequence[MappedLeaf],
              backing_free: Optional[Callable[[int], bool]] = None, mem=None, deep: bool = False,
              unknown: Sequence[Interval] = (), hvo_unknown: Optional[Assumption] = None,
              progress: Optional[Callable[[int], None]] = None, prediction: Optional[Prediction] = None,
              known_tails: Optional[dict] = None) -> CheckResult:
    """Compare sections and leaves with the model's prediction for ``inputs``.

    :param leaves: every vmemmap leaf, in address order.
    :param backing_free: returns whether a physical pfn is free in the buddy allocator
        (None: that check is skipped).
    :param mem: target memory, for reading struct pages' node and zone (None: skipped).
    :param deep: read every struct page's node and zone, not a sample per section, and
        every page that backs the vmemmap against the buddy allocator.
    :param progress: called with the number of struct pages read so far (under ``deep``).
    :param unknown: virtual ranges whose mapping could not be read (unreadable tables):
        not reported as unmapped, since nobody knows.
    :param hvo_unknown: why the HugeTLB pools could not be read (a filtered dump left them out): read-only
        leaves no folio explains are then ``unreadable``, not ``hvo-inconsistent``.
    :param prediction: the model's prediction to compare with (default ``predict(inputs)``;
        a ranged re-check gives the part of it over its sections: live.recheck).
    :param known_tails: 7.1+ HVO: the shared tail page of each (node, zone, order) as an
        earlier check found it, where this one sees too few folios to tell by majority.
    :return: a :class:`CheckResult` with findings merged per range.
    """
    res = CheckResult()
    res.prediction = predict(inputs) if prediction is None else prediction
    obs = Observed(inputs, res.prediction, sections, leaves, unknown)
    obs.known_tails = known_tails or {}
    explained = Explained()
    out = res.findings
    out.extend(check_section_flags(obs))
    out.extend(check_placement(obs))
    found, res.hvo = check_hvo(obs, explained, hvo_unknown)
    res.shared_tails = obs.shared_tails
    out.extend(found)
    found, res.device_dedup, res.self_hosted = check_device(obs, explained)
    out.extend(found)
    out.extend(check_backing(obs, explained, backing_free, deep))
    if mem is not None and inputs.page_flags and inputs.zones:
        out.extend(check_page_node_zone(obs, mem, deep, progress))
    out.extend(check_folio_heads(obs, mem))
    return res
