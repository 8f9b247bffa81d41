"""``loopmoe eval``: perplexity, zero-shot tasks, looped-depth analysis and adaptive depth (early exit) of a
checkpoint directory."""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass
from pathlib import Path

from loopmoe.atomic import atomic_write_text
from loopmoe.cli.generate import check_device
from loopmoe.errors import ConfigError
from loopmoe.evaluation import harness, loading, report
from loopmoe.evaluation.custom_task import load_task_file
from loopmoe.evaluation.depth import analyse_depth, depth_curve, token_sequences
from loopmoe.evaluation.early_exit import exit_sweep, parse_policy, parse_sweep, resolve_policy
from loopmoe.evaluation.overlap import training_overlap
from loopmoe.evaluation.perplexity import read_heldout_tokens
from loopmoe.evaluation.pipeline import find_text, task_scores, text_scores
from loopmoe.evaluation.plots import plot_depth, plot_exit_sweep
from loopmoe.model.adaptive import CRITERIA, ExitPolicy
from loopmoe.options import add_options, option
from loopmoe.paths import shared_data_dir

DEPTH = "looped-depth analysis (LoopMoE only)"
ADAPTIVE = "adaptive depth (looped LoopMoE only)"


@dataclass
class EvalOptions:
    """The options of ``loopmoe eval``."""

    model_dir: Path = option(help="checkpoint directory (config.json + weights)", positional=True)
    tasks: tuple[str, ...] = option(
        (),
        help="comma-separated shipped tasks, 'all' (see --list-tasks), or lm-eval tasks whose data is cached locally",
    )
    task_file: list[Path] = option(
        default_factory=list,
        help="YAML describing a JSONL multiple-choice task (jsonl, prompt, choices, gold); repeatable",
    )
    list_tasks: bool = option(False, help="print the shipped task names and exit")
    text: list[str] = option(
        default_factory=list,
        help="held-out text file or prepared shard folder (val split) for perplexity/bits-per-byte; "
        "relative paths not found here are looked up in the data dir; repeatable",
    )
    window: int | None = option(None, help="perplexity window in tokens", shown="the model's context")
    stride: int | None = option(None, help="perplexity window stride", shown="window/2")
    max_tokens: int | None = option(None, help="score at most this many tokens per --text", shown="all")
    data_dir: Path | None = option(
        None, help="folder with the benchmark files", shown="$LOOPMOE_DATA_DIR, else the shared data dir"
    )
    limit: int | None = option(None, help="evaluate only the first N documents of each task", shown="all")
    batch_size: str = option(
        "8",
        help="sequences per forward pass; 'auto' or 'auto:N': the largest that fits, found by lm-eval (tasks)",
        metavar="N|auto",
    )
    num_fewshot: int = option(0, help="examples from the task's own data placed before each question (tasks)")
    log_samples: bool = option(
        False, help="write every scored document and the model's answers to OUTPUT.samples.TASK.jsonl (needs --output)"
    )
    num_loops: int | None = option(
        None, help="loops of the core at inference (LoopMoE only)", shown="the trained num_loops"
    )
    device: str = option("cpu", help="torch device, e.g. cpu or cuda:0")
    tokenizer: Path | None = option(
        None, help="tokenizer.json or tokenizer dir, when MODEL_DIR has no tokenizer saved", shown="MODEL_DIR's"
    )
    output: Path | None = option(None, help="write the full results JSON here")
    depth_analysis: bool = option(
        False,
        help="loss, logit lens and routing divergence vs loops run at inference, on the first --text",
        group=DEPTH,
    )
    loops: tuple[int, ...] = option((1, 2, 4, 8), help="comma-separated loop counts to compare", group=DEPTH)
    output_dir: Path | None = option(None, help="where depth.json and the plots go", group=DEPTH)
    seq_len: int = option(256, help="sequence length of the held-out rows", group=DEPTH)
    sequences: int = option(16, help="number of held-out rows", group=DEPTH)
    exit: str | None = option(
        None,
        help="score --text and the tasks with each token leaving the loop once CRITERION falls below THRESHOLD "
        f"(gate: reaches it; {', '.join(CRITERIA)}; e.g. latent:0.03), and report the core iterations and FLOPs "
        "per token it executed",
        metavar="CRITERION:THRESHOLD",
        group=ADAPTIVE,
    )
    min_loops: int = option(
        1, help="with --exit / --exit-sweep: iterations every token runs before it may exit", group=ADAPTIVE
    )
    max_loops: int | None = option(
        None,
        help="with --exit / --exit-sweep: iterations at most (may exceed the trained num_loops)",
        shown="--num-loops, else the trained num_loops",
        group=ADAPTIVE,
    )
    exit_sweep: tuple[str, ...] = option(
        (),
        help="comma-separated exit policies, a bare threshold taking the criterion before it (e.g. "
        "latent:0.3,0.1,0.03,0.01): held-out loss against core iterations and FLOPs per token on the first --text's "
        "rows (--seq-len x --sequences), beside the fixed-depth curve at --loops; writes exit_sweep.json and "
        "loss_vs_compute.png to --output-dir",
        group=ADAPTIVE,
    )


def add_parser(sub) -> None:
    p = sub.add_parser(
        "eval",
        help="evaluate a checkpoint: held-out perplexity, zero-shot tasks, looped-depth analysis",
        description="Evaluate MODEL_DIR (a LoopMoE checkpoint or any transformers causal-LM directory) offline. "
        "Tasks run through lm-evaluation-harness on local copies of the benchmarks in the data dir. "
        "Prints markdown tables; --output writes the full results as JSON.",
    )
    add_options(p, EvalOptions)
    p.set_defaults(run=run)


def run(args) -> int:
    if args.list_tasks:
        print("\n".join(harness.SHIPPED_TASKS))
        return 0
    data_dir = args.data_dir or shared_data_dir()
    tasks = harness.resolve_tasks(list(args.tasks))
    if not (tasks or args.task_file or args.text or args.depth_analysis or args.exit_sweep):
        raise ConfigError(
            "nothing to evaluate: pass --tasks, --task-file, --text, or --depth-analysis / --exit-sweep with --text"
        )
    if args.depth_analysis and (not args.text or args.output_dir is None):
        raise ConfigError("--depth-analysis needs held-out text (--text) and --output-dir")
    policy, sweep = _exit_policies(args)
    if args.log_samples and args.output is None:
        raise ConfigError("--log-samples writes beside the results: pass --output FILE.json")
    batch_size = _batch_size(args.batch_size, tasks_only=not (args.text or args.depth_analysis))
    texts = [find_text(t, data_dir) for t in args.text]
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    harness.check_task_files(tasks, data_dir)  # fail fast, before loading the model
    task_configs = [load_task_file(p, data_dir) for p in args.task_file]
    requested: list[str | dict] = [*tasks, *task_configs]  # task names, then task-file configs
    manager = harness.task_manager(data_dir, requested) if requested else None  # unknown names fail here

    check_device(args.device)  # before the model loads: a device this machine lacks, in one line
    model = loading.load_model(args.model_dir, device=args.device)
    # Every exit policy checked against the model (a LoopMoE that loops) before anything is scored.
    policy = resolve_policy(model, policy) if policy is not None else None
    for each in sweep:
        resolve_policy(model, each)
    tokenizer = loading.load_hf_tokenizer(args.model_dir, args.tokenizer)
    results: dict = {
        "model_dir": str(args.model_dir),
        "num_loops": args.num_loops,
        "data_dir": None if data_dir is None else str(data_dir),
    }
    # Under an exit policy its max_loops is the depth (--max-loops, else --num-loops, else the trained T).
    num_loops = None if policy is not None else args.num_loops
    if policy is not None:
        results["exit"] = asdict(policy)
    if texts and not args.depth_analysis:
        results["perplexity"] = text_scores(
            model,
            tokenizer,
            texts,
            window=args.window,
            stride=args.stride,
            batch_size=int(args.batch_size),
            max_tokens=args.max_tokens,
            num_loops=num_loops,
            exit_policy=policy,
        )
        print(report.perplexity_table(results["perplexity"]))
        if policy is not None:
            print(report.exit_table(results["perplexity"], model.config.num_loops))
    if sweep:
        results["exit_sweep"] = _exit_sweep(model, tokenizer, texts[0], sweep, args)
    if args.depth_analysis:
        results["depth"] = _depth(model, tokenizer, texts[0], requested, data_dir, args, manager)
        print(report.depth_table(results["depth"]))
    elif tasks or task_configs:
        lm = harness.wrap_model(model, tokenizer, batch_size=batch_size, device=args.device)
        results["tasks"], raw = task_scores(
            model,
            lm,
            requested,
            data_dir,
            num_loops=num_loops,
            limit=args.limit,
            num_fewshot=args.num_fewshot,
            log_samples=args.log_samples,
            manager=manager,
            exit_policy=policy,
        )
        results["lm_eval"] = {k: raw[k] for k in ("results", "n-samples", "versions") if k in raw}
        print(report.task_table(results["tasks"]))
        if args.log_samples:
            for task, samples in raw.get("samples", {}).items():
                lines = "".join(json.dumps(s, default=str) + "\n" for s in samples)
                atomic_write_text(args.output.with_name(f"{args.output.stem}.samples.{task}.jsonl"), lines)
    if args.output is not None:
        args.output.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_text(args.output, json.dumps(results, indent=2, default=str))
    return 0


def _batch_size(text: str, *, tasks_only: bool) -> int | str:
    """``--batch-size``: a positive integer, or lm-eval's ``auto`` / ``auto:N`` (tasks only)."""
    if text.isdigit() and int(text) > 0:
        return int(text)
    if text == "auto" or (text.startswith("auto:") and text[5:].isdigit()):
        if not tasks_only:
            raise ConfigError(f"--batch-size {text} applies to lm-eval tasks only; give a number with --text")
        return text
    raise ConfigError(f"--batch-size must be a positive integer, 'auto' or 'auto:N', got {text!r}")


def _exit_policies(args) -> tuple[ExitPolicy | None, list[ExitPolicy]]:
    """``--exit``'s policy and ``--exit-sweep``'s, bounded by --min-loops / --max-loops (checked without a model)."""
    max_loops = args.max_loops or args.num_loops
    sweep = parse_sweep(args.exit_sweep, min_loops=args.min_loops, max_loops=max_loops)
    if sweep and (not args.text or args.output_dir is None):
        raise ConfigError("--exit-sweep needs held-out text (--text) and --output-dir")
    if args.exit is None:
        if not sweep and (args.min_loops != 1 or args.max_loops is not None):
            raise ConfigError(
                "--min-loops and --max-loops bound an adaptive depth: give --exit CRITERION:THRESHOLD or --exit-sweep"
            )
        return None, sweep
    if args.depth_analysis:
        raise ConfigError(
            "--exit scores --text and the tasks under one exit policy, --depth-analysis at fixed loop counts: give "
            "one of them (--exit-sweep puts exit policies beside the fixed-depth curve)"
        )
    return parse_policy(args.exit, min_loops=args.min_loops, max_loops=max_loops), sweep


def _sequences(text: Path, tokenizer, args):
    """The held-out rows of the depth analysis and the exit sweep: ``--sequences`` rows of ``--seq-len`` tokens."""
    ids, _ = read_heldout_tokens(text, tokenizer, args.seq_len * args.sequences)
    return token_sequences(ids, args.seq_len, args.sequences)


def _exit_sweep(model, tokenizer, text: Path, policies: list[ExitPolicy], args) -> dict:
    """The fixed-depth curve at ``--loops`` and the exit sweep on the same rows: printed, plotted, and written
    to ``--output-dir/exit_sweep.json``."""
    batches = list(_sequences(text, tokenizer, args).split(int(args.batch_size)))
    curve = depth_curve(model, batches, args.loops, args.seq_len)
    points = exit_sweep(model, batches, policies, args.seq_len)
    print(report.exit_sweep_table(curve, points))
    record = {
        "text": str(text),
        "seq_len": args.seq_len,
        "sequences": sum(len(b) for b in batches),
        "depth": curve.to_dict(),
        "points": [p.to_dict() for p in points],
        "plot": str(plot_exit_sweep(curve, points, args.output_dir)),
    }
    atomic_write_text(args.output_dir / "exit_sweep.json", json.dumps(record, indent=2))
    return record


def _depth(model, tokenizer, text: Path, tasks: list, data_dir: Path | None, args, manager) -> dict:
    loading.require_looped(model, "depth analysis")
    loops = list(args.loops)
    sequences = _sequences(text, tokenizer, args)
    overlap = training_overlap(args.model_dir, sequences.numpy(), len(tokenizer))
    analysis = analyse_depth(model, sequences, loops, batch_size=int(args.batch_size), training_overlap=overlap)
    analysis["text"] = str(text)
    if tasks:
        lm = harness.wrap_model(model, tokenizer, batch_size=int(args.batch_size), device=args.device)
        analysis["tasks"] = {}
        for t in loops:
            analysis["tasks"][str(t)], _ = task_scores(
                model, lm, tasks, data_dir, num_loops=t, limit=args.limit, num_fewshot=args.num_fewshot, manager=manager
            )
    analysis["plots"] = [str(p) for p in plot_depth(analysis, args.output_dir)]
    atomic_write_text(args.output_dir / "depth.json", json.dumps(analysis, indent=2))
    return analysis
