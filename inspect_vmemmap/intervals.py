"""Half-open intervals ``[start, end)``: the one copy of merging, subtracting and
coalescing runs that the model, the checks and the dump readers share."""

from __future__ import annotations

from typing import Iterable, List, Sequence, Tuple

Interval = Tuple[int, int]  # [start, end)


def merge(intervals: Iterable[Interval]) -> List[Interval]:
    """Sort and merge overlapping or touching intervals (empty ones dropped)."""
    out: List[List[int]] = []
    for a, b in sorted(i for i in intervals if i[1] > i[0]):
        if out and a <= out[-1][1]:
            out[-1][1] = max(out[-1][1], b)
        else:
            out.append([a, b])
    return [(a, b) for a, b in out]


def subtract(a: Sequence[Interval], b: Sequence[Interval]) -> List[Interval]:
    """``a`` minus ``b``; both merged and sorted."""
    out: List[Interval] = []
    j = 0
    for s, e in a:
        cur = s
        while j < len(b) and b[j][1] <= cur:
            j += 1
        k = j
        while k < len(b) and b[k][0] < e:
            if b[k][0] > cur:
                out.append((cur, b[k][0]))
            cur = max(cur, b[k][1])
            k += 1
        if cur < e:
            out.append((cur, e))
    return out


def coalesce(items: Iterable[Tuple], continues=None) -> List[Tuple]:
    """Merge ``(start, size, *rest)`` items, in the order given, into runs: an item joins
    the run before it when it starts where that run ends and ``continues(run, item)``
    (default: the rest of the tuple is equal).

    :return: ``[(start, size, *rest of the run's first item)]``.
    """
    out: List[list] = []
    for it in items:
        if out and out[-1][0] + out[-1][1] == it[0] and (
                continues(out[-1], it) if continues is not None else tuple(out[-1][2:]) == tuple(it[2:])):
            out[-1][1] += it[1]
        else:
            out.append(list(it))
    return [tuple(r) for r in out]
