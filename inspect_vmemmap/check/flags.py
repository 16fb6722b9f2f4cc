"""Flags: each section's flags against the model's prediction (``section-flags``), and the
node and zone that struct pages' flags carry against the node and zone spans
(``page-node-zone``)."""

from __future__ import annotations

from typing import Callable, List, Optional, Sequence, Tuple

from inspect_vmemmap.check.observed import Observed
from inspect_vmemmap.facts import Inputs
from inspect_vmemmap.findings import Finding
from inspect_vmemmap.flagrules import impossible_taint, ram_pfns, ram_unknown
from inspect_vmemmap.intervals import Interval, coalesce, merge, subtract
from inspect_vmemmap.layout import SECTION_FLAG
from inspect_vmemmap.memory import FaultError

# A dump is taken from a kernel that was crashing: states the kernel passes through while
# it changes the vmemmap are named as such (still errors: the kernel stopped in them).
_TRANSIENT_NOT_PRESENT = (" (transient: a hot-add in progress registers the memory resource before "
                          "sparse_add_section() marks the section present)")


def check_section_flags(obs: Observed) -> List[Finding]:
    """Every section the model predicts against the one the kernel has, and every present
    section the model does not predict (device memory counts only where the inputs list
    the device maps)."""
    lay = obs.layout
    out: List[Finding] = []
    all_ram = ram_pfns(lay, obs.inputs.ram)
    for nr, sp in sorted(obs.pred.sections.items()):
        s = obs.sections.get(nr)
        start = nr << lay.pfn_section_shift
        where = dict(section=nr, pfn_start=start, pfn_end=start + lay.pages_per_section - 1)
        if s is None or not s.present:
            # add_memory_resource() registers the RAM resource before sparse_add_section()
            note = "" if sp.early else _TRANSIENT_NOT_PRESENT
            out.append(Finding("section-flags", None,
                               f"section {nr} holds RAM (pfn {max(start, sp.valid[0][0])}-{sp.valid[-1][1] - 1}) but "
                               f"is not present" + note, **where, **({"transient": True} if note else {})))
            continue
        have = set(s.flags) - {"VMEMMAP_PREINIT"}
        want = set(sp.flags)
        if "ZONE_DEVICE" in have and "ZONE_DEVICE" not in want:
            # a taint stays while the section holds any memory (mm/sparse.c
            # section_deactivate() clears section_mem_map only when it empties), so one
            # left by device memory removed since cannot be told from a wrong one,
            # unless the section is RAM throughout (flagrules.impossible_taint)
            have.discard("ZONE_DEVICE")
            bad_taint = impossible_taint(lay, nr, s.letters(), sp.early, all_ram)
            if bad_taint is not None:
                out.append(bad_taint)
        if have != want:
            note = _section_transient(have, want)
            expects = "+".join(sorted(SECTION_FLAG[f].json for f in want))
            out.append(Finding("section-flags", None,
                               f"section {nr}: flags {s.letters() or '-'} where the model expects {expects} "
                               f"({'boot memory' if sp.early else 'hot-added memory'})" + note,
                               **where, **({"transient": True} if note else {})))
    know_devices = obs.inputs.device_maps is not None
    ram = bool(obs.inputs.ram)
    if not ram:  # neither iomem nor node spans could be read
        out.append(ram_unknown(len(obs.sections)))
    for s in obs.sections:
        if ram and s.present and s.nr not in obs.pred.sections and (know_devices or "ZONE_DEVICE" not in s.flags):
            start = s.start_pfn(lay)
            out.append(Finding("section-flags", None,
                               f"section {s.nr} is present but no RAM" + (" and no device memory" if know_devices else "")
                               + " lies in it", section=s.nr, pfn_start=start, pfn_end=start + lay.pages_per_section - 1))
    return out


def _section_transient(have: set, want: set) -> str:
    """Why a section's flags (our names) may be a state on the way (mm/sparse.c,
    mm/memory_hotplug.c)."""
    if "PRESENT" in have and "HAS_MEM_MAP" in want and "HAS_MEM_MAP" not in have:
        return (" (transient: a hot-add in progress, between section_mark_present() and "
                "sparse_init_one_section() in sparse_add_section(), or a hot-remove clearing it)")
    if have ^ want == {"ONLINE"}:
        return (" (transient: onlining or offlining in progress: online_pages()/offline_pages() change the "
                "sections' online bit before the memory block's state follows)")
    return ""


def check_page_node_zone(obs: Observed, mem, deep: bool,
                         progress: Optional[Callable[[int], None]] = None) -> List[Finding]:
    """page_to_nid()/page_zonenum() of struct pages against the node and zone spans
    (include/linux/mm.h; memmap_init_range() in mm/mm_init.c sets them with
    set_page_links()). Online sections only: offline memory's struct pages are not
    initialised. Without ``deep``, the first and last 64 struct pages of each run.
    """
    lay = obs.layout
    pf = obs.inputs.page_flags
    zones_width = pf["zones_width"]
    zmask = (1 << zones_width) - 1
    bad, unread = _read_page_links(obs, mem, deep, progress)
    out: List[Finding] = []
    for p0, n, got, want in coalesce((pfn, 1, got, want) for pfn, got, want in bad):
        p1 = p0 + n
        out.append(Finding(
            "page-node-zone", None,
            f"struct pages of pfn {p0}-{p1 - 1} say node {got >> zones_width} zone {got & zmask}, "
            f"but the pfns lie in node {want >> zones_width} zone {want & zmask}",
            section=p0 >> lay.pfn_section_shift, pfn_start=p0, pfn_end=p1 - 1, vaddr=lay.pfn_to_page(p0),
            vaddr_end=lay.pfn_to_page(p1)))
    # struct pages that should be mapped but could not be read are already findings when
    # unmapped; a mapped one that cannot be read is a filtered or truncated dump
    for a, b in merge(unread):
        va, vb = lay.pfn_to_page(a), lay.pfn_to_page(b)
        if subtract([(va, vb)], obs.mapped) != [(va, vb)]:
            out.append(Finding("unreadable", None,
                               f"struct pages of pfn {a}-{b - 1} could not be read: their node and zone are unchecked",
                               section=a >> lay.pfn_section_shift, pfn_start=a, pfn_end=b - 1, vaddr=va, vaddr_end=vb))
    return out


def _read_page_links(obs: Observed, mem, deep: bool, progress: Optional[Callable[[int], None]]
                     ) -> Tuple[List[Tuple[int, int, int]], List[Interval]]:
    """Read the node and zone field of the struct pages to check.

    Byte slicing reads the top bytes of every flags word at C speed; only a chunk that
    differs is looked at page by page.

    :return: ``[(pfn, field found, field wanted)]`` of the pages that differ, and the pfn
        ranges that could not be read.
    """
    inputs = obs.inputs
    lay = obs.layout
    pf = inputs.page_flags
    sps = lay.struct_page_size
    shift = pf["zones_shift"]
    width = 64 - shift
    nbytes = (width + 7) // 8
    first_byte = 8 - nbytes
    low_bits = shift - 8 * first_byte  # bits of the lowest used byte below the field
    ram_pfns = merge((a >> lay.page_shift, b >> lay.page_shift) for a, b in inputs.ram)
    chunk = max(1, (2 << 20) // sps)  # struct pages per read: 2 MiB of memmap
    bad: List[Tuple[int, int, int]] = []
    unread: List[Interval] = []
    tables = []
    for k in range(nbytes):
        m = 0xFF if k else (0xFF << low_bits) & 0xFF
        tables.append(None if m == 0xFF else bytes(b & m for b in range(256)))  # None: the byte as it is
    done = 0
    pieces = []  # (first pfn, count, field wanted): at most a chunk each, in pfn order
    for s in obs.sections:
        if not s.valid or "ONLINE" not in s.flags or "ZONE_DEVICE" in s.flags:
            continue
        for a, b in s.pfn_ranges(lay):
            for ra, rb, nid, zone in _zone_runs(inputs, ram_pfns, a, b):
                spans = [(ra, rb)] if deep or rb - ra <= 128 else [(ra, ra + 64), (rb - 64, rb)]
                want = (nid << pf["zones_width"]) | zone
                for x, y in spans:
                    pieces.extend((c, min(chunk, y - c), want) for c in range(x, y, chunk))
    for buf, c, n, want in _read_pieces(mem, lay, pieces, chunk):
        done += n
        if progress is not None:
            progress(done)
        if buf is None:
            unread.append((c, c + n))
            continue
        wbytes = (want << low_bits).to_bytes(nbytes, "little")
        same = True
        for k in range(nbytes):
            col = buf[first_byte + k::sps][:n]
            if tables[k] is not None:
                col = col.translate(tables[k])
            if col != bytes([wbytes[k]]) * n:
                same = False
                break
        if same:
            continue
        for i in range(n):
            w = int.from_bytes(buf[i * sps:i * sps + 8], "little") >> shift
            if w != want:
                bad.append((c + i, w, want))
    return bad, unread


def _read_pieces(mem, lay, pieces, chunk: int):
    """``(bytes or None, pfn, count, want)`` of each piece, neighbouring pieces' struct
    pages read together (the last sample of a section and the first of the next are
    side by side), at most ``chunk`` struct pages a read: the pieces of a read that fails
    are read alone, so what is unread is what reading them alone could not."""
    sps = lay.struct_page_size
    i, n = 0, len(pieces)
    while i < n:
        c0 = pieces[i][0]
        j, end = i + 1, c0 + pieces[i][1]
        while j < n and pieces[j][0] == end and end + pieces[j][1] - c0 <= chunk:
            end += pieces[j][1]
            j += 1
        try:
            buf = mem.read(lay.pfn_to_page(c0), (end - c0) * sps)
        except FaultError:
            buf = None
        for c, k, want in pieces[i:j]:
            if buf is not None:
                yield (buf if j == i + 1 else buf[(c - c0) * sps:(c - c0 + k) * sps]), c, k, want
                continue
            try:
                yield mem.read(lay.pfn_to_page(c), k * sps), c, k, want
            except FaultError:
                yield None, c, k, want
        i = j


def _zone_runs(inputs: Inputs, ram_pfns: Sequence[Interval], start: int, end: int):
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
