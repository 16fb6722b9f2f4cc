"""Page-table walkers that work on the :class:`~inspect_vmemmap.memory.Memory` interface.

A walk yields three kinds of event, in virtual-address order:

- :class:`Leaf`: one page-table entry that maps memory (a 4K PTE, a 2M PMD block, ...);
- :class:`BadEntry`: a malformed entry, reported and not followed;
- :class:`Unreadable`: a table page that could not be read; its range is skipped.

The walk reads each table page once (one read per table page, not per entry), visits each
table page at most once (so a corrupt table can neither loop nor explode), never follows a
pointer outside physical memory, and never raises for what it finds in the tables.
"""

from __future__ import annotations

import struct
from typing import Callable, Iterator, List, Optional, Sequence, Tuple, Union

from inspect_vmemmap.memory import FaultError, Memory

__all__ = ["Leaf", "BadEntry", "Unreadable", "Step", "PagingFormat", "walk", "translate", "effective",
           "DENY_WRITE", "DENY_USER", "DENY_EXEC", "DENY_UEXEC", "GRANT_WRITE", "GRANT_USER", "GRANT_EXEC",
           "GRANT_UEXEC"]

# Entry kinds returned by PagingFormat.decode().
NONE, TABLE, LEAF, BAD = 0, 1, 2, 3

# What a table entry takes away from everything it maps (PagingFormat.table_restrict):
# writes, user (EL0) access, execution by the kernel, execution by user space. The
# effective permission of a leaf is its own bits less what any table above it denies
# (x86: RW and U/S are ANDed over the levels, NX ORed; arm64: APTable, PXNTable, UXNTable).
DENY_WRITE, DENY_USER, DENY_EXEC, DENY_UEXEC = 1, 2, 4, 8
# What a leaf grants once every level is applied (PagingFormat.grants).
GRANT_WRITE, GRANT_USER, GRANT_EXEC, GRANT_UEXEC = 1, 2, 4, 8


class Leaf:
    """A page-table entry that maps ``[vaddr, vaddr + size)`` to ``[phys, phys + size)``.

    ``writable`` and ``attrs`` are the permissions as they take effect, every table above
    applied; ``leaf_writable`` is the entry's own write permission; ``inherited`` the
    DENY_* bits of the tables above, and ``denied_by`` the highest table entry that
    takes writes away, as ``(level, table_phys, index, entry, vaddr, size)``, or None.
    """

    __slots__ = ("vaddr", "size", "level", "entry", "phys", "writable", "attrs", "leaf_writable", "inherited",
                 "denied_by")

    def __init__(self, vaddr: int, size: int, level: str, entry: int, phys: int, writable: bool, attrs: Tuple[str, ...],
                 leaf_writable: Optional[bool] = None, inherited: int = 0, denied_by: Optional[tuple] = None) -> None:
        self.vaddr = vaddr
        self.size = size
        self.level = level
        self.entry = entry
        self.phys = phys
        self.writable = writable
        self.attrs = attrs
        self.leaf_writable = writable if leaf_writable is None else leaf_writable
        self.inherited = inherited
        self.denied_by = denied_by

    def __repr__(self) -> str:
        return (f"Leaf({self.vaddr:#x}, {self.size:#x}, {self.level}, entry={self.entry:#x}, "
                f"phys={self.phys:#x}, {'RW' if self.writable else 'ro'})")


class BadEntry:
    """A malformed entry at ``level`` covering ``[vaddr, vaddr + size)``; not followed."""

    __slots__ = ("vaddr", "size", "level", "entry", "table_phys", "index", "reason")

    def __init__(self, vaddr: int, size: int, level: str, entry: int, table_phys: int, index: int, reason: str) -> None:
        self.vaddr = vaddr
        self.size = size
        self.level = level
        self.entry = entry
        self.table_phys = table_phys
        self.index = index
        self.reason = reason

    def __repr__(self) -> str:
        return f"BadEntry({self.vaddr:#x}, {self.level}[{self.index}]={self.entry:#x}: {self.reason})"


class Unreadable:
    """The table page at ``table_phys`` (for ``level``) could not be read."""

    __slots__ = ("vaddr", "size", "level", "table_phys")

    def __init__(self, vaddr: int, size: int, level: str, table_phys: int) -> None:
        self.vaddr = vaddr
        self.size = size
        self.level = level
        self.table_phys = table_phys

    def __repr__(self) -> str:
        return f"Unreadable({self.vaddr:#x}+{self.size:#x}, {self.level} table at {self.table_phys:#x})"


Event = Union[Leaf, BadEntry, Unreadable]


class PagingFormat:
    """How one architecture's page tables look. Subclasses fill in the attributes and
    :meth:`decode`.

    ``shifts[d]`` is the virtual-address shift of table depth ``d`` (0 is the top level),
    ``names[d]`` its name as the kernel calls it (pgd, p4d, pud, pmd, pte).
    """

    arch = ""
    page_shift = 12
    shifts: Tuple[int, ...] = ()
    names: Tuple[str, ...] = ()
    #: virtual address bits that the top level translates (sign extension above)
    va_bits = 48

    @property
    def entries(self) -> int:
        return 1 << (self.page_shift - 3)

    @property
    def table_size(self) -> int:
        return 1 << self.page_shift

    def table_entries(self, depth: int) -> int:
        """Entries in a table at ``depth``: :attr:`entries` unless the top level is
        smaller (arm64's top level translates only what is left of :attr:`va_bits`)."""
        return self.entries

    def decode(self, entry: int, depth: int) -> Tuple[int, int, str]:
        """Classify ``entry`` found at ``depth``.

        :return: ``(kind, phys, reason)``: kind is NONE (not present), TABLE (phys is
            the next table), LEAF (phys is the mapped page) or BAD (reason says why).
        """
        raise NotImplementedError

    #: grants that the kernel's own vmemmap leaves never have (PAGE_KERNEL): checked by
    #: the map; and whether the CPU may lack execute protection (x86 without NX: then
    #: no leaf has it and executable memmap is not a finding)
    kernel_denies = GRANT_USER | GRANT_EXEC | GRANT_UEXEC
    exec_protection_optional = False

    def leaf_info(self, entry: int, depth: int, inherited: int = 0) -> Tuple[bool, Tuple[str, ...]]:
        """:return: ``(writable, attrs)`` of a leaf entry as they take effect under tables
        that deny ``inherited`` (DENY_* bits); attrs like ptdump's (PSE, NX, GLB)."""
        raise NotImplementedError

    def table_restrict(self, entry: int, depth: int) -> int:
        """:return: the DENY_* bits a table entry applies to everything below it."""
        return 0

    def grants(self, entry: int, inherited: int = 0) -> int:
        """:return: the GRANT_* bits of a leaf entry under tables that deny ``inherited``."""
        return GRANT_WRITE

    def leaf_writable(self, entry: int, depth: int) -> bool:
        """The leaf entry's own write permission, whatever the tables above say."""
        return self.leaf_info(entry, depth)[0]

    def write_bit(self) -> str:
        """How a table entry takes writes away, in the architecture's words."""
        return "RW clear"

    def suspect(self, entry: int) -> bool:
        """A cheap filter: False when a leaf's own bits cannot grant any of
        :attr:`kernel_denies` (then :meth:`grants` need not be asked)."""
        return True

    def can_be_leaf(self, depth: int) -> bool:
        """Whether an entry at ``depth`` can map memory (a block/huge page or a PTE)."""
        raise NotImplementedError

    #: None, or ``contiguous_span(entry, depth)``: how many consecutive entries of one
    #: table a valid leaf spans as one mapping (riscv64 Svnapot: 16 PTEs of 64K, all
    #: holding the same entry; decode() gives the first page of the whole range)
    contiguous_span = None

    def pmd_blocks(self, layout) -> bool:
        """Whether the kernel maps whole-section vmemmap with PMD blocks here, so that a
        PMD range mapped by base pages counts as a split PMD."""
        return False

    def canonical(self, vaddr: int) -> int:
        """Sign-extend a virtual address from :attr:`va_bits`."""
        vaddr &= (1 << self.va_bits) - 1
        if vaddr >> (self.va_bits - 1):
            vaddr |= ((1 << 64) - 1) ^ ((1 << self.va_bits) - 1)
        return vaddr


def walk(
    mem: Memory,
    fmt: PagingFormat,
    root_phys: int,
    start: int,
    end: int,
    phys_ok: Optional[Callable[[int], bool]] = None,
) -> Iterator[Event]:
    """Walk the page tables rooted at ``root_phys`` over virtual ``[start, end)``.

    :param phys_ok: returns whether a table's physical address may be read (is RAM);
        entries that point elsewhere become :class:`BadEntry`. None allows everything.
    :return: an iterator of :class:`Leaf`, :class:`BadEntry` and :class:`Unreadable`, in
        address order.
    """
    shifts = fmt.shifts
    counts = [fmt.table_entries(d) for d in range(len(shifts))]
    unpackers = [struct.Struct(f"<{c}Q").unpack for c in counts]
    names = fmt.names
    last = len(shifts) - 1
    seen = {root_phys: None}  # table page -> the virtual address it was first used for
    decode = fmt.decode
    canonical = fmt.canonical
    leaf_info = fmt.leaf_info
    leaf_writable = fmt.leaf_writable
    restrict = fmt.table_restrict
    span_of = fmt.contiguous_span

    def table(phys: int, depth: int, base: int, inh: int, denied: Optional[tuple]) -> Union[list, Unreadable]:
        """A table page read, as the frame the walk continues from: [entries, next index,
        end index, depth, base, inherited, denied, phys, done]; or why it could not be."""
        # base: the virtual address that index 0 of this table maps
        shift = shifts[depth]
        size = 1 << shift
        n = counts[depth]
        span = n << shift
        if depth == 0:
            lo = (start >> shift) & (n - 1)
            hi = (((end - 1) >> shift) & (n - 1)) + 1
        else:
            lo = (start - base) >> shift if start > base else 0
            hi = (end - base + size - 1) >> shift if end < base + span else n
        try:
            entries = unpackers[depth](mem.read(phys, n * 8, True))
        except FaultError:
            first = max(start, base + (lo << shift)) if depth else start
            return Unreadable(first, min(end, (base + (hi << shift)) if depth else end) - first, names[depth], phys)
        return [entries, lo, hi, depth, base, inh, denied, phys, 0]

    # one generator frame and an explicit stack of tables (not a generator per table: a
    # 1 TiB vmemmap split by HVO has 40000 leaves, each passed up through every level)
    top = table(root_phys, 0, 0, 0, None)
    if type(top) is Unreadable:
        yield top
        return
    stack = [top]
    while stack:
        frame = stack[-1]
        entries, i, hi, depth, base, inh, denied, phys, done = frame
        shift = shifts[depth]
        size = 1 << shift
        name = names[depth]
        child = None
        while i < hi:
            e = entries[i]
            i += 1
            if not e:
                continue
            va = base + ((i - 1) << shift) if depth else canonical((i - 1) << shift)
            kind, nphys, reason = decode(e, depth)
            if kind == NONE:
                continue
            if kind == LEAF:
                if span_of is not None and (span := span_of(e, depth)) > 1:
                    # one mapping over `span` entries that must all be the same
                    first = (i - 1) & ~(span - 1)
                    if i - 1 < done:
                        continue
                    group = entries[first:first + span]
                    if len(group) == span and group.count(e) == span:
                        done = first + span
                        writable, attrs = leaf_info(e, depth, inh)
                        yield Leaf(va - ((i - 1 - first) << shift), size * span, name, e, nphys, writable, attrs,
                                   writable if not inh else leaf_writable(e, depth), inh, denied)
                    else:
                        yield BadEntry(va, size, name, e, phys, i - 1,
                                       f"one of a group of {span} entries that must be equal ({first}-{first + span - 1}) and are not")
                    continue
                writable, attrs = leaf_info(e, depth, inh)
                yield Leaf(va, size, name, e, nphys, writable, attrs,
                           writable if not inh else leaf_writable(e, depth), inh, denied)
            elif kind == TABLE:
                if depth == last:
                    yield BadEntry(va, size, name, e, phys, i - 1, "table pointer at the last level")
                elif phys_ok is not None and not phys_ok(nphys):
                    yield BadEntry(va, size, name, e, phys, i - 1, f"points outside physical memory ({nphys:#x})")
                elif nphys in seen:
                    first = seen[nphys]
                    where = "as the top-level table (a loop)" if first is None else f"for {first:#x} (a loop or a shared table)"
                    yield BadEntry(va, size, name, e, phys, i - 1, f"table {nphys:#x} is already used {where}")
                else:
                    seen[nphys] = va
                    r = restrict(e, depth)
                    below = denied
                    if r & DENY_WRITE and not inh & DENY_WRITE:
                        below = (name, phys, i - 1, e, va, size)
                    child = table(nphys, depth + 1, va, inh | r, below)
                    if type(child) is Unreadable:
                        yield child
                        child = None
                        continue
                    break
            else:
                yield BadEntry(va, size, name, e, phys, i - 1, reason)
        if child is None:
            stack.pop()
        else:
            frame[1] = i
            frame[8] = done
            stack.append(child)


class Step:
    """One level of a single-address translation."""

    __slots__ = ("level", "table_phys", "index", "entry", "kind", "phys", "reason", "size")

    def __init__(self, level: str, table_phys: int, index: int, entry: int, kind: str, phys: int, reason: str, size: int) -> None:
        self.level = level
        self.table_phys = table_phys
        self.index = index
        self.entry = entry
        self.kind = kind  # "none", "table", "leaf", "bad", "unreadable"
        self.phys = phys
        self.reason = reason
        self.size = size


def translate(mem: Memory, fmt: PagingFormat, root_phys: int, vaddr: int) -> List[Step]:
    """Translate one virtual address, keeping every level on the way.

    :return: the steps from the top level down; the last one says how it ended (a leaf,
        a non-present entry, a malformed entry or an unreadable table).
    """
    steps: List[Step] = []
    phys = root_phys
    for depth, shift in enumerate(fmt.shifts):
        index = (vaddr >> shift) & (fmt.table_entries(depth) - 1)
        try:
            (e,) = struct.unpack("<Q", mem.read(phys + index * 8, 8, True))
        except FaultError:
            steps.append(Step(fmt.names[depth], phys, index, 0, "unreadable", 0, "table page not readable", 1 << shift))
            break
        kind, nphys, reason = fmt.decode(e, depth) if e else (NONE, 0, "")
        if kind == TABLE and depth == len(fmt.shifts) - 1:
            kind, reason = BAD, "table pointer at the last level"
        size = 1 << shift
        if kind == LEAF and fmt.contiguous_span is not None:
            size *= fmt.contiguous_span(e, depth)
        name = {NONE: "none", TABLE: "table", LEAF: "leaf", BAD: "bad"}[kind]
        steps.append(Step(fmt.names[depth], phys, index, e, name, nphys, reason, size))
        if kind != TABLE:
            break
        phys = nphys
    return steps


def effective(fmt: PagingFormat, steps: Sequence[Step]) -> Tuple[bool, Tuple[str, ...]]:
    """``(writable, attrs)`` of the leaf a :func:`translate` ended on, as they take effect
    under the table entries above it."""
    inh = 0
    for depth, s in enumerate(steps[:-1]):
        inh |= fmt.table_restrict(s.entry, depth)
    return fmt.leaf_info(steps[-1].entry, len(steps) - 1, inh)
