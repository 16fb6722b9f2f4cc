"""Reads of struct pages through the vmemmap leaves the walk found (issue 18).

Once ``check`` has walked the vmemmap page tables it knows, for every mapped vmemmap
page, the physical page the tables map it to: the same translation a debugger makes for
each virtual read, from the same tables. drgn makes it again on every read (on a QEMU
guest: three reads of page-table pages, then the data), so the struct pages that the
HugeTLB pools, the buddy allocator and the page->flags samples read, some 20,000 reads on
1 TiB, cost four reads each. :class:`VmemmapMemory` reads them at the physical addresses
the leaves give instead, one read per physically contiguous piece, and reads a physical
page that several leaves map (HVO's tails) once per read.

What the leaves do not map (outside them, or where a table was unreadable or malformed),
and any physical read that fails, goes to the target's own virtual read, so what cannot
be read, and how that is said, is exactly what reading virtually says. On a running
kernel the leaves are those of this analysis' own walk: each re-read of
``confirmed_check`` walks the tables again, so a change between walk and read is seen as
any change between two reads is.
"""

from __future__ import annotations

from bisect import bisect_right
from typing import Dict, List, Optional, Sequence, Tuple

from inspect_vmemmap.memory import FaultError, Memory
from inspect_vmemmap.vmemmap import MappedLeaf


class VmemmapMemory:
    """:class:`~inspect_vmemmap.memory.Memory` over ``mem`` whose virtual reads that lie
    wholly in ``leaves`` (vmemmap leaves in address order) are read at the physical
    addresses those leaves map them to."""

    def __init__(self, mem: Memory, leaves: Sequence[MappedLeaf]) -> None:
        self.mem = mem
        self._leaves = leaves
        self._starts = [l.vaddr for l in leaves]
        self._lo = leaves[0].vaddr if leaves else 0
        self._hi = leaves[-1].vaddr + leaves[-1].size if leaves else 0

    def pieces(self, address: int, size: int) -> Optional[List[Tuple[int, int]]]:
        """:return: ``[(phys, size)]`` that virtual ``[address, address + size)`` is read
        from, physically contiguous pieces merged; None if a part of it has no leaf."""
        if size <= 0 or address < self._lo or address + size > self._hi:
            return None
        leaves = self._leaves
        i = bisect_right(self._starts, address) - 1
        out: List[Tuple[int, int]] = []
        va, end = address, address + size
        n = len(leaves)
        while va < end:
            if i < 0 or i >= n:
                return None
            leaf = leaves[i]
            off = va - leaf.vaddr
            if off < 0 or off >= leaf.size:
                return None
            take = min(leaf.size - off, end - va)
            phys = leaf.phys + off
            if out and out[-1][0] + out[-1][1] == phys:
                out[-1] = (out[-1][0], out[-1][1] + take)
            else:
                out.append((phys, take))
            va += take
            i += 1
        return out

    def read(self, address: int, size: int, physical: bool = False) -> bytes:
        mem = self.mem
        if physical:
            return mem.read(address, size, True)
        pieces = self.pieces(address, size)
        if pieces is None:
            return mem.read(address, size, False)
        try:
            if len(pieces) == 1:
                return mem.read(pieces[0][0], pieces[0][1], True)
            got: Dict[Tuple[int, int], bytes] = {}
            for p in pieces:
                if p not in got:
                    got[p] = mem.read(p[0], p[1], True)
            return b"".join(got[p] for p in pieces)
        except FaultError:
            # as reading it virtually says (which may read it, or say why not)
            return mem.read(address, size, False)
