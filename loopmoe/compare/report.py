"""The comparison's report: ``report.md`` with the budget table, results, and plots.

``budget_table`` is also what ``loopmoe budget`` prints.

``loss.png`` shows training (smoothed) and validation loss against tokens for both models and
every seed; ``expert_load.png`` shows, per executed (layer, iteration) slot, each expert's share
of routed tokens relative to uniform (1.0 = perfectly balanced).
"""

from __future__ import annotations

import statistics
from pathlib import Path
from typing import TYPE_CHECKING, Any

from loopmoe.atomic import atomic_write_text, save_figure
from loopmoe.text import human, markdown_table

if TYPE_CHECKING:
    from loopmoe.balance import BalanceResult
    from loopmoe.compare.arms import Arm

COLORS = {"reference": "tab:blue", "looped": "tab:orange", "granularity": "tab:green"}
_MORE_COLORS = ("tab:red", "tab:purple", "tab:brown", "tab:pink", "tab:gray", "tab:olive", "tab:cyan")


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


def budget_table(result: BalanceResult, title: str = "") -> str:
    """The reference and its balanced LoopMoE side by side: shapes, budgets and their deviations."""
    ref, loop = result.reference, result.looped
    rb, lb = result.reference_budget, result.looped_budget
    dev = result.deviations

    def layers(c):
        return f"{c.num_prelude_layers}+{c.num_core_layers}x{c.num_loops}+{c.num_coda_layers}"

    rows = [
        ("layers P+CxT+Q", layers(ref), layers(loop), ""),
        ("executed depth", rb.executed_depth, lb.executed_depth, ""),
        (
            "heads q/kv x size",
            f"{ref.num_attention_heads}/{ref.num_key_value_heads}x{ref.head_dim}",
            f"{loop.num_attention_heads}/{loop.num_key_value_heads}x{loop.head_dim}",
            "",
        ),
        (
            "experts E, top-k",
            f"{ref.num_experts}, {ref.num_experts_per_tok}",
            f"{loop.num_experts}, {loop.num_experts_per_tok}",
            "",
        ),
        (
            "expert size f (shared)",
            f"{ref.moe_intermediate_size} ({ref.shared_expert_intermediate_size})",
            f"{loop.moe_intermediate_size} ({loop.shared_expert_intermediate_size})",
            "",
        ),
        ("iteration conditioning", ref.iter_conditioning, loop.iter_conditioning, ""),
        ("total params", human(rb.total_params), human(lb.total_params), f"{dev['total_params']:+.2%}"),
        (
            "active params",
            human(rb.active_params),
            human(lb.active_params),
            f"{lb.active_params / rb.active_params - 1:+.2%}",
        ),
        (
            f"FLOPs/token (S={result.seq_len})",
            human(rb.flops_per_token),
            human(lb.flops_per_token),
            f"{dev['flops_per_token']:+.2%}",
        ),
        (
            "attn/FFN active ratio",
            f"{rb.attn_ffn_ratio:.4f}",
            f"{lb.attn_ffn_ratio:.4f}",
            f"{dev['attn_ffn_ratio']:+.2%}",
        ),
    ]
    head = ("", "reference (Vanilla MoE)", f"looped ({result.strategy})", "deviation")
    heading = f"## Budget: {title}, num_loops={loop.num_loops}" if title else "## Budget"
    return "\n".join([heading, "", markdown_table(head, rows)])


def arms_table(arms: dict[str, Arm], seq_len: int) -> str:
    """Every arm's shape and budget, with its deviation from the reference (the first arm without one)."""
    reference = arms["reference"].budget if "reference" in arms else next(iter(arms.values())).budget

    def dev(arm: Arm, key: str) -> str:
        return f"{human(getattr(arm.budget, key))} ({getattr(arm.budget, key) / getattr(reference, key) - 1:+.1%})"

    rows = []
    for name, arm in arms.items():
        c = arm.config
        rows.append(
            (
                name,
                arm.spec.kind,
                f"{c.num_prelude_layers}+{c.num_core_layers}x{c.num_loops}+{c.num_coda_layers}",
                f"{c.num_attention_heads}/{c.num_key_value_heads}x{c.head_dim}",
                f"{c.num_experts} x {c.moe_intermediate_size}, {c.num_experts_per_tok}",
                c.iter_conditioning,
                c.norm_scheme,
                dev(arm, "total_params"),
                dev(arm, "active_params"),
                dev(arm, "flops_per_token"),
                f"{arm.budget.attn_ffn_ratio:.3f}",
                ",".join(str(s) for s in arm.seeds),
            )
        )
    head = (
        "arm",
        "kind",
        "layers P+CxT+Q",
        "heads q/kv x size",
        "experts E x f, top-k",
        "iteration conditioning",
        "norm",
        "total params",
        "active params",
        f"FLOPs/token (S={seq_len})",
        "attn/FFN",
        "seeds",
    )
    return "\n".join(["## Arms (deviations from the reference)", "", markdown_table(head, rows)])


def plot_losses(runs: dict[str, dict[int, dict]], path: Path) -> None:
    plt = _pyplot()
    fig, (ax_train, ax_val) = plt.subplots(1, 2, figsize=(11, 4))
    for name, seeds in runs.items():
        for i, (_seed, run) in enumerate(sorted(seeds.items())):
            steps = [m for m in run["metrics"] if not m.get("skipped")]
            tokens = [m["tokens"] / 1e6 for m in steps]
            label = name if i == 0 else None
            color = color_of(name, list(runs))
            ax_train.plot(tokens, _ema([m["lm_loss"] for m in steps]), color=color, alpha=0.9, label=label)
            val = [(m["tokens"] / 1e6, m["val_loss"]) for m in run["metrics"] if m.get("val_loss") is not None]
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
    plt = _pyplot()
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
    save_figure(fig, path)
    plt.close(fig)


def comparisons(arms: dict[str, dict[str, Any]]) -> list[tuple[str, str]]:
    """The paired differences the report shows, as (a, b) for ``a - b``: looped - reference and
    looped - granularity first, then every other arm against the reference and every ablation of the
    looped model against it (arms given as results.json's ``arms``: name -> its ``spec``)."""
    names = list(arms)
    pairs = [(a, b) for a, b in (("looped", "reference"), ("looped", "granularity")) if a in names and b in names]
    for name in names:
        if name in ("reference", "looped"):
            continue
        if "reference" in names and (name, "reference") not in pairs:
            pairs.append((name, "reference"))
        if name != "granularity" and arms[name]["spec"]["kind"] == "looped" and "looped" in names:
            pairs.append((name, "looped"))
    return pairs


def paired_table(runs: dict[str, dict[int, dict]], pairs: list[tuple[str, str]], key: str = "val_loss") -> str:
    """Per pair: the seeds, the per-seed differences, their mean, sd and 95% t-interval."""
    from loopmoe.compare.stats import paired_difference

    rows = []
    for a, b in pairs:
        d = paired_difference({s: r[key] for s, r in runs[a].items()}, {s: r[key] for s, r in runs[b].items()})
        rows.append(
            (
                f"{a} - {b}",
                d.n,
                ", ".join(f"{v:+.4f}" for v in d.per_seed.values()),
                f"{d.mean:+.4f}",
                "" if d.sd is None else f"{d.sd:.4f}",
                "" if d.ci95 is None else f"[{d.ci95[0]:+.4f}, {d.ci95[1]:+.4f}]",
            )
        )
    return markdown_table(("difference", "seeds", "per seed", "mean", "sd", "95% t-interval"), rows)


def _mean_spread(values: list[float]) -> str:
    if len(values) == 1:
        return f"{values[0]:.4f}"
    return f"{statistics.mean(values):.4f} ± {statistics.stdev(values):.4f}"


def write_report(out: Path, results: dict[str, Any], budget: str) -> Path:
    """Write ``report.md`` and its plots into ``out``; ``budget`` is the ``budget_table`` of the comparison."""
    runs = results["runs"]
    plot_losses(runs, out / "loss.png")
    plot_expert_load({name: runs[name][min(runs[name])]["expert_load"] for name in runs}, out / "expert_load.png")
    opts = results["options"]
    seeds = sorted({s for seeds in runs.values() for s in seeds})
    val = {name: [runs[name][s]["val_loss"] for s in sorted(runs[name])] for name in runs}
    train = {name: [runs[name][s]["train_loss"] for s in sorted(runs[name])] for name in runs}
    pairs = comparisons(results["arms"])
    per_seed = [(s, *(f"{runs[name][s]['val_loss']:.4f}" if s in runs[name] else "" for name in runs)) for s in seeds]
    lines = [
        "# LoopMoE vs Vanilla MoE: controlled comparison",
        "",
        f"Reference `{opts['reference']}`, loops T = {opts['num_loops']}, strategy `{opts['strategy']}`; corpus "
        f"`{opts['source']}`; {opts['steps']} steps x {opts['micro_batch_size']} x {opts['seq_len']} tokens "
        f"= {opts['steps'] * opts['micro_batch_size'] * opts['seq_len']:,} tokens per model; seeds {seeds}. "
        "Every arm sees the same tokens in the same order with the same optimizer and schedule.",
        "",
        budget,
        "",
        "## Results",
        "",
        markdown_table(
            ("model", "seeds", "held-out loss", "final training loss"),
            [(name, len(val[name]), _mean_spread(val[name]), _mean_spread(train[name])) for name in runs],
        ),
        "",
        "Held-out loss per seed:",
        "",
        markdown_table(("seed", *runs), per_seed),
        "",
        *(
            [
                "Paired held-out loss differences (same seed = same data order and initialisation stream; "
                "negative: the first arm is better):",
                "",
                paired_table(runs, pairs),
                "",
            ]
            if pairs
            else []
        ),
        *(
            []
            if min(len(v) for v in val.values()) > 2
            else ["Fewer than 3 seeds: do not call a difference a result (run `--seeds 0,1,2`).", ""]
        ),
        "![loss curves](loss.png)",
        "",
        "![expert load](expert_load.png)",
    ]
    downstream = results.get("downstream") or {}
    if downstream:
        scores = {name: {(r["task"], r["metric"]): r for r in rows} for name, rows in downstream.items()}
        keys = sorted({key for table in scores.values() for key in table})
        table_rows = []
        for task, metric in keys:
            cells = []
            for table in scores.values():
                row = table.get((task, metric))
                err = f" ± {row['stderr']:.4f}" if row and row["stderr"] is not None else ""
                cells.append(f"{row['value']:.4f}{err}" if row else "")
            n = next((t[(task, metric)]["n"] for t in scores.values() if (task, metric) in t), "")
            table_rows.append((task, metric, *cells, n))
        lines += [
            "",
            "## Downstream (zero-shot, lm-evaluation-harness)",
            "",
            markdown_table(("task", "metric", *scores, "documents"), table_rows),
        ]
    path = out / "report.md"
    atomic_write_text(path, "\n".join(lines) + "\n")
    return path
