"""AdamW with the usual decay exemptions, and learning-rate schedules as LambdaLR multipliers.

Schedules are small callable dataclasses rather than closures so `LambdaLR.state_dict()` can
store their settings, and so a resumed run reproduces the same learning rate at every step.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn
from torch.optim.lr_scheduler import LambdaLR

from loopmoe.training.config import RunConfig


def param_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """Split parameters: decay matrices; exempt norms, biases and other <2-D (embedding-like) params.

    Decaying a norm gain or a bias pulls it toward 0, which is a change of function, not a
    regulariser of capacity.
    """
    decay: list[torch.nn.Parameter] = []
    no_decay: list[torch.nn.Parameter] = []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        (no_decay if p.ndim < 2 or name.endswith(".bias") else decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def build_optimizer(model: nn.Module, cfg: RunConfig) -> torch.optim.AdamW:
    o = cfg.optim
    return torch.optim.AdamW(param_groups(model, o.weight_decay), lr=o.lr, betas=o.betas, eps=o.eps)


@dataclass
class WarmupCosine:
    """Linear warmup to 1, then cosine to `min_lr_ratio` at `total_steps`. `step` is 0-based."""

    warmup_steps: int
    total_steps: int
    min_lr_ratio: float

    def __call__(self, step: int) -> float:
        if step < self.warmup_steps:
            return (step + 1) / self.warmup_steps
        progress = min(1.0, (step - self.warmup_steps) / max(1, self.total_steps - self.warmup_steps))
        return self.min_lr_ratio + (1.0 - self.min_lr_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))


@dataclass
class WarmupStableDecay:
    """WSD: linear warmup, a flat stable phase, then linear decay over the last `decay_fraction`.

    The stable phase makes intermediate checkpoints reusable: a shorter run is the same run
    with its decay started earlier.
    """

    warmup_steps: int
    total_steps: int
    decay_fraction: float
    min_lr_ratio: float

    def __call__(self, step: int) -> float:
        if step < self.warmup_steps:
            return (step + 1) / self.warmup_steps
        decay_steps = round(self.decay_fraction * self.total_steps)
        decay_start = self.total_steps - decay_steps
        if step < decay_start:
            return 1.0
        progress = min(1.0, (step - decay_start) / max(1, decay_steps))
        return 1.0 - (1.0 - self.min_lr_ratio) * progress


def lr_multiplier(cfg: RunConfig) -> WarmupCosine | WarmupStableDecay:
    s, total = cfg.schedule, cfg.train.max_steps
    if s.kind == "cosine":
        return WarmupCosine(s.warmup_steps, total, s.min_lr_ratio)
    return WarmupStableDecay(s.warmup_steps, total, s.decay_fraction, s.min_lr_ratio)


def build_scheduler(optimizer: torch.optim.Optimizer, cfg: RunConfig) -> LambdaLR:
    return LambdaLR(optimizer, lr_multiplier(cfg))


def apply_optim_settings(optimizer: torch.optim.Optimizer, scheduler: LambdaLR, cfg: RunConfig) -> None:
    """Make a restored optimizer and scheduler follow ``cfg`` from the scheduler's current step.

    A checkpoint restores the param groups' hyper-parameters and the scheduler's ``base_lrs``
    as they were saved; after this call the peak lr, betas, eps, weight decay and the schedule
    (``cfg.schedule`` over ``cfg.train.max_steps``) are ``cfg``'s, and the next step's lr is exactly
    what a run started with ``cfg`` would use at that step. With an unchanged config it changes
    nothing. The groups are ``param_groups``' (decay first).
    """
    o, mult = cfg.optim, lr_multiplier(cfg)
    groups = optimizer.param_groups
    scheduler.lr_lambdas = [mult] * len(groups)
    scheduler.base_lrs = [o.lr] * len(groups)
    for i, group in enumerate(groups):
        group["initial_lr"] = o.lr
        group["lr"] = o.lr * mult(scheduler.last_epoch)
        group["betas"], group["eps"] = o.betas, o.eps
        group["weight_decay"] = o.weight_decay if i == 0 else 0.0
    scheduler._last_lr = [group["lr"] for group in groups]
