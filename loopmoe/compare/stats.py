"""Paired statistics over seeds: what a difference between two arms is, and how sure it is.

Both arms of a seed see the same data in the same order from the same initialisation stream, so
the seed is the unit of pairing: the per-seed difference ``d_s = x_s(a) - x_s(b)`` removes the
variance the seed contributes to both, and the interval is Student's t over those differences
(``mean ± t_{0.975, n-1} · sd / sqrt(n)``). With one seed there is no interval.

A study declares one primary comparison before its runs; it is tested at α = 0.05 alone. The
secondary comparisons share a family-wise α = 0.05 through Holm's step-down correction (``holm``).
Every comparison reports its minimum detectable effect (``PairedDifference.mde``): the true
difference a paired t-test at that α would detect with 80% power, given the observed spread. A
single-seed arm is read against the multi-seed arm's 95% prediction interval for one new seed
(``prediction_interval``), not against a confidence interval.
"""

from __future__ import annotations

import math
import statistics
from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class PairedDifference:
    """``a - b`` over the seeds both arms have: per seed, mean, sample sd, 95% t-interval."""

    per_seed: dict[int, float]
    mean: float
    sd: float | None  # None with one seed
    ci95: tuple[float, float] | None  # None with one seed

    @property
    def n(self) -> int:
        return len(self.per_seed)

    def excludes_zero(self) -> bool:
        """The 95% interval lies on one side of zero (the only case a difference may be claimed)."""
        return self.ci95 is not None and (self.ci95[0] > 0 or self.ci95[1] < 0)

    @property
    def p_value(self) -> float | None:
        """Two-sided p-value of the paired t-test of ``mean = 0`` (None with one seed)."""
        if self.sd is None:
            return None
        if self.sd == 0:
            return 0.0 if self.mean != 0 else 1.0
        from scipy.stats import t  # lazy: scipy.stats takes ~0.5 s to import, and only reports need it

        statistic = self.mean / (self.sd / math.sqrt(self.n))
        return float(2 * t.sf(abs(statistic), self.n - 1))

    def mde(self, alpha: float = 0.05, power: float = 0.8) -> float | None:
        """Minimum detectable effect: ``(t_{1-α/2} + t_{power}) · sd / sqrt(n)`` with n - 1 degrees of freedom."""
        if self.sd is None:
            return None
        df = self.n - 1
        return (t_quantile(1 - alpha / 2, df) + t_quantile(power, df)) * self.sd / math.sqrt(self.n)


def t_quantile(p: float, df: int) -> float:
    """The ``p`` quantile of Student's t with ``df`` degrees of freedom."""
    from scipy.stats import t  # lazy: scipy.stats takes ~0.5 s to import, and only reports need it

    return float(t.ppf(p, df))


def paired_difference(a: dict[int, float], b: dict[int, float]) -> PairedDifference:
    """``a - b`` over the seeds present in both (seed -> value); ValueError if they share none."""
    seeds = sorted(set(a) & set(b))
    if not seeds:
        raise ValueError(f"no seed in common (a: {sorted(a)}, b: {sorted(b)}): a paired difference needs shared seeds")
    diffs = {s: a[s] - b[s] for s in seeds}
    mean = statistics.fmean(diffs.values())
    if len(seeds) == 1:
        return PairedDifference(diffs, mean, None, None)
    sd = statistics.stdev(diffs.values())
    half = t_quantile(0.975, len(seeds) - 1) * sd / math.sqrt(len(seeds))
    return PairedDifference(diffs, mean, sd, (mean - half, mean + half))


@dataclass(frozen=True)
class HolmResult:
    """One comparison of a Holm-corrected family: its raw and adjusted p-values, and the decision."""

    p_value: float
    adjusted: float  # Holm's adjusted p-value (monotone, capped at 1)
    rejected: bool  # adjusted <= alpha: the difference may be claimed


def holm(p_values: dict[str, float], alpha: float = 0.05) -> dict[str, HolmResult]:
    """Holm's step-down correction of a family of p-values (name -> p), family-wise error rate ``alpha``.

    Sorted ascending, the i-th smallest (from 0) is compared with ``alpha / (m - i)``; its adjusted
    value is ``max_{j <= i} min(1, (m - j) · p_(j))``, and it is rejected when that is at most ``alpha``.
    """
    m = len(p_values)
    out: dict[str, HolmResult] = {}
    running = 0.0
    for i, (name, p) in enumerate(sorted(p_values.items(), key=lambda item: item[1])):
        running = max(running, min(1.0, (m - i) * p))
        out[name] = HolmResult(p, running, running <= alpha)
    return out


def prediction_interval(values: list[float], level: float = 0.95) -> tuple[float, float] | None:
    """Where one new seed of an arm is expected: ``mean ± t_{(1+level)/2, n-1} · sd · sqrt(1 + 1/n)``."""
    if len(values) < 2:
        return None
    n, mean, sd = len(values), statistics.fmean(values), statistics.stdev(values)
    half = t_quantile((1 + level) / 2, n - 1) * sd * math.sqrt(1 + 1 / n)
    return mean - half, mean + half


def mean_stderr(values: list[float]) -> tuple[float, float | None]:
    """Mean and its standard error (sample sd / sqrt(n)); no stderr for one value."""
    mean = statistics.fmean(values)
    if len(values) < 2:
        return mean, None
    return mean, statistics.stdev(values) / math.sqrt(len(values))


def downstream_over_seeds(per_seed: dict[int, list[dict[str, Any]]]) -> list[dict[str, Any]]:
    """One arm's task scores averaged over its seeds (``per_seed``: seed -> ``harness.summarize`` rows).

    Per (task, metric): the mean over the seeds that scored it, and its standard error over those seeds
    (``stderr_over`` = "seeds"); with one seed there is no spread over seeds, and the stderr is lm-eval's
    over the documents (``stderr_over`` = "documents"). ``n`` is the documents scored per seed.
    """
    by_key: dict[tuple[str, str], list[dict[str, Any]]] = {}
    for seed in sorted(per_seed):
        for row in per_seed[seed]:
            by_key.setdefault((row["task"], row["metric"]), []).append(row)
    out = []
    for (task, metric), rows in sorted(by_key.items()):
        mean, stderr = mean_stderr([r["value"] for r in rows])
        single = len(rows) == 1
        out.append(
            {
                "task": task,
                "metric": metric,
                "value": mean,
                "stderr": rows[0]["stderr"] if single else stderr,
                "stderr_over": "documents" if single else "seeds",
                "seeds": len(rows),
                "n": rows[0]["n"],
            }
        )
    return out
