"""Number formatting shared by the command-line tables."""

from __future__ import annotations


def human(n: float) -> str:
    """``1234567 -> '1.23M'``: counts in tables, exact values stay in JSON."""
    for unit, scale in (("T", 1e12), ("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if abs(n) >= scale:
            return f"{n / scale:.2f}{unit}"
    return f"{n:.0f}"
