"""Many small reads as a few big ones (issue 18): neighbouring reads coalesced, in address
order, each run at most ``max_run`` bytes and leaving gaps of at most ``max_gap`` bytes
unasked-for. A run that cannot be read is read again item by item, so what cannot be
read is exactly what reading one by one could not; a live kernel read this way is read
no less consistently than one by one (each item is still one read's worth)."""

from __future__ import annotations

from typing import List, Optional, Sequence, Tuple

from inspect_vmemmap.memory import FaultError, Memory


#: the most bytes between two items that one run reads without being asked for them
MAX_GAP = 512


def read_many(mem: Memory, items: Sequence[Tuple[int, int]], max_gap: int = MAX_GAP, max_run: int = 1 << 16,
              physical: bool = False) -> List[Optional[bytes]]:
    """:param items: ``(address, size)`` pairs, in any order.
    :return: for each item, in the order given, its bytes, or None where it could not be read."""
    out: List[Optional[bytes]] = [None] * len(items)
    order = sorted(range(len(items)), key=lambda i: items[i])
    i, n = 0, len(order)
    while i < n:
        start = items[order[i]][0]
        end = start + items[order[i]][1]
        j = i + 1
        while j < n:
            a, size = items[order[j]]
            if a - end > max_gap or max(end, a + size) - start > max_run:
                break
            end = max(end, a + size)
            j += 1
        try:
            buf = mem.read(start, end - start, physical)
        except FaultError:
            for k in order[i:j]:
                a, size = items[k]
                try:
                    out[k] = mem.read(a, size, physical)
                except FaultError:
                    pass
        else:
            for k in order[i:j]:
                a, size = items[k]
                out[k] = buf[a - start:a - start + size]
        i = j
    return out
