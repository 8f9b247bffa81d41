"""Paired statistics over seeds: what a difference between two arms is, and how sure it is.

Both arms of a seed see the same data in the same order from the same initialisation stream, so
the seed is the unit of pairing: the per-seed difference ``d_s = x_s(a) - x_s(b)`` removes the
variance the seed contributes to both, and the interval is Student's t over those differences
(``mean ± t_{0.975, n-1} · sd / sqrt(n)``). With one seed there is no interval.
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


def t_quantile(p: float, df: int) -> float:
    """The ``p`` quantile of Student's t with ``df`` degrees of freedom."""
    from scipy.stats import t

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
