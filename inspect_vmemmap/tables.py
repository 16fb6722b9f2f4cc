"""Tables that never hide data: every cell is printed whole at any terminal width.

rich cuts a table that is wider than the console with ``…`` in every column, addresses
included. :func:`print_table` instead, in this order, until the table fits:

1. prints it as it is;
2. leaves out the optional columns (the caller's, in its order; never one with addresses)
   and says which were left out and how to see them;
3. folds each row onto two or more lines: the columns are dealt into groups, the second
   group's cells under the first group's, with two-line headers;
4. and where even one column is wider than the console, lets that cell run past it
   (the terminal wraps it) rather than cut it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import List, Optional, Sequence, Tuple, Union

from rich.console import Console
from rich.table import Table
from rich.text import Text

Cell = Union[str, Text]
GAP = 2  # rich's padding (0, 1) on both sides of a column boundary


@dataclass(frozen=True)
class Column:
    name: str
    justify: str = "left"
    #: may be left out when the table does not fit (its data is in --json)
    optional: bool = False


def _width(cell: Cell) -> int:
    return cell.cell_len if isinstance(cell, Text) else Text(cell).cell_len


def _widths(columns: Sequence[Column], rows: Sequence[Sequence[Cell]]) -> List[int]:
    return [max([len(c.name)] + [_width(r[i]) for r in rows]) for i, c in enumerate(columns)]


def _total(widths: Sequence[int]) -> int:
    return sum(widths) + GAP * max(len(widths) - 1, 0)


def _fold_widths(widths: Sequence[int], lines: int) -> List[int]:
    per = -(-len(widths) // lines)
    return [max(widths[k * per + j] for k in range(lines) if k * per + j < len(widths)) for j in range(per)]


def layout(columns: Sequence[Column], rows: Sequence[Sequence[Cell]], width: int) -> Tuple[List[int], int]:
    """:return: ``(kept, lines)``: the indices of the columns printed and onto how many
    lines each row is folded (1: not folded)."""
    widths = _widths(columns, rows)
    everything = list(range(len(columns)))
    if _total(widths) <= width:
        return everything, 1
    kept = list(everything)
    for i in everything:
        if columns[i].optional:
            kept.remove(i)
            if _total([widths[k] for k in kept]) <= width:
                return kept, 1
    for lines in range(2, len(columns) + 1):
        if _total(_fold_widths(widths, lines)) <= width:
            return everything, lines
    return everything, len(columns)


def print_table(console: Console, columns: Sequence[Column], rows: Sequence[Sequence[Cell]],
                fold_order: Optional[Sequence[str]] = None, header_style: str = "bold") -> None:
    """Print ``rows`` under ``columns`` at the console's width without cutting any cell.
    ``fold_order``: the column names in the order they are dealt onto folded lines
    (default: as they are)."""
    if fold_order is not None:
        by_name = {c.name: i for i, c in enumerate(columns)}
        order = [by_name[n] for n in fold_order]
        assert sorted(order) == list(range(len(columns))), fold_order
        if layout(columns, rows, console.width)[1] > 1:
            columns = [columns[i] for i in order]
            rows = [[r[i] for i in order] for r in rows]
    kept, lines = layout(columns, rows, console.width)
    widths = _widths(columns, rows)
    needed = _total([widths[i] for i in kept]) if lines == 1 else _total(_fold_widths(widths, lines))
    t = Table(box=None, header_style=header_style, pad_edge=False)
    if lines == 1:
        for i in kept:
            t.add_column(columns[i].name, justify=columns[i].justify, no_wrap=True, overflow="ignore")
        for r in rows:
            t.add_row(*(r[i] for i in kept))
    else:
        per = -(-len(columns) // lines)
        groups = [list(range(k * per, min((k + 1) * per, len(columns)))) for k in range(lines)]
        for j in range(per):
            names = [columns[g[j]].name if j < len(g) else "" for g in groups]
            t.add_column("\n".join(names), justify=columns[groups[0][j]].justify, no_wrap=True, overflow="ignore")
        for r in rows:
            for g in groups:
                t.add_row(*([r[i] for i in g] + [""] * (per - len(g))))
    # the table may be wider than the console only when one cell is: let it run on, never cut
    console.print(t, crop=False, width=max(console.width, needed))
    left_out = [columns[i].name for i in range(len(columns)) if i not in kept]
    if left_out:
        console.print(f"[dim]({', '.join(left_out)} not shown at {console.width} columns: "
                      f"a wider terminal, or --json, has {'them' if len(left_out) > 1 else 'it'})[/]", highlight=False)
    elif lines > 1:
        console.print(f"[dim](each row on {lines} lines at {console.width} columns)[/]", highlight=False)


def plural(n: int, word: str, words: Optional[str] = None) -> str:
    """``1 split PMD``, ``3 split PMDs``."""
    return f"{n} {word if n == 1 else (words or word + 's')}"


def human_size(n: int) -> str:
    """A size in the largest unit it reaches, so that a table's sizes share units:
    ``20M``, ``36.5M`` (not 37376K), ``388K``; ``~`` where two decimals round it."""
    for unit, suffix in ((1 << 40, "T"), (1 << 30, "G"), (1 << 20, "M"), (1 << 10, "K")):
        if n >= unit:
            v = n / unit
            text = f"{v:.2f}".rstrip("0").rstrip(".")
            return ("" if float(text) * unit == n else "~") + text + suffix
    return f"{n}B" if n else "0"

