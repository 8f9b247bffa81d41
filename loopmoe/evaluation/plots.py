"""PNG figures of a depth analysis (matplotlib, headless Agg backend)."""

from __future__ import annotations

from pathlib import Path

from loopmoe.atomic import save_figure


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_depth(analysis: dict, output_dir: str | Path) -> list[Path]:
    """Write loss_vs_loops.png, logit_lens.png and routing_divergence.png; return their paths."""
    plt = _pyplot()
    out = Path(output_dir)
    out.mkdir(parents=True, exist_ok=True)
    loops = analysis["loops"]
    by = analysis["by_loops"]
    paths = []

    fig, ax = plt.subplots(figsize=(5, 3.5))
    ax.plot(loops, [by[str(t)]["loss"] for t in loops], marker="o", label="held-out loss")
    ax.set(xlabel="loops at inference T", ylabel="loss (nats/token)", xscale="log", title="Loss vs test-time depth")
    ax.set_xticks(loops, [str(t) for t in loops])
    tasks = analysis.get("tasks")
    if tasks:
        twin = ax.twinx()
        for name in sorted({r["task"] for rows in tasks.values() for r in rows}):
            ys = [
                next((r["value"] for r in tasks[str(t)] if r["task"] == name and r["metric"] == "acc"), None)
                for t in loops
            ]
            twin.plot(loops, ys, linestyle="--", marker="x", label=f"{name} acc")
        twin.set_ylabel("accuracy")
        twin.legend(loc="upper right", fontsize=7)
    ax.legend(loc="upper left", fontsize=7)
    paths.append(_save(fig, out / "loss_vs_loops.png", plt))

    fig, ax = plt.subplots(figsize=(5, 3.5))
    for t in loops:
        lens = by[str(t)]["lens_loss"]
        ax.plot(range(1, len(lens) + 1), lens, marker="o", label=f"T={t}")
    ax.set_xticks(range(1, max(loops) + 1))
    ax.set(xlabel="iteration k (readout after it)", ylabel="loss (nats/token)", title="Logit lens at loop boundaries")
    ax.legend(fontsize=7)
    paths.append(_save(fig, out / "logit_lens.png", plt))

    t_max = max(loops)
    routing = by[str(t_max)]["routing"]
    fig, (left, right) = plt.subplots(1, 2, figsize=(9, 3.5))
    for layer, curves in routing.items():
        ks = range(1, len(curves["changed"]) + 1)
        left.plot(ks, curves["changed"], marker="o", label=layer)
        right.plot(ks, curves["jaccard"], marker="o", label=layer)
        left.set_xticks(list(ks))
        right.set_xticks(list(ks))
    left.set(xlabel="iteration k vs k-1", ylabel="fraction of tokens", title=f"Expert set changed (T={t_max})")
    right.set(xlabel="iteration k vs k-1", ylabel="mean Jaccard", title=f"Expert set overlap (T={t_max})")
    left.legend(fontsize=7)
    paths.append(_save(fig, out / "routing_divergence.png", plt))
    return paths


def _save(fig, path: Path, plt) -> Path:
    fig.tight_layout()
    save_figure(fig, path)
    plt.close(fig)
    return path
