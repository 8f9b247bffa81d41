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

This module also decides which pairs of arms are compared at all (``comparisons``): the report shows
the paired differences of exactly these pairs, and ``verdict`` judges them.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal

from loopmoe.compare.results import ArmRecord, RunRecord
from loopmoe.compare.stats import PairedDifference, paired_difference

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


def comparisons(arms: dict[str, ArmRecord]) -> list[tuple[str, str]]:
    """The paired differences the report shows, as (a, b) for ``a - b``: looped - reference and
    looped - granularity first, then every other arm against the reference, every other looped arm
    without switches against the granularity control of its own loop count and strategy, and every
    ablation of the looped model against it."""
    names = list(arms)
    pairs = [(a, b) for a, b in (("looped", "reference"), ("looped", "granularity")) if a in names and b in names]

    def balancing(name: str) -> tuple:
        spec = arms[name].spec
        return spec.num_loops, spec.strategy

    for name in names:
        if name in ("reference", "looped"):
            continue
        spec = arms[name].spec
        if "reference" in names and (name, "reference") not in pairs:
            pairs.append((name, "reference"))
        if spec.kind == "looped" and spec.iter_conditioning is None and spec.norm_scheme is None:
            pairs += [
                (name, g)
                for g in names
                if arms[g].spec.kind == "granularity" and balancing(g) == balancing(name) and (name, g) not in pairs
            ]
        if name != "granularity" and spec.kind == "looped" and "looped" in names:
            pairs.append((name, "looped"))
    return pairs


def main_comparisons(arms: dict[str, ArmRecord]) -> list[tuple[str, str]]:
    """The pairs of arms that both run on the comparison's seeds (the others are ablations)."""
    return [(a, b) for a, b in comparisons(arms) if arms[a].spec.seeds is None and arms[b].spec.seeds is None]


def paired(
    runs: dict[str, dict[int, RunRecord]], pairs: list[tuple[str, str]], value: Callable[[RunRecord], float | None]
) -> list[tuple[str, str, PairedDifference]]:
    """The paired differences of ``value(run)`` for the pairs whose arms share a seed."""
    out = []
    for a, b in pairs:
        if a in runs and b in runs and set(runs[a]) & set(runs[b]):
            out.append(
                (
                    a,
                    b,
                    paired_difference(
                        {s: value(r) for s, r in runs[a].items()},  # type: ignore[misc]  # None only for text losses, checked by the caller
                        {s: value(r) for s, r in runs[b].items()},  # type: ignore[misc]
                    ),
                )
            )
    return out


def verdict(runs: dict[str, dict[int, RunRecord]], arms: dict[str, ArmRecord], text_name: str | None) -> list[str]:
    """The verdict's sentences, by this module's rules, from the paired differences of the finished runs."""
    main = main_comparisons(arms)
    found = {(a, b): judge(a, b, d) for a, b, d in paired(runs, main, lambda r: r.val_loss)}
    sentences = [f.sentence for f in found.values()]
    for looped in [n for n in arms if arms[n].spec.kind == "looped" and (n, "reference") in found]:
        control = next(
            (b for (a, b) in found if a == looped and b != "reference" and arms[b].spec.kind == "granularity"),
            None,
        )
        words = attribution(found[(looped, "reference")], found.get((looped, control)) if control else None, looped)
        if words:
            sentences.append(words)
    if text_name:
        text_pairs = [(a, b) for a, b in main if (a, b) in found]
        for a, b, d in paired(runs, text_pairs, lambda r: r.eval.text["loss"] if r.eval.text else None):
            if None not in d.per_seed.values():
                sentences.append(judge(a, b, d, measure=f"{text_name} loss").sentence)
    ablations = [p for p in comparisons(arms) if p not in main]
    for a, b, d in paired(runs, ablations, lambda r: r.val_loss):
        sentences.append(judge(a, b, d).sentence)
    return sentences
