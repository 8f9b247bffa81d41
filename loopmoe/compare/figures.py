"""The comparison's figures (matplotlib, headless Agg backend), every one drawn from the results.

``loss.png`` shows training (smoothed) and validation loss against tokens for every arm and seed;
``expert_load.png`` shows, per executed (layer, iteration) slot, each expert's share of routed
tokens relative to uniform (1.0 = perfectly balanced); ``depth.png`` the held-out loss of every
looped arm against its loop count at inference, and ``loss_vs_flops.png`` the held-out loss of
every arm and depth against the forward FLOPs per token it executes; with an exit sweep, both also
show each looped arm under its exit policies (adaptive depth: hollow squares, dashed) at the core
iterations and FLOPs per token they executed. An arm has the same colour in every figure.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from loopmoe.atomic import save_figure
from loopmoe.compare.results import DepthMean, ExitMean, RunRecord

COLORS = {"reference": "tab:blue", "looped": "tab:orange", "granularity": "tab:green"}
# the rest of tab10, then distinct named colours: a study with every ablation has 11 arms
_MORE_COLORS = (
    *("tab:red", "tab:purple", "tab:brown", "tab:pink", "tab:gray", "tab:olive", "tab:cyan"),
    *("black", "gold", "navy", "lime", "teal", "magenta", "darkred", "darkkhaki"),
)


def color_of(name: str, names: list[str]) -> str:
    """The built-in arms keep their colours; the others take the next free ones, in order."""
    if name in COLORS:
        return COLORS[name]
    others = [n for n in names if n not in COLORS]
    return _MORE_COLORS[others.index(name) % len(_MORE_COLORS)]


def _ema(values: list[float], alpha: float = 0.1) -> list[float]:
    out, acc = [], None
    for v in values:
        acc = v if acc is None else (1 - alpha) * acc + alpha * v
        out.append(acc)
    return out


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_losses(runs: dict[str, dict[int, RunRecord]], path: Path) -> None:
    plt = _pyplot()
    fig, (ax_train, ax_val) = plt.subplots(1, 2, figsize=(11, 4))
    for name, seeds in runs.items():
        for i, (_seed, run) in enumerate(sorted(seeds.items())):
            steps = [m for m in run.metrics if not m.get("skipped")]
            tokens = [m["tokens"] / 1e6 for m in steps]
            label = name if i == 0 else None
            color = color_of(name, list(runs))
            ax_train.plot(tokens, _ema([m["lm_loss"] for m in steps]), color=color, alpha=0.9, label=label)
            val = [(m["tokens"] / 1e6, m["val_loss"]) for m in run.metrics if m.get("val_loss") is not None]
            if val:
                ax_val.plot(*zip(*val), marker="o", color=color, label=label)
    for ax, title in ((ax_train, "training loss (EMA)"), (ax_val, "validation loss")):
        ax.set_xlabel("tokens (M)")
        ax.set_ylabel("cross-entropy (nats/token)")
        ax.set_title(title)
        ax.grid(alpha=0.3)
        ax.legend()
    fig.tight_layout()
    save_figure(fig, path)
    plt.close(fig)


def plot_expert_load(loads: dict[str, dict[str, list[float]]], path: Path) -> None:
    """Heat maps of expert load / uniform share per layer@iteration, one per model, on one colour scale:
    white at 1 (balanced), blue below, red above, up to the largest load of either model (never clipped)."""
    plt = _pyplot()
    from matplotlib.colors import TwoSlopeNorm  # after _pyplot has chosen the Agg backend

    cols = min(len(loads), 3)  # a study's many arms wrap into rows, three maps wide
    rows = -(-len(loads) // cols)
    fig, axes = plt.subplots(rows, cols, figsize=(6 * cols, 3.5 * rows), squeeze=False)
    for ax in axes.flat[len(loads) :]:
        ax.set_visible(False)
    matrices = {name: [[share * len(row) for share in row] for row in slots.values()] for name, slots in loads.items()}
    peak = max((v for m in matrices.values() for row in m for v in row), default=1.0)
    norm = TwoSlopeNorm(vmin=0.0, vcenter=1.0, vmax=max(peak, 1.0 + 1e-6))
    for ax, (name, slots) in zip(axes.flat, loads.items()):
        labels = list(slots)
        image = ax.imshow(matrices[name], aspect="auto", cmap="RdBu_r", norm=norm)
        ax.set_yticks(range(len(labels)), labels, fontsize=7)
        ax.set_xlabel("expert")
        ax.set_title(f"{name}: load / uniform per layer@iteration (max {peak:.2f})", fontsize=9)
        fig.colorbar(image, ax=ax)
    fig.tight_layout()
    save_figure(fig, path)
    plt.close(fig)


def _plot_depths(
    points: dict[str, dict[int, DepthMean]],
    trained: dict[str, int],
    path: Path,
    x: Callable[[int, DepthMean], float],
    xlabel: str,
    title: str,
    labels: bool,
    names: list[str],
    exits: dict[str, list[ExitMean]] | None = None,
    x_exit: Callable[[ExitMean], float] | None = None,
) -> None:
    """Held-out loss of every arm at each depth it was run at, against ``x(T, point)``; a star at the trained T.
    ``names``: every arm of the report, so an arm has the same colour in every figure. ``exits``: each arm's
    exit-policy points (adaptive depth), drawn on the same axes at ``x_exit(point)``, dashed, one line per
    criterion."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for name, by_loops in points.items():
        color = color_of(name, names)
        xs = {t: x(t, e) for t, e in by_loops.items()}
        ax.plot(list(xs.values()), [e.loss for e in by_loops.values()], marker="o", color=color, label=name)
        if labels and len(by_loops) > 1:
            for t, e in by_loops.items():
                ax.annotate(f"T={t}", (xs[t], e.loss), fontsize=6, xytext=(3, 3), textcoords="offset points")
        t = trained[name]
        ax.plot([xs[t]], [by_loops[t].loss], marker="*", markersize=12, color=color)
        if exits and x_exit is not None and name in exits:
            styles = ("--", ":", "-.")
            criteria = sorted({m.criterion for m in exits[name]})
            for i, criterion in enumerate(criteria):
                mine = sorted((m for m in exits[name] if m.criterion == criterion), key=lambda m: m.loops)
                ax.plot(
                    [x_exit(m) for m in mine],
                    [m.loss for m in mine],
                    marker="s",
                    markerfacecolor="none",
                    linestyle=styles[i % len(styles)],
                    color=color,
                    label=f"{name}, exit: {criterion}",
                )
                if labels:
                    for m in mine:
                        ax.annotate(
                            m.label, (x_exit(m), m.loss), fontsize=5, xytext=(3, -8), textcoords="offset points"
                        )
    ax.set(xlabel=xlabel, ylabel="held-out loss (nats/token)", title=title)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    save_figure(fig, path)
    plt.close(fig)


def plot_depth_curves(
    points: dict[str, dict[int, DepthMean]],
    trained: dict[str, int],
    path: Path,
    names: list[str],
    exits: dict[str, list[ExitMean]] | None = None,
) -> None:
    """Held-out loss against the loop count at inference, one line per looped arm (mean over seeds), and its
    exit policies (``exits``, adaptive depth) against the core iterations per token they executed;
    ``names``: every arm of the report (for the colours)."""
    _plot_depths(
        points,
        trained,
        path,
        lambda t, e: t,
        "loops at inference T / core iterations per token (star: as trained; squares: early exit)"
        if exits
        else "loops at inference T (star: as trained)",
        "Test-time depth" + (" and adaptive depth" if exits else ""),
        False,
        names,
        exits,
        lambda e: e.loops,
    )


def plot_loss_vs_flops(
    points: dict[str, dict[int, DepthMean]],
    trained: dict[str, int],
    path: Path,
    exits: dict[str, list[ExitMean]] | None = None,
) -> None:
    """Held-out loss against executed forward FLOPs per token, every arm at every depth it was run at, and
    each looped arm under its exit policies (``exits``)."""
    _plot_depths(
        points,
        trained,
        path,
        lambda t, e: e.flops_per_token / 1e6,
        "forward FLOPs per token executed (M)",
        "Loss vs executed compute (star: the depth each arm was trained at)",
        True,
        list(points),
        exits,
        lambda e: e.flops / 1e6,
    )


def plot_gaps(gaps: dict[str, dict[int, list[float]]], path: Path, names: list[str]) -> None:
    """Held-out loss gap ``arm - reference`` against tokens seen, one line per arm (mean over seeds, each seed
    faint); below 0 the arm is ahead. ``gaps``: label ``"A - B"`` -> tokens -> per-seed gaps."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for label, by_tokens in gaps.items():
        color = color_of(label.split(" - ")[0], names)
        tokens = [t / 1e6 for t in by_tokens]
        ax.plot(tokens, [sum(v) / len(v) for v in by_tokens.values()], marker="o", color=color, label=label)
        seeds = max(len(v) for v in by_tokens.values())
        for i in range(seeds):
            per_seed = [(t / 1e6, v[i]) for t, v in by_tokens.items() if len(v) > i]
            if seeds > 1:
                ax.plot(*zip(*per_seed), color=color, alpha=0.25, linewidth=0.8)
    ax.axhline(0.0, color="black", linewidth=0.8)
    ax.set(
        xlabel="tokens seen (M)", ylabel="held-out loss difference (nats/token)", title="Held-out gap per evaluation"
    )
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    save_figure(fig, path)
    plt.close(fig)


def plot_cosines(cosines: dict[str, dict[str, list[float]]], path: Path, names: list[str]) -> None:
    """Cosine of each core layer's output between adjacent iterations, per looped arm (mean over seeds)."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(7, 4.5))
    styles = ("-", "--", ":", "-.")
    for name, layers in cosines.items():
        for j, (layer, values) in enumerate(layers.items()):
            xs = [f"{k + 1}->{k + 2}" for k in range(len(values))]
            ax.plot(
                xs,
                values,
                marker="o",
                linestyle=styles[j % len(styles)],
                color=color_of(name, names),
                label=f"{name} {layer}",
            )
    ax.set(
        xlabel="adjacent iterations",
        ylabel="cosine similarity of the hidden state",
        title="Iteration cosine per core layer",
    )
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    save_figure(fig, path)
    plt.close(fig)
