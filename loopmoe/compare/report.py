"""The comparison's report, laid out in markdown: ``report.md`` with the budget table, results, and figures;
and the study's results page (``write_results``: RESULTS.md, the same sections with its figures in
``docs/study/``).

``budget_table`` is also what ``loopmoe budget`` prints. Every number comes from the results
(``loopmoe.compare.results``, itself read from the run folders), none is written by hand; which pairs
are compared and what may be claimed of them is ``loopmoe.compare.verdict``'s, the figures are
``loopmoe.compare.figures``'.
"""

from __future__ import annotations

import json
import statistics
from pathlib import Path
from typing import TYPE_CHECKING, Any

from loopmoe.atomic import atomic_write_text
from loopmoe.balance import targets_of
from loopmoe.compare.diagnostics import DEAD_BELOW, clipped_fraction, dead_experts, held_out_gap, mean_cosine
from loopmoe.compare.figures import (
    plot_cosines,
    plot_depth_curves,
    plot_expert_load,
    plot_gaps,
    plot_loss_vs_flops,
    plot_losses,
)
from loopmoe.compare.results import (
    ArmRecord,
    DepthMean,
    ExitMean,
    RunRecord,
    StudyResults,
    TextSource,
    depth_means,
    exit_means,
)
from loopmoe.compare.stats import paired_difference
from loopmoe.compare.verdict import Comparison, Declared, comparisons, held_out_comparisons, verdict
from loopmoe.config import ExpertType, layers_text
from loopmoe.errors import ConfigError
from loopmoe.text import human, markdown_table

if TYPE_CHECKING:
    from loopmoe.balance import BalanceResult
    from loopmoe.compare.arms import Arm


def arm_balancings(arms: dict[str, Arm]) -> list[BalanceResult]:
    """Every balancing the arms use, once each, in arm order: a study of both strategies gets a budget table for
    each (arms of one balancing share its result, ``resolve_arms``)."""
    return list({id(arm.balanced): arm.balanced for arm in arms.values() if arm.balanced is not None}.values())


def budget_table(
    result: BalanceResult, title: str = "", all_to_all: tuple[int, str, float, float] | None = None
) -> str:
    """The reference and its balanced LoopMoE side by side: shapes, budgets and their deviations, with where
    the FLOPs go (attention, executed FFN, IterAdaLN), both readings of the attention/FFN ratio, and the
    three targets of the strategy marked with their tolerances (``naive``: reported, not enforced).
    The one budget table: ``loopmoe budget`` prints it, ``loopmoe compare``'s report and RESULTS.md show it.

    ``all_to_all``: (ep, dtype, reference bytes, looped bytes) adds the expert-parallel all_to_all
    bytes per token (``loopmoe.budget.all_to_all_bytes_per_token``) of both models.
    """
    ref, loop = result.reference, result.looped
    rb, lb = result.reference_budget, result.looped_budget
    dev = result.deviations

    def relative(key: str) -> str:
        before, after = getattr(rb, key), getattr(lb, key)
        return f"{after / before - 1:+.2%}" if before else ("" if not after else "new")

    def experts(c):  # DCCA: BigMac's low-dimension experts, at width dcca_dim
        if not ExpertType(c.expert_type).projects:
            return c.expert_type
        return f"{c.expert_type}, width {c.dcca_dim}" + (", routed there" if c.dcca_router_input == "descended" else "")

    rows: list[tuple[Any, ...]] = [
        ("layers P+CxT+Q", layers_text(ref), layers_text(loop), ""),
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
        *(
            (f"  {label}", human(getattr(rb, key)), human(getattr(lb, key)), relative(key))
            for label, key in (
                ("attention FLOPs/token (projections + S x S scores)", "attention_flops_per_token"),
                ("executed FFN FLOPs/token (routed + shared experts)", "ffn_flops_per_token"),
                ("IterAdaLN FLOPs/token (per-token modulation)", "modulation_flops_per_token"),
            )
        ),
        (
            "attn/FFN active ratio, unique attention / executed FFN (rho_unique)",
            f"{rb.attn_ffn_ratio:.4f}",
            f"{lb.attn_ffn_ratio:.4f}",
            f"{dev['attn_ffn_ratio']:+.2%}",
        ),
        (
            "attn/FFN per executed layer (rho_per_layer)",
            f"{rb.attn_ffn_ratio_per_layer:.4f}",
            f"{lb.attn_ffn_ratio_per_layer:.4f}",
            relative("attn_ffn_ratio_per_layer"),
        ),
    ]
    targets = targets_of(result.strategy)
    enforced = result.strategy != "naive"
    tol = {"total_params": 0.01, "flops_per_token": 0.01, "attn_ffn_ratio": 0.05, "attn_ffn_ratio_per_layer": 0.05}
    tol.update(result.tolerances)
    keys = {"total params": "total_params", "FLOPs/token": "flops_per_token", "attn/FFN active": "attn_ffn_ratio"}
    keys["attn/FFN per executed"] = "attn_ffn_ratio_per_layer"

    def target(label: str) -> str:
        key = next((k for prefix, k in keys.items() if label.startswith(prefix)), None)
        if key not in targets:
            return ""
        return f"±{tol[key]:.0%}" + (" (target)" if enforced else " (reported, not enforced)")

    rows = [(*row, target(str(row[0]))) for row in rows]
    if all_to_all is not None:
        ep, dtype, ref_bytes, loop_bytes = all_to_all
        rows.append(
            (
                f"all_to_all bytes/token, forward (ep={ep}, {dtype})",
                human(ref_bytes),
                human(loop_bytes),
                f"{loop_bytes / ref_bytes - 1:+.2%}" if ref_bytes else "",
                "",
            )
        )
    head = ("", "reference (Vanilla MoE)", f"looped ({result.strategy})", "deviation", "target")
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
                layers_text(c),
                f"{c.num_attention_heads}/{c.num_key_value_heads}x{c.head_dim}",
                f"{c.num_experts} x {c.moe_intermediate_size}, {c.num_experts_per_tok}",
                c.iter_conditioning,
                c.norm_scheme,
                dev(arm, "total_params"),
                dev(arm, "active_params"),
                dev(arm, "flops_per_token"),
                f"{arm.budget.attn_ffn_ratio:.3f} / {arm.budget.attn_ffn_ratio_per_layer:.3f}",
                "" if arm.lr is None else f"{arm.lr:g}",
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
        "attn/FFN (rho_unique / rho_per_layer)",
        "lr (own)",
        "seeds",
    )
    return "\n".join(["## Arms (deviations from the reference)", "", markdown_table(head, rows)])


def paired_table(values: dict[str, dict[int, float]], pairs: list[tuple[str, str]]) -> str:
    """Per pair: the seeds, the per-seed differences, their mean, sd and 95% t-interval (``values``: arm ->
    seed -> the measure)."""
    rows = []
    for a, b in pairs:
        d = paired_difference(values[a], values[b])
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


def _pvalue(p: float | None) -> str:
    return "" if p is None else (f"{p:.3f}" if p >= 0.001 else f"{p:.1e}")


def held_out_table(found: list[Comparison]) -> str:
    """The held-out loss comparisons: role, per-seed differences, mean, 95% t-interval, raw p, Holm-adjusted p
    (secondaries) and the minimum detectable effect at 80% power (every comparison with 2+ seeds)."""
    rows = []
    for c in found:
        d = c.d
        mde = d.mde()
        rows.append(
            (
                f"{c.a} - {c.b}",
                c.role,
                d.n,
                ", ".join(f"{v:+.4f}" for v in d.per_seed.values()),
                f"{d.mean:+.4f}",
                "" if d.sd is None else f"{d.sd:.4f}",
                "" if d.ci95 is None else f"[{d.ci95[0]:+.4f}, {d.ci95[1]:+.4f}]",
                _pvalue(d.p_value),
                "" if c.holm is None else _pvalue(c.holm.adjusted) + (" *" if c.holm.rejected else ""),
                "" if mde is None else f"{mde:.4f}",
                c.finding.outcome.replace("_", " "),
            )
        )
    head = ("difference", "role", "seeds", "per seed", "mean", "sd", "95% t-interval", "p", "Holm p", "MDE", "finding")
    return markdown_table(head, rows)


def _primary_section(found: list[Comparison], declared: Declared) -> list[str]:
    if declared.secondary is None:
        family = "Every other comparison below is secondary and Holm-corrected."
    else:
        listed = ", ".join(f"{a} - {b}" for a, b in declared.secondary)
        family = f"The secondary comparisons, declared with it and Holm-corrected together: {listed}."
    if declared.primary is None:
        return ["## Primary comparison", "", f"No primary comparison was declared (`primary = [A, B]`). {family}", ""]
    primary = next((c for c in found if c.role == "primary"), None)
    if primary is None:
        a, b = declared.primary
        return ["## Primary comparison", "", f"Declared: {a} - {b}; not yet measurable. {family}", ""]
    d = primary.d
    numbers = f"mean {d.mean:+.4f} nats/token over {d.n} seeds"
    if d.ci95 is not None:
        numbers += f", 95% t-interval [{d.ci95[0]:+.4f}, {d.ci95[1]:+.4f}], paired t-test p = {_pvalue(d.p_value)}"
        numbers += f", MDE {d.mde():.4f}"
    return [
        "## Primary comparison",
        "",
        f"Declared in the study config before the runs: **{primary.a} - {primary.b}** on held-out loss, tested "
        f"alone at 5%: {numbers}. Finding: {primary.finding.outcome.replace('_', ' ')}. {family}",
        "",
    ]


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


def _cost_rows(runs: dict[str, dict[int, RunRecord]], tokens_per_step: int, steps: int) -> list[tuple]:
    rows = []
    for name, seeds in runs.items():
        sessions = [s for run in seeds.values() for s in run.cost]
        complete = [run for run in seeds.values() if sum(s["end_step"] - s["start_step"] for s in run.cost) == steps]
        wall = sum(s["wall_s"] for s in sessions)
        trained = sum(s["end_step"] - s["start_step"] for s in sessions) * tokens_per_step
        per_run = [sum(s["wall_s"] for s in run.cost) for run in complete]
        evals = [sum(v for v in run.eval.wall_s.values() if v) for run in seeds.values()]
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


def _environments(runs: dict[str, dict[int, RunRecord]], current: dict[str, Any]) -> list[str]:
    """The environments training sessions recorded, and the one writing this report. Measurements stored
    in a run's ``eval/`` are reused by later reports (keyed on the weights and the settings), so they
    may come from an earlier commit than the report's."""
    keys = ("commit", "torch", "transformers", "python", "hardware")
    seen: dict[tuple, int] = {}
    unrecorded = 0
    for seeds in runs.values():
        for run in seeds.values():
            for session in run.cost:
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


def report_lines(results: StudyResults, budget: str, figures: Path, link: str = "") -> list[str]:
    """Every section of the report; plots are written into ``figures`` and linked as ``link + name``."""
    runs = results.finished_runs()
    opts = results.options
    lines: list[str] = []
    missing = results.missing
    if missing:
        lines += [
            f"**Incomplete: {len(missing)} run(s) of the plan are not finished** and are left out of every table "
            "below (re-run the same command to train them, then regenerate this report):",
            "",
            markdown_table(
                ("arm", "seed", "trained steps"),
                [(m.arm, m.seed, f"{m.step}/{opts['steps']}") for m in missing],
            ),
            "",
        ]
    if not runs:
        return [*lines, "No run has finished yet: nothing to report."]
    plot_losses(runs, figures / "loss.png")
    plot_expert_load({name: runs[name][min(runs[name])].eval.expert_load for name in runs}, figures / "expert_load.png")
    seeds = sorted({s for arm_seeds in runs.values() for s in arm_seeds})
    # a finished run has a held-out loss (the trainer evaluates at its last step)
    val: dict[str, list[float]] = {name: [runs[name][s].val_loss for s in sorted(runs[name])] for name in runs}  # type: ignore[misc]
    train = {name: [runs[name][s].train_loss for s in sorted(runs[name])] for name in runs}
    arms = {name: arm for name, arm in results.arms.items() if name in runs}
    pairs = comparisons(arms)
    per_seed = [(s, *(f"{runs[name][s].val_loss:.4f}" if s in runs[name] else "" for name in runs)) for s in seeds]
    text = results.text
    declared = Declared.from_options(opts)
    found = held_out_comparisons(runs, arms, declared)
    secondaries = sum(c.role == "secondary" for c in found)
    sentences = [f"- {sentence}" for sentence in verdict(runs, arms, text.name if text else None, options=opts)]
    lines += [
        budget,
        "",
        *_primary_section(found, declared),
        "## Verdict",
        "",
        "Generated from the paired differences by fixed rules (`loopmoe/compare/verdict.py`): a claim needs at "
        "least 3 seeds, a 95% interval that excludes 0 and every seed agreeing; the "
        f"{secondaries} secondary comparisons are Holm-corrected together (a claim among them also needs a Holm-"
        "adjusted p <= 0.05); single-seed differences are observations, read against the other arm's 95% "
        "prediction interval. Each sentence names the formulation it tested.",
        "",
        *sentences,
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
                "negative: the first arm is better). p: two-sided paired t-test; Holm p: adjusted over the "
                f"{secondaries} secondary comparisons (* rejected at a family-wise 5%); MDE: the true difference the "
                "paired t-test would detect with 80% power at 5%, given the observed spread:",
                "",
                held_out_table(found),
                "",
            ]
            if found
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
    lines += _diagnostics_section(runs, results.arms, results.run_configs, figures, link)
    lines += _text_section(runs, pairs, text)
    lines += _downstream_section(results.downstream)
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
        *_environments(runs, results.environment),
        "",
        "## Configurations",
        "",
        "<details><summary>The comparison's options and the full training config of every arm</summary>",
        "",
        "```json",
        json.dumps({"options": opts, "run_configs": results.run_configs}, indent=2, default=str),
        "```",
        "",
        "</details>",
    ]
    return lines


def _diagnostics_section(
    runs: dict[str, dict[int, RunRecord]],
    arms: dict[str, ArmRecord],
    run_configs: dict[str, Any],
    figures: Path,
    link: str,
) -> list[str]:
    """Per arm: dead experts per slot, clipped steps, the held-out gap against the reference per evaluation,
    and, for looped arms, the iteration cosine per core layer."""
    names = list(runs)
    lines = ["", "## Diagnostics", ""]
    rows = []
    for name, seeds in runs.items():
        clip = (run_configs.get(name) or {}).get("train", {}).get("grad_clip", 1.0)
        per_seed_dead, slots_text = [], []
        by_slot: dict[str, list[tuple[int, int]]] = {}
        for run in seeds.values():
            for slot, slot_counts in dead_experts(run.eval.expert_load).items():
                by_slot.setdefault(slot, []).append(slot_counts)
            per_seed_dead.append(sum(d for d, _ in dead_experts(run.eval.expert_load).values()))
        for slot, counts in by_slot.items():
            slots_text.append(f"{slot} {statistics.fmean(d for d, _ in counts):.1f}/{counts[0][1]}")
        total = sum(n for counts in by_slot.values() for _, n in counts[:1])
        clipped = [f for run in seeds.values() if (f := clipped_fraction(run.metrics, clip)) is not None]
        rows.append(
            (
                name,
                len(seeds),
                f"{statistics.fmean(per_seed_dead):.1f}/{total}" if per_seed_dead and total else "",
                "; ".join(slots_text),
                f"{statistics.fmean(clipped):.1%} (clip {clip:g})"
                if clipped
                else ("clipping off" if clip <= 0 else ""),
            )
        )
    lines += [
        f"Dead experts: load below {DEAD_BELOW:g} x the uniform share on the held-out batches, per executed "
        "(layer@iteration) slot, mean over seeds. Clipped steps: the share of optimizer steps whose gradient norm "
        "before clipping exceeded `train.grad_clip` (`metrics.jsonl`), mean over seeds.",
        "",
        markdown_table(("arm", "seeds", "dead experts (all slots)", "dead per slot", "clipped steps"), rows),
    ]
    reference = "reference" if "reference" in runs else None
    gaps = {
        f"{name} - {reference}": gap
        for name in runs
        if reference
        and name != reference
        and name in arms
        and arms[name].spec.kind == "looped"
        and (gap := held_out_gap(runs[name], runs[reference]))
    }
    if gaps:
        plot_gaps(gaps, figures / "gap.png", names)
        tokens = sorted({t for g in gaps.values() for t in g})
        lines += [
            "",
            "Held-out loss gap of every looped arm to the reference at each evaluation (mean over the seeds both "
            "ran; negative: the looped arm is ahead), against tokens seen:",
            "",
            markdown_table(
                ("difference", *(f"{t / 1e6:.2f}M" for t in tokens)),
                [
                    (label, *(f"{statistics.fmean(g[t]):+.4f}" if t in g else "" for t in tokens))
                    for label, g in gaps.items()
                ],
            ),
            "",
            f"![held-out gap]({link}gap.png)",
        ]
    cosines = {name: c for name, seeds in runs.items() if (c := mean_cosine(seeds))}
    if cosines:
        plot_cosines(cosines, figures / "cosine.png", names)
        width = max(len(v) for c in cosines.values() for v in c.values())
        lines += [
            "",
            "Cosine similarity of each core layer's output hidden state between adjacent iterations at the trained "
            "depth (held-out batches, mean over tokens and seeds); rising towards 1 means the core approaches a "
            "fixed point:",
            "",
            markdown_table(
                ("arm", "core layer", *(f"{k + 1}->{k + 2}" for k in range(width))),
                [
                    (name, layer, *(f"{v:.4f}" for v in values), *([""] * (width - len(values))))
                    for name, c in cosines.items()
                    for layer, values in c.items()
                ],
            ),
            "",
            f"![iteration cosine]({link}cosine.png)",
        ]
    return lines


def _text_section(
    runs: dict[str, dict[int, RunRecord]], pairs: list[tuple[str, str]], text: TextSource | None
) -> list[str]:
    if not text:
        return []
    scored = {n: {s: r.eval.text for s, r in seeds.items() if r.eval.text} for n, seeds in runs.items()}
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
        f"## {text.name} perplexity",
        "",
        f"`{Path(text.path).name}`, scored with a sliding window of {window['window']} tokens (the training "
        f"length) and stride {window['stride']}; the tokenizer is the study's own BPE, so perplexity compares "
        "arms with each other, not with published numbers (bits per byte is tokenizer-free).",
        "",
        markdown_table(("model", "seeds", "loss (nats/token)", "perplexity", "bits/byte", "tokens"), rows),
        *(
            [
                "",
                "Paired loss differences on this text:",
                "",
                paired_table({n: {s: v["loss"] for s, v in scored[n].items()} for n in scored}, have),
            ]
            if have
            else []
        ),
    ]


# Accuracy of guessing, for the shipped tasks' accuracy metrics (1 / choices; LAMBADA's exact next word: 0).
CHANCE = {
    "arc_challenge": 0.25,
    "arc_easy": 0.25,
    "boolq": 0.5,
    "copa": 0.5,
    "hellaswag": 0.25,
    "openbookqa": 0.25,
    "piqa": 0.5,
    "lambada_openai": 0.0,
}


def at_chance(row: dict[str, Any]) -> bool | None:
    """Whether a task score is within 1.96 standard errors of guessing (None: chance or stderr unknown)."""
    chance = CHANCE.get(row["task"]) if row["metric"] in ("acc", "acc_norm") else None
    if chance is None or row.get("stderr") is None:
        return None
    return bool(abs(row["value"] - chance) <= 1.96 * row["stderr"])


def _downstream_section(downstream: dict[str, list[dict[str, Any]]]) -> list[str]:
    if not downstream:
        return []
    scores = {name: {(r["task"], r["metric"]): r for r in rows} for name, rows in downstream.items()}
    keys = sorted({key for table in scores.values() for key in table})
    table_rows = []
    every_chance = 0
    for task, metric in keys:
        cells, chance_flags = [], []
        for table in scores.values():
            row = table.get((task, metric))
            if row is None:
                cells.append("")
                continue
            chance_flags.append(at_chance(row))
            err = "" if row["stderr"] is None else f" ± {_value(row['stderr'], row['value'])}"
            cells.append(f"{_value(row['value'])}{err}{'' if row['stderr_over'] == 'seeds' else ' †'}")
        n = next((t[(task, metric)]["n"] for t in scores.values() if (task, metric) in t), "")
        chance = CHANCE.get(task) if metric in ("acc", "acc_norm") else None
        if chance_flags and all(chance_flags):
            caveat = "every arm at chance: no signal"
            every_chance += 1
        elif any(flag is None for flag in chance_flags):
            caveat = ""
        else:
            caveat = f"{sum(bool(f) for f in chance_flags)}/{len(chance_flags)} arms at chance"
        table_rows.append((task, metric, *cells, n, "" if chance is None else f"{chance:g}", caveat))
    seeds = {name: max(r["seeds"] for r in rows) for name, rows in downstream.items()}
    return [
        "",
        "## Downstream (zero-shot, lm-evaluation-harness)",
        "",
        "Mean over each arm's seeds ± its standard error over those seeds; † one seed: ± is lm-eval's standard "
        "error over the documents. Seeds per arm: " + ", ".join(f"{n} {k}" for n, k in seeds.items()) + ".",
        "",
        markdown_table(("task", "metric", *scores, "documents", "chance", "at chance (±1.96 s.e.)"), table_rows),
        *(
            [
                "",
                f"At this size {every_chance} of {len(keys)} task metrics have every arm at chance: those rows "
                "cannot tell the arms apart, whatever their differences.",
            ]
            if every_chance
            else []
        ),
    ]


def _depth_section(runs: dict[str, dict[int, RunRecord]], figures: Path, link: str, seq_len: int) -> list[str]:
    points = depth_means(runs)
    trained = {name: next(iter(seeds.values())).eval.depth.trained_loops for name, seeds in runs.items()}
    exits = exit_means(runs)
    plot_loss_vs_flops(points, trained, figures / "loss_vs_flops.png", exits)
    looped = {n: p for n, p in points.items() if len(p) > 1}
    lines = [
        "",
        "## Test-time depth and executed compute",
        "",
        f"Held-out loss (the runs' validation batches, mean over seeds) at each loop count at inference, and the "
        f"forward FLOPs per token executed there (at S = {seq_len}, `loopmoe.budget`).",
    ]
    if looped:
        plot_depth_curves(looped, trained, figures / "depth.png", names=list(points), exits=exits)
        all_loops = sorted({t for p in looped.values() for t in p})
        rows = []
        for name, by_loops in looped.items():
            cells = []
            for t in all_loops:
                e = by_loops.get(t)
                mark = " *" if t == trained[name] else (" ‡" if e and e.untrained_iteration_vectors else "")
                cells.append("" if e is None else f"{e.loss:.4f}{mark}")
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
            for t, why in run.eval.depth.unrunnable.items()
        }
        lines += [f"- {name} cannot run at T = {t}: {why}" for (name, t), why in sorted(unrunnable.items())]
        lines += ["", f"![test-time depth]({link}depth.png)"]
    rows = [
        (name, t, human(e.flops_per_token), f"{e.loss:.4f}")
        for name, by_loops in points.items()
        for t, e in by_loops.items()
    ]
    return [
        *lines,
        "",
        markdown_table(("arm", "loops T", "FLOPs/token", "held-out loss"), rows),
        "",
        f"![loss vs executed FLOPs]({link}loss_vs_flops.png)",
        *_exit_section(exits, points, trained),
    ]


def _exit_section(
    exits: dict[str, list[ExitMean]],
    points: dict[str, dict[int, DepthMean]],
    trained: dict[str, int],
) -> list[str]:
    """The adaptive-depth sweep of every looped arm (``--exit-sweep``), against the same arm at full depth."""
    if not exits:
        return []
    rows = []
    for name, means in exits.items():
        full = points[name][trained[name]]
        for e in means:
            rows.append(
                (
                    name,
                    e.label,
                    len(e.losses),
                    f"{e.loss:.4f}",
                    f"{e.loss - full.loss:+.4f}",
                    f"{e.loops:.3f} of {trained[name]}",
                    human(e.flops),
                    f"{100 * e.fraction:.1f}%",
                )
            )
    return [
        "",
        "### Adaptive depth (early exit)",
        "",
        "Each looped arm with every token leaving the loop once its exit criterion falls below the threshold (the "
        "learned gate: reaches it) "
        "(`loopmoe.evaluation.early_exit`; criteria in docs/design.md §5), on the same held-out batches: its loss, "
        "the difference from the same arm at its trained depth (negative: better), the core iterations a token "
        "executed (mean over every position) and the forward FLOPs per token they imply (`loopmoe.budget`, the "
        "exit tests' LM head included), as a share of the trained depth's. Means over seeds; plotted as hollow "
        "squares in both figures above.",
        "",
        markdown_table(
            (
                "arm",
                "exit policy",
                "seeds",
                "held-out loss",
                "vs trained T",
                "iterations/token",
                "FLOPs/token",
                "of full",
            ),
            rows,
            align="llrrrrrr",
        ),
    ]


def _setup(results: StudyResults) -> list[str]:
    opts = results.options
    seeds = sorted({s for arm in results.arms.values() for s in arm.seeds})
    tokens = opts["steps"] * opts["micro_batch_size"] * opts["seq_len"]
    return [
        f"Reference `{opts['reference']}`, loops T = {opts['num_loops']}, strategy `{opts['strategy']}`; corpus "
        f"`{opts['source']}`; {opts['steps']} steps x {opts['micro_batch_size']} x {opts['seq_len']} tokens "
        f"= {tokens:,} tokens per model; seeds {seeds}. "
        "Every arm sees the same tokens in the same order with the same optimizer and schedule.",
        "",
        *(
            ["**Not evaluated:**", "", *(f"- {why}" for why in results.not_evaluated), ""]
            if results.not_evaluated
            else []
        ),
    ]


def write_report(out: Path, results: StudyResults, budget: str) -> Path:
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


RESULTS_TITLE = "# Results: does looping help at matched budgets?"  # the first line of every results page


def _first_line_is(path: Path, line: str) -> bool:
    """Whether ``path`` starts with ``line`` (reads only that much: the file may be anything of the user's)."""
    with open(path, "rb") as handle:
        return handle.read(len(line.encode()) + 1) == (line + "\n").encode()


def check_results_path(path: Path) -> None:
    """Refuse a ``--results`` path loopmoe may not write: an existing file that is not a results page it wrote
    (recognised by its first line), a folder, or a ``docs/study`` beside it that is not a folder."""
    if path.is_dir():
        raise ConfigError(f"--results {path} is a folder: give the path of the page to write, e.g. RESULTS.md")
    if path.exists() and not _first_line_is(path, RESULTS_TITLE):
        raise ConfigError(
            f"--results {path} exists and is not a results page loopmoe wrote: loopmoe never replaces a file "
            "of yours; choose another path"
        )
    figures = path.parent / "docs" / "study"
    if figures.exists() and not figures.is_dir():
        raise ConfigError(f"{figures} is not a folder: the results page puts its figures there; move it")


def write_results(path: Path, results: StudyResults, budget: str) -> Path:
    """Write the study's results page (RESULTS.md) at ``path``, its figures in ``docs/study/`` beside it."""
    check_results_path(path)
    figures = path.parent / "docs" / "study"
    figures.mkdir(parents=True, exist_ok=True)
    opts = results.options
    data = results.data
    planned = sum(len(arm.seeds) for arm in results.arms.values())
    missing = len(results.missing)
    split = (
        f"{data['train_tokens']:,} training and {data['val_tokens']:,} held-out tokens"
        if "train_tokens" in data
        else "token counts unavailable"
    )
    lines = [
        RESULTS_TITLE,
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
