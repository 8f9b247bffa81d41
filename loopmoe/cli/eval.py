"""``loopmoe eval``: perplexity, zero-shot tasks and looped-depth analysis of a checkpoint directory."""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

from loopmoe.atomic import atomic_write_text
from loopmoe.cli.generate import check_device
from loopmoe.errors import ConfigError
from loopmoe.evaluation import harness, loading, report
from loopmoe.evaluation.custom_task import load_task_file
from loopmoe.evaluation.depth import analyse_depth, token_sequences
from loopmoe.evaluation.overlap import training_overlap
from loopmoe.evaluation.perplexity import read_heldout_tokens
from loopmoe.evaluation.pipeline import find_text, task_scores, text_scores
from loopmoe.evaluation.plots import plot_depth
from loopmoe.options import add_options, option
from loopmoe.paths import shared_data_dir

DEPTH = "looped-depth analysis (LoopMoE only)"


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
    if not (tasks or args.task_file or args.text or args.depth_analysis):
        raise ConfigError("nothing to evaluate: pass --tasks, --task-file, --text, or --depth-analysis with --text")
    if args.depth_analysis and (not args.text or args.output_dir is None):
        raise ConfigError("--depth-analysis needs held-out text (--text) and --output-dir")
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
    tokenizer = loading.load_hf_tokenizer(args.model_dir, args.tokenizer)
    results: dict = {
        "model_dir": str(args.model_dir),
        "num_loops": args.num_loops,
        "data_dir": None if data_dir is None else str(data_dir),
    }
    if texts and not args.depth_analysis:
        results["perplexity"] = text_scores(
            model,
            tokenizer,
            texts,
            window=args.window,
            stride=args.stride,
            batch_size=int(args.batch_size),
            max_tokens=args.max_tokens,
            num_loops=args.num_loops,
        )
        print(report.perplexity_table(results["perplexity"]))
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
            num_loops=args.num_loops,
            limit=args.limit,
            num_fewshot=args.num_fewshot,
            log_samples=args.log_samples,
            manager=manager,
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


def _depth(model, tokenizer, text: Path, tasks: list, data_dir: Path | None, args, manager) -> dict:
    loading.require_looped(model, "depth analysis")
    loops = list(args.loops)
    ids, _ = read_heldout_tokens(text, tokenizer, args.seq_len * args.sequences)
    sequences = token_sequences(ids, args.seq_len, args.sequences)
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
