"""`run_training`: assemble a run (process group, data, model, parallelism, optimizer,
checkpoints, logging), resume it if it was interrupted, train, export the final model.

Re-running the same command on the same `out_dir` continues from the newest complete
checkpoint; on CPU the continued run's per-step losses equal those of an uninterrupted run.
"""

from __future__ import annotations

import json
import random
import time
import warnings
from pathlib import Path
from typing import Any, Protocol, cast

import numpy as np
import torch
from torch import nn
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict
from torch.distributed.fsdp import FSDPModule

from loopmoe.atomic import atomic_write_text
from loopmoe.distributed.env import DistInfo, barrier, init_distributed, is_distributed, teardown_distributed
from loopmoe.distributed.parallelize import (
    apply_activation_checkpointing,
    apply_compile,
    apply_ddp,
    apply_fsdp2,
    build_mesh,
    unwrap,
)
from loopmoe.training.builders import (
    DataBundle,
    DataFactory,
    ModelFactory,
    check_resume_data,
    default_data_factory,
    default_model_factory,
    move_data_aside,
)
from loopmoe.training.checkpoint import CheckpointManager, list_checkpoints
from loopmoe.training.config import RunConfig, config_from_dict, load_run_config
from loopmoe.training.metrics import MetricsLogger, read_metrics, summarize_router_stats
from loopmoe.training.optim import build_optimizer, build_scheduler
from loopmoe.training.trainer import Trainer, resolve_precision

_RESUME_MUST_MATCH = ("model", "data", "optim", "schedule", "dist")


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


def _parallelize(model: nn.Module, cfg: RunConfig, info: DistInfo) -> nn.Module:
    model.to(info.device)
    if cfg.train.activation_checkpointing != "none":
        apply_activation_checkpointing(model, cfg.train.activation_checkpointing, cfg.train.ac_every)
    if cfg.train.compile:  # before DDP / FSDP2 wrapping, as torchtitan does
        apply_compile(model)
    if not info.distributed:
        return model
    if cfg.dist.strategy == "fsdp2":
        return apply_fsdp2(model, build_mesh(info.world_size, info.device.type))
    return apply_ddp(model, info.device)


def _check_resumed_config(saved: dict[str, Any], cfg: RunConfig) -> None:
    current = cfg.to_dict()
    for section in _RESUME_MUST_MATCH:
        if saved.get(section) != current[section]:
            warnings.warn(
                f"resuming with a different [{section}] than the checkpoint was written with: "
                f"{saved.get(section)} -> {current[section]}; the run will not match an uninterrupted one",
                stacklevel=3,
            )


def _latest_meta(root: Path) -> dict[str, Any] | None:
    """meta.json of the newest checkpoint that has a readable one (nothing is loaded or changed)."""
    for _, path in reversed(list_checkpoints(root)):
        try:
            return cast(dict[str, Any], json.loads((path / "meta.json").read_text()))
        except (OSError, ValueError):
            continue
    return None


class _Exportable(Protocol):
    """The model contract's export (``loopmoe.training.builders``): what LoopMoEForCausalLM and stand-ins provide."""

    def save_pretrained(self, save_directory: str) -> Any: ...


def _export_final(
    model: nn.Module, bundle: DataBundle, cfg: RunConfig, out_dir: Path, info: DistInfo, model_factory: ModelFactory
) -> Path:
    """HF checkpoint of the final weights (gathered from shards under FSDP2) + tokenizer + config."""
    final = out_dir / "final"
    if isinstance(model, FSDPModule):
        full = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
        if info.is_main:
            plain = model_factory(cfg, bundle.vocab_size)
            plain.load_state_dict(full)
            cast(_Exportable, plain).save_pretrained(str(final))
    elif info.is_main:
        cast(_Exportable, unwrap(model)).save_pretrained(str(final))
    if info.is_main:
        tok = bundle.tokenizer
        if tok is not None:
            (tok.save if hasattr(tok, "save") else tok.save_pretrained)(str(final))
        atomic_write_text(final / "run_config.json", json.dumps(cfg.to_dict(), indent=2))
    barrier()
    return final


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
) -> dict[str, Any]:
    """Train a run into `out_dir` and return its final metrics.

    `run_config` is a RunConfig or a TOML path; `max_steps`/`checkpoint_every` override the
    config. With `resume` (default) an interrupted run continues from its newest complete
    checkpoint; with `resume=False` an `out_dir` that already holds checkpoints is refused.
    Works alone or under torchrun (DDP or FSDP2 per `dist.strategy`). The factories default
    to the LoopMoE model and the `loopmoe.data` pipeline.

    On resume, the data (tokenizer and shard fingerprints stored in the checkpoint) is checked
    before anything is rebuilt: if the corpus or tokenizer changed the run is refused, unless
    `rebuild_data`, which moves the old data aside (DATA_DIR/<name>.step<N>) and continues the
    run on freshly built data (the data order restarts).
    """
    owns_group = not is_distributed()
    info = init_distributed()
    try:
        return _run(
            run_config,
            Path(out_dir),
            max_steps,
            checkpoint_every,
            resume,
            rebuild_data,
            info,
            model_factory or default_model_factory,
            data_factory or default_data_factory,
        )
    finally:
        if owns_group:
            teardown_distributed()


def _run(
    run_config: RunConfig | str | Path,
    out_dir: Path,
    max_steps: int | None,
    checkpoint_every: int | None,
    resume: bool,
    rebuild_data: bool,
    info: DistInfo,
    model_factory: ModelFactory,
    data_factory: DataFactory,
) -> dict[str, Any]:
    cfg = _resolve_config(run_config, out_dir, max_steps, checkpoint_every, info.world_size)
    t = cfg.train
    ckpt = CheckpointManager(out_dir / "checkpoints", keep_last=t.keep_last, rank=info.rank)
    if not resume and list_checkpoints(ckpt.root):
        raise ValueError(
            f"{out_dir} already holds checkpoints; pass resume=True to continue it or choose a new out_dir"
        )

    rebuilt = False
    saved = _latest_meta(ckpt.root) if resume else None
    if saved and saved.get("data") and data_factory is default_data_factory:
        rebuilt = check_resume_data(cfg, saved["data"], rebuild=rebuild_data, step=saved["step"])
        barrier()
        if rebuilt and info.is_main:
            move_data_aside(cfg, saved["step"])

    _seed_everything(t.seed)
    bundle = data_factory(cfg, info.rank, info.world_size)
    model = _parallelize(model_factory(cfg, bundle.vocab_size), cfg, info)
    optimizer = build_optimizer(model, cfg)
    scheduler = build_scheduler(optimizer, cfg)
    _seed_everything(t.seed + info.rank)  # per-rank streams (dropout, sampling) after identical init

    start_step, tokens_seen, skipped_total = 0, 0, 0
    restored = ckpt.load_latest(model, optimizer, scheduler) if resume else None
    if restored is not None:
        _check_resumed_config(restored.meta.get("config", {}), cfg)
        if rebuilt:
            warnings.warn("the data was rebuilt: the resumed run reads the new data from its start", stacklevel=2)
        else:
            bundle.train.load_state_dict(restored.loader_state)
        start_step, tokens_seen = restored.meta["step"], restored.meta["tokens"]
        skipped_total = restored.meta["skipped_steps"]
    if info.is_main:
        out_dir.mkdir(parents=True, exist_ok=True)
        atomic_write_text(out_dir / "run_config.json", json.dumps(cfg.to_dict(), indent=2))

    trainer = Trainer(
        model,
        optimizer,
        scheduler,
        grad_accum=cfg.grad_accum_for(info.world_size),
        grad_clip=t.grad_clip,
        device=info.device,
        autocast_dtype=resolve_precision(t.precision, info.device),
        world_size=info.world_size,
    )
    logger = MetricsLogger(out_dir, enabled=info.is_main, max_steps=t.max_steps, start_step=start_step)
    batches = iter(bundle.train)
    record: dict[str, Any] = {}
    val_loss: float | None = None
    try:
        for step in range(start_step + 1, t.max_steps + 1):
            t0 = time.perf_counter()
            out = trainer.train_step(batches)
            tokens_seen += out.tokens
            skipped_total += out.skipped
            record = {
                "step": step,
                "loss": out.loss,
                "lm_loss": out.lm_loss,
                "aux_loss": out.aux_loss,
                "lr": out.lr,
                "grad_norm": out.grad_norm,
                "tokens": tokens_seen,
                "tokens_per_s": out.tokens / max(time.perf_counter() - t0, 1e-9),
                "skipped": out.skipped,
                "skipped_steps": skipped_total,
            }
            if t.eval_batches and (step % t.eval_every == 0 or step == t.max_steps):
                val_loss = record["val_loss"] = trainer.evaluate(bundle.val_batches(), t.eval_batches)
            router = summarize_router_stats(out.router_stats) if info.is_main and step % t.log_every == 0 else None
            logger.log_step(record, router)
            if step % t.checkpoint_every == 0 or step == t.max_steps:
                ckpt.save(
                    step,
                    model,
                    optimizer,
                    scheduler,
                    bundle.train.state_dict(),
                    {
                        "tokens": tokens_seen,
                        "skipped_steps": skipped_total,
                        "world_size": info.world_size,
                        "config": cfg.to_dict(),
                        **({"data": bundle.fingerprints} if bundle.fingerprints else {}),
                    },
                )
    finally:
        logger.close()
    if not record:  # nothing was left to train: report the completed run as it was logged
        history = read_metrics(out_dir) if info.is_main else []
        record = history[-1] if history else {}
        val_loss = next((r["val_loss"] for r in reversed(history) if r.get("val_loss") is not None), None)
    final = _export_final(model, bundle, cfg, out_dir, info, model_factory)
    return {
        **record,
        "val_loss": val_loss,
        "step": max(start_step, record.get("step", 0)),
        "tokens": tokens_seen,
        "skipped_steps": skipped_total,
        "run_dir": str(out_dir),
        "final_dir": str(final),
    }
