"""Markdown tables of evaluation results, for the terminal and for pasting into notes."""

from __future__ import annotations

from loopmoe.evaluation.depth import DepthCurve
from loopmoe.evaluation.early_exit import ExitPoint
from loopmoe.text import human, markdown_table


def _fmt(x: float | None, digits: int = 4) -> str:
    return "" if x is None else f"{x:.{digits}f}"


def task_table(rows: list[dict]) -> str:
    """| task | metric | value | stderr | n | from ``harness.summarize`` rows."""
    return markdown_table(
        ("task", "metric", "value", "± stderr", "n"),
        [(r["task"], r["metric"], _fmt(r["value"]), _fmt(r["stderr"]), r["n"] or "") for r in rows],
        align="llrrr",
    )


def perplexity_table(results: list[dict]) -> str:
    """| text | tokens | loss | perplexity | bits/byte | from ``PerplexityResult.as_dict()``."""
    return markdown_table(
        ("text", "tokens", "loss", "perplexity", "bits/byte"),
        [
            (r["name"], r["tokens"], _fmt(r["loss"]), _fmt(r["perplexity"], 2), _fmt(r["bits_per_byte"]))
            for r in results
        ],
        align="lrrrr",
    )


def depth_table(analysis: dict) -> str:
    """| loops | loss | logit lens per iteration | mean routing change | per loop count."""
    rows = []
    for t in analysis["loops"]:
        entry = analysis["by_loops"][str(t)]
        lens = ", ".join(_fmt(x, 3) for x in entry["lens_loss"])
        layers = list(entry["routing"].values())
        changed = [sum(c["changed"][i] for c in layers) / len(layers) for i in range(t - 1)] if layers else []
        rows.append((t, _fmt(entry["loss"]), lens, ", ".join(_fmt(x, 3) for x in changed)))
    return markdown_table(
        ("loops T", "loss", "lens loss after k=1..T", "expert set changed (mean over layers, k=1..T-1)"),
        rows,
        align="rr",
    )


def exit_table(scores: list[dict], trained_loops: int) -> str:
    """| text | exit policy | loss | iterations/token | FLOPs/token | of full depth | from ``text_scores`` records
    scored under an exit policy (their ``"exit"``); full depth is the trained T."""
    rows = []
    for r in scores:
        point = ExitPoint.from_dict(r["exit"])
        rows.append(
            (
                r["name"],
                point.label(trained_loops),
                _fmt(r["loss"]),
                f"{point.mean_loops:.3f} of {trained_loops}",
                human(point.flops_per_token),
                f"{100 * point.flops_fraction:.1f}%",
            )
        )
    return markdown_table(
        ("text", "exit policy", "loss", "core iterations/token", "FLOPs/token", "of full depth"), rows, align="llrrrr"
    )


def exit_sweep_table(curve: DepthCurve, points: list[ExitPoint]) -> str:
    """The fixed loop counts of ``curve`` and the exit policies of a sweep on the same rows, one table:
    | depth | loss | vs trained T | core iterations/token | FLOPs/token | of trained depth |."""
    trained = next(p for p in curve.points if p.loops == curve.trained_loops)

    def row(name: str, loss: float, loops: float, flops: float) -> tuple:
        return (
            name,
            _fmt(loss),
            f"{loss - trained.loss:+.4f}",
            f"{loops:.3f}",
            human(flops),
            f"{100 * flops / trained.flops_per_token:.1f}%",
        )

    rows = [
        row(
            f"T={p.loops}" + (" (trained)" if p.loops == curve.trained_loops else ""),
            p.loss,
            p.loops,
            p.flops_per_token,
        )
        for p in curve.points
    ]
    rows += [row(p.label(curve.trained_loops), p.loss, p.mean_loops, p.flops_per_token) for p in points]
    return markdown_table(
        ("depth", "loss", "vs trained T", "core iterations/token", "FLOPs/token", "of trained depth"),
        rows,
        align="lrrrrr",
    )
