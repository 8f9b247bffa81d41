"""What a run says when it starts, and what its logs record of the model it really trains.

A run config names a preset and overrides; what trains is the resolved model. The start banner
(stderr, rank 0) says where the run goes, whether it starts or resumes and from which step, the
resolved architecture with its parameter and FLOP counts, and the data and optimizer settings, so a
log file answers "what was this?" on its own. ``resolved_model`` is the same record for TensorBoard's
and W&B's config (a preset name alone does not say what was trained).
"""

from __future__ import annotations

from datetime import datetime
from pathlib import Path
from typing import Any

from torch import nn

from loopmoe.budget import compute_budget
from loopmoe.config import LoopMoEConfig, layers_text
from loopmoe.text import human
from loopmoe.training.config import RunConfig


def clock() -> str:
    """The local wall-clock time of a console line, ``HH:MM:SS``."""
    return datetime.now().strftime("%H:%M:%S")


def resolved_model(model: nn.Module, seq_len: int) -> dict[str, Any]:
    """The model a run trains: its class and parameter count, and for a LoopMoE its architecture fields
    with the analytic total and active parameters and forward FLOPs per token (``loopmoe.budget``)."""
    config = getattr(model, "config", None)
    if not isinstance(config, LoopMoEConfig):
        return {"class": type(model).__name__, "total_params": sum(p.numel() for p in model.parameters())}
    budget = compute_budget(config, seq_len)
    return {
        "class": type(model).__name__,
        **config.architecture_dict(),
        "layers": layers_text(config),
        "total_params": budget.total_params,
        "active_params": budget.active_params,
        "flops_per_token": budget.flops_per_token,
    }


def start_banner(cfg: RunConfig, out_dir: Path, step: int, tokens: int, model: dict[str, Any], world_size: int) -> str:
    """The lines a run prints before its first step (``model``: ``resolved_model``)."""
    t, d, o = cfg.train, cfg.data, cfg.optim
    where = (
        f"starting at step 0 of {t.max_steps}"
        if step == 0
        else f"resuming from step {step} of {t.max_steps} ({human(tokens)} tokens seen)"
    )
    if step >= t.max_steps:
        where = f"finished at step {step} of {t.max_steps}: nothing to train"
    lines = [f"{clock()} loopmoe train: {out_dir}, {where}"]
    if "layers" in model:
        arch = (
            f"{model['layers']} layers, d {model['hidden_size']}, heads {model['num_attention_heads']}/"
            f"{model['num_key_value_heads']}x{model['head_dim']}, experts {model['num_experts_per_tok']}/"
            f"{model['num_experts']}x{model['moe_intermediate_size']}"
        )
        counts = (
            f"{human(model['total_params'])} params, {human(model['active_params'])} active, "
            f"{human(model['flops_per_token'])} FLOPs/token (forward)"
        )
        lines.append(f"  model: {cfg.model.preset or 'config'} -> {arch}; {counts}")
    else:
        lines.append(f"  model: {model['class']}, {human(model['total_params'])} params")
    accum = t.grad_accum or 1
    per_step = d.seq_len * t.micro_batch_size * accum * world_size
    lines.append(
        f"  data: {d.source}, {t.micro_batch_size} x {d.seq_len} tokens x {accum} accumulation x "
        f"{world_size} process(es) = {human(per_step)} tokens/step; optimizer lr {o.lr:g}, "
        f"{cfg.schedule.kind} schedule, warmup {cfg.schedule.warmup_steps}"
    )
    return "\n".join(lines)
