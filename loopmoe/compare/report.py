"""The comparison's report: ``report.md`` with the budget table, results, and plots; and the study's
results page (``write_results``: RESULTS.md, the same sections with its figures in ``docs/study/``).

``budget_table`` is also what ``loopmoe budget`` prints. Every number comes from results.json's
content (itself read from the run folders), none is written by hand.

``loss.png`` shows training (smoothed) and validation loss against tokens for every arm and seed;
``expert_load.png`` shows, per executed (layer, iteration) slot, each expert's share of routed
tokens relative to uniform (1.0 = perfectly balanced); ``depth.png`` the held-out loss of every
looped arm against its loop count at inference, and ``loss_vs_flops.png`` the held-out loss of
every arm and depth against the forward FLOPs per token it executes.
"""

from __future__ import annotations

import json
import statistics
from pathlib import Path
from typing import TYPE_CHECKING, Any

from loopmoe.atomic import atomic_write_text, save_figure
from loopmoe.config import ExpertType
from loopmoe.text import human, markdown_table

if TYPE_CHECKING:
    from loopmoe.balance import BalanceResult
    from loopmoe.compare.arms import Arm

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


def budget_table(
    result: BalanceResult, title: str = "", all_to_all: tuple[int, str, float, float] | None = None
) -> str:
    """The reference and its balanced LoopMoE side by side: shapes, budgets and their deviations.

    ``all_to_all``: (ep, dtype, reference bytes, looped bytes) adds the expert-parallel all_to_all
    bytes per token (``loopmoe.budget.all_to_all_bytes_per_token``) of both models.
    """
    ref, loop = result.reference, result.looped
    rb, lb = result.reference_budget, result.looped_budget
    dev = result.deviations

    def layers(c):
        return f"{c.num_prelude_layers}+{c.num_core_layers}x{c.num_loops}+{c.num_coda_layers}"

    def experts(c):  # DCCA: BigMac's low-dimension experts, at width dcca_dim
        if not ExpertType(c.expert_type).projects:
            return c.expert_type
        return f"{c.expert_type}, width {c.dcca_dim}" + (", routed there" if c.dcca_router_input == "descended" else "")

    rows = [
        ("layers P+CxT+Q", layers(ref), layers(loop), ""),
        ("executed depth", rb.executed_depth, lb.executed_depth, ""),
        (
            "heads q/kv x size",
            f"{ref.num_attention_heads}/{ref.num_key_value_heads}x{ref.head_dim}",
            f"{loop.num_attention_heads}/{loop.num_key_value_heads}x{loop.head_dim}",
            "",
        ),
        ("expert type", experts(ref), experts(loop), ""),
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
    if all_to_all is not None:
        ep, dtype, ref_bytes, loop_bytes = all_to_all
        rows.append(
            (
                f"all_to_all bytes/token, forward (ep={ep}, {dtype})",
                human(ref_bytes),
                human(loop_bytes),
                f"{loop_bytes / ref_bytes - 1:+.2%}" if ref_bytes else "",
            )
        )
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
    """Heat maps of expert load / uniform share per layer@iteration, one per model, on one colour scale:
    white at 1 (balanced), blue below, red above, up to the largest load of either model (never clipped)."""
    from matplotlib.colors import TwoSlopeNorm

    plt = _pyplot()
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


def comparisons(arms: dict[str, dict[str, Any]]) -> list[tuple[str, str]]:
    """The paired differences the report shows, as (a, b) for ``a - b``: looped - reference and
    looped - granularity first, then every other arm against the reference, every other looped arm
    without switches against the granularity control of its own loop count and strategy, and every
    ablation of the looped model against it (arms given as results.json's ``arms``: name -> its ``spec``)."""
    names = list(arms)
    pairs = [(a, b) for a, b in (("looped", "reference"), ("looped", "granularity")) if a in names and b in names]

    def balancing(name: str) -> tuple:
        spec = arms[name]["spec"]
        return spec["num_loops"], spec["strategy"]

    for name in names:
        if name in ("reference", "looped"):
            continue
        spec = arms[name]["spec"]
        if "reference" in names and (name, "reference") not in pairs:
            pairs.append((name, "reference"))
        if spec["kind"] == "looped" and spec["iter_conditioning"] is None and spec["norm_scheme"] is None:
            pairs += [
                (name, g)
                for g in names
                if arms[g]["spec"]["kind"] == "granularity"
                and balancing(g) == balancing(name)
                and (name, g) not in pairs
            ]
        if name != "granularity" and spec["kind"] == "looped" and "looped" in names:
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


def _value(v: float, size: float | None = None) -> str:
    """A score at the precision its size (or ``size``, e.g. the mean a spread belongs to) calls for:
    losses and accuracies to 4 decimals, perplexities in the hundreds to one, millions as whole numbers."""
    size = abs(v if size is None else size)
    return f"{v:.4f}" if size < 100 else f"{v:.1f}" if size < 10_000 else f"{v:,.0f}"


def _mean_spread(values: list[float]) -> str:
    if len(values) == 1:
        return _value(values[0])
    mean = statistics.mean(values)
    return f"{_value(mean)} ± {_value(statistics.stdev(values), mean)}"


def finished_runs(results: dict[str, Any]) -> dict[str, dict[int, dict]]:
    """The arms with at least one finished run, as seed -> run record (JSON turns seeds into strings)."""
    return {name: {int(s): r for s, r in seeds.items()} for name, seeds in results["runs"].items() if seeds}


def depth_points(runs: dict[str, dict[int, dict]]) -> dict[str, dict[int, dict[str, Any]]]:
    """Per arm and loop count: the mean held-out loss over the seeds, its seeds, and the FLOPs per token."""
    out: dict[str, dict[int, dict[str, Any]]] = {}
    for name, seeds in runs.items():
        by_loops: dict[int, dict[str, Any]] = {}
        for run in seeds.values():
            for point in run["eval"]["depth"]["points"]:
                entry = by_loops.setdefault(point["loops"], {"losses": [], "flops_per_token": point["flops_per_token"]})
                entry["losses"].append(point["loss"])
                entry["untrained_iteration_vectors"] = point["untrained_iteration_vectors"]
        out[name] = {t: {**e, "loss": statistics.fmean(e["losses"])} for t, e in sorted(by_loops.items())}
    return out


def _plot_depths(points, trained: dict[str, int], path: Path, x, xlabel: str, title: str, labels: bool, names) -> None:
    """Held-out loss of every arm at each depth it was run at, against ``x(T, point)``; a star at the trained T.
    ``names``: every arm of the report, so an arm has the same colour in every figure."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for name, by_loops in points.items():
        color = color_of(name, names)
        xs = {t: x(t, e) for t, e in by_loops.items()}
        ax.plot(list(xs.values()), [e["loss"] for e in by_loops.values()], marker="o", color=color, label=name)
        if labels and len(by_loops) > 1:
            for t, e in by_loops.items():
                ax.annotate(f"T={t}", (xs[t], e["loss"]), fontsize=6, xytext=(3, 3), textcoords="offset points")
        t = trained[name]
        ax.plot([xs[t]], [by_loops[t]["loss"]], marker="*", markersize=12, color=color)
    ax.set(xlabel=xlabel, ylabel="held-out loss (nats/token)", title=title)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    save_figure(fig, path)
    plt.close(fig)


def plot_depth_curves(
    points: dict[str, dict[int, dict[str, Any]]], trained: dict[str, int], path: Path, names: list[str]
) -> None:
    """Held-out loss against the loop count at inference, one line per looped arm (mean over seeds);
    ``names``: every arm of the report (for the colours)."""
    _plot_depths(
        points,
        trained,
        path,
        lambda t, e: t,
        "loops at inference T (star: as trained)",
        "Test-time depth",
        False,
        names,
    )


def plot_loss_vs_flops(points: dict[str, dict[int, dict[str, Any]]], trained: dict[str, int], path: Path) -> None:
    """Held-out loss against executed forward FLOPs per token, every arm at every depth it was run at."""
    _plot_depths(
        points,
        trained,
        path,
        lambda t, e: e["flops_per_token"] / 1e6,
        "forward FLOPs per token executed (M)",
        "Loss vs executed compute (star: the depth each arm was trained at)",
        True,
        list(points),
    )


def _loss_pairs(runs: dict[str, dict[int, dict]], pairs: list[tuple[str, str]], value) -> list[tuple[str, str, Any]]:
    """The paired differences of ``value(run)`` for the pairs whose arms share a seed."""
    from loopmoe.compare.stats import paired_difference

    out = []
    for a, b in pairs:
        if a in runs and b in runs and set(runs[a]) & set(runs[b]):
            out.append(
                (
                    a,
                    b,
                    paired_difference(
                        {s: value(r) for s, r in runs[a].items()}, {s: value(r) for s, r in runs[b].items()}
                    ),
                )
            )
    return out


def verdict_lines(
    runs: dict[str, dict[int, dict]], arms: dict[str, dict[str, Any]], text_name: str | None
) -> list[str]:
    """The verdict paragraph, generated by ``loopmoe.compare.verdict``'s rules from the paired differences."""
    from loopmoe.compare.verdict import attribution, judge

    # the main comparisons pair arms that both run on the comparison's seeds; the others are ablations
    main = [
        (a, b) for a, b in comparisons(arms) if arms[a]["spec"]["seeds"] is None and arms[b]["spec"]["seeds"] is None
    ]
    found = {(a, b): judge(a, b, d) for a, b, d in _loss_pairs(runs, main, lambda r: r["val_loss"])}
    lines = [f"- {f.sentence}" for f in found.values()]
    for looped in [n for n in arms if arms[n]["spec"]["kind"] == "looped" and (n, "reference") in found]:
        control = next(
            (b for (a, b) in found if a == looped and b != "reference" and arms[b]["spec"]["kind"] == "granularity"),
            None,
        )
        words = attribution(found[(looped, "reference")], found.get((looped, control)) if control else None, looped)
        if words:
            lines.append(f"- {words}")
    if text_name:
        text_pairs = [(a, b) for a, b in main if (a, b) in found]
        for a, b, d in _loss_pairs(
            runs, text_pairs, lambda r: r["eval"]["text"]["loss"] if r["eval"]["text"] else None
        ):
            if None not in d.per_seed.values():
                lines.append(f"- {judge(a, b, d, measure=f'{text_name} loss').sentence}")
    ablations = [p for p in comparisons(arms) if p not in main]
    for a, b, d in _loss_pairs(runs, ablations, lambda r: r["val_loss"]):
        lines.append(f"- {judge(a, b, d).sentence}")
    return lines


def _cost_rows(runs: dict[str, dict[int, dict]], tokens_per_step: int, steps: int) -> list[tuple]:
    rows = []
    for name, seeds in runs.items():
        sessions = [s for run in seeds.values() for s in run["cost"]]
        complete = [run for run in seeds.values() if sum(s["end_step"] - s["start_step"] for s in run["cost"]) == steps]
        wall = sum(s["wall_s"] for s in sessions)
        trained = sum(s["end_step"] - s["start_step"] for s in sessions) * tokens_per_step
        per_run = [sum(s["wall_s"] for s in run["cost"]) for run in complete]
        evals = [sum(v for v in run["eval"].get("wall_s", {}).values() if v) for run in seeds.values()]
        peak = max((s["peak_rss_mib"] for s in sessions), default=None)
        cuda = max((s["peak_cuda_mib"] for s in sessions if s.get("peak_cuda_mib") is not None), default=None)
        rows.append(
            (
                name,
                f"{len(complete)}/{len(seeds)}",
                f"{statistics.fmean(per_run):,.0f}" if per_run else "",
                f"{trained / wall:,.0f}" if wall else "",
                f"{peak:,.0f}" if peak is not None else "",
                f"{cuda:,.0f}" if cuda is not None else "",
                f"{statistics.fmean(evals):,.0f}" if evals else "",
                ", ".join(sorted({str(s.get("threads")) for s in sessions})),
            )
        )
    return rows


def _environments(runs: dict[str, dict[int, dict]], current: dict[str, Any]) -> list[str]:
    """The environments training sessions recorded, and the one writing this report. Measurements stored
    in a run's ``eval/`` are reused by later reports (keyed on the weights and the settings), so they
    may come from an earlier commit than the report's."""
    keys = ("commit", "torch", "transformers", "python", "hardware")
    seen: dict[tuple, int] = {}
    unrecorded = 0
    for seeds in runs.values():
        for run in seeds.values():
            for session in run["cost"]:
                if "torch" in session:
                    key = tuple(session.get(k) for k in keys)
                    seen[key] = seen.get(key, 0) + 1
                else:
                    unrecorded += 1
    rows = [("training", n, *key) for key, n in seen.items()]
    if unrecorded:
        rows.append(("training", unrecorded, *["not recorded (sessions from before cost.json kept it)"] * len(keys)))
    rows.append(("this report", "", *(current.get(k) for k in keys)))
    return [
        markdown_table(("what", "sessions", *keys), rows),
        "",
        "Evaluations are measured once per run and stored in its `eval/` folder, keyed on a hash of the "
        "weights and the measurement's settings; a later report reuses them, so they may come from an "
        "earlier commit than this report's.",
    ]


def report_lines(results: dict[str, Any], budget: str, figures: Path, link: str = "") -> list[str]:
    """Every section of the report; plots are written into ``figures`` and linked as ``link + name``."""
    runs = finished_runs(results)
    opts = results["options"]
    lines: list[str] = []
    missing = results.get("missing") or []
    if missing:
        lines += [
            f"**Incomplete: {len(missing)} run(s) of the plan are not finished** and are left out of every table "
            "below (re-run the same command to train them, then regenerate this report):",
            "",
            markdown_table(
                ("arm", "seed", "trained steps"),
                [(m["arm"], m["seed"], f"{m['step']}/{opts['steps']}") for m in missing],
            ),
            "",
        ]
    if not runs:
        return [*lines, "No run has finished yet: nothing to report."]
    plot_losses(runs, figures / "loss.png")
    plot_expert_load(
        {name: runs[name][min(runs[name])]["eval"]["expert_load"] for name in runs}, figures / "expert_load.png"
    )
    seeds = sorted({s for arm_seeds in runs.values() for s in arm_seeds})
    val = {name: [runs[name][s]["val_loss"] for s in sorted(runs[name])] for name in runs}
    train = {name: [runs[name][s]["train_loss"] for s in sorted(runs[name])] for name in runs}
    arms = {name: spec for name, spec in results["arms"].items() if name in runs}
    pairs = comparisons(arms)
    per_seed = [(s, *(f"{runs[name][s]['val_loss']:.4f}" if s in runs[name] else "" for name in runs)) for s in seeds]
    text = results.get("text")
    verdict = verdict_lines(runs, arms, text["name"] if text else None)
    lines += [
        budget,
        "",
        "## Verdict",
        "",
        "Generated from the paired differences by fixed rules (`loopmoe/compare/verdict.py`): a claim needs at "
        "least 3 seeds, a 95% interval that excludes 0 and every seed agreeing; single-seed differences are "
        "observations, not results.",
        "",
        *verdict,
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
                paired_table(runs, [(a, b) for a, b in pairs if set(runs[a]) & set(runs[b])]),
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
        f"![loss curves]({link}loss.png)",
        "",
        f"![expert load]({link}expert_load.png)",
    ]
    lines += _text_section(runs, pairs, text)
    lines += _downstream_section(results.get("downstream") or {})
    lines += _depth_section(runs, figures, link, opts["seq_len"])
    tokens_per_step = opts["micro_batch_size"] * opts["seq_len"]
    lines += [
        "",
        "## Cost",
        "",
        "Per arm over its finished runs, from each run's `cost.json` (training sessions: wall-clock includes the "
        "periodic evaluations, checkpoints and the final export) and `eval/` (the measurements above). "
        "Wall-clock is as each session ran: a run that shared the machine with other work shows as slower, so "
        "these columns compare the arms' speed only if every run had the machine to itself. "
        "`python -m bench.study_sizing CONFIG` times one training step of every arm side by side in one process "
        "(CPU time, one thread), which compares them like for like.",
        "",
        markdown_table(
            (
                "arm",
                "runs fully timed",
                "training wall-clock per run (s)",
                "tokens/s",
                "peak RSS (MiB)",
                "peak GPU (MiB)",
                "evaluation per run (s)",
                "threads",
            ),
            _cost_rows(runs, tokens_per_step, opts["steps"]),
        ),
        "",
        "## Environment",
        "",
        *_environments(runs, results.get("environment") or {}),
        "",
        "## Configurations",
        "",
        "<details><summary>The comparison's options and the full training config of every arm</summary>",
        "",
        "```json",
        json.dumps({"options": opts, "run_configs": results.get("run_configs", {})}, indent=2, default=str),
        "```",
        "",
        "</details>",
    ]
    return lines


def _text_section(runs: dict[str, dict[int, dict]], pairs: list[tuple[str, str]], text: dict | None) -> list[str]:
    if not text:
        return []
    scored = {n: {s: r["eval"]["text"] for s, r in seeds.items() if r["eval"]["text"]} for n, seeds in runs.items()}
    rows = []
    for name, per_seed in scored.items():
        if per_seed:
            first = next(iter(per_seed.values()))
            rows.append(
                (
                    name,
                    len(per_seed),
                    _mean_spread([v["loss"] for v in per_seed.values()]),
                    _mean_spread([v["perplexity"] for v in per_seed.values()]),
                    _mean_spread([v["bits_per_byte"] for v in per_seed.values()]),
                    f"{first['tokens']:,}",
                )
            )
    have = [(a, b) for a, b in pairs if scored.get(a) and scored.get(b) and set(scored[a]) & set(scored[b])]
    window = next(iter(next(v for v in scored.values() if v).values()))
    return [
        "",
        f"## {text['name']} perplexity",
        "",
        f"`{Path(text['path']).name}`, scored with a sliding window of {window['window']} tokens (the training "
        f"length) and stride {window['stride']}; the tokenizer is the study's own BPE, so perplexity compares "
        "arms with each other, not with published numbers (bits per byte is tokenizer-free).",
        "",
        markdown_table(("model", "seeds", "loss (nats/token)", "perplexity", "bits/byte", "tokens"), rows),
        *(
            [
                "",
                "Paired loss differences on this text:",
                "",
                paired_table({n: {s: {"loss": v["loss"]} for s, v in scored[n].items()} for n in scored}, have, "loss"),
            ]
            if have
            else []
        ),
    ]


def _downstream_section(downstream: dict[str, list[dict[str, Any]]]) -> list[str]:
    if not downstream:
        return []
    scores = {name: {(r["task"], r["metric"]): r for r in rows} for name, rows in downstream.items()}
    keys = sorted({key for table in scores.values() for key in table})
    table_rows = []
    for task, metric in keys:
        cells = []
        for table in scores.values():
            row = table.get((task, metric))
            if row is None:
                cells.append("")
                continue
            err = "" if row["stderr"] is None else f" ± {_value(row['stderr'], row['value'])}"
            cells.append(f"{_value(row['value'])}{err}{'' if row['stderr_over'] == 'seeds' else ' †'}")
        n = next((t[(task, metric)]["n"] for t in scores.values() if (task, metric) in t), "")
        table_rows.append((task, metric, *cells, n))
    seeds = {name: max(r["seeds"] for r in rows) for name, rows in downstream.items()}
    return [
        "",
        "## Downstream (zero-shot, lm-evaluation-harness)",
        "",
        "Mean over each arm's seeds ± its standard error over those seeds; † one seed: ± is lm-eval's standard "
        "error over the documents. Seeds per arm: " + ", ".join(f"{n} {k}" for n, k in seeds.items()) + ".",
        "",
        markdown_table(("task", "metric", *scores, "documents"), table_rows),
    ]


def _depth_section(runs: dict[str, dict[int, dict]], figures: Path, link: str, seq_len: int) -> list[str]:
    points = depth_points(runs)
    trained = {name: next(iter(seeds.values()))["eval"]["depth"]["trained_loops"] for name, seeds in runs.items()}
    plot_loss_vs_flops(points, trained, figures / "loss_vs_flops.png")
    looped = {n: p for n, p in points.items() if len(p) > 1}
    lines = [
        "",
        "## Test-time depth and executed compute",
        "",
        f"Held-out loss (the runs' validation batches, mean over seeds) at each loop count at inference, and the "
        f"forward FLOPs per token executed there (at S = {seq_len}, `loopmoe.budget`).",
    ]
    if looped:
        plot_depth_curves(looped, trained, figures / "depth.png", names=list(points))
        all_loops = sorted({t for p in looped.values() for t in p})
        rows = []
        for name, by_loops in looped.items():
            cells = []
            for t in all_loops:
                e = by_loops.get(t)
                mark = " *" if t == trained[name] else (" ‡" if e and e["untrained_iteration_vectors"] else "")
                cells.append("" if e is None else f"{e['loss']:.4f}{mark}")
            rows.append((name, len(runs[name]), *cells))
        lines += [
            "",
            markdown_table(("arm", "seeds", *(f"T={t}" for t in all_loops)), rows),
            "",
            "\\* the loop count it was trained at; ‡ beyond it, an `iter_embedding` model adds iteration vectors "
            "that were never trained.",
        ]
        unrunnable = {
            (name, t): why
            for name, seeds in runs.items()
            for run in seeds.values()
            for t, why in run["eval"]["depth"]["unrunnable"].items()
        }
        lines += [f"- {name} cannot run at T = {t}: {why}" for (name, t), why in sorted(unrunnable.items())]
        lines += ["", f"![test-time depth]({link}depth.png)"]
    rows = [
        (name, t, human(e["flops_per_token"]), f"{e['loss']:.4f}")
        for name, by_loops in points.items()
        for t, e in by_loops.items()
    ]
    return [
        *lines,
        "",
        markdown_table(("arm", "loops T", "FLOPs/token", "held-out loss"), rows),
        "",
        f"![loss vs executed FLOPs]({link}loss_vs_flops.png)",
    ]


def _setup(results: dict[str, Any]) -> list[str]:
    opts = results["options"]
    seeds = sorted({s for arm in results["arms"].values() for s in arm["seeds"]})
    tokens = opts["steps"] * opts["micro_batch_size"] * opts["seq_len"]
    return [
        f"Reference `{opts['reference']}`, loops T = {opts['num_loops']}, strategy `{opts['strategy']}`; corpus "
        f"`{opts['source']}`; {opts['steps']} steps x {opts['micro_batch_size']} x {opts['seq_len']} tokens "
        f"= {tokens:,} tokens per model; seeds {seeds}. "
        "Every arm sees the same tokens in the same order with the same optimizer and schedule.",
        "",
    ]


def write_report(out: Path, results: dict[str, Any], budget: str) -> Path:
    """Write ``report.md`` and its plots into ``out``; ``budget`` is the budget and arms tables of the comparison."""
    lines = [
        "# LoopMoE vs Vanilla MoE: controlled comparison",
        "",
        *_setup(results),
        *report_lines(results, budget, out),
    ]
    path = out / "report.md"
    atomic_write_text(path, "\n".join(lines) + "\n")
    return path


def write_results(path: Path, results: dict[str, Any], budget: str) -> Path:
    """Write the study's results page (RESULTS.md) at ``path``, its figures in ``docs/study/`` beside it."""
    figures = path.parent / "docs" / "study"
    figures.mkdir(parents=True, exist_ok=True)
    opts = results["options"]
    data = results.get("data") or {}
    planned = sum(len(arm["seeds"]) for arm in results["arms"].values())
    missing = len(results.get("missing") or [])
    split = (
        f"{data['train_tokens']:,} training and {data['val_tokens']:,} held-out tokens"
        if "train_tokens" in data
        else "token counts unavailable"
    )
    lines = [
        "# Results: does looping help at matched budgets?",
        "",
        f"Generated by `loopmoe compare ... --results {path.name}` from the run folder `{opts['out']}` "
        f"({planned - missing} of {planned} planned runs finished). Every number below is read from the run "
        "folders; re-running the command regenerates this page.",
        "",
        "## Setup",
        "",
        f"Data: `{data.get('source', opts['source'])}`"
        + (f", a byte-level BPE of {data['bpe_vocab']} tokens trained on it" if data.get("bpe_vocab") else "")
        + f"; 5% of the documents held out ({split}). Held-out loss is the mean over {opts['eval_batches']} "
        f"held-out batches of {opts['micro_batch_size']} x {opts['seq_len']} tokens.",
        "",
        *_setup(results),
        *report_lines(results, budget, figures, link=f"{figures.relative_to(path.parent).as_posix()}/"),
    ]
    atomic_write_text(path, "\n".join(lines) + "\n")
    return path
