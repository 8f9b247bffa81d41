"""Text shared by the command line, the reports and the error messages.

``human`` formats counts for tables, ``markdown_table`` is the one table layout (aligned markdown,
readable in a terminal and pasted into notes as is), and ``suggest`` is the one "did you mean"
of every error that rejects a name.
"""

from __future__ import annotations

import difflib
from collections.abc import Iterable, Sequence
from typing import Any

from loopmoe.errors import ConfigError


def human(n: float) -> str:
    """``1234567 -> '1.23M'``: counts in tables, exact values stay in JSON."""
    for unit, scale in (("T", 1e12), ("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if abs(n) >= scale:
            return f"{n / scale:.2f}{unit}"
    return f"{n:.0f}"


def markdown_table(header: Sequence[Any], rows: Iterable[Sequence[Any]], align: str = "") -> str:
    """An aligned markdown table of ``str()`` of every cell.

    ``align`` has one letter per column, ``l`` (the default for columns it does not cover) or
    ``r`` (right-aligned, for numbers; marked ``---:`` in the rule).
    """
    head = [str(h) for h in header]
    cells = [[str(c) for c in row] for row in rows]
    for row in cells:
        if len(row) != len(head):
            raise ConfigError(f"table row {row} has {len(row)} cells, the header has {len(head)}")
    widths = [max(len(r[i]) for r in [head, *cells]) for i in range(len(head))]
    sides = align.ljust(len(head), "l")

    def line(row: list[str]) -> str:
        return "| " + " | ".join(c.rjust(w) if a == "r" else c.ljust(w) for c, w, a in zip(row, widths, sides)) + " |"

    rule = "|" + "|".join("-" * (w + 1) + ":" if a == "r" else "-" * (w + 2) for w, a in zip(widths, sides)) + "|"
    return "\n".join([line(head), rule, *map(line, cells)])


def suggest(name: str, options: Iterable[str], prefix: str = "") -> str:
    """``"did you mean 'x'?"`` for the option closest to ``name`` (written with ``prefix``), or ``""``."""
    close = difflib.get_close_matches(name, [str(o) for o in options], n=1, cutoff=0.5)
    return f"did you mean '{prefix}{close[0]}'?" if close else ""
