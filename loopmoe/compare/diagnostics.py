"""Per-run diagnostics of a comparison, read from what every run already stores (no extra training pass).

- ``dead_experts``: per executed (layer, iteration) slot, the experts whose share of the routed tokens on
  the held-out batches is below ``DEAD_BELOW`` x the uniform share (the expert-load pass of ``eval/depth.json``);
- ``clipped_fraction``: the share of optimizer steps whose pre-clip gradient norm exceeded ``train.grad_clip``
  (``metrics.jsonl``'s per-step ``grad_norm``);
- ``held_out_gap``: ``a - b`` held-out loss at each evaluation both runs of a seed logged, against tokens seen;
- the iteration cosine per core layer is measured by the evaluation (``eval/cosine.json``) and averaged here.
"""

from __future__ import annotations

import statistics
from typing import Any

from loopmoe.compare.results import RunRecord

DEAD_BELOW = 0.1  # an expert is dead in a slot below this fraction of the uniform share 1/E


def dead_experts(load: dict[str, list[float]]) -> dict[str, tuple[int, int]]:
    """Slot -> (dead experts, experts) from the slot's per-expert shares of routed tokens."""
    out = {}
    for slot, shares in load.items():
        uniform = 1.0 / len(shares) if shares else 0.0
        out[slot] = (sum(share < DEAD_BELOW * uniform for share in shares), len(shares))
    return out


def clipped_fraction(metrics: list[dict[str, Any]], grad_clip: float) -> float | None:
    """The share of logged optimizer steps whose gradient norm (before clipping) exceeded ``grad_clip``;
    None without clipping (``grad_clip`` 0) or without a step that logged its norm."""
    norms = [m["grad_norm"] for m in metrics if m.get("grad_norm") is not None and not m.get("skipped")]
    if grad_clip <= 0 or not norms:
        return None
    return sum(n > grad_clip for n in norms) / len(norms)


def val_points(metrics: list[dict[str, Any]]) -> dict[int, float]:
    """Tokens seen -> held-out loss, at every evaluation the run logged."""
    return {int(m["tokens"]): float(m["val_loss"]) for m in metrics if m.get("val_loss") is not None}


def held_out_gap(a: dict[int, RunRecord], b: dict[int, RunRecord]) -> dict[int, list[float]]:
    """Tokens seen -> the per-seed ``a - b`` held-out loss, at the evaluations both runs of a seed logged."""
    gaps: dict[int, list[float]] = {}
    for seed in sorted(set(a) & set(b)):
        va, vb = val_points(a[seed].metrics), val_points(b[seed].metrics)
        for tokens in sorted(set(va) & set(vb)):
            gaps.setdefault(tokens, []).append(va[tokens] - vb[tokens])
    return dict(sorted(gaps.items()))


def mean_cosine(runs: dict[int, RunRecord]) -> dict[str, list[float]]:
    """Core layer -> the iteration cosine averaged over the seeds that measured it ({} where none did)."""
    measured = [r.eval.iteration_cosine for r in runs.values() if r.eval.iteration_cosine]
    if not measured:
        return {}
    layers = measured[0]
    return {
        layer: [statistics.fmean(m[layer][k] for m in measured if layer in m) for k in range(len(values))]
        for layer, values in layers.items()
    }
