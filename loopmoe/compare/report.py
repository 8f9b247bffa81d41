"""The comparison's report: ``report.md`` with the budget table, results, and plots.

``loss.png`` shows training (smoothed) and validation loss against tokens for both models and
every seed; ``expert_load.png`` shows, per executed (layer, iteration) slot, each expert's share
of routed tokens relative to uniform (1.0 = perfectly balanced).
"""

from __future__ import annotations

import statistics
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt

COLORS = {"reference": "tab:blue", "looped": "tab:orange"}


def _ema(values: list[float], alpha: float = 0.1) -> list[float]:
    out, acc = [], None
    for v in values:
        acc = v if acc is None else (1 - alpha) * acc + alpha * v
        out.append(acc)
    return out


def plot_losses(runs: dict[str, dict[int, dict]], path: Path) -> None:
    fig, (ax_train, ax_val) = plt.subplots(1, 2, figsize=(11, 4))
    for name, seeds in runs.items():
        for i, (_seed, run) in enumerate(sorted(seeds.items())):
            steps = [m for m in run["metrics"] if not m.get("skipped")]
            tokens = [m["tokens"] / 1e6 for m in steps]
            label = name if i == 0 else None
            ax_train.plot(tokens, _ema([m["lm_loss"] for m in steps]), color=COLORS[name], alpha=0.9, label=label)
            val = [(m["tokens"] / 1e6, m["val_loss"]) for m in run["metrics"] if m.get("val_loss") is not None]
            if val:
                ax_val.plot(*zip(*val), marker="o", color=COLORS[name], label=label)
    for ax, title in ((ax_train, "training loss (EMA)"), (ax_val, "validation loss")):
        ax.set_xlabel("tokens (M)")
        ax.set_ylabel("cross-entropy (nats/token)")
        ax.set_title(title)
        ax.grid(alpha=0.3)
        ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def plot_expert_load(loads: dict[str, dict[str, list[float]]], path: Path) -> None:
    fig, axes = plt.subplots(1, len(loads), figsize=(6 * len(loads), 3.5), squeeze=False)
    for ax, (name, slots) in zip(axes[0], loads.items()):
        labels = list(slots)
        matrix = [[share * len(row) for share in row] for row in slots.values()]
        image = ax.imshow(matrix, aspect="auto", cmap="viridis", vmin=0.0, vmax=2.0)
        ax.set_yticks(range(len(labels)), labels, fontsize=7)
        ax.set_xlabel("expert")
        ax.set_title(f"{name}: load / uniform per layer@iteration", fontsize=9)
        fig.colorbar(image, ax=ax)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def _mean_spread(values: list[float]) -> str:
    if len(values) == 1:
        return f"{values[0]:.4f}"
    return f"{statistics.mean(values):.4f} ± {statistics.stdev(values):.4f}"


def write_report(out: Path, results: dict[str, Any], budget_table: str) -> Path:
    runs = results["runs"]
    plot_losses(runs, out / "loss.png")
    plot_expert_load({name: runs[name][min(runs[name])]["expert_load"] for name in runs}, out / "expert_load.png")
    opts = results["options"]
    seeds = sorted(runs["reference"])
    val = {name: [runs[name][s]["val_loss"] for s in seeds] for name in runs}
    train = {name: [runs[name][s]["train_loss"] for s in seeds] for name in runs}
    diffs = [b - a for a, b in zip(val["reference"], val["looped"])]
    lines = [
        "# LoopMoE vs Vanilla MoE: controlled comparison",
        "",
        f"Reference `{opts['reference']}`, loops T = {opts['loops']}, strategy `{opts['strategy']}`; corpus "
        f"`{opts['source']}`; {opts['steps']} steps x {opts['micro_batch_size']} x {opts['seq_len']} tokens "
        f"= {opts['steps'] * opts['micro_batch_size'] * opts['seq_len']:,} tokens per model; seeds {seeds}. "
        "Both models see the same tokens in the same order with the same optimizer and schedule.",
        "",
        budget_table,
        "",
        "## Results",
        "",
        "| model | held-out loss | final training loss |",
        "|---|---|---|",
        *[f"| {name} | {_mean_spread(val[name])} | {_mean_spread(train[name])} |" for name in runs],
        "",
        f"Held-out loss difference (looped - reference), per seed: {', '.join(f'{d:+.4f}' for d in diffs)}."
        + ("" if len(seeds) > 2 else " Fewer than 3 seeds: do not call a difference a result (run `--seeds 0,1,2`)."),
        "",
        "![loss curves](loss.png)",
        "",
        "![expert load](expert_load.png)",
    ]
    downstream = results.get("downstream") or {}
    if downstream:
        scores = {name: {(r["task"], r["metric"]): r for r in rows} for name, rows in downstream.items()}
        keys = sorted({key for table in scores.values() for key in table})
        lines += [
            "",
            "## Downstream (zero-shot, lm-evaluation-harness)",
            "",
            "| task | metric | " + " | ".join(scores) + " | documents |",
            "|---|---|" + "---|" * (len(scores) + 1),
        ]
        for task, metric in keys:
            cells = []
            for table in scores.values():
                row = table.get((task, metric))
                err = f" ± {row['stderr']:.4f}" if row and row["stderr"] is not None else ""
                cells.append(f"{row['value']:.4f}{err}" if row else "")
            n = next((t[(task, metric)]["n"] for t in scores.values() if (task, metric) in t), "")
            lines.append(f"| {task} | {metric} | " + " | ".join(cells) + f" | {n} |")
    path = out / "report.md"
    path.write_text("\n".join(lines) + "\n")
    return path
