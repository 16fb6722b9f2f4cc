"""``check``: compare what the kernel built (sections, page-table leaves) with what the
reference model predicts, and check what backs the vmemmap. No drgn here."""

from __future__ import annotations

from bisect import bisect_right
from collections import defaultdict
from typing import Callable, Dict, Iterable, List, Optional, Sequence, Tuple

from inspect_vmemmap.findings import Finding
from inspect_vmemmap.layout import KernelLayout
from inspect_vmemmap.memory import PhysRanges
from inspect_vmemmap.facts import Assumption, Inputs
from inspect_vmemmap.intervals import merge, subtract
from inspect_vmemmap.model import Prediction, predict
from inspect_vmemmap.sections import SectionTable
from inspect_vmemmap.vmemmap import NodeMap, size_label

#: (vaddr, size, phys, writable) of one vmemmap leaf
LeafTuple = Tuple[int, int, int, bool]
Interval = Tuple[int, int]


class CheckResult:
    def __init__(self) -> None:
        self.findings: List[Finding] = []
        self.hvo = {"optimized_folios": 0, "remapped_ptes": 0, "freed_bytes": 0}
        self.prediction: Optional[Prediction] = None
        self.fallback_pmds = 0  # whole-section memmap mapped by base pages (allowed)
        #: ZONE_DEVICE compound pages whose tail vmemmap is deduplicated as the model says
        self.device_dedup = {"compound_pages": 0, "remapped_ptes": 0, "saved_bytes": 0}
        #: vmemmap backed by an altmap where the model says: memmap_on_memory blocks, devices
        self.self_hosted = {"memory_blocks": 0, "device_maps": 0, "bytes": 0}


def _pfn_span(lay: KernelLayout, a: int, b: int) -> Tuple[int, int, int]:
    """:return: (section, first pfn, last pfn) of the struct pages in virtual [a, b)."""
    p0 = lay.page_to_pfn(a)
    p1 = lay.page_to_pfn(b - 1)
    return p0 >> lay.pfn_section_shift, p0, p1


def run_check(inputs: Inputs, sections: SectionTable, leaves: Sequence[LeafTuple],
              backing_free: Optional[Callable[[int], bool]] = None, mem=None, deep: bool = False,
              unknown: Sequence[Interval] = (), hvo_unknown: Optional[Assumption] = None,
              progress: Optional[Callable[[int], None]] = None) -> CheckResult:
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
    :return: a :class:`CheckResult` with findings merged per range.
    """
    lay = inputs.layout
    res = CheckResult()
    pred = res.prediction = predict(inputs)
    nodes = NodeMap(inputs.nodes)
    ram = PhysRanges(inputs.ram)
    out = res.findings
    shift = lay.page_shift

    # -- sections ------------------------------------------------------------------
    for nr, sp in sorted(pred.sections.items()):
        s = sections.get(nr)
        start = nr << lay.pfn_section_shift
        where = dict(section=nr, pfn_start=start, pfn_end=start + lay.pages_per_section - 1)
        if s is None or not s.present:
            # add_memory_resource() registers the RAM resource before sparse_add_section()
            note = "" if sp.early else _TRANSIENT_NOT_PRESENT
            out.append(Finding("section-flags", "error",
                               f"section {nr} holds RAM (pfn {max(start, sp.valid[0][0])}-{sp.valid[-1][1] - 1}) but is not present"
                               + note, **where, **({"transient": True} if note else {})))
            continue
        have = set(s.flag_names()) - {"vmemmap_preinit"}
        want = set(sp.flags)
        if "zone_device" in have and "zone_device" not in want:
            # a taint stays while the section holds any memory (mm/sparse.c
            # section_deactivate() clears section_mem_map only when it empties), so one
            # left by device memory removed since cannot be told from a wrong one
            have.discard("zone_device")
        if have != want:
            note = _section_transient(have, want)
            out.append(Finding("section-flags", "error",
                               f"section {nr}: flags {s.letters() or '-'} where the model expects "
                               f"{'+'.join(sorted(want))} ({'boot memory' if sp.early else 'hot-added memory'})" + note,
                               **where, **({"transient": True} if note else {})))
    know_devices = inputs.device_maps is not None
    for s in sections:
        if s.present and s.nr not in pred.sections and (know_devices or "ZONE_DEVICE" not in s.flags):
            start = s.start_pfn(lay)
            out.append(Finding("section-flags", "error",
                               f"section {s.nr} is present but no RAM" + (" and no device memory" if know_devices else "")
                               + " lies in it", section=s.nr, pfn_start=start, pfn_end=start + lay.pages_per_section - 1))

    # -- what is mapped against what must be ----------------------------------------
    mapped = merge([(va, va + size) for va, size, _, _ in leaves])
    unknown_iv = merge(list(unknown))
    for a, b in subtract(subtract(pred.required, mapped), unknown_iv):
        sec, p0, p1 = _pfn_span(lay, a, b)
        out.append(Finding("memmap-unmapped", "error",
                           f"struct pages of pfn {p0}-{p1} (section {sec}) at {a:#x}-{b:#x} are not mapped",
                           section=sec, pfn_start=p0, pfn_end=p1, vaddr=a, vaddr_end=b))
    for a, b in subtract(mapped, pred.allowed):
        sec, p0, p1 = _pfn_span(lay, a, b)
        out.append(Finding("stray-mapping", "warning",
                           f"{a:#x}-{b:#x} ({size_label(b - a)}) is mapped but holds struct pages of pfn {p0}-{p1}, "
                           f"which no section needs", section=sec, pfn_start=p0, pfn_end=p1, vaddr=a, vaddr_end=b))

    # -- HVO --------------------------------------------------------------------------
    by_va: Dict[int, LeafTuple] = {va: l for l in leaves for va in [l[0]] if l[1] == lay.page_size}
    explained_ro = set()  # vaddrs of read-only leaves the model explains
    alias_ok: Dict[int, int] = defaultdict(int)  # phys page -> extra mappings explained
    shared_tail = _shared_tails(pred, by_va, lay.page_size)
    for h in pred.hvo:
        f = h.folio
        h_end = h.start + h.pages * lay.page_size
        hidden = [(a, b) for a, b in unknown_iv if a < h_end and h.start < b]
        if hidden:
            # the tables that map its vmemmap could not be read: nothing to compare
            sec, p0, _ = _pfn_span(lay, h.start, h.start + 1)
            out.append(Finding("unreadable", "warning",
                               f"HugeTLB folio at pfn {f.head_pfn} (order {f.order}) is marked vmemmap-optimized; "
                               f"whether its vmemmap is remapped is unknown: the page table mapping "
                               f"{hidden[0][0]:#x}-{hidden[0][1]:#x} could not be read", section=sec,
                               pfn_start=f.head_pfn, pfn_end=f.head_pfn + (1 << f.order) - 1,
                               vaddr=h.start, vaddr_end=h_end))
            for k in range(h.pages):
                explained_ro.add(h.start + k * lay.page_size)
            continue
        if h.tail_target == "unsupported":
            # model.hvo_supported(): this kernel cannot optimize; the mark is corrupt
            sec, p0, _ = _pfn_span(lay, h.start, h.start + 1)
            out.append(Finding("hvo-inconsistent", "error",
                               f"HugeTLB folio at pfn {f.head_pfn} (order {f.order}) is marked vmemmap-optimized, but "
                               f"{lay.arch} kernels have no HugeTLB vmemmap optimisation", section=sec,
                               pfn_start=f.head_pfn, pfn_end=f.head_pfn + (1 << f.order) - 1,
                               vaddr=h.start, vaddr_end=h.start + h.pages * lay.page_size))
            continue
        bad = []
        rw_tails: List[int] = []  # tails still writable
        odd = False  # a tail neither writable nor read-only onto its target
        head = by_va.get(h.start)
        if head is None:
            bad.append("its first vmemmap page is not mapped by a base page (PMD not split)")
        elif not head[3]:
            bad.append("its first vmemmap page is read-only")
        for k in range(1, h.pages):
            va = h.start + k * lay.page_size
            l = by_va.get(va)
            if l is None:
                bad.append(f"vmemmap page {k} is not mapped by a base page")
                odd = True
                continue
            if l[3]:
                rw_tails.append(k)
            if not l[3]:
                explained_ro.add(va)  # part of this folio: reported here if wrong, not twice
            else:
                bad.append(f"vmemmap page {k} is writable")
            if h.tail_target == "head":
                want = head[2] if head is not None else None
                what = "the kept page"
            else:
                want = shared_tail.get((f.nid, f.zone, f.order))
                what = "the zone's shared tail page"
                if head is not None and l[2] == head[2]:
                    want = None
            if want is not None and l[2] == want:
                alias_ok[l[2] >> shift] += 1
                odd = odd or bool(l[3])  # writable onto the target: no step of a remap does that
            else:
                bad.append(f"vmemmap page {k} maps {l[2]:#x}, not {what}" + (f" {want:#x}" if want is not None else ""))
                odd = odd or not l[3]
        sec, p0, _ = _pfn_span(lay, h.start, h.start + 1)
        if bad:
            note = _hvo_transient(h.pages, head, rw_tails, odd, any(by_va.get(h.start + k * lay.page_size)
                                                                     for k in range(1, h.pages)))
            out.append(Finding("hvo-inconsistent", "error",
                               f"HugeTLB folio at pfn {f.head_pfn} (order {f.order}) is marked vmemmap-optimized but "
                               + "; ".join(bad[:3]) + (f" (and {len(bad) - 3} more)" if len(bad) > 3 else "") + note,
                               section=sec, pfn_start=f.head_pfn, pfn_end=f.head_pfn + (1 << f.order) - 1,
                               vaddr=h.start, vaddr_end=h.start + h.pages * lay.page_size,
                               **({"transient": True} if note else {})))
        else:
            res.hvo["optimized_folios"] += 1
            res.hvo["remapped_ptes"] += h.pages - 1
            res.hvo["freed_bytes"] += (h.pages - 1) * lay.page_size
    # read-only leaves no optimised folio explains
    ro_runs = merge([(va, va + size) for va, size, _, w in leaves if not w and va not in explained_ro])
    if hvo_unknown:  # their sharing is as unknown as their folio: no alias finding either
        for va, size, phys, w in leaves:
            if not w and va not in explained_ro:
                alias_ok[phys >> shift] += 1
    for a, b in ro_runs:
        sec, p0, p1 = _pfn_span(lay, a, b)
        if hvo_unknown:
            out.append(Finding("unreadable", "warning",
                               f"{a:#x}-{b:#x} (struct pages of pfn {p0}-{p1}) is mapped read-only; whether a "
                               f"vmemmap-optimized HugeTLB folio explains it is unknown: {hvo_unknown}",
                               section=sec, pfn_start=p0, pfn_end=p1, vaddr=a, vaddr_end=b,
                               **({"excluded_by": hvo_unknown.excluded_by} if hvo_unknown.excluded_by else {})))
            continue
        out.append(Finding("hvo-inconsistent", "error",
                           f"{a:#x}-{b:#x} (struct pages of pfn {p0}-{p1}) is mapped read-only but no "
                           f"vmemmap-optimized HugeTLB folio is there", section=sec, pfn_start=p0, pfn_end=p1,
                           vaddr=a, vaddr_end=b))

    placed = _check_placement(lay, pred, leaves, by_va, alias_ok, res)

    # -- backing: RAM, aliases, node, buddy -----------------------------------------------
    backed: List[Tuple[int, int, int]] = []  # (phys, phys end, vaddr) of leaves in RAM
    outside: List[Tuple[int, int, int]] = []  # (vaddr, size, phys)
    offnode: List[Tuple[int, int, int, int]] = []
    free: List[Tuple[int, int, int]] = []
    # --deep: every backing page in bulk, where the checker can (else the first of each leaf)
    bulk = deep and hasattr(backing_free, "free_ranges")
    know_ram = bool(ram)  # no RAM list at all: nothing can be said about backing
    for va, size, phys, w in leaves:
        if know_ram and not ram.covers(phys, phys + size) and va not in placed:
            outside.append((va, size, phys))
            continue
        backed.append((phys, phys + size, va))
        sec = lay.page_to_pfn(va) >> lay.pfn_section_shift
        sp = pred.sections.get(sec)
        bn = nodes.nid(phys >> shift)
        if sp is not None and sp.nid is not None and bn is not None and bn != sp.nid:
            offnode.append((va, size, sp.nid, bn))
        if backing_free is not None and not bulk and backing_free(phys >> shift):
            free.append((va, size, phys))
    if bulk:
        free = _free_backing(backing_free, backed, shift)
    for kind, items, why in (("backing-outside-ram", outside, "which is not System RAM"),
                             ("backing-free", free, "which is free in the buddy allocator")):
        for va, end, phys, phys_end in _runs(items):
            sec, p0, p1 = _pfn_span(lay, va, end)
            out.append(Finding(kind, "error",
                               f"vmemmap {va:#x}-{end:#x} (struct pages of pfn {p0}-{p1}) is backed by phys "
                               f"{phys:#x}-{phys_end:#x}, {why}",
                               section=sec, pfn_start=p0, pfn_end=p1, vaddr=va, vaddr_end=end, phys=phys))
    # one alias finding per run of consecutive shared pages mapped by consecutive addresses
    aliases: List[Tuple[int, int, int]] = []
    for pfn, vas in _shared_pages(backed, shift):
        if len(vas) - alias_ok.get(pfn, 0) > 1:
            aliases.append((sorted(vas)[1], lay.page_size, pfn << shift))
    for va, end, phys, phys_end in _runs(aliases):
        sec, p0, p1 = _pfn_span(lay, va, end)
        out.append(Finding("alias", "error",
                           f"phys {phys:#x}-{phys_end:#x} also backs vmemmap {va:#x}-{end:#x} (struct pages of pfn "
                           f"{p0}-{p1}) and neither HVO nor ZONE_DEVICE dedup explains it", section=sec, pfn_start=p0, pfn_end=p1,
                           vaddr=va, vaddr_end=end, phys=phys))
    for (va, size, want, got) in _merge_offnode(offnode):
        sec, p0, p1 = _pfn_span(lay, va, va + size)
        out.append(Finding("offnode-memmap", "warning",
                           f"struct pages of pfn {p0}-{p1} (node {want}) live in memory of node {got}",
                           section=sec, pfn_start=p0, pfn_end=p1, vaddr=va, vaddr_end=va + size))
    if mem is not None and inputs.page_flags and inputs.zones:
        out.extend(check_page_flags(inputs, sections, mem, mapped, deep, progress))
    return res


def _check_placement(lay: KernelLayout, pred: Prediction, leaves: Sequence[LeafTuple], by_va: Dict[int, LeafTuple],
                     alias_ok: Dict[int, int], res: CheckResult) -> set:
    """Where the model says exactly which memory backs the vmemmap: the tails of ZONE_DEVICE
    compound pages (model._compound_segments()) and altmap-backed vmemmap (memmap_on_memory
    blocks, device memory with its memmap on the device; model._altmap_alloc()). Pages
    that map what the model says are explained sharing (``alias_ok``); others are
    ``backing-misplaced``, and their sharing is not reported again as ``alias``.

    :return: the vaddrs of leaves backed where an altmap places them (device memory is
        not System RAM, and is not reported as such).
    """
    out = res.findings
    placed: set = set()
    if not pred.device and not pred.blocks:
        return placed
    starts = [l[0] for l in leaves]
    page = lay.page_size
    shift = lay.page_shift

    # -- device-dax compound page dedup: every leaf in a dedup segment against its target
    bad: List[Tuple[int, int, Optional[int], int, int]] = []  # va, phys found, phys wanted, head pfn, leaf size
    for d in pred.device:
        if d.dedup is False or not d.segments:
            continue
        if d.dedup is None:
            # either era's layout is right (model.dax_dedup()): deduplicated if its tails map their target
            seen = False
            for s, _, period, _ in d.segments[:64]:
                va = s + 2 * page if period else s
                t = d.target_of(va)
                if t is not None and by_va.get(va) is not None and by_va.get(t) is not None \
                        and by_va[va][2] == by_va[t][2]:
                    seen = True
                    break
            if not seen:
                continue
        matched: Dict[int, int] = defaultdict(int)
        for s, e, _, _ in d.segments:
            i = max(bisect_right(starts, s) - 1, 0)
            while i < len(leaves) and leaves[i][0] < e:
                lva, size, lphys, _ = leaves[i]
                i += 1
                for va in range(max(lva, s), min(lva + size, e), page):
                    t = d.target_of(va)
                    if t is None:
                        continue  # a page of its own
                    phys = lphys + (va - lva)
                    tl = by_va.get(t)
                    want = tl[2] if tl is not None else None
                    if size == page and phys == want:
                        alias_ok[want >> shift] += 1
                        matched[t] += 1
                    else:
                        alias_ok[phys >> shift] += 1  # reported here, not again as an alias
                        bad.append((va, phys, want, lay.page_to_pfn(t - page), size))
        for t, n in matched.items():
            if n == d.tails(t):
                res.device_dedup["compound_pages"] += 1
            res.device_dedup["remapped_ptes"] += n
            res.device_dedup["saved_bytes"] += n * page
    groups: List[List] = []
    for va, phys, want, head, size in bad:
        g = groups[-1] if groups else None
        if g is not None and g[1] == va and g[3] == want and g[4] == head:
            g[1] = va + page
        else:
            groups.append([va, va + page, phys, want, head, size])
    for va, end, phys, want, head, size in groups:
        sec, p0, p1 = _pfn_span(lay, va, end)
        how = (f"maps phys {phys:#x}" if size == page else f"is mapped by a {size_label(size)} block (phys {phys:#x})")
        target = (f"the compound page's second vmemmap page, phys {want:#x}" if want is not None
                  else "the compound page's second vmemmap page, which is not mapped by a base page")
        out.append(Finding("backing-misplaced", "error",
                           f"vmemmap {va:#x}-{end:#x} (struct pages of pfn {p0}-{p1}, tails of the ZONE_DEVICE "
                           f"compound page at pfn {head}) {how}; memremap_pages() maps them onto {target}",
                           section=sec, pfn_start=p0, pfn_end=p1, vaddr=va, vaddr_end=end, phys=phys))

    # -- altmap-backed vmemmap
    def hosted_ok(hosted) -> Tuple[bool, int]:
        good = True
        nbytes = 0
        for h in hosted:
            i = max(bisect_right(starts, h.start) - 1, 0)
            while i < len(leaves) and leaves[i][0] < h.end:
                va, size, phys, _ = leaves[i]
                i += 1
                if va + size <= h.start:
                    continue
                want = h.phys + (va - h.start)
                if phys == want and va >= h.start and va + size <= h.end:
                    placed.add(va)
                    nbytes += size
                    continue
                good = False
                for p in range(phys >> shift, (phys + size) >> shift):
                    alias_ok[p] += 1  # reported here, not again as an alias
                a, b = max(va, h.start), min(va + size, h.end)
                sec, p0, p1 = _pfn_span(lay, a, b)
                out.append(Finding("backing-misplaced", "error",
                                   f"vmemmap {a:#x}-{b:#x} (struct pages of pfn {p0}-{p1}) is backed by phys "
                                   f"{phys + (a - va):#x}; the kernel allocates it from {h.what}, phys "
                                   f"{h.phys + (a - h.start):#x}", section=sec, pfn_start=p0, pfn_end=p1,
                                   vaddr=a, vaddr_end=b, phys=phys + (a - va)))
        return good, nbytes

    for blk in pred.blocks:
        good, nbytes = hosted_ok(blk.hosted)
        if good and blk.hosted:
            res.self_hosted["memory_blocks"] += 1
            res.self_hosted["bytes"] += nbytes
    for d in pred.device:
        good, nbytes = hosted_ok(d.hosted)
        if good and d.hosted:
            res.self_hosted["device_maps"] += 1
            res.self_hosted["bytes"] += nbytes
    return placed


def _zone_runs(inputs: Inputs, ram_pfns, start: int, end: int):
    """Runs ``(a, b, nid, zone)`` of pfns in ``[start, end)`` that are RAM and in exactly
    one zone span (where struct pages must carry that node and zone)."""
    out = []
    for nid, zs, ze, z in inputs.zones:
        a, b = max(start, zs), min(end, ze)
        if a >= b:
            continue
        for ra, rb in ram_pfns:
            x, y = max(a, ra), min(b, rb)
            if x < y:
                out.append((x, y, nid, z))
    out.sort()
    # drop overlaps (ZONE_MOVABLE inside a ZONE_NORMAL span): ambiguous, not checked
    clean = []
    for r in out:
        if clean and r[0] < clean[-1][1]:
            last = clean.pop()
            if last[0] < r[0]:
                clean.append((last[0], r[0]) + last[2:])
            if r[1] < last[1]:
                clean.append((r[1], last[1]) + last[2:])
            continue
        clean.append(r)
    return clean


def check_page_flags(inputs: Inputs, sections: SectionTable, mem, mapped: Sequence[Interval], deep: bool,
                     progress: Optional[Callable[[int], None]] = None) -> List[Finding]:
    """page_to_nid()/page_zonenum() of struct pages against the node and zone spans
    (include/linux/mm.h; memmap_init_range() in mm/mm_init.c sets them with
    set_page_links()). Online sections only: offline memory's struct pages are not
    initialised. Without ``deep``, the first and last 64 struct pages of each run.

    Byte slicing reads the top bytes of every flags word at C speed; only a chunk that
    differs is looked at page by page.
    """
    from inspect_vmemmap.memory import FaultError

    lay = inputs.layout
    pf = inputs.page_flags
    sps = lay.struct_page_size
    shift = pf["zones_shift"]
    width = 64 - shift
    nbytes = (width + 7) // 8
    first_byte = 8 - nbytes
    low_bits = shift - 8 * first_byte  # bits of the lowest used byte below the field
    ram_pfns = merge([(a >> lay.page_shift, b >> lay.page_shift) for a, b in inputs.ram])
    chunk = max(1, (2 << 20) // sps)  # struct pages per read: 2 MiB of memmap
    bad: List[Tuple[int, int, int, int]] = []  # pfn, got field, want field
    unread: List[Tuple[int, int]] = []
    zmask = (1 << pf["zones_width"]) - 1
    tables = []
    for k in range(nbytes):
        m = 0xFF if k else (0xFF << low_bits) & 0xFF
        tables.append(bytes(b & m for b in range(256)))
    done = 0
    for s in sections:
        if not s.valid or "ONLINE" not in s.flags or "ZONE_DEVICE" in s.flags:
            continue
        s0 = s.start_pfn(lay)
        for a, b in s.pfn_ranges(lay):
            for ra, rb, nid, zone in _zone_runs(inputs, ram_pfns, a, b):
                spans = [(ra, rb)] if deep or rb - ra <= 128 else [(ra, ra + 64), (rb - 64, rb)]
                want = (nid << pf["zones_width"]) | zone
                wbytes = (want << low_bits).to_bytes(nbytes, "little")
                for x, y in spans:
                    for c in range(x, y, chunk):
                        n = min(chunk, y - c)
                        done += n
                        if progress is not None:
                            progress(done)
                        try:
                            buf = mem.read(lay.pfn_to_page(c), n * sps)
                        except FaultError:
                            unread.append((c, c + n))
                            continue
                        same = True
                        for k in range(nbytes):
                            col = buf[first_byte + k::sps][:n].translate(tables[k])
                            if col != bytes([wbytes[k]]) * n:
                                same = False
                                break
                        if same:
                            continue
                        for i in range(n):
                            w = int.from_bytes(buf[i * sps:i * sps + 8], "little") >> shift
                            if w != want:
                                bad.append((c + i, w, want))
    out: List[Finding] = []
    runs: List[List[int]] = []
    for pfn, got, want in bad:
        if runs and runs[-1][1] == pfn and runs[-1][2:] == [got, want]:
            runs[-1][1] = pfn + 1
        else:
            runs.append([pfn, pfn + 1, got, want])
    for p0, p1, got, want in runs:
        out.append(Finding(
            "page-node-zone", "error",
            f"struct pages of pfn {p0}-{p1 - 1} say node {got >> pf['zones_width']} zone {got & zmask}, "
            f"but the pfns lie in node {want >> pf['zones_width']} zone {want & zmask}",
            section=p0 >> lay.pfn_section_shift, pfn_start=p0, pfn_end=p1 - 1, vaddr=lay.pfn_to_page(p0),
            vaddr_end=lay.pfn_to_page(p1)))
    # struct pages that should be mapped but could not be read are already findings when
    # unmapped; a mapped one that cannot be read is a filtered or truncated dump
    for a, b in merge(unread):
        va, vb = lay.pfn_to_page(a), lay.pfn_to_page(b)
        if subtract([(va, vb)], list(mapped)) != [(va, vb)]:
            out.append(Finding("unreadable", "warning",
                               f"struct pages of pfn {a}-{b - 1} could not be read: their node and zone are unchecked",
                               section=a >> lay.pfn_section_shift, pfn_start=a, pfn_end=b - 1, vaddr=va, vaddr_end=vb))
    return out


# A dump is taken from a kernel that was crashing: states the kernel passes through while
# it changes the vmemmap are named as such (still errors: the kernel stopped in them).
_TRANSIENT_NOT_PRESENT = (" (transient: a hot-add in progress registers the memory resource before "
                          "sparse_add_section() marks the section present)")


def _section_transient(have: set, want: set) -> str:
    """Why a section's flags may be a state on the way (mm/sparse.c, mm/memory_hotplug.c)."""
    if "present" in have and "has_mem_map" in want and "has_mem_map" not in have:
        return (" (transient: a hot-add in progress, between section_mark_present() and "
                "sparse_init_one_section() in sparse_add_section(), or a hot-remove clearing it)")
    if have ^ want == {"online"}:
        return (" (transient: onlining or offlining in progress: online_pages()/offline_pages() change the "
                "sections' online bit before the memory block's state follows)")
    return ""


def _hvo_transient(pages: int, head: Optional[LeafTuple], rw_tails: List[int], odd: bool, any_base: bool) -> str:
    """Whether an optimized-marked folio's vmemmap is half remapped the way
    mm/hugetlb_vmemmap.c leaves it between steps: the flag is set before
    vmemmap_remap_free() splits the PMD and remaps the tails in address order onto the
    kept page, and cleared only after vmemmap_remap_alloc() has given every tail its own
    writable page again (also in address order). So a PMD not split yet, or a split PMD
    whose writable tails are a prefix or a suffix of the tails (the rest read-only onto
    their target), is a remap in progress; anything else is not."""
    if head is None and not any_base:
        return (" (transient: the remap had not started: kernels with 'set hugetlb page flag before optimizing "
                "vmemmap' set the flag before vmemmap_remap_free() splits the PMD)")
    if head is None or not head[3] or odd or not rw_tails:
        return ""
    n = len(rw_tails)
    prefix = rw_tails == list(range(1, n + 1))
    suffix = rw_tails == list(range(pages - n, pages))
    if not (prefix or suffix):
        return ""
    if n == pages - 1:
        return (" (transient: PMD split but every tail still writable: a remap in progress, "
                "started by vmemmap_remap_free() or finished by vmemmap_remap_alloc() before the flag is cleared)")
    return f" (transient: {pages - 1 - n} of {pages - 1} tails remapped: a remap in progress)"


def _free_backing(buddy, backed: List[Tuple[int, int, int]], shift: int) -> List[Tuple[int, int, int]]:
    """Under --deep: every page that backs the vmemmap, not only the first of each leaf,
    against the buddy allocator (their struct pages read in bulk; those that cannot be read
    go unchecked: a filtered dump leaves out struct pages of excluded pages, which the
    vmemmap's backing is not).

    :return: ``(vaddr, size, phys)`` of the vmemmap backed by free pages.
    """
    pfns = merge([(a >> shift, b >> shift) for a, b, _ in backed])
    free: List[Tuple[int, int]] = []
    for a, b in pfns:
        free.extend(buddy.free_ranges(a, b)[0])
    if not free:
        return []
    free = [(a << shift, b << shift) for a, b in merge(free)]
    ends = [b for _, b in free]
    out = []
    for phys, end, va in backed:
        i = bisect_right(ends, phys)
        while i < len(free) and free[i][0] < end:
            x, y = max(phys, free[i][0]), min(end, free[i][1])
            out.append((va + (x - phys), y - x, x))
            i += 1
    return sorted(out)


def _runs(items: List[Tuple[int, int, int]]) -> List[Tuple[int, int, int, int]]:
    """Merge ``(vaddr, size, phys)`` where both addresses continue the previous item.

    :return: ``[(vaddr, vaddr end, phys, phys end)]``.
    """
    out: List[List[int]] = []
    for va, size, phys in sorted(items):
        if out and out[-1][1] == va and out[-1][3] == phys:
            out[-1][1] += size
            out[-1][3] += size
        else:
            out.append([va, va + size, phys, phys + size])
    return [tuple(r) for r in out]


def _shared_tails(pred: Prediction, by_va: Dict[int, LeafTuple], page_size: int) -> Dict[tuple, int]:
    """7.1+ HVO: the page most tails of each (node, zone, order) map, by majority, so
    that one damaged folio is blamed on itself and not on its healthy neighbours."""
    votes: Dict[tuple, Dict[int, int]] = defaultdict(lambda: defaultdict(int))
    for h in pred.hvo:
        if h.tail_target != "shared":
            continue
        key = (h.folio.nid, h.folio.zone, h.folio.order)
        for k in range(1, h.pages):
            l = by_va.get(h.start + k * page_size)
            if l is not None:
                votes[key][l[2]] += 1
    return {key: max(v.items(), key=lambda kv: kv[1])[0] for key, v in votes.items()}


def _shared_pages(backed: List[Tuple[int, int, int]], shift: int):
    """Physical pages that more than one leaf maps: sort the leaves' backing by address
    and sweep, so the cost grows with the number of leaves, not of pages.

    :return: ``[(pfn, [vaddr of each mapping of that page])]``.
    """
    backed.sort()
    out = []
    i = 0
    n = len(backed)
    while i < n:
        # a cluster of overlapping backing ranges
        j = i + 1
        end = backed[i][1]
        while j < n and backed[j][0] < end:
            end = max(end, backed[j][1])
            j += 1
        if j - i > 1:
            per: Dict[int, List[int]] = defaultdict(list)
            for a, b, va in backed[i:j]:
                for p in range(a >> shift, b >> shift):
                    per[p].append(va + ((p << shift) - a))
            out.extend((p, vas) for p, vas in sorted(per.items()) if len(vas) > 1)
        i = j
    return out


def _merge_offnode(items):
    out = []
    for va, size, want, got in items:
        if out and out[-1][0] + out[-1][1] == va and out[-1][2:] == (want, got):
            out[-1] = (out[-1][0], out[-1][1] + size, want, got)
        else:
            out.append((va, size, want, got))
    return out
