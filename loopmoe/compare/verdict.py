"""The verdict of a study in words, generated from its paired differences by fixed, conservative rules.

A sentence may say that one arm beats another only when all of these hold for the paired difference
(``loopmoe.compare.stats``) of the measure:

1. at least ``MIN_SEEDS`` seeds (3) were paired,
2. the 95% t-interval of the mean difference excludes 0, and
3. every seed's difference has the sign of the mean (no seed disagrees).

Otherwise the words are "no difference detectable at N seeds" (interval includes 0), "not
established" (interval excludes 0 but a seed disagrees, or fewer than 3 seeds), or, with one seed,
"single-seed observation" with the number and no direction claimed as a result. The attribution
sentence (is a win of the looped model a win of *looping*?) follows only from the two established
claims it names.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from loopmoe.compare.stats import PairedDifference

MIN_SEEDS = 3
Outcome = Literal["better", "worse", "no_difference", "not_established", "observation"]


@dataclass(frozen=True)
class Finding:
    """What the paired difference ``a - b`` of a lower-is-better measure supports."""

    a: str
    b: str
    outcome: Outcome
    sentence: str


def judge(a: str, b: str, d: PairedDifference, measure: str = "held-out loss", unit: str = "nats/token") -> Finding:
    """The finding for ``a - b`` (lower is better for ``a``), with a sentence that claims no more than the rules allow."""
    amount = f"{abs(d.mean):.4f} {unit}"
    direction = "lower" if d.mean < 0 else "higher"
    if d.n == 1 or d.ci95 is None:
        (seed,) = d.per_seed
        return Finding(
            a,
            b,
            "observation",
            f"{a} vs {b} ({measure}): single-seed observation (seed {seed}): {a} is {amount} {direction}; one seed "
            "cannot tell this from seed noise, so it is not a result.",
        )
    interval = f"mean {d.mean:+.4f}, 95% interval [{d.ci95[0]:+.4f}, {d.ci95[1]:+.4f}] over {d.n} seeds"
    if not d.excludes_zero():
        return Finding(
            a, b, "no_difference", f"{a} vs {b} ({measure}): no difference detectable at {d.n} seeds ({interval})."
        )
    agree = all((v < 0) == (d.mean < 0) and v != 0 for v in d.per_seed.values())
    if d.n < MIN_SEEDS or not agree:
        why = f"only {d.n} seeds (at least {MIN_SEEDS} needed)" if d.n < MIN_SEEDS else "not every seed agrees"
        return Finding(
            a,
            b,
            "not_established",
            f"{a} vs {b} ({measure}): {a} is {amount} {direction} on average, but this is not established: "
            f"{why} ({interval}).",
        )
    winner, loser = (a, b) if d.mean < 0 else (b, a)
    return Finding(
        a,
        b,
        "better" if d.mean < 0 else "worse",
        f"{winner} beats {loser} on {measure} by {amount} ({interval}; every seed agrees).",
    )


def attribution(vs_reference: Finding | None, vs_granularity: Finding | None, looped: str = "looped") -> str | None:
    """What the two findings of the looped arm together say about looping itself (None without both)."""
    if vs_reference is None or vs_granularity is None:
        return None
    if vs_reference.outcome == "better" and vs_granularity.outcome == "better":
        return (
            f"{looped} beats both the reference and the granularity control: at this scale the gain is "
            "attributable to looping, not only to its finer experts."
        )
    if vs_reference.outcome == "better":
        return (
            f"{looped} beats the reference but not the granularity control: the gain cannot be separated from "
            "the finer experts that capacity balancing gives it."
        )
    if vs_reference.outcome == "worse":
        return f"{looped} is worse than the reference it is matched to: looping does not pay at this scale and budget."
    return f"The study does not show that {looped} helps at this scale and budget (nor that it hurts)."
