"""The controlled comparison (docs/design.md §8): a reference Vanilla MoE against its balanced LoopMoE.

Every arm (``loopmoe.compare.arms``: the reference, its balanced LoopMoE, the granularity control,
and ablations) is trained with one code path and identical conditions: the same tokenizer and
shards (built once), the same data order (the loader is seeded by the run seed), optimizer,
schedule, batch, sequence length and number of tokens. Only the model differs. Several seeds
give paired differences; every run is an ordinary ``run_training`` run directory
(``OUT/seed{s}/{arm}``), so an interrupted comparison resumes where it stopped when the same
command is run again, and finished runs are skipped.
"""

from __future__ import annotations

import json
import tomllib
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, cast, get_type_hints

import torch

from loopmoe.atomic import atomic_write_text
from loopmoe.balance import STRATEGIES, Strategy
from loopmoe.compare.arms import BUILTIN_ARMS, Arm, ArmSpec, arm_spec_from_table, check_arm_name, resolve_arms
from loopmoe.compare.cost import environment, read_cost, recorded_session
from loopmoe.compare.evaluate import DEFAULT_TEXT, DEPTH_LOOPS
from loopmoe.config import ExpertTypeName, LoopMoEConfig
from loopmoe.options import flag_of, help_of, option
from loopmoe.training.config import (
    DataSection,
    ModelSection,
    OptimSection,
    RunConfig,
    ScheduleKind,
    ScheduleSection,
    TrainSection,
)

OPTIONS_FILE = "options.json"
# Options that only choose what is evaluated, where, or how fast: changing them never makes the trained runs stale.
_NOT_IDENTITY = (
    "out",
    "fresh",
    "tasks",
    "task_limit",
    "threads",
    "text",
    "text_tokens",
    "depth_loops",
    "report_only",
    "results",
)


@dataclass
class CompareOptions:
    """Everything that defines a comparison; the defaults finish in about 10 minutes on 2 CPU cores."""

    reference: str = option("small", help="reference Vanilla MoE: preset name, model config file or checkpoint dir")
    num_loops: int = option(2, help="loop count T of the LoopMoE")
    strategy: Strategy = option(
        "capacity", help="capacity (match params, FLOPs and ratio) or naive (same shapes, more experts)"
    )
    prelude: int = option(0, help="prelude layers of the LoopMoE")
    coda: int = option(0, help="coda layers of the LoopMoE")
    expert_type: ExpertTypeName | None = option(
        None,
        help="expert type of the balanced model: swiglu, or dcca (BigMac's low-dimension experts); with "
        "--num-loops 1 this compares two expert types in Vanilla MoEs",
        shown="the reference's",
    )
    dcca_dim: int | None = option(
        None, help="width of the balanced model's DCCA experts", shown="the reference's, else hidden_size // 4"
    )
    source: str = option("embedded", help=help_of(DataSection, "source"))
    tokenizer: str | None = option(None, help=help_of(DataSection, "tokenizer"), shown="a BPE trained on the source")
    bpe_vocab: int = option(4096, help="vocabulary of the trained BPE")
    seq_len: int = option(256, help=help_of(DataSection, "seq_len"))
    micro_batch_size: int = option(16, help="sequences per batch", flag="--batch-size")
    steps: int = option(300, help="optimizer steps per model")
    tokens: int | None = option(
        None, help="training tokens per model (sets --steps from batch size and sequence length)"
    )
    lr: float = option(3e-3, help=help_of(OptimSection, "lr"))
    warmup_steps: int = option(30, help=help_of(ScheduleSection, "warmup_steps"))
    schedule: ScheduleKind = option("cosine", help=help_of(ScheduleSection, "kind"))
    seeds: tuple[int, ...] = option((0,), help="comma-separated seeds (mean and spread)")
    arms: tuple[str, ...] = option(
        ("reference", "looped"),
        help="comma-separated arms to train: reference, looped, granularity (a Vanilla MoE with the looped "
        "model's expert size and top-k at the reference's total parameters), or arms defined in the --config file",
    )
    arm: dict[str, ArmSpec] = option(
        default_factory=dict, help="arms defined by [arm.NAME] tables of a study config", cli=False
    )
    eval_every: int = option(50, help=help_of(TrainSection, "eval_every"))
    eval_batches: int = option(16, help=help_of(TrainSection, "eval_batches"))
    tasks: tuple[str, ...] = option(
        ("auto",),
        help="comma-separated downstream tasks (see `loopmoe eval --list-tasks`); 'auto': every task whose "
        "data is present; '' for none",
    )
    task_limit: int | None = option(100, help="documents per task (none: all)")
    text: str = option(
        "auto",
        help="held-out text whose perplexity every run reports (a file, or a path under the data folder); "
        f"'auto': {DEFAULT_TEXT} if the data folder has it; '' for none",
    )
    text_tokens: int | None = option(None, help="score only the first N tokens of --text (none: all)")
    depth_loops: tuple[int, ...] = option(
        DEPTH_LOOPS, help="comma-separated loop counts of the test-time depth curve of every looped arm; '' for none"
    )
    report_only: bool = option(
        False,
        help="train nothing: evaluate the finished runs and write the report, listing the runs still missing "
        "(safe while the comparison trains in another process)",
    )
    results: Path | None = option(
        None,
        help="also write the study's results page here (e.g. RESULTS.md), its figures in docs/study/ beside it",
    )
    out: Path = option(default_factory=lambda: Path("runs/compare"), help="run folder")
    fresh: bool = option(
        False,
        help="start anew in --out even if it holds a comparison with other options: the old folder is "
        "moved aside to OUT.prev-N (never deleted)",
    )
    threads: int | None = option(
        None,
        help="CPU threads torch uses (torch.set_num_threads), to share the machine; a run's numbers do not "
        "depend on it beyond floating-point reduction order",
        shown="torch's default (OMP_NUM_THREADS, else all cores)",
    )

    @classmethod
    def from_toml(cls, path: Path) -> CompareOptions:
        """The options of a study config: top-level keys are these fields, ``[arm.NAME]`` tables define arms."""
        from loopmoe.training.config import coerce_value, unknown_key_hint

        if not path.is_file():
            raise ValueError(f"study config {path} not found; pass an existing .toml (see configs/study/eltec.toml)")
        try:
            raw = tomllib.loads(path.read_text())
        except tomllib.TOMLDecodeError as error:
            raise ValueError(f"{path} is not valid TOML: {error}") from None
        hints = get_type_hints(cls)
        kwargs: dict[str, Any] = {}
        for key, value in raw.items():
            if key == "arm":
                if not isinstance(value, dict):
                    raise ValueError(f"{path}: 'arm' must hold [arm.NAME] tables, got {value!r}")
                kwargs["arm"] = {name: arm_spec_from_table(name, table) for name, table in value.items()}
            elif key in hints:
                kwargs[key] = coerce_value(key, value, hints[key])
            else:
                raise ValueError(f"{path}: unknown key '{key}'" + unknown_key_hint(key, list(hints)))
        return cls(**kwargs)

    def arm_spec(self, name: str) -> ArmSpec:
        """The spec of arm ``name``: a built-in kind, or an ``[arm.NAME]`` of the study config."""
        if name in self.arm:
            return self.arm[name]
        if name in BUILTIN_ARMS:
            return BUILTIN_ARMS[name]
        defined = sorted({*BUILTIN_ARMS, *self.arm})
        raise ValueError(
            f"{flag_of(CompareOptions, 'arms')}: unknown arm {name!r}; choose from {', '.join(defined)}, "
            "or define it in an [arm.NAME] table of a --config file"
        )

    def validate(self) -> CompareOptions:
        def flag(name: str) -> str:
            return flag_of(CompareOptions, name)

        if self.tokens is not None:
            if self.tokens < self.micro_batch_size * self.seq_len:
                raise ValueError(
                    f"{flag('tokens')} ({self.tokens}) is less than one batch "
                    f"({self.micro_batch_size} x {self.seq_len}); raise it"
                )
            self.steps = -(-self.tokens // (self.micro_batch_size * self.seq_len))
        if self.strategy not in STRATEGIES:
            raise ValueError(f"{flag('strategy')} must be one of {STRATEGIES}, got {self.strategy!r}")
        for name in ("num_loops", "seq_len", "micro_batch_size", "steps", "eval_every", "bpe_vocab"):
            if getattr(self, name) < 1:
                raise ValueError(f"{flag(name)} must be >= 1, got {getattr(self, name)}")
        if self.warmup_steps >= self.steps:
            raise ValueError(
                f"{flag('warmup_steps')} ({self.warmup_steps}) must be below {flag('steps')} ({self.steps})"
            )
        if not self.seeds:
            raise ValueError(f"{flag('seeds')} needs at least one seed, e.g. {flag('seeds')} 0,1,2")
        if not self.arms:
            raise ValueError(f"{flag('arms')} needs at least one arm, e.g. {flag('arms')} reference,looped")
        if len(set(self.arms)) != len(self.arms):
            raise ValueError(f"{flag('arms')} names an arm twice: {','.join(self.arms)}")
        for name, spec in self.arm.items():
            check_arm_name(name)
            spec.validate(name)
        for name in self.arms:
            self.arm_spec(name)
        if any(t < 1 for t in self.depth_loops):
            raise ValueError(f"{flag('depth_loops')} must be positive loop counts, got {self.depth_loops}")
        if self.text_tokens is not None and self.text_tokens < 2:
            raise ValueError(f"{flag('text_tokens')} must be >= 2, got {self.text_tokens}")
        if self.report_only and self.fresh:
            raise ValueError(
                f"{flag('report_only')} reports the comparison in --out; {flag('fresh')} would move it aside: drop one"
            )
        if self.threads is not None and self.threads < 1:
            raise ValueError(f"{flag('threads')} must be >= 1, got {self.threads}")
        return self

    def run_plan(self) -> list[tuple[int, str]]:
        """(seed, arm) of every run, in training order: seed by seed through the arms that use
        ``--seeds`` (so the paired comparison fills in first), then the arms with seeds of their own."""
        shared = [(s, a) for s in self.seeds for a in self.arms if self.arm_spec(a).seeds is None]
        own = [(s, a) for a in self.arms for s in (self.arm_spec(a).seeds or ())]
        return shared + own

    @property
    def tokens_per_model(self) -> int:
        return self.steps * self.micro_batch_size * self.seq_len


def run_config_for(opts: CompareOptions, model: LoopMoEConfig, seed: int) -> RunConfig:
    """The RunConfig of one side of the comparison: identical for both models but for ``model``."""
    return RunConfig(
        model=ModelSection.of(model),
        data=DataSection(
            source=opts.source,
            tokenizer=opts.tokenizer or None,
            train_bpe_vocab=None if opts.tokenizer else opts.bpe_vocab,
            val_fraction=0.05,
            seq_len=opts.seq_len,
            data_dir=str(opts.out / "data"),
        ),
        optim=OptimSection(lr=opts.lr),
        schedule=ScheduleSection(kind=opts.schedule, warmup_steps=opts.warmup_steps),
        train=TrainSection(
            max_steps=opts.steps,
            micro_batch_size=opts.micro_batch_size,
            grad_accum=1,
            seed=seed,
            eval_every=opts.eval_every,
            eval_batches=opts.eval_batches,
            checkpoint_every=max(1, opts.steps // 4),
            keep_last=1,
            log_every=8,
        ),
    ).validate(1)


def prepare(opts: CompareOptions) -> tuple[dict[str, Arm], Any]:
    """Build the tokenizer and shards once, then build every arm at that vocabulary."""
    from loopmoe.presets import load_model_config
    from loopmoe.training.builders import default_data_factory

    probe = run_config_for(opts, load_model_config(opts.reference), opts.seeds[0])
    _check_trained_data(opts, probe)
    bundle = default_data_factory(probe, 0, 1)
    reference = load_model_config(opts.reference, vocab_size=bundle.vocab_size)
    return resolve_arms(opts, reference), bundle


def _check_trained_data(opts: CompareOptions, probe: RunConfig) -> None:
    """Before the shared data is (re)built: refuse if runs in OUT were trained on other data (corpus changed)."""
    from loopmoe.training.builders import DataChangedError, check_resume_data
    from loopmoe.training.checkpoint import peek_latest_meta

    for run_dir in sorted(opts.out.glob("seed*/*")):
        peeked = peek_latest_meta(run_dir / "checkpoints")
        meta = peeked[1] if peeked is not None else None
        if not meta or not meta.get("data"):
            continue
        try:
            check_resume_data(probe, meta["data"], rebuild=False, step=meta["step"])
        except DataChangedError as error:
            raise ValueError(
                f"{run_dir} was trained on other data than --source {opts.source!r} gives now ({error.why}); "
                "nothing was changed: restore the corpus, choose another --out, or pass --fresh to move the old "
                "comparison aside"
            ) from None
        return  # all runs share one data folder: checking one is enough


def identity_options(opts: CompareOptions) -> dict[str, Any]:
    """The options that determine the trained runs, as JSON values (``--tokens`` is resolved into steps)."""
    raw = {k: v for k, v in asdict(opts).items() if k not in _NOT_IDENTITY}
    return cast(dict[str, Any], json.loads(json.dumps(raw, default=str)))


def claim_out_dir(opts: CompareOptions, log=print) -> None:
    """Make ``opts.out`` this comparison's folder, or refuse if it holds one run with other options.

    OUT/options.json (written atomically before anything trains) records the options of the runs in
    it. Re-running with the same options resumes; with others it is refused, naming the differences,
    unless ``opts.fresh``, which moves the old folder aside to OUT.prev-N. With ``opts.report_only``
    the folder must already hold this comparison, and nothing is written.
    """
    out = opts.out
    wanted = identity_options(opts)
    saved = _saved_options(out)
    if saved is not None:  # options added since the folder was claimed: the runs in it used their defaults
        saved = {**identity_options(CompareOptions()), **saved}
    holds_runs = out.is_dir() and any(out.glob("seed*"))
    if opts.report_only and saved is None:
        raise ValueError(
            f"--report-only: {out} holds no comparison (no {OPTIONS_FILE}); run the command without --report-only "
            "to train it, or point --out at the comparison's folder"
        )
    if (saved is not None and saved != wanted) or (saved is None and holds_runs):
        if not opts.fresh or opts.report_only:
            if saved is None:
                what = "runs whose options are not recorded (no options.json)"
            else:
                keys = sorted(set(saved) | set(wanted))
                what = "other options: " + ", ".join(
                    f"{flag_of(CompareOptions, k)} {saved.get(k)!r} -> {wanted.get(k)!r}"
                    for k in keys
                    if saved.get(k) != wanted.get(k)
                )
            raise ValueError(
                f"{out} holds a comparison trained with {what}; re-running would mix old and new runs. Re-run "
                "with the old options to resume it, choose another --out, or pass --fresh to move the old "
                "folder aside and start anew"
            )
        n = 1
        while (aside := out.with_name(f"{out.name}.prev-{n}")).exists():
            n += 1
        out.rename(aside)
        log(f"moved the previous comparison in {out} aside to {aside}")
    if opts.report_only:  # the folder is the comparison's already: it only reads it
        return
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_text(out / OPTIONS_FILE, json.dumps(wanted, indent=2, sort_keys=True))


def _saved_options(out: Path) -> dict[str, Any] | None:
    try:
        return cast(dict[str, Any], json.loads((out / OPTIONS_FILE).read_text()))
    except FileNotFoundError:
        pass
    except ValueError as error:
        raise ValueError(f"{out / OPTIONS_FILE} is unreadable ({error}): pass --fresh to start anew") from error
    try:  # a comparison finished before options.json existed: its results record the options
        options = json.loads((out / "results.json").read_text())["options"]
    except (OSError, ValueError, KeyError, TypeError):
        return None
    return {k: v for k, v in options.items() if k not in _NOT_IDENTITY}


def run_comparison(opts: CompareOptions, log=print) -> dict[str, Any]:
    """Train every arm for every seed, evaluate them, and write the report. Returns results.json's content.

    Runs go in ``opts.run_plan()`` order; a finished run (its last checkpoint at ``--steps`` and its
    final export present) is not touched again, an interrupted one resumes from its last checkpoint.
    With ``opts.report_only`` nothing is trained and the runs not finished are listed as missing.
    Every finished run is then evaluated (``loopmoe.compare.evaluate``: stored in its ``eval/`` folder,
    reused when already there).
    """
    from loopmoe.compare.evaluate import evaluate_run, resolve_text
    from loopmoe.compare.report import arms_table, budget_table, write_report
    from loopmoe.compare.stats import downstream_over_seeds

    opts.validate()
    if opts.threads is not None:
        torch.set_num_threads(opts.threads)
    claim_out_dir(opts, log)
    text = resolve_text(opts.text)
    tasks = _tasks(opts, log)
    arms, bundle = prepare(opts)
    main = next((arm.balanced for arm in arms.values() if arm.balanced is not None), None)
    table = budget_table(main, title=f"{opts.reference}") if main is not None else ""
    if set(arms) != {"reference", "looped"}:
        table = "\n\n".join(t for t in (table, arms_table(arms, opts.seq_len)) if t)
    log(table)
    runs: dict[str, dict[int, dict[str, Any]]] = {name: {} for name in arms}
    missing: list[dict[str, Any]] = []
    plan = opts.run_plan()
    for i, (seed, name) in enumerate(plan, 1):
        run_dir = opts.out / f"seed{seed}" / name
        if is_finished(run_dir, opts.steps):
            log(f"[{i}/{len(plan)}] {name} (seed {seed}): finished earlier, skipped ({run_dir})")
        elif opts.report_only:
            missing.append({"arm": name, "seed": seed, "step": _latest_step(run_dir)})
            log(f"[{i}/{len(plan)}] {name} (seed {seed}): not finished (step {missing[-1]['step']}), not reported")
            continue
        else:
            log(f"\n[{i}/{len(plan)}] == training {name} (seed {seed}, {opts.tokens_per_model:,} tokens) -> {run_dir}")
            from loopmoe.training import run_training

            with recorded_session(run_dir, _latest_step(run_dir), opts.steps):
                run_training(run_config_for(opts, arms[name].config, seed), run_dir)
        record = runs[name][seed] = run_record(run_dir)
        record["eval"] = evaluate_run(
            run_dir,
            val_batches=bundle.val_batches,
            seq_len=opts.seq_len,
            depth_loops=opts.depth_loops,
            text=text,
            text_tokens=opts.text_tokens,
            tasks=tasks,
            task_limit=opts.task_limit,
            log=log,
        )
        log(f"   {name}: final train loss {record['train_loss']:.4f}, held-out loss {record['val_loss']:.4f}")
    reference_budget = arms[opts.arms[0]].budget if "reference" not in arms else arms["reference"].budget
    results = {
        "options": {k: (str(v) if isinstance(v, Path) else v) for k, v in asdict(opts).items()},
        "budget": main.as_dict() if main is not None else None,
        "arms": {name: arm.as_dict(reference_budget) for name, arm in arms.items()},
        "runs": runs,
        "missing": missing,
        "downstream": {
            name: rows
            for name, seeds in runs.items()
            if (rows := downstream_over_seeds({s: r["eval"]["tasks"] for s, r in seeds.items()}))
        },
        "text": None if text is None else {"path": str(text), "name": _text_name(opts.text, text)},
        "data": _data_summary(opts),
        "run_configs": {name: run_config_for(opts, arm.config, arm.seeds[0]).to_dict() for name, arm in arms.items()},
        "environment": environment(),
    }
    write_report(opts.out, results, table)
    atomic_write_text(opts.out / "results.json", json.dumps(results, indent=2, default=str))
    log(f"\nreport: {opts.out / 'report.md'}")
    if opts.results is not None:
        from loopmoe.compare.report import write_results

        log(f"results page: {write_results(opts.results, results, table)}")
    return results


def _latest_step(run_dir: Path) -> int:
    """The step of the run's last checkpoint (0 if it has none)."""
    from loopmoe.training.checkpoint import peek_latest_meta

    peeked = peek_latest_meta(run_dir / "checkpoints")
    return int(peeked[1].get("step", 0)) if peeked else 0


def _text_name(option: str, path: Path) -> str:
    from loopmoe.compare.evaluate import DEFAULT_TEXT_NAME

    return DEFAULT_TEXT_NAME if option == "auto" else path.name


def _data_summary(opts: CompareOptions) -> dict[str, Any]:
    """The shared data of the comparison: tokens in each split, from its prepared shards."""
    from loopmoe.data import load_shards

    summary: dict[str, Any] = {"source": opts.source, "bpe_vocab": None if opts.tokenizer else opts.bpe_vocab}
    try:
        shards = load_shards(opts.out / "data" / "shards")
        summary.update(train_tokens=len(shards.tokens("train")), val_tokens=len(shards.tokens("val")))
    except (OSError, ValueError) as error:
        summary["unavailable"] = str(error)
    return summary


def is_finished(run_dir: Path, steps: int) -> bool:
    """Whether the run in ``run_dir`` trained all ``steps`` and exported its final model."""
    from loopmoe.training.checkpoint import peek_latest_meta

    peeked = peek_latest_meta(run_dir / "checkpoints")
    return (
        peeked is not None
        and peeked[1].get("step") == steps
        and (run_dir / "final" / "config.json").is_file()
        and (run_dir / "metrics.jsonl").is_file()
    )


def run_record(run_dir: Path) -> dict[str, Any]:
    """What the report needs of a finished run, read from its folder (so a skipped run reads like a trained one)."""
    from loopmoe.training import read_metrics

    metrics = read_metrics(run_dir)
    return {
        "val_loss": next((m["val_loss"] for m in reversed(metrics) if m.get("val_loss") is not None), None),
        "train_loss": metrics[-1]["loss"],
        "final_dir": str(run_dir / "final"),
        "metrics": metrics,
        "cost": read_cost(run_dir),
    }


def available_tasks() -> tuple[str, ...]:
    """Shipped downstream tasks whose data files are present in the data folder (none on a bare machine)."""
    from loopmoe.evaluation import SHIPPED_TASKS
    from loopmoe.evaluation.harness import required_files
    from loopmoe.paths import shared_data_dir

    data = shared_data_dir()
    if data is None:
        return ()
    return tuple(t for t in SHIPPED_TASKS if all((data / f).is_file() for f in required_files(t)))


def _tasks(opts: CompareOptions, log) -> tuple[str, ...]:
    """The downstream tasks to run: ``--tasks``, with 'auto' resolved to the shipped tasks whose data is present."""
    if opts.tasks != ("auto",):
        return opts.tasks
    tasks = available_tasks()
    if not tasks:
        log("no downstream task data found (set LOOPMOE_DATA_DIR); skipping downstream evaluation")
    return tasks
