"""Markdown tables of evaluation results, for the terminal and for pasting into notes."""

from __future__ import annotations


def _fmt(x: float | None, digits: int = 4) -> str:
    return "" if x is None else f"{x:.{digits}f}"


def task_table(rows: list[dict]) -> str:
    """| task | metric | value | stderr | n | from ``harness.summarize`` rows."""
    lines = ["| task | metric | value | ± stderr | n |", "|---|---|---:|---:|---:|"]
    for r in rows:
        lines.append(f"| {r['task']} | {r['metric']} | {_fmt(r['value'])} | {_fmt(r['stderr'])} | {r['n'] or ''} |")
    return "\n".join(lines)


def perplexity_table(results: list[dict]) -> str:
    """| text | tokens | loss | perplexity | bits/byte | from ``PerplexityResult.as_dict()``."""
    lines = ["| text | tokens | loss | perplexity | bits/byte |", "|---|---:|---:|---:|---:|"]
    for r in results:
        lines.append(
            f"| {r['name']} | {r['tokens']} | {_fmt(r['loss'])} | {_fmt(r['perplexity'], 2)} "
            f"| {_fmt(r['bits_per_byte'])} |"
        )
    return "\n".join(lines)


def depth_table(analysis: dict) -> str:
    """| loops | loss | logit lens per iteration | mean routing change | per loop count."""
    lines = [
        "| loops T | loss | lens loss after k=1..T | expert set changed (mean over layers, k=1..T-1) |",
        "|---:|---:|---|---|",
    ]
    for t in analysis["loops"]:
        entry = analysis["by_loops"][str(t)]
        lens = ", ".join(_fmt(x, 3) for x in entry["lens_loss"])
        layers = list(entry["routing"].values())
        changed = [sum(c["changed"][i] for c in layers) / len(layers) for i in range(t - 1)] if layers else []
        lines.append(f"| {t} | {_fmt(entry['loss'])} | {lens} | {', '.join(_fmt(x, 3) for x in changed)} |")
    return "\n".join(lines)
