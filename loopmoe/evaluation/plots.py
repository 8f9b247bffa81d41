"""PNG figures of a depth analysis and of an adaptive-depth sweep (matplotlib, headless Agg backend)."""

from __future__ import annotations

from pathlib import Path

from loopmoe.atomic import save_figure
from loopmoe.evaluation.depth import DepthCurve
from loopmoe.evaluation.early_exit import ExitPoint


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


BEYOND = dict(color="0.85", alpha=0.5, zorder=0)  # the shading of loop counts past the trained depth


def _mark_trained(ax, trained: float | None, last: float, label: str) -> None:
    """A dashed line at the trained depth and the region beyond it shaded (when the plot reaches past it)."""
    if trained is None or trained > last:  # this plot stops short of the trained depth
        return
    ax.axvline(trained, color="0.3", linestyle=":", linewidth=1, label=label)
    if last > trained:
        ax.axvspan(trained, last, **BEYOND)


def plot_depth(analysis: dict, output_dir: str | Path) -> list[Path]:
    """Write loss_vs_loops.png, logit_lens.png and routing_divergence.png; return their paths.

    Every plot marks the trained depth (``trained_loops``): a dotted line, and the loop counts past
    it shaded. The logit lens gets one panel per loop count T: the readout after iteration k is the
    same computation for every T >= k (the core at iteration k does not know T), so the curves of
    different T coincide where they overlap and one set of axes would show a single line.
    """
    plt = _pyplot()
    out = Path(output_dir)
    out.mkdir(parents=True, exist_ok=True)
    loops = analysis["loops"]
    by = analysis["by_loops"]
    trained = analysis.get("trained_loops")
    warned = " (see warnings)" if analysis.get("warnings") else ""
    paths = []

    fig, ax = plt.subplots(figsize=(5, 3.5))
    ax.plot(loops, [by[str(t)]["loss"] for t in loops], marker="o", label="held-out loss")
    ax.set(
        xlabel="loops at inference T",
        ylabel="loss (nats/token)",
        xscale="log",
        title=f"Loss vs test-time depth{warned}",
    )
    ax.set_xticks(loops, [str(t) for t in loops])
    ax.minorticks_off()  # the log axis would label 3 as 3x10^0
    _mark_trained(ax, trained, max(loops), f"trained T={trained}")
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

    fig, axes = plt.subplots(1, len(loops), figsize=(2.6 * len(loops) + 1, 3.2), sharey=True, squeeze=False)
    for ax, t in zip(axes[0], loops):
        lens = by[str(t)]["lens_loss"]
        ks = range(1, len(lens) + 1)
        ax.plot(ks, lens, marker="o", color=f"C{loops.index(t)}", label="lens after k")
        ax.axhline(by[str(t)]["loss"], color="0.4", linestyle="--", linewidth=1, label="model output")
        _mark_trained(ax, trained, max(ks), f"trained T={trained}")
        ax.set_xticks(list(ks))
        ax.set(xlabel="iteration k", title=f"T={t}")
    axes[0][0].set_ylabel("loss (nats/token)")
    axes[0][0].legend(fontsize=7)
    fig.suptitle(f"Logit lens at loop boundaries{warned}", fontsize=10)
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
    for ax in (left, right):  # transition k compares iterations k-1 and k (0-based): trained up to T-1
        if trained is not None and t_max > trained:
            _mark_trained(ax, trained - 0.5, t_max - 0.5, f"trained T={trained}")
    left.set(xlabel="iteration k vs k-1", ylabel="fraction of tokens", title=f"Expert set changed (T={t_max})")
    right.set(xlabel="iteration k vs k-1", ylabel="mean Jaccard", title=f"Expert set overlap (T={t_max})")
    left.legend(fontsize=7)
    paths.append(_save(fig, out / "routing_divergence.png", plt))
    return paths


def plot_exit_sweep(curve: DepthCurve, points: list[ExitPoint], output_dir: str | Path) -> Path:
    """Write loss_vs_compute.png: held-out loss against core iterations per token (left) and forward FLOPs per
    token (right), the fixed loop counts of ``curve`` as one line (x = T) and each exit criterion's policies
    as another (x = the mean executed iterations), on the same axes; the trained depth marked."""
    plt = _pyplot()
    out = Path(output_dir)
    out.mkdir(parents=True, exist_ok=True)
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.8), sharey=True)
    trained = curve.trained_loops
    for ax, x_fixed, x_exit, xlabel in (
        (axes[0], lambda p: p.loops, lambda p: p.mean_loops, "core iterations per token"),
        (axes[1], lambda p: p.flops_per_token / 1e6, lambda p: p.flops_per_token / 1e6, "forward FLOPs per token (M)"),
    ):
        fixed = sorted(curve.points, key=lambda p: p.loops)
        ax.plot([x_fixed(p) for p in fixed], [p.loss for p in fixed], marker="o", color="0.3", label="fixed depth T")
        for p in fixed:
            ax.annotate(f"T={p.loops}", (x_fixed(p), p.loss), fontsize=6, xytext=(3, 3), textcoords="offset points")
        for i, criterion in enumerate(sorted({q.criterion for q in points})):
            mine = sorted((q for q in points if q.criterion == criterion), key=lambda q: q.mean_loops)
            xs, ys = [x_exit(q) for q in mine], [q.loss for q in mine]
            ax.plot(xs, ys, marker="s", linestyle="--", color=f"C{i}", label=f"exit: {criterion}")
            for q, x, y in zip(mine, xs, ys):
                ax.annotate(f"{q.threshold:g}", (x, y), fontsize=6, xytext=(3, -8), textcoords="offset points")
        at = next(p for p in fixed if p.loops == trained)
        ax.plot([x_fixed(at)], [at.loss], marker="*", markersize=12, color="0.3", linestyle="none")
        ax.set(xlabel=xlabel)
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("held-out loss (nats/token)")
    axes[0].legend(fontsize=7)
    fig.suptitle(f"Adaptive depth: loss vs executed compute (star: trained T={trained})", fontsize=10)
    return _save(fig, out / "loss_vs_compute.png", plt)


def _save(fig, path: Path, plt) -> Path:
    fig.tight_layout()
    save_figure(fig, path)
    plt.close(fig)
    return path
