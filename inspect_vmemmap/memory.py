"""The small memory interface that the decoders and walkers work on.

Everything below the drgn adapter reads target memory through :class:`Memory`: one
method, ``read(address, size, physical)``. Production passes the adapter's DrgnMemory
(drgn's ``Program.read`` has exactly this signature), unit tests synthetic memory
(tests/synthmem.py). Type information, DWARF or BTF, has one interface too: :class:`Types`.
"""

from __future__ import annotations

from typing import Dict, Iterable, Optional, Protocol, Tuple


class FaultError(Exception):
    """Memory that could not be read (not in the dump, filtered, not RAM)."""

    def __init__(self, address: int, physical: bool, reason: str = "", excluded_by: Optional[str] = None) -> None:
        self.address = address
        self.physical = physical
        #: the dump filter that left this memory out (makedumpfile's level), where one did
        self.excluded_by = excluded_by
        kind = "physical" if physical else "virtual"
        super().__init__(f"could not read {kind} address {address:#x}" + (f": {reason}" if reason else ""))


class Memory(Protocol):
    def read(self, address: int, size: int, physical: bool = False) -> bytes:
        """Return ``size`` bytes at ``address``; raise :class:`FaultError` if unreadable."""
        ...


class Types(Protocol):
    """Type information about kernel structures: the drgn adapter's DwarfTypes and
    :class:`inspect_vmemmap.btf.Btf` both have it. ``source`` is "dwarf" or "btf"; the
    lookups raise KeyError for what the kernel does not have."""

    source: str

    def sizeof(self, name: str) -> int: ...

    def offsetof(self, name: str, member: str) -> int: ...

    def member_size(self, name: str, member: str) -> int: ...

    def has_member(self, name: str, member: str) -> bool: ...

    def enum_value(self, name: str) -> Optional[int]: ...

    def enumerators(self, enum_name: Optional[str] = None, *, containing: Optional[str] = None) -> Dict[str, int]: ...


class PhysRanges:
    """A sorted set of physical address ranges ``[start, end)`` with fast lookup."""

    def __init__(self, ranges: Iterable[Tuple[int, int]] = ()) -> None:
        from inspect_vmemmap.intervals import merge

        self.ranges = merge(ranges)
        self._starts = [s for s, _ in self.ranges]
        self._last: Optional[Tuple[int, int]] = None

    def __contains__(self, addr: int) -> bool:
        return self.find(addr) is not None

    def __bool__(self) -> bool:
        return bool(self.ranges)

    def find(self, addr: int) -> Optional[Tuple[int, int]]:
        last = self._last  # callers ask in runs: the range found last time, first
        if last is not None and last[0] <= addr < last[1]:
            return last
        from bisect import bisect_right

        i = bisect_right(self._starts, addr) - 1
        if i >= 0 and addr < self.ranges[i][1]:
            self._last = self.ranges[i]
            return self._last
        return None

    def covers(self, start: int, end: int) -> bool:
        r = self.find(start)
        return r is not None and end <= r[1]

    @property
    def end(self) -> int:
        return self.ranges[-1][1] if self.ranges else 0
