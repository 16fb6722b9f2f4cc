"""The vmemmap as the page tables map it: leaves merged into ranges, counted, attributed
to nodes and to the sections whose struct pages they hold.

Works on plain data: a page-table walk (:func:`inspect_vmemmap.pgtable.walk`), a
:class:`~inspect_vmemmap.sections.SectionTable` and node spans.
"""

from __future__ import annotations

from bisect import bisect_right
from typing import Callable, Dict, Iterable, List, NamedTuple, Optional, Sequence, Tuple

from inspect_vmemmap.findings import Finding
from inspect_vmemmap.layout import KernelLayout
from inspect_vmemmap.pgtable import (GRANT_EXEC, GRANT_UEXEC, GRANT_USER, BadEntry, Leaf, PagingFormat, Unreadable,
                                     walk)
from inspect_vmemmap.sections import SectionTable
from inspect_vmemmap.memory import Memory

SIZE_LABELS = {1 << 12: "4K", 1 << 14: "16K", 1 << 16: "64K", 1 << 21: "2M", 1 << 25: "32M", 1 << 29: "512M", 1 << 30: "1G",
               1 << 36: "64G"}


def size_label(size: int) -> str:
    """4096 -> "4K", 2097152 -> "2M" (ptdump's style)."""
    if size in SIZE_LABELS:
        return SIZE_LABELS[size]
    for unit, suffix in ((1 << 40, "T"), (1 << 30, "G"), (1 << 20, "M"), (1 << 10, "K")):
        if size >= unit and size % unit == 0:
            return f"{size // unit}{suffix}"
    return f"{size}B" if size < 1024 else f"{size / 1024:.1f}K"


class MappedLeaf(NamedTuple):
    """One vmemmap leaf as the checks need it: ``[vaddr, vaddr + size)`` mapped onto
    ``[phys, phys + size)`` (a :class:`~inspect_vmemmap.pgtable.Leaf` without its entry)."""

    vaddr: int
    size: int
    phys: int
    writable: bool

    @classmethod
    def of(cls, leaf: Leaf) -> "MappedLeaf":
        # the leaf's own write bit: a table entry that takes writes away is its own
        # finding (map_vmemmap's permissions), not one per HVO folio or leaf below it
        return cls(leaf.vaddr, leaf.size, leaf.phys, leaf.leaf_writable)


class NodeMap:
    """Physical pfn ranges of NUMA nodes: ``[(nid, start_pfn, end_pfn), ...]``."""

    def __init__(self, spans: Iterable[Tuple[int, int, int]]) -> None:
        self.spans = sorted(spans, key=lambda s: s[1])
        self._starts = [s[1] for s in self.spans]
        self._last: Optional[Tuple[int, int, int]] = None

    def nid(self, pfn: int) -> Optional[int]:
        """:return: the node whose span holds ``pfn`` (the innermost, latest-starting one
        where spans nest), or None."""
        last = self._last  # asked in runs: between the starts that bound the last answer, the same
        if last is not None and last[0] <= pfn < last[1]:
            return last[2]
        i = bisect_right(self._starts, pfn) - 1
        if i >= 0 and pfn < self.spans[i][2]:
            nxt = self._starts[i + 1] if i + 1 < len(self._starts) else self.spans[i][2]
            self._last = (self.spans[i][1], min(nxt, self.spans[i][2]), self.spans[i][0])
            return self.spans[i][0]
        while i >= 0:
            if pfn < self.spans[i][2]:
                return self.spans[i][0]
            i -= 1
        return None

    def nid_of_range(self, start: int, end: int) -> Optional[int]:
        """:return: the node of ``start``, else of the first span that overlaps
        ``[start, end)`` (a node span may start inside a section: x86's first node starts
        at pfn 1)."""
        nid = self.nid(start)
        if nid is not None:
            return nid
        for n, s, e in self.spans:
            if s < end and start < e:
                return n
        return None


class Range:
    """Consecutive leaves of one size and permission whose backing is contiguous
    (``stride == size``) or one page repeated (``stride == 0``, HVO tails)."""

    __slots__ = ("start", "end", "page_size", "level", "writable", "attrs", "phys_start", "stride", "count", "nid", "holds",
                 "first_section", "last_section")

    def __init__(self, leaf: Leaf, holds: str, nid: Optional[int], sec: Tuple[int, int]) -> None:
        self.start = leaf.vaddr
        self.end = leaf.vaddr + leaf.size
        self.page_size = leaf.size
        self.level = leaf.level
        self.writable = leaf.writable
        self.attrs = leaf.attrs
        self.phys_start = leaf.phys
        self.stride: Optional[int] = None
        self.count = 1
        self.nid = nid
        self.holds = holds
        self.first_section, self.last_section = sec

    def to_json(self) -> dict:
        d = {
            "start": hex(self.start), "end": hex(self.end), "page_size": self.page_size,
            "level": self.level, "writable": self.writable, "attrs": list(self.attrs),
            "phys_start": hex(self.phys_start),
            "phys_stride": self.page_size if self.stride is None else self.stride,
            "leaves": self.count, "nid": self.nid, "holds": self.holds,
        }
        if self.first_section is not None:
            d["sections"] = [self.first_section, self.last_section]
        return d


class VmemmapMap:
    """What the page tables map in the vmemmap region."""

    def __init__(self) -> None:
        self.leaves: Dict[str, int] = {}
        self.split_pmds = 0
        self.readonly_ptes = 0
        self.bytes_mapped = 0
        self.ranges: List[Range] = []
        self.findings: List[Finding] = []
        self.start = 0
        self.end = 0

    def unknown(self) -> List[Tuple[int, int]]:
        """:return: virtual ranges whose mapping is unknown (their tables were unreadable)."""
        return [(f.vaddr, f.vaddr_end) for f in self.findings if f.kind == "unreadable" and f.vaddr_end is not None]

    def to_json(self) -> dict:
        return {
            "start": hex(self.start), "end": hex(self.end),
            "leaves": dict(self.leaves), "split_pmds": self.split_pmds, "readonly_ptes": self.readonly_ptes,
            "bytes_mapped": self.bytes_mapped, "ranges": [r.to_json() for r in self.ranges],
        }


def leaf_labels(fmt: PagingFormat) -> Dict[str, int]:
    """Zeroed leaf counters for every size this format can map, keyed by size label."""
    labels: Dict[str, int] = {}
    for depth, shift in enumerate(fmt.shifts):
        if fmt.can_be_leaf(depth):
            labels[size_label(1 << shift)] = 0
    return labels


def map_vmemmap(
    mem: Memory,
    fmt: PagingFormat,
    layout: KernelLayout,
    sections: SectionTable,
    nodes: NodeMap,
    phys_ok: Optional[Callable[[int], bool]] = None,
    start: Optional[int] = None,
    end: Optional[int] = None,
    on_leaf: Optional[Callable[[Leaf], None]] = None,
) -> VmemmapMap:
    """Walk the vmemmap page tables and summarize them.

    :param on_leaf: called with each leaf too (for checks that need every leaf).
    :return: a :class:`VmemmapMap`; malformed entries and unreadable tables are in its
        ``findings`` as ``bad-entry`` and ``unreadable``.
    """
    vm = VmemmapMap()
    vm.start = layout.vmemmap_base if start is None else start
    vm.end = layout.vmemmap_end if end is None else end
    vm.leaves = leaf_labels(fmt)
    sps = layout.struct_page_size
    base = layout.vmemmap_base
    pfn_shift = layout.pfn_section_shift
    page_shift = fmt.page_shift
    pmd_shift = fmt.shifts[-2]
    pte_size = 1 << page_shift
    count_split = fmt.pmd_blocks(layout)
    split_bases = set()
    secs = sections.sections
    ranges = vm.ranges
    cur: Optional[Range] = None
    leaves = vm.leaves

    # a section's valid pfn runs, and whether they cover it all: asked once per section (a
    # leaf's struct pages mostly lie in one section, every leaf of a split PMD in the same)
    sec_runs: Dict[int, Optional[list]] = {}

    full: Dict[int, Tuple[int, int]] = {}  # sections whose pfns are all valid -> (nr, nr)
    whole = 1 << pfn_shift

    def runs_of(nr: int) -> Optional[list]:
        if nr in sec_runs:
            return sec_runs[nr]
        s = secs.get(nr)
        r = sec_runs[nr] = None if s is None or not s.valid else s.pfn_ranges(layout)
        if r is not None and len(r) == 1 and r[0] == (nr << pfn_shift, (nr << pfn_shift) + whole):
            full[nr] = (nr, nr)
        return r

    def holds_of(leaf: Leaf) -> Tuple[str, Tuple[Optional[int], Optional[int]]]:
        vaddr = leaf.vaddr
        p0 = (vaddr - base) // sps
        p1 = (vaddr + leaf.size - base + sps - 1) // sps  # exclusive
        s0, s1 = p0 >> pfn_shift, (p1 - 1) >> pfn_shift
        used = False
        first = last = None
        for nr in range(s0, s1 + 1):
            runs = sec_runs[nr] if nr in sec_runs else runs_of(nr)
            if runs is None:
                continue
            if not used:
                for a, b in runs:
                    if a < p1 and p0 < b:
                        used = True
                        break
            if first is None:
                first = nr
            last = nr
        if not used:
            return "unused", (first, last)
        if not leaf.leaf_writable and leaf.size == pte_size:
            return "hvo-tail", (first, last)
        return "memmap", (first, last)

    def pfns_of(ev) -> Tuple[int, int]:
        # the pfns whose struct pages an entry covers, within the walked range (an upper
        # level entry covers more than the vmemmap: pfns are never negative nor absurd)
        a, b = max(ev.vaddr, vm.start, base), min(ev.vaddr + ev.size, vm.end)
        return (a - base) // sps, (max(a, b - 1) - base) // sps

    perms = _Permissions(fmt)
    suspect = fmt.suspect
    protected = False  # a leaf with PAGE_KERNEL's permissions (x86: NX is in use)
    by_size: Dict[int, int] = {}  # leaves counted by size, labelled at the end
    mapped = readonly = 0
    nid_of = nodes.nid
    for ev in walk(mem, fmt, layout.pgtable_root, vm.start, vm.end, phys_ok):
        if type(ev) is Leaf:
            if ev.denied_by is not None or suspect(ev.entry):
                perms.add(ev)
            elif not protected:
                protected = True
            size = ev.size
            vaddr = ev.vaddr
            writable = ev.writable
            by_size[size] = by_size.get(size, 0) + 1
            mapped += size
            if not writable:
                readonly += 1
            if count_split and size == pte_size:
                split_bases.add(vaddr >> pmd_shift)
            if on_leaf is not None:
                on_leaf(ev)
            p0 = (vaddr - base) // sps
            s0 = p0 >> pfn_shift
            if s0 in full and ((vaddr + size - base + sps - 1) // sps - 1) >> pfn_shift == s0:
                # inside a section whose pfns are all valid: its struct pages are in use
                sec = full[s0]
                holds = "hvo-tail" if size == pte_size and not ev.leaf_writable else "memmap"
            else:
                holds, sec = holds_of(ev)
            phys = ev.phys
            nid = nid_of(phys >> page_shift)
            if cur is not None and cur.end == vaddr and cur.page_size == size and cur.writable == writable \
                    and cur.attrs == ev.attrs and cur.holds == holds and cur.level == ev.level and nid == cur.nid:
                stride = cur.stride
                delta = phys - (cur.phys_start + (cur.count - 1) * (stride or 0))
                if (stride is None and delta in (size, 0)) or delta == stride:
                    cur.stride = delta
                    cur.count += 1
                    cur.end += size
                    if sec[0] is not None:
                        if cur.first_section is None:
                            cur.first_section = sec[0]
                        cur.last_section = sec[1]
                    continue
            cur = Range(ev, holds, nid, sec)
            ranges.append(cur)
        elif type(ev) is BadEntry:
            cur = None
            p0, p1 = pfns_of(ev)
            vm.findings.append(Finding(
                "bad-entry", None,
                f"malformed {ev.level} entry {ev.entry:#018x} for {ev.vaddr:#x}-{ev.vaddr + ev.size:#x} "
                f"(struct pages of pfn {p0}-{p1}): {ev.reason}",
                section=p0 >> pfn_shift, pfn_start=p0, pfn_end=p1, vaddr=ev.vaddr,
                vaddr_end=ev.vaddr + ev.size, level=ev.level, entry=ev.entry, table_phys=ev.table_phys, index=ev.index))
        else:
            cur = None
            p0, p1 = pfns_of(ev)
            vm.findings.append(Finding(
                "unreadable", None,
                f"{ev.level} table at phys {ev.table_phys:#x} could not be read: the mapping of "
                f"{ev.vaddr:#x}-{ev.vaddr + ev.size:#x} (struct pages of pfn {p0}-{p1}) is unknown",
                section=p0 >> pfn_shift, pfn_start=p0, pfn_end=p1, vaddr=ev.vaddr, vaddr_end=ev.vaddr + ev.size,
                phys=ev.table_phys, level=ev.level))
    for size, n in by_size.items():
        label = SIZE_LABELS.get(size) or size_label(size)
        leaves[label] = leaves.get(label, 0) + n
    vm.bytes_mapped = mapped
    vm.readonly_ptes = readonly
    vm.split_pmds = len(split_bases)
    perms.protected = perms.protected or protected
    vm.findings.extend(perms.findings(pfns_of, pfn_shift))
    return vm


#: what a leaf grants that PAGE_KERNEL does not, in words
_GRANTS = ((GRANT_USER, "user"), (GRANT_EXEC, "executable"), (GRANT_UEXEC, "user-executable"))


class _Permissions:
    """Collects the leaves whose permissions, every level applied, are not PAGE_KERNEL's
    (pgtable.PagingFormat.grants) and the table entries that take writes away from the
    leaves below them, and makes one ``permissions`` finding per table entry and per run
    of leaves with the same fault."""

    def __init__(self, fmt: PagingFormat) -> None:
        self.fmt = fmt
        self.denied: Dict[tuple, List[int]] = {}  # table entry -> [first leaf vaddr, end]
        self.runs: List[list] = []  # [vaddr, end, level, what]
        self.protected = False  # some leaf is execute-protected (x86: the CPU has NX)

    def add(self, leaf: Leaf) -> None:
        if leaf.denied_by is not None:
            d = self.denied.get(leaf.denied_by)
            if d is None:
                self.denied[leaf.denied_by] = [leaf.vaddr, leaf.vaddr + leaf.size]
            else:
                d[1] = leaf.vaddr + leaf.size
        g = self.fmt.grants(leaf.entry, leaf.inherited)
        if not g & GRANT_EXEC:
            self.protected = True
        g &= self.fmt.kernel_denies
        effective = True
        if not g and leaf.inherited:
            # the leaf's own bits grant it, a table above takes it away: damage all the
            # same, but not a permission anyone has
            g = self.fmt.grants(leaf.entry, 0) & self.fmt.kernel_denies
            effective = False
        what = tuple(w for bit, w in _GRANTS if g & bit)
        if not what:
            return
        r = self.runs[-1] if self.runs else None
        if r is not None and r[1] == leaf.vaddr and r[2] == leaf.level and r[3] == what and r[4] == effective:
            r[1] += leaf.size
        else:
            self.runs.append([leaf.vaddr, leaf.vaddr + leaf.size, leaf.level, what, effective])

    def findings(self, pfns_of, pfn_shift: int) -> List[Finding]:
        out = []
        for (level, table_phys, index, entry, va, size), (a, b) in self.denied.items():
            p0, p1 = pfns_of(_Span(a, b - a))
            out.append(Finding(
                "permissions", None,
                f"{level} entry {entry:#018x} for {va:#x}-{va + size:#x} ({self.fmt.write_bit()}) makes the vmemmap "
                f"{a:#x}-{b:#x} below it read-only (struct pages of pfn {p0}-{p1}); the kernel's table entries "
                f"never take writes away, and HVO makes PTEs read-only, not tables",
                section=p0 >> pfn_shift, pfn_start=p0, pfn_end=p1, vaddr=a, vaddr_end=b, level=level, entry=entry,
                table_phys=table_phys, index=index, access=["read-only"]))
        optional = self.fmt.exec_protection_optional
        for a, b, level, what, effective in self.runs:
            if optional and not self.protected:
                what = tuple(w for w in what if w == "user")
                if not what:
                    continue
            p0, p1 = pfns_of(_Span(a, b - a))
            words = " and ".join(_WORDS[w] for w in what)
            if effective:
                out.append(Finding(
                    "permissions", None,
                    f"vmemmap {a:#x}-{b:#x} (struct pages of pfn {p0}-{p1}) is {words}: its {level} entries grant "
                    f"it and no table above takes it away (PAGE_KERNEL does not)",
                    section=p0 >> pfn_shift, pfn_start=p0, pfn_end=p1, vaddr=a, vaddr_end=b, level=level,
                    access=list(what)))
            else:
                out.append(Finding(
                    "permissions", "warning",
                    f"vmemmap {a:#x}-{b:#x} (struct pages of pfn {p0}-{p1}): its {level} entries would make it "
                    f"{words}, which PAGE_KERNEL does not, but a table entry above takes it away",
                    section=p0 >> pfn_shift, pfn_start=p0, pfn_end=p1, vaddr=a, vaddr_end=b, level=level,
                    access=list(what), effective=False))
        return out


_WORDS = {"user": "accessible from user mode", "executable": "executable by the kernel",
          "user-executable": "executable from user mode"}


class _Span:
    __slots__ = ("vaddr", "size")

    def __init__(self, vaddr: int, size: int) -> None:
        self.vaddr = vaddr
        self.size = size
