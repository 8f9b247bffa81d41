"""`run_training`: assemble a run (process group, data, model, parallelism, optimizer,
checkpoints, logging), resume it if it was interrupted, train, export the final model.

Re-running the same command on the same `out_dir` continues from the newest complete
checkpoint; on CPU the continued run's per-step losses equal those of an uninterrupted run.
What a re-run may change of the run's settings is `loopmoe.training.rerun`'s rule.

The steps, each a function below: `_setup` (config, checkpoints, data, model, optimizer),
`_resume` (the newest checkpoint's state, if any), `_train_loop`, `_export_final`.
"""

from __future__ import annotations

import contextlib
import json
import os
import random
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol, cast

import numpy as np
import torch
from torch import nn
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict
from torch.distributed.fsdp import FSDPModule
from torch.distributed.tensor import DTensor

from loopmoe.atomic import atomic_directory, atomic_write_text, clean_stale_temporaries, fsync_dir
from loopmoe.console import status
from loopmoe.data.prepare import check_resume_data, move_data_aside
from loopmoe.data.tokenizer import export_tokenizer, special_token_ids
from loopmoe.distributed.env import (
    DistInfo,
    all_reduce_sum_,
    collective_stage,
    end_with_parent,
    init_distributed,
    is_distributed,
    teardown_distributed,
)
from loopmoe.distributed.expert_parallel import expert_parallel_of, gather_full_experts
from loopmoe.distributed.parallelize import parallelize, unwrap
from loopmoe.errors import ConfigError, RunError
from loopmoe.training.allocator import keep_freed_memory
from loopmoe.training.banner import resolved_model, start_banner
from loopmoe.training.builders import (
    DataBundle,
    DataFactory,
    ModelFactory,
    default_data_factory,
    default_model_factory,
)
from loopmoe.training.checkpoint import CheckpointManager, CheckpointMeta, list_checkpoints, peek_latest_meta
from loopmoe.training.config import RunConfig, config_from_dict, load_run_config
from loopmoe.training.metrics import METRICS_FILE, WANDB_ID_FILE, MetricsLogger, read_metrics, summarize_router_stats
from loopmoe.training.optim import apply_optim_settings, build_optimizer, build_scheduler
from loopmoe.training.rerun import announce_changes, refuse_fixed_changes, setting_changes
from loopmoe.training.runlock import RunLock
from loopmoe.training.throughput import peak_flops_per_s, training_flops_per_token
from loopmoe.training.trainer import Trainer, resolve_precision


def _seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def _resolve_config(
    run_config: RunConfig | str | Path,
    out_dir: Path,
    max_steps: int | None,
    checkpoint_every: int | None,
    world_size: int,
) -> RunConfig:
    """Apply the call's overrides; the data cache defaults to OUT_DIR/data."""
    cfg = run_config if isinstance(run_config, RunConfig) else load_run_config(run_config)
    raw = cfg.to_dict()
    if raw["data"]["data_dir"] is None:
        raw["data"]["data_dir"] = str(out_dir / "data")
    if max_steps is not None:
        raw["train"]["max_steps"] = max_steps
    if checkpoint_every is not None:
        raw["train"]["checkpoint_every"] = checkpoint_every
    return config_from_dict(raw).validate(world_size)


def trainer_for(model: nn.Module, optimizer, scheduler, cfg: RunConfig, info: DistInfo) -> Trainer:
    """The ``Trainer`` of ``cfg``'s run on this process (``model`` already parallelised): accumulation
    over the world size, clipping, precision and the update guard as the config sets them."""
    t = cfg.train
    return Trainer(
        model,
        optimizer,
        scheduler,
        grad_accum=cfg.grad_accum_for(info.world_size),
        grad_clip=t.grad_clip,
        device=info.device,
        autocast_dtype=resolve_precision(t.precision, info.device),
        world_size=info.world_size,
        update_guard=t.update_guard,
    )


def parallelize_for(model: nn.Module, cfg: RunConfig, device: torch.device) -> nn.Module:
    """``parallelize`` with ``cfg``'s ``[dist]`` layout and its ``[train]`` recomputation and compilation."""
    t = cfg.train
    return parallelize(
        model,
        cfg.dist,
        device,
        activation_checkpointing=t.activation_checkpointing,
        ac_every=t.ac_every,
        compile=t.compile,
    )


class _Exportable(Protocol):
    """The model contract's export (``loopmoe.training.builders``): what LoopMoEForCausalLM and stand-ins provide."""

    def save_pretrained(self, save_directory: str) -> Any: ...


class DivergedError(RunError, ValueError):
    """Too many consecutive steps were skipped as non-finite (the CLI reports it in one line)."""


class NonFiniteModelError(RunError, ValueError):
    """The weights hold NaN or infinity: there is no model worth exporting (the CLI reports it in one line)."""


def _refuse_nonfinite(model: nn.Module, out_dir: Path, device: torch.device) -> None:
    """Raise NonFiniteModelError on every rank if any rank's weights (its shards under FSDP2) are not finite."""
    bad = [
        name
        for name, v in unwrap(model).state_dict().items()
        if torch.is_tensor(v)
        and v.is_floating_point()
        and not (v.to_local() if isinstance(v, DTensor) else v).isfinite().all()
    ]
    count = torch.tensor(float(len(bad)), device=device)
    all_reduce_sum_(count)  # every rank takes the same decision, so none waits in a barrier
    if count.item():
        raise NonFiniteModelError(
            f"not exporting {out_dir / 'final'}: tensors of the final model are not finite "
            f"({', '.join(bad[:3]) or 'on another rank'}{', ...' if len(bad) > 3 else ''}); the run diverged. "
            f"Lower optim.lr or enable train.grad_clip and start a new --out"
        )


def _export_final(
    model: nn.Module,
    bundle: DataBundle,
    cfg: RunConfig,
    out_dir: Path,
    info: DistInfo,
    model_factory: ModelFactory,
    recorded: dict[str, Any],
) -> Path:
    """HF checkpoint of the final weights (gathered from FSDP2 shards and expert-parallel blocks: one
    ordinary checkpoint whatever the layout) + tokenizer + ``recorded`` (the run config it was trained with).

    The tokenizer's special tokens go into the model's config and generation config (``generate``
    stops at EOS, batches pad) and the training context into the tokenizer's ``model_max_length``.
    """
    final = out_dir / "final"
    _refuse_nonfinite(model, out_dir, info.device)
    exported: nn.Module | None = None
    expert_parallel = expert_parallel_of(unwrap(model)) is not None
    if isinstance(model, FSDPModule) or expert_parallel:
        # Under EP every rank takes part in gathering the expert blocks, so every rank needs the full dict.
        options = StateDictOptions(full_state_dict=True, cpu_offload=not expert_parallel)
        full = gather_full_experts(get_model_state_dict(model, options=options), unwrap(model))
        if info.is_main:
            exported = model_factory(cfg, bundle.vocab_size)
            exported.load_state_dict(full)
    elif info.is_main:
        exported = unwrap(model)
    with collective_stage("the final export"):  # rank 0 writes; every rank learns whether it failed
        _write_final(exported, bundle, cfg, final, recorded)
    return final


def _write_final(
    exported: nn.Module | None, bundle: DataBundle, cfg: RunConfig, final: Path, recorded: dict[str, Any]
) -> None:
    """Write ``exported`` (rank 0's model; None on the other ranks: nothing to do) into ``final``, staged
    beside it and published in one rename (``loopmoe.atomic.atomic_directory``), as a checkpoint is: a
    reader, or a kill, sees the previous export or the new one, never a torn ``model.safetensors``. An
    earlier export of this run (``run_config.json`` is written there only by loopmoe) is replaced."""
    if exported is None:
        return
    tokenizer = export_tokenizer(bundle.tokenizer, cfg.data.seq_len) if bundle.tokenizer is not None else None
    if tokenizer is not None:
        for holder in (getattr(exported, "config", None), getattr(exported, "generation_config", None)):
            if holder is not None:
                for name, value in special_token_ids(tokenizer).items():
                    setattr(holder, name, value)
    with atomic_directory(final, legacy_marker="run_config.json") as staging:
        cast(_Exportable, exported).save_pretrained(str(staging))
        if tokenizer is not None:
            tokenizer.save_pretrained(str(staging))
        (staging / "run_config.json").write_text(json.dumps(recorded, indent=2))


@dataclass
class _Run:
    """One process's assembled run: what `_setup` builds and the later steps use."""

    cfg: RunConfig
    out_dir: Path
    info: DistInfo
    ckpt: CheckpointManager
    bundle: DataBundle
    model: nn.Module
    optimizer: torch.optim.Optimizer
    scheduler: Any
    model_factory: ModelFactory


@dataclass
class _Progress:
    """Where the run stands: the last trained step, tokens and skipped steps so far, and the run config
    to record (``run_config.json``, the final model's): ``cfg``'s, or a finished run's stored one."""

    step: int
    tokens: int
    skipped: int
    recorded: dict[str, Any]


def run_training(
    run_config: RunConfig | str | Path,
    out_dir: str | Path,
    max_steps: int | None = None,
    checkpoint_every: int | None = None,
    resume: bool = True,
    *,
    rebuild_data: bool = False,
    model_factory: ModelFactory | None = None,
    data_factory: DataFactory | None = None,
    restart: bool = False,
) -> dict[str, Any]:
    """Train a run into `out_dir` and return its final metrics.

    `run_config` is a RunConfig or a TOML path; `max_steps`/`checkpoint_every` override the
    config. With `resume` (default) an interrupted run continues from its newest complete
    checkpoint; with `resume=False` an `out_dir` that already holds checkpoints is refused.
    Works alone or under torchrun (DDP or FSDP2 per `dist.strategy`). The factories default
    to the LoopMoE model and the `loopmoe.data` pipeline.

    Rank 0 holds an exclusive lock on `out_dir` for the whole run (a second process on the same
    folder stops at once). Checkpoints that exist but do not verify stop the run with an error;
    `restart=True` moves the whole previous run (checkpoints, metrics, config, logs, final model)
    aside into `OUT/restarted-<time>/` and starts from step 0.

    A re-run (finished or interrupted) that changes the model, the data or the seed is refused
    before anything is loaded; other changed settings warn and apply from the next step
    (`loopmoe.training.rerun`). On resume, the data (tokenizer and shard fingerprints stored in the
    checkpoint) is checked before anything is rebuilt: if the corpus or tokenizer changed the run is
    refused, unless `rebuild_data`, which moves the old data aside (DATA_DIR/<name>.step<N>) and
    continues the run on freshly built data (the data order restarts).
    """
    owns_group = not is_distributed()
    info = init_distributed()
    if info.device.type == "cpu":
        keep_freed_memory()  # 1.1-1.15x faster CPU steps: no page faults on memory the last step freed
    if is_distributed():
        end_with_parent()  # a worker ends when its launcher dies, instead of training on unsupervised
    lock = RunLock(out_dir)
    failed = True
    try:
        _hold_run_dir(lock, Path(out_dir), info)
        with collective_stage("reading the run config"):
            cfg = _resolve_config(run_config, Path(out_dir), max_steps, checkpoint_every, info.world_size)
        run, rebuilt = _setup(
            cfg,
            Path(out_dir),
            info,
            model_factory or default_model_factory,
            data_factory or default_data_factory,
            resume=resume,
            restart=restart,
            rebuild_data=rebuild_data,
        )
        progress = _resume(run, rebuilt, rebuild_data=rebuild_data) if resume else _fresh(cfg)
        with collective_stage("writing run_config.json"):
            if info.is_main:
                run.out_dir.mkdir(parents=True, exist_ok=True)
                atomic_write_text(run.out_dir / "run_config.json", json.dumps(progress.recorded, indent=2))
        start_step = progress.step
        record, val_loss = _train_loop(run, progress)
        final = _export_final(run.model, run.bundle, cfg, run.out_dir, info, run.model_factory, progress.recorded)
        failed = False
        return {
            **record,
            "val_loss": val_loss,
            "step": max(start_step, record.get("step", 0)),
            "tokens": progress.tokens,
            "skipped_steps": progress.skipped,
            "run_dir": str(run.out_dir),
            "final_dir": str(final),
        }
    finally:
        lock.release()
        if owns_group:
            teardown_distributed(failed=failed)  # no barrier after a failure: a peer may never reach it


def _hold_run_dir(lock: RunLock, out_dir: Path, info: DistInfo) -> None:
    """Rank 0 takes the run folder's lock (every rank raises if another process holds it) and, holding
    it, removes the debris of killed writes."""
    with collective_stage("locking the run folder"):
        if info.is_main:
            lock.acquire()
            # We hold the folder: every temporary in it is debris of a killed write.
            clean_stale_temporaries(out_dir, held=True)


def _setup(
    cfg: RunConfig,
    out_dir: Path,
    info: DistInfo,
    model_factory: ModelFactory,
    data_factory: DataFactory,
    *,
    resume: bool,
    restart: bool,
    rebuild_data: bool,
) -> tuple[_Run, bool]:
    """Checkpoints, data, model, optimizer and schedule of the run, after the re-run checks (which read
    the newest checkpoint's meta only). Returns the run and whether its data was rebuilt."""
    ckpt = CheckpointManager(out_dir / "checkpoints", keep_last=cfg.train.keep_last, rank=info.rank)
    with collective_stage("preparing the run folder"):
        if info.is_main and cfg.data.data_dir is not None and not Path(cfg.data.data_dir).is_relative_to(out_dir):
            clean_stale_temporaries(Path(cfg.data.data_dir), held=False)  # shared cache: dead writers only
        if restart and info.is_main and (aside := move_run_aside(out_dir)) is not None:
            warnings.warn(
                f"--restart: moved the previous run (checkpoints, metrics, config, logs, final model) aside "
                f"into {aside}",
                stacklevel=3,
            )
    if not resume and list_checkpoints(ckpt.root):
        raise ConfigError(
            f"{out_dir} already holds checkpoints; pass resume=True to continue it or choose a new out_dir"
        )
    peeked = peek_latest_meta(ckpt.root) if resume else None
    rebuilt = False
    if peeked is not None:
        path, meta = peeked
        changes = setting_changes(meta.config or {}, cfg.to_dict())
        refuse_fixed_changes(changes, path, meta.step, cfg.train.max_steps, rebuild_data=rebuild_data)
        if meta.data and data_factory is default_data_factory:
            with collective_stage("checking the data against the checkpoint"):
                rebuilt = check_resume_data(cfg.data, meta.data, rebuild=rebuild_data, step=meta.step)
            with collective_stage("moving the old data aside"):
                if rebuilt and info.is_main:
                    move_data_aside(cfg.data, meta.step)

    _seed_everything(cfg.train.seed)
    with collective_stage("preparing the data"):
        bundle = data_factory(cfg, info.rank, info.world_size)
    with collective_stage("building the model"):
        built = model_factory(cfg, bundle.vocab_size)
    model = parallelize_for(built, cfg, info.device)
    optimizer = build_optimizer(model, cfg)
    scheduler = build_scheduler(optimizer, cfg)
    _seed_everything(cfg.train.seed + info.rank)  # per-rank streams (dropout, sampling) after identical init
    return _Run(cfg, out_dir, info, ckpt, bundle, model, optimizer, scheduler, model_factory), rebuilt


def _fresh(cfg: RunConfig) -> _Progress:
    return _Progress(step=0, tokens=0, skipped=0, recorded=cfg.to_dict())


def _resume(run: _Run, rebuilt: bool, *, rebuild_data: bool) -> _Progress:
    """Load the newest loadable checkpoint into the run (nothing if there is none); the re-run rule
    (`loopmoe.training.rerun`) against the settings it was trained with."""
    cfg = run.cfg
    restored = run.ckpt.load_latest(run.model, run.optimizer, run.scheduler)
    if restored is None:
        return _fresh(cfg)
    meta: CheckpointMeta = restored.meta
    changes = setting_changes(meta.config or {}, cfg.to_dict())
    # Checked again: the checkpoint loaded may be older than the one peeked at.
    refuse_fixed_changes(changes, restored.path, meta.step, cfg.train.max_steps, rebuild_data=rebuild_data)
    saved_lr = run.optimizer.param_groups[0]["lr"]
    apply_optim_settings(run.optimizer, run.scheduler, cfg)
    announce_changes(
        changes, run.out_dir, meta.step, cfg.train.max_steps, lr=(saved_lr, run.optimizer.param_groups[0]["lr"])
    )
    if rebuilt:
        warnings.warn("the data was rebuilt: the resumed run reads the new data from its start", stacklevel=3)
    else:
        run.bundle.train.load_state_dict(restored.loader_state)
    finished = meta.step >= cfg.train.max_steps and meta.config is not None
    recorded = meta.config if finished and changes else cfg.to_dict()
    return _Progress(meta.step, meta.tokens, meta.skipped_steps, cast(dict[str, Any], recorded))


def _train_loop(run: _Run, progress: _Progress) -> tuple[dict[str, Any], float | None]:
    """Train from ``progress.step`` to ``train.max_steps`` (updating ``progress``), evaluating, logging and
    checkpointing on the way; returns the last step's record and the last validation loss. With nothing
    left to train, those of the finished run as it was logged."""
    cfg, info, t = run.cfg, run.info, run.cfg.train
    trainer = trainer_for(run.model, run.optimizer, run.scheduler, cfg, info)
    flops_per_token = training_flops_per_token(unwrap(run.model), cfg.data.seq_len)
    model = resolved_model(unwrap(run.model), cfg.data.seq_len)
    if info.is_main:
        status(start_banner(cfg, run.out_dir, progress.step, progress.tokens, model, info.world_size))
    with collective_stage("starting the logs (metrics.jsonl, TensorBoard, W&B)"):  # rank 0 opens them
        logger = MetricsLogger(
            run.out_dir,
            enabled=info.is_main,
            max_steps=t.max_steps,
            start_step=progress.step,
            log_every=t.log_every,
            config={**progress.recorded, "resolved_model": model},
            tokens=progress.tokens,
            flops_per_token=flops_per_token,
            peak_flops=peak_flops_per_s(info.device, t.peak_tflops),
            world_size=info.world_size,
            wandb_project=t.wandb_project if t.wandb else None,
        )
    batches = iter(run.bundle.train)
    record: dict[str, Any] = {}
    consecutive_skipped = 0
    val_loss: float | None = None
    closed = False
    try:
        for step in range(progress.step + 1, t.max_steps + 1):
            t0 = time.perf_counter()
            out = trainer.train_step(batches)
            progress.step = step
            progress.tokens += out.tokens
            progress.skipped += out.skipped
            record = {
                "step": step,
                "loss": out.loss,
                "lm_loss": out.lm_loss,
                "aux_loss": out.aux_loss,
                "lr": out.lr,
                "grad_norm": out.grad_norm,
                "tokens": progress.tokens,
                "tokens_per_s": out.tokens / max(time.perf_counter() - t0, 1e-9),
                "skipped": out.skipped,
                "skipped_steps": progress.skipped,
            }
            if out.exit_depth is not None:  # a learned exit gate's mean expected depth (core iterations)
                record["exit_depth"] = out.exit_depth
            if t.eval_batches and (step % t.eval_every == 0 or step == t.max_steps):
                val_loss = record["val_loss"] = trainer.evaluate(run.bundle.val_batches(), t.eval_batches)
            router = summarize_router_stats(out.router_stats) if info.is_main and step % t.log_every == 0 else None
            with collective_stage(f"logging step {step}"):  # rank 0 writes (a full disk stops every rank)
                logger.log_step(record, router)
            consecutive_skipped = consecutive_skipped + 1 if out.skipped else 0
            if consecutive_skipped >= t.max_skipped_steps:
                raise DivergedError(
                    f"{consecutive_skipped} consecutive steps (up to step {step}) were skipped: the loss, gradients or "
                    f"update were not finite (train.max_skipped_steps = {t.max_skipped_steps}). The run has "
                    f"diverged; lower optim.lr, check the data, or raise train.max_skipped_steps. "
                    f"Nothing was exported; the last checkpoint is in {run.ckpt.root}"
                )
            if step % t.checkpoint_every == 0 or step == t.max_steps:
                _save_checkpoint(run, progress)
        closed = True
        with collective_stage("closing the logs"):
            logger.close()
    finally:
        if not closed:  # failing already: close what can be closed, without waiting for other ranks
            with contextlib.suppress(Exception):  # the error being raised is the one to report
                logger.close()
    if not record:  # nothing was left to train: report the completed run as it was logged
        with collective_stage("reading metrics.jsonl"):
            history = read_metrics(run.out_dir) if info.is_main else []
        record = history[-1] if history else {}
        val_loss = next((r["val_loss"] for r in reversed(history) if r.get("val_loss") is not None), None)
    return record, val_loss


RESTARTED = "restarted-"  # OUT/restarted-<time>/: a run that --restart set aside, whole


def move_run_aside(out_dir: Path) -> Path | None:
    """Move the run in ``out_dir`` (checkpoints, metrics.jsonl, run_config.json, tensorboard, W&B, final
    model) into ``OUT/restarted-<time>/``, whole: ``--restart`` starts from step 0 and never truncates or
    replaces the history of the run before. The data cache (``OUT/data``) stays: it is the corpus's, not
    the run's. Returns the folder, or None when there was nothing to move."""
    names = ("checkpoints", METRICS_FILE, "run_config.json", "tensorboard", "wandb", WANDB_ID_FILE, "final")
    found = [out_dir / name for name in names if (out_dir / name).exists() or (out_dir / name).is_symlink()]
    if not found:
        return None
    dest = out_dir / f"{RESTARTED}{time.strftime('%Y%m%d-%H%M%S', time.gmtime())}"
    base, n = dest.name, 0
    while dest.exists():
        n += 1
        dest = dest.with_name(f"{base}.{n}")
    dest.mkdir()
    for path in found:
        os.replace(path, dest / path.name)
    fsync_dir(out_dir)
    return dest


def _save_checkpoint(run: _Run, progress: _Progress) -> None:
    meta = CheckpointMeta(
        step=progress.step,
        tokens=progress.tokens,
        skipped_steps=progress.skipped,
        world_size=run.info.world_size,
        config=run.cfg.to_dict(),
        data=run.bundle.fingerprints or None,
    )
    run.ckpt.save(meta, run.model, run.optimizer, run.scheduler, run.bundle.train.state_dict())
