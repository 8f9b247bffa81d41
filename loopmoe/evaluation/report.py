"""Markdown tables of evaluation results, for the terminal and for pasting into notes."""

from __future__ import annotations

from loopmoe.text import markdown_table


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
