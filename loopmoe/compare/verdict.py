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

This module also decides which pairs of arms are compared at all (``comparisons``) and how they are
tested (``held_out_comparisons``): the study's one **primary** comparison (``--primary``, declared in
the study config before the runs) is tested alone at 5%; the **secondary** comparisons are those the
study config declares (``--secondary``), else every other pair the report compares on held-out loss
with at least two paired seeds, and they are Holm-corrected together as one family (a claim among them
also needs its Holm-adjusted p <= 0.05).
A pair with one shared seed is an observation: the single-seed arm is read against the other arm's 95%
prediction interval over its seeds, where it has several. Every sentence names the formulation each arm
tested (balancing rule, loops, iteration conditioning, norm, lr): a verdict is about that formulation,
never about looping in general.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Literal

from loopmoe.compare.arms import parse_difference
from loopmoe.compare.results import ArmRecord, RunRecord
from loopmoe.compare.stats import HolmResult, PairedDifference, holm, paired_difference, prediction_interval

MIN_SEEDS = 3
Outcome = Literal["better", "worse", "no_difference", "not_established", "observation"]
Role = Literal["primary", "secondary", "observation"]


@dataclass(frozen=True)
class Finding:
    """What the paired difference ``a - b`` of a lower-is-better measure supports."""

    a: str
    b: str
    outcome: Outcome
    sentence: str


def _p(p: float | None) -> str:
    return "" if p is None else (f"p = {p:.3f}" if p >= 0.001 else f"p = {p:.1e}")


def judge(
    a: str,
    b: str,
    d: PairedDifference,
    measure: str = "held-out loss",
    unit: str = "nats/token",
    adjusted: HolmResult | None = None,
    family: int = 0,
) -> Finding:
    """The finding for ``a - b`` (lower is better for ``a``), with a sentence that claims no more than the rules allow.

    ``adjusted``: the pair's Holm result within a family of ``family`` secondary comparisons; a difference
    that passes the rules but not the correction is "not established".
    """
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
    if d.p_value is not None:
        interval += f", {_p(d.p_value)}"
    if adjusted is not None:
        interval += f", Holm-adjusted over {family} secondary comparisons {_p(adjusted.adjusted)}"
    if not d.excludes_zero():
        mde = d.mde()
        missed = f"; a true difference below {mde:.4f} {unit} would likely go undetected (MDE)" if mde else ""
        return Finding(
            a,
            b,
            "no_difference",
            f"{a} vs {b} ({measure}): no difference detectable at {d.n} seeds ({interval}{missed}).",
        )
    agree = all((v < 0) == (d.mean < 0) and v != 0 for v in d.per_seed.values())
    corrected_out = adjusted is not None and not adjusted.rejected
    if d.n < MIN_SEEDS or not agree or corrected_out:
        why = (
            f"only {d.n} seeds (at least {MIN_SEEDS} needed)"
            if d.n < MIN_SEEDS
            else "not every seed agrees"
            if not agree
            else "it does not survive the Holm correction"
        )
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


def attribution(
    vs_reference: Finding | None,
    vs_granularity: Finding | None,
    looped: str = "looped",
    formulation: str | None = None,
) -> str | None:
    """What the two findings of the looped arm together say about this formulation of looping (None without
    both). ``formulation``: the looped arm's (balancing rule, loops, conditioning, norm, lr), named in the
    sentence so that a finding is never worded as one about looping in general."""
    if vs_reference is None or vs_granularity is None:
        return None
    tested = (
        f"looping as {looped} formulates it ({formulation})" if formulation else f"looping as {looped} formulates it"
    )
    scope = " Other balancing rules, conditionings, norms or learning rates are not tested by this pair."
    if vs_reference.outcome == "better" and vs_granularity.outcome == "better":
        return (
            f"{looped} beats both the reference and the granularity control: at this scale the gain of {tested} is "
            "attributable to looping, not only to its finer experts." + scope
        )
    if vs_reference.outcome == "better":
        return (
            f"{looped} beats the reference but not the granularity control: the gain of {tested} cannot be "
            "separated from the finer experts that its balancing gives it." + scope
        )
    if vs_reference.outcome == "worse":
        return (
            f"{looped} is worse than the reference it is matched to: {tested} does not pay at this scale and budget."
            + scope
        )
    return (
        f"The study does not show that {looped} helps at this scale and budget (nor that it hurts); tested: {tested}."
    )


def formulation(name: str, arms: dict[str, ArmRecord], options: dict[str, Any] | None = None) -> str:
    """What arm ``name`` tested, in words: its kind's balancing rule and loops, conditioning, norm and lr."""
    options = options or {}
    record = arms[name]
    spec, cfg = record.spec, record.config
    lr = spec.lr if spec.lr is not None else options.get("lr")
    strategy = spec.strategy or options.get("strategy") or "capacity"
    loops = spec.num_loops or options.get("num_loops")
    prelude = spec.prelude if spec.prelude is not None else options.get("prelude", 0)
    coda = spec.coda if spec.coda is not None else options.get("coda", 0)
    parts = []
    if spec.kind == "looped":
        parts += [f"{strategy} balancing", f"T = {cfg.get('num_loops', loops)}"]
        if prelude or coda:
            parts.append(f"prelude {prelude} + coda {coda}")
        parts.append(f"{cfg.get('iter_conditioning', spec.iter_conditioning or 'iteradaln')} conditioning")
    elif spec.kind == "granularity":
        parts.append(f"granularity control of the {strategy}-balanced T = {loops} model")
    elif spec.kind == "granularity_matched":
        parts.append(f"exact-budget granularity control of the {strategy}-balanced T = {loops} model")
    else:
        parts.append("Vanilla MoE")
    parts.append(f"{cfg.get('norm_scheme', spec.norm_scheme or 'pre')} norm")
    if spec.qk_norm is not None:
        parts.append(f"QK-norm {'on' if spec.qk_norm else 'off'}")
    if spec.initializer_range is not None:
        parts.append(f"init std {spec.initializer_range:g}")
    if lr is not None:
        parts.append(f"lr {lr:g}")
    return ", ".join(parts)


CONTROLS = ("granularity", "granularity_matched")


def comparisons(arms: dict[str, ArmRecord]) -> list[tuple[str, str]]:
    """The paired differences the report shows, as (a, b) for ``a - b``: looped - reference and
    looped - granularity first, then every other arm against the reference, every other looped arm
    without switches against the granularity controls (both kinds) of its own balancing, every ablation of
    the looped model against it, and every looped arm against the reference-kind arm with the same norm,
    init and lr settings (a reference-side ablation: the same switch on both sides)."""
    names = list(arms)
    pairs = [(a, b) for a, b in (("looped", "reference"), ("looped", "granularity")) if a in names and b in names]

    def balancing(name: str) -> tuple:
        spec = arms[name].spec
        return spec.num_loops, spec.strategy, spec.prelude, spec.coda

    def shared(name: str) -> tuple:
        spec = arms[name].spec
        return spec.norm_scheme, spec.qk_norm, spec.initializer_range, spec.lr

    for name in names:
        if name in ("reference", "looped"):
            continue
        spec = arms[name].spec
        if "reference" in names and (name, "reference") not in pairs:
            pairs.append((name, "reference"))
        if spec.kind == "looped" and not spec.switches() and spec.lr is None:
            pairs += [
                (name, g)
                for g in names
                if arms[g].spec.kind in CONTROLS and balancing(g) == balancing(name) and (name, g) not in pairs
            ]
        if name != "granularity" and spec.kind == "looped" and "looped" in names:
            pairs.append((name, "looped"))
    for name in names:  # the same norm / init / lr on both sides
        if arms[name].spec.kind != "looped":
            continue
        pairs += [
            (name, r)
            for r in names
            if r != "reference"
            and arms[r].spec.kind == "reference"
            and shared(r) == shared(name)
            and any(v is not None for v in shared(name))
            and (name, r) not in pairs
        ]
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


@dataclass(frozen=True)
class Comparison:
    """One held-out loss comparison ``a - b``: its role, paired difference, Holm result (secondaries) and finding."""

    a: str
    b: str
    role: Role
    d: PairedDifference
    holm: HolmResult | None
    finding: Finding


@dataclass(frozen=True)
class Declared:
    """The comparisons a study config declared before its runs: the primary ``a - b``, and the secondary family
    (None: not declared, every other pair of ``comparisons`` is secondary)."""

    primary: tuple[str, str] | None = None
    secondary: tuple[tuple[str, str], ...] | None = None

    @classmethod
    def from_options(cls, options: dict[str, Any] | None) -> Declared:
        """From a comparison's options (``options.json``: ``primary = [A, B]``, ``secondary = ["A - B", ...]``)."""
        options = options or {}
        primary = options.get("primary")
        secondary = options.get("secondary")
        pairs = None if secondary is None else tuple(p for p in map(parse_difference, secondary) if p is not None)
        return cls((primary[0], primary[1]) if primary else None, pairs)


def held_out_pairs(arms: dict[str, ArmRecord], declared: Declared) -> list[tuple[str, str]]:
    """Every pair the report compares on held-out loss: the primary first (as declared), then the declared
    secondaries, or ``comparisons`` where none were declared; pairs naming an arm without results are left out."""
    pairs = comparisons(arms) if declared.secondary is None else list(declared.secondary)
    if declared.primary is not None:
        a, b = declared.primary
        pairs = [(a, b), *(p for p in pairs if p not in ((a, b), (b, a)))]
    return [(a, b) for a, b in pairs if a in arms and b in arms]


def held_out_comparisons(
    runs: dict[str, dict[int, RunRecord]], arms: dict[str, ArmRecord], declared: Declared = Declared()
) -> list[Comparison]:
    """The held-out loss comparisons with their roles: the declared primary, tested alone; the secondary family
    (the declared secondaries, else every other pair; those with at least 2 paired seeds), Holm-corrected
    together; and single-seed observations."""
    primary = declared.primary
    diffs = paired(runs, held_out_pairs(arms, declared), lambda r: r.val_loss)
    family = {(a, b): d.p_value for a, b, d in diffs if (a, b) != primary and d.p_value is not None}
    corrected = holm({f"{a} - {b}": p for (a, b), p in family.items() if p is not None})
    out = []
    for a, b, d in diffs:
        if (a, b) == primary:
            out.append(Comparison(a, b, "primary", d, None, judge(a, b, d)))
        elif (a, b) in family:
            h = corrected[f"{a} - {b}"]
            out.append(Comparison(a, b, "secondary", d, h, judge(a, b, d, adjusted=h, family=len(family))))
        else:
            out.append(Comparison(a, b, "observation", d, None, judge(a, b, d)))
    return out


def single_seed_sentence(a: str, b: str, d: PairedDifference, runs: dict[str, dict[int, RunRecord]]) -> str | None:
    """A single-seed pair worded against the other arm's 95% prediction interval for one new seed (None when
    neither arm has the seeds for one)."""
    (seed,) = d.per_seed
    one, many = (a, b) if len(runs[a]) <= len(runs[b]) else (b, a)
    values = [r.val_loss for r in runs[many].values() if r.val_loss is not None]
    interval = prediction_interval(values)
    value = runs[one][seed].val_loss
    if interval is None or value is None:
        return None
    low, high = interval
    where = "inside" if low <= value <= high else "outside"
    side = "" if where == "inside" else (" (below it: lower loss)" if value < low else " (above it: higher loss)")
    reading = (
        "indistinguishable from the seed-to-seed spread of"
        if where == "inside"
        else "unlikely under the seed-to-seed spread of"
    )
    return (
        f"{one} vs {many} (held-out loss): {one}'s single seed ({seed}) scored {value:.4f}, {where} the 95% "
        f"prediction interval [{low:.4f}, {high:.4f}] of {many} over {len(values)} seeds{side}: {reading} "
        f"{many}; one seed is an observation, not a result."
    )


def verdict(
    runs: dict[str, dict[int, RunRecord]],
    arms: dict[str, ArmRecord],
    text_name: str | None,
    options: dict[str, Any] | None = None,
) -> list[str]:
    """The verdict's sentences, by this module's rules, from the paired differences of the finished runs:
    the primary comparison first, then the Holm-corrected secondaries, then observations; each names the
    formulations it tested (``options``: the comparison's, for the defaults an arm does not override, and
    its declared comparisons)."""

    def tested(a: str, b: str) -> str:
        return f" Tested: {a} = {formulation(a, arms, options)}; {b} = {formulation(b, arms, options)}."

    held = held_out_comparisons(runs, arms, Declared.from_options(options))
    found = {(c.a, c.b): c.finding for c in held}
    sentences = []
    for c in sorted(held, key=lambda c: ("primary", "secondary", "observation").index(c.role)):
        if c.role == "observation":
            words = single_seed_sentence(c.a, c.b, c.d, runs) or c.finding.sentence
        else:
            words = c.finding.sentence
        prefix = "Primary comparison (declared before the runs): " if c.role == "primary" else ""
        sentences.append(prefix + words + tested(c.a, c.b))
    for looped in [n for n in arms if arms[n].spec.kind == "looped" and (n, "reference") in found]:
        controls = [b for (a, b) in found if a == looped and b != "reference" and arms[b].spec.kind in CONTROLS]
        control = next((b for b in controls if arms[b].spec.kind == "granularity_matched"), None) or next(
            iter(controls), None
        )
        said = attribution(
            found[(looped, "reference")],
            found.get((looped, control)) if control else None,
            looped,
            formulation(looped, arms, options),
        )
        if said:
            sentences.append(said)
    if text_name:
        main = main_comparisons(arms)
        text_pairs = [(a, b) for a, b in main if (a, b) in found]
        for a, b, d in paired(runs, text_pairs, lambda r: r.eval.text["loss"] if r.eval.text else None):
            if None not in d.per_seed.values():
                sentences.append(
                    judge(a, b, d, measure=f"{text_name} loss").sentence + " (secondary measure, uncorrected)"
                )
    return sentences
