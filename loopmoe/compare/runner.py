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
from pathlib import Path
from typing import Any, cast

import torch

from loopmoe import training
from loopmoe.atomic import atomic_write_text, check_no_overlap, move_aside
from loopmoe.compare.arms import Arm, resolve_arms
from loopmoe.compare.cost import environment, read_cost, recorded_session
from loopmoe.compare.identity import IDENTITY_FILE, defining, differences, identity_record, stored_identity
from loopmoe.compare.ledger import Ledger, evaluation_settings
from loopmoe.compare.options import (
    COMPOSITION,
    NOT_IDENTITY,
    OPTIONS_FILE,
    CompareOptions,
    identity_options,
    options_record,
    run_config_for,
)
from loopmoe.compare.report import (
    arm_balancings,
    arms_table,
    budget_table,
    check_results_path,
    write_report,
    write_results,
)
from loopmoe.compare.results import (
    RESULTS_FILE,
    ArmRecord,
    MissingRun,
    RunRecord,
    StudyResults,
    TextSource,
    stored_options,
)
from loopmoe.compare.stats import downstream_over_seeds
from loopmoe.data import load_shards
from loopmoe.data.loader import validation_batches
from loopmoe.data.prepare import DataChangedError, PreparedData, check_resume_data, prepare_data
from loopmoe.errors import CheckpointError, ConfigError
from loopmoe.evaluation import SHIPPED_TASKS
from loopmoe.evaluation.harness import required_files
from loopmoe.evaluation.pipeline import DEFAULT_TEXT, DEFAULT_TEXT_NAME, RunEvaluation, evaluate_run, resolve_text
from loopmoe.options import flag_of
from loopmoe.paths import shared_data_dir
from loopmoe.presets import load_model_config
from loopmoe.training.checkpoint import peek_latest_meta
from loopmoe.training.config import RunConfig
from loopmoe.trust import check_safetensors


def prepare(opts: CompareOptions) -> tuple[dict[str, Arm], PreparedData]:
    """Build the tokenizer and shards once (``prepare_data``), then build every arm at that vocabulary."""
    data = opts.data_section()
    _check_trained_data(opts)
    prepared = prepare_data(data)
    reference = load_model_config(opts.reference, vocab_size=prepared.vocab_size)
    return resolve_arms(opts, reference), prepared


def _check_trained_data(opts: CompareOptions) -> None:
    """Before the shared data is (re)built: refuse if runs in OUT were trained on other data (corpus changed)."""
    for run_dir in sorted(opts.out.glob("seed*/*")):
        peeked = peek_latest_meta(run_dir / "checkpoints")
        meta = peeked[1] if peeked is not None else None
        if meta is None or not meta.data:
            continue
        try:
            check_resume_data(opts.data_section(), meta.data, rebuild=False, step=meta.step)
        except DataChangedError as error:
            raise ConfigError(
                f"{run_dir} was trained on other data than --source {opts.source!r} gives now ({error.why}); "
                "nothing was changed: restore the corpus, choose another --out, or pass --fresh to move the old "
                "comparison aside"
            ) from None
        return  # all runs share one data folder: checking one is enough


def claim_out_dir(opts: CompareOptions, log=print) -> None:
    """Make ``opts.out`` this comparison's folder, or refuse if it holds one run with other options.

    OUT/options.json (written atomically before anything trains) records the options of the runs in
    it. Re-running with the same options resumes; with others it is refused, naming the differences,
    unless ``opts.fresh``, which moves the old folder aside to OUT.prev-N. With ``opts.report_only``
    the folder must already hold this comparison, and nothing is written.
    """
    out = opts.out
    if out.exists() and not out.is_dir():
        raise ConfigError(f"--out {out} is a file, not a folder: choose another --out")
    wanted = identity_options(opts)
    saved = _saved_options(out)
    if saved is not None:  # options added since the folder was claimed: the runs in it used their defaults
        # (and a folder claimed before the study's composition was left out recorded arms and seeds too)
        saved = {**identity_options(CompareOptions()), **{k: v for k, v in saved.items() if k not in COMPOSITION}}
    holds_runs = out.is_dir() and any(out.glob("seed*"))
    foreign = saved is None and not holds_runs and out.is_dir() and any(out.iterdir())
    if foreign and not opts.fresh:  # a folder of the user's: loopmoe writes only into its own, or a new one
        raise ConfigError(
            f"--out {out} is a folder that holds no comparison (no {OPTIONS_FILE}) and is not empty: choose a new "
            "or empty folder, or pass --fresh to move its contents aside (to OUT.prev-N, kept)"
        )
    if opts.report_only and saved is None:
        raise ConfigError(
            f"--report-only: {out} holds no comparison (no {OPTIONS_FILE}); run the command without --report-only "
            "to train it, or point --out at the comparison's folder"
        )
    if (saved is not None and saved != wanted) or (saved is None and holds_runs) or foreign:
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
            raise ConfigError(
                f"{out} holds a comparison trained with {what}; re-running would mix old and new runs. Re-run "
                "with the old options to resume it, choose another --out, or pass --fresh to move the old "
                "folder aside and start anew"
            )
        log(f"moved the previous comparison in {out} aside to {move_aside(out)}")
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
        raise ConfigError(f"{out / OPTIONS_FILE} is unreadable ({error}): pass --fresh to start anew") from error
    options = stored_options(out / RESULTS_FILE)  # a comparison finished before options.json existed
    return None if options is None else {k: v for k, v in options.items() if k not in NOT_IDENTITY}


def run_comparison(opts: CompareOptions, log=print) -> StudyResults:
    """Train every arm for every seed, evaluate them, and write the report. Returns what results.json holds.

    Runs go in ``opts.run_plan()`` order; a finished run (its last checkpoint at ``--steps`` and its
    final export present) is not touched again, an interrupted one resumes from its last checkpoint.
    With ``opts.report_only`` nothing is trained and the runs not finished are listed as missing.
    Every finished run is then evaluated (``loopmoe.evaluation.pipeline.evaluate_run``: stored in its
    ``eval/`` folder, reused when already there). With ``opts.ledger``, every evaluated run is recorded
    there, and a run not finished in OUT that the ledger records is reused (``loopmoe.compare.ledger``).
    """
    opts.validate()
    if opts.threads is not None:
        torch.set_num_threads(opts.threads)
    if opts.results is not None:  # before anything trains: never a user's file at the end of a study
        check_results_path(opts.results)
    claim_out_dir(opts, log)
    text = resolve_text(opts.text)
    tasks = _tasks(opts)
    for why in not_evaluated(opts, text, tasks):
        log(f"not evaluated: {why}")
    arms, prepared = prepare(opts)
    balancings = arm_balancings(arms)
    table = "\n\n".join(budget_table(b, title=f"{opts.reference}, {b.strategy}") for b in balancings)
    main = balancings[0] if balancings else None  # results.json's budget: the first arm's balancing
    if set(arms) != {"reference", "looped"}:
        table = "\n\n".join(t for t in (table, arms_table(arms, opts.seq_len)) if t)
    log(table)

    def val_batches():  # the training runs' own validation batches (Trainer.evaluate's)
        return validation_batches(
            prepared.shards.tokens("val"),
            batch_size=opts.micro_batch_size,
            seq_len=opts.seq_len,
            num_batches=opts.eval_batches,
            rank=0,
            world_size=1,
        )

    runs: dict[str, dict[int, RunRecord]] = {name: {} for name in arms}
    missing: list[MissingRun] = []
    plan = opts.run_plan()
    # Every run's config is built and validated, and every run folder's identity checked, before the first
    # run trains: a bad seed, lr or arm, or a run trained with other settings, stops the study here.
    configs = {(seed, name): arm_run_config(opts, arms[name], seed) for seed, name in plan}
    identities = {key: identity_record(arms[key[1]], cfg) for key, cfg in configs.items()}
    check_run_identities(opts, identities, log)
    # what every run is measured under: evaluate_run's settings, which a ledger entry records too
    measured: dict[str, Any] = dict(
        depth_loops=opts.depth_loops,
        text=text,
        text_tokens=opts.text_tokens,
        tasks=tasks,
        task_limit=opts.task_limit,
        exit_sweep=opts.exit_sweep,
    )
    ledger, settings = None, {}
    if opts.ledger is not None:
        check_no_overlap(opts.ledger, {"run folder (--out)": opts.out}, flag="--ledger")
        ledger = Ledger.open(opts.ledger, create=True)  # --report-only records finished runs too: entries are atomic
        ledger.check(identities, prepared.fingerprints, fresh=opts.fresh, report_only=opts.report_only, log=log)
        settings = evaluation_settings(val_batches=val_batches(), **measured)
    for i, (seed, name) in enumerate(plan, 1):
        run_dir = opts.out / f"seed{seed}" / name
        if is_finished(run_dir, opts.steps):
            log(f"[{i}/{len(plan)}] {name} (seed {seed}): finished earlier, skipped ({run_dir})")
        elif ledger is not None and (recorded := ledger.record(seed, name, settings, log)) is not None:
            runs[name][seed] = recorded
            log(f"[{i}/{len(plan)}] {name} (seed {seed}): recorded in the ledger, reused ({ledger.path(seed, name)})")
            continue
        elif opts.report_only:
            missing.append(MissingRun(name, seed, _latest_step(run_dir)))
            log(f"[{i}/{len(plan)}] {name} (seed {seed}): not finished (step {missing[-1].step}), not reported")
            continue
        else:
            log(f"\n[{i}/{len(plan)}] == training {name} (seed {seed}, {opts.tokens_per_model:,} tokens) -> {run_dir}")
            run_dir.mkdir(parents=True, exist_ok=True)
            atomic_write_text(
                run_dir / IDENTITY_FILE, json.dumps(identity_record(arms[name], configs[seed, name]), indent=2)
            )
            with recorded_session(run_dir, _latest_step(run_dir), opts.steps):
                training.run_training(configs[seed, name], run_dir)
        evaluation = evaluate_run(run_dir, val_batches=val_batches, seq_len=opts.seq_len, log=log, **measured)
        record = runs[name][seed] = run_record(run_dir, evaluation)
        if ledger is not None:
            ledger.write(
                seed,
                name,
                identity=identities[seed, name],
                data=prepared.fingerprints,
                settings=settings,
                record=record,
            )
        log(f"   {name}: final train loss {record.train_loss:.4f}, held-out loss {record.val_loss:.4f}")
    reference_budget = arms[opts.arms[0]].budget if "reference" not in arms else arms["reference"].budget
    results = StudyResults(
        options=options_record(opts),
        budget=main.as_dict() if main is not None else None,
        arms={name: ArmRecord.of(arm, reference_budget) for name, arm in arms.items()},
        runs=runs,
        missing=missing,
        downstream={
            name: rows
            for name, seeds in runs.items()
            if (rows := downstream_over_seeds({s: r.eval.tasks for s, r in seeds.items()}))
        },
        text=None if text is None else TextSource(str(text), DEFAULT_TEXT_NAME if opts.text == "auto" else text.name),
        data=_data_summary(opts),
        run_configs={name: arm_run_config(opts, arm, arm.seeds[0]).to_dict() for name, arm in arms.items()},
        environment=environment(),
        not_evaluated=not_evaluated(opts, text, tasks),
    )
    write_report(opts.out, results, table)
    results.save(opts.out / RESULTS_FILE)
    log(f"\nreport: {opts.out / 'report.md'}")
    if opts.results is not None:
        log(f"results page: {write_results(opts.results, results, table)}")
    return results


def arm_run_config(opts: CompareOptions, arm: Arm, seed: int) -> RunConfig:
    """The validated RunConfig of one run of ``arm`` (its own lr where it sets one)."""
    try:
        return run_config_for(opts, arm.config, seed, lr=arm.lr)
    except ConfigError as error:
        raise ConfigError(f"arm {arm.name!r}, seed {seed}: {error}") from None


def check_run_identities(opts: CompareOptions, wanted: dict[tuple[int, str], dict[str, Any]], log=print) -> None:
    """Refuse (or, with ``--fresh``, move aside) every run folder of the plan that holds a run of other settings.

    A folder with a checkpoint or an export but no record of its settings is refused as well. Identical runs are
    kept, finished or not; a folder with nothing trained in it is simply trained. All runs are checked before
    any trains.
    """
    changed: list[tuple[Path, str]] = []
    for (seed, name), record in wanted.items():
        run_dir = opts.out / f"seed{seed}" / name
        if _latest_step(run_dir) == 0 and not (run_dir / "final" / "config.json").is_file():
            continue  # nothing trained yet: the run starts (again) with the arm's settings
        stored = stored_identity(run_dir)
        if stored is None:
            changed.append((run_dir, "its settings are not recorded"))
            continue
        diff = differences(defining(stored), defining(record["run_config"]))
        if diff:
            changed.append((run_dir, ", ".join(diff[:4]) + (f" (+{len(diff) - 4} more)" if len(diff) > 4 else "")))
    if not changed:
        return
    if not opts.fresh or opts.report_only:
        run_dir, why = changed[0]
        more = f" (and {len(changed) - 1} other run(s))" if len(changed) > 1 else ""
        raise ConfigError(
            f"{run_dir} holds a run trained with other settings than its arm now gives: {why}{more}; nothing was "
            "trained. Restore the arm's settings to reuse it, give the changed arm a new name (a new arm trains "
            "alongside), or pass --fresh to move the changed runs aside and train them anew"
        )
    for run_dir, why in changed:
        log(f"moved {run_dir} aside to {move_aside(run_dir)} ({why})")


def _latest_step(run_dir: Path) -> int:
    """The step of the run's last checkpoint (0 if it has none)."""
    peeked = peek_latest_meta(run_dir / "checkpoints")
    return peeked[1].step if peeked else 0


def _data_summary(opts: CompareOptions) -> dict[str, Any]:
    """The shared data of the comparison: tokens in each split, from its prepared shards."""
    summary: dict[str, Any] = {"source": opts.source, "bpe_vocab": None if opts.tokenizer else opts.bpe_vocab}
    try:
        shards = load_shards(opts.out / "data" / "shards")
        summary.update(train_tokens=len(shards.tokens("train")), val_tokens=len(shards.tokens("val")))
    except (OSError, ValueError) as error:
        summary["unavailable"] = str(error)
    return summary


def is_finished(run_dir: Path, steps: int) -> bool:
    """Whether the run in ``run_dir`` trained all ``steps`` and exported a whole final model.

    A ``final/`` whose weights do not verify (torn, truncated) makes the run unfinished: running it
    again trains no step and exports ``final/`` anew from its last checkpoint.
    """
    peeked = peek_latest_meta(run_dir / "checkpoints")
    return (
        peeked is not None
        and peeked[1].step == steps
        and (run_dir / "final" / "config.json").is_file()
        and (run_dir / "metrics.jsonl").is_file()
        and _final_verifies(run_dir / "final")
    )


def _final_verifies(final: Path) -> bool:
    weights = sorted(final.glob("*.safetensors"))
    try:
        for path in weights:
            check_safetensors(path)
    except CheckpointError:
        return False
    return bool(weights)


def run_record(run_dir: Path, evaluation: RunEvaluation) -> RunRecord:
    """A finished run as the results record it, read from its folder (so a skipped run reads like a trained one)."""
    metrics = training.read_metrics(run_dir)
    return RunRecord(
        val_loss=next((m["val_loss"] for m in reversed(metrics) if m.get("val_loss") is not None), None),
        train_loss=metrics[-1]["loss"],
        final_dir=str(run_dir / "final"),
        metrics=metrics,
        cost=read_cost(run_dir),
        eval=evaluation,
    )


def not_evaluated(opts: CompareOptions, text: Path | None, tasks: tuple[str, ...]) -> list[str]:
    """The evaluations this study does not run, each with why: asked off, or 'auto' finding no data."""
    data = shared_data_dir()
    where = f"the data folder {data}" if data is not None else "no data folder (set LOOPMOE_DATA_DIR)"
    out = []
    if text is None:
        out.append(
            f"held-out text perplexity: {where} has no {DEFAULT_TEXT}; pass --text FILE, or set LOOPMOE_DATA_DIR to "
            "the shared data"
            if opts.text == "auto"
            else "held-out text perplexity: --text '' asks for none"
        )
    if opts.tasks == ("auto",):
        absent = [t for t in SHIPPED_TASKS if t not in tasks]
        if absent:
            out.append(
                f"downstream tasks {', '.join(absent)}: their data files are not in {where}"
                + ("" if tasks else "; no task ran")
            )
    elif not opts.tasks:
        out.append("downstream tasks: --tasks '' asks for none")
    if not opts.depth_loops:
        out.append("test-time depth curve: --depth-loops '' asks for none")
    return out


def available_tasks() -> tuple[str, ...]:
    """Shipped downstream tasks whose data files are present in the data folder (none on a bare machine)."""
    data = shared_data_dir()
    if data is None:
        return ()
    return tuple(t for t in SHIPPED_TASKS if all((data / f).is_file() for f in required_files(t)))


def _tasks(opts: CompareOptions) -> tuple[str, ...]:
    """The downstream tasks to run: ``--tasks``, with 'auto' resolved to the shipped tasks whose data is present."""
    return available_tasks() if opts.tasks == ("auto",) else opts.tasks
