"""One optimizer step and one evaluation, independent of how the model is parallelised.

The step guards the weights: if the loss or the gradient norm is not finite on any rank, or the
optimizer step itself leaves a parameter non-finite (that step is then rolled back), the
update (and the model's own per-step update, see ``StepHooks``) is skipped and the gradients
dropped, so one bad batch costs a step, not the run.

The contract with the model: ``model(input_ids=x, labels=x)`` returns an output with ``loss``
and ``lm_loss`` (``aux_loss`` and ``router_stats`` when it has them, ``exit_depth`` when it trains
a learned exit gate: the mean expected number of core iterations); a model with state that
changes once per optimizer step outside autograd implements ``StepHooks``. Nothing here knows
about experts or routers: gradient sync and clipping at the model's layout (expert-parallel blocks
included) are ``loopmoe.distributed``'s.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Iterable, Iterator
from contextlib import nullcontext
from dataclasses import dataclass, field
from itertools import islice
from typing import TYPE_CHECKING, Any, Protocol, runtime_checkable

import torch
from torch import nn
from torch.distributed.tensor import DTensor

from loopmoe.distributed.env import all_reduce_mean, all_reduce_sum_
from loopmoe.distributed.parallelize import clip_grad_norm_, gradient_sync, unwrap

if TYPE_CHECKING:
    from loopmoe.model.moe import RouterStats


@runtime_checkable
class StepHooks(Protocol):
    """Per-step state of a model outside autograd, e.g. aux-loss-free router biases.

    After every applied optimizer step the trainer calls ``on_optimizer_step(reduce_fn)``, where
    ``reduce_fn`` sums a tensor over the data-parallel ranks in place (None in one process), so
    every rank takes the same decision; after a skipped step it calls ``on_skipped_step()``, so
    that what the bad batch gathered is dropped.
    """

    def on_optimizer_step(self, reduce_fn: Callable[[torch.Tensor], None] | None) -> None: ...

    def on_skipped_step(self) -> None: ...


def resolve_precision(precision: str, device: torch.device) -> torch.dtype | None:
    """Autocast dtype: `auto` is fp32 (no autocast) on CPU and bf16 on CUDA."""
    if precision == "auto":
        return torch.bfloat16 if device.type == "cuda" else None
    return torch.bfloat16 if precision == "bf16" else None


@dataclass
class StepOutput:
    """Globally averaged numbers of one optimizer step (identical on every rank)."""

    loss: float
    lm_loss: float
    aux_loss: float
    grad_norm: float
    lr: float
    skipped: bool
    tokens: int
    router_stats: list[list[RouterStats]] = field(default_factory=list)  # per micro-batch
    exit_depth: float | None = None  # a learned exit gate's mean expected exit depth; None without one


def _aux(out: Any, like: torch.Tensor) -> torch.Tensor:
    aux = getattr(out, "aux_loss", None)
    return torch.zeros((), device=like.device) if aux is None else torch.as_tensor(aux, device=like.device)


class Trainer:
    """Runs gradient-accumulated steps on a (possibly wrapped) model."""

    def __init__(
        self,
        model: nn.Module,
        optimizer: torch.optim.Optimizer,
        scheduler: Any,
        *,
        grad_accum: int,
        grad_clip: float,
        device: torch.device,
        autocast_dtype: torch.dtype | None,
        world_size: int = 1,
        step_reduce: Callable[[torch.Tensor], None] | None = None,
        update_guard: bool = True,
    ):
        self.model, self.optimizer, self.scheduler = model, optimizer, scheduler
        self.update_guard = update_guard
        self.grad_accum, self.grad_clip = grad_accum, grad_clip
        self.device, self.autocast_dtype, self.world_size = device, autocast_dtype, world_size
        self.step_reduce = step_reduce if step_reduce is not None else (all_reduce_sum_ if world_size > 1 else None)

    def _autocast(self):
        if self.autocast_dtype is None:
            return nullcontext()
        return torch.autocast(device_type=self.device.type, dtype=self.autocast_dtype)

    def _clip(self) -> torch.Tensor:
        """The global gradient norm, clipped to ``grad_clip`` (0: measured only), at any layout."""
        return clip_grad_norm_(self.model, self.grad_clip if self.grad_clip > 0 else float("inf"))

    def _guarded_step(self) -> bool:
        """``optimizer.step()``, undone if it left any parameter non-finite (on any rank).

        Costs one copy of the parameters and the optimizer state per step (device memory of the
        same size, and a copy that is cheap next to the step itself) and one reduction over the
        parameters; a non-finite result restores both, so the step is skipped like a non-finite
        gradient.
        """
        params = [p for group in self.optimizer.param_groups for p in group["params"]]
        saved_params = [p.detach().clone() for p in params]
        saved_state = {
            p: {k: v.clone() if isinstance(v, torch.Tensor) else v for k, v in self.optimizer.state[p].items()}
            for p in params
            if p in self.optimizer.state
        }
        self.optimizer.step()
        local = [p.to_local() if isinstance(p, DTensor) else p for p in params]
        bad = torch.zeros((), device=self.device)
        for p in local:
            bad += (~torch.isfinite(p.detach())).any().to(bad.dtype)
        all_reduce_sum_(bad)
        if bad.item() == 0:
            return True
        with torch.no_grad():
            for p, saved in zip(params, saved_params):
                p.copy_(saved)
        self.optimizer.state.clear()
        for p, state in saved_state.items():
            self.optimizer.state[p] = state
        return False

    def train_step(self, batches: Iterator[torch.Tensor]) -> StepOutput:
        """Consume `grad_accum` micro-batches, then update unless anything is non-finite."""
        self.model.train()
        sums = torch.zeros(3, device=self.device)
        router_stats: list[list[RouterStats]] = []
        tokens = 0
        depth: torch.Tensor | None = None  # summed over micro-batches
        for i in range(self.grad_accum):
            x = next(batches).to(self.device, non_blocking=True)
            tokens += x.numel()
            with gradient_sync(self.model, enabled=i == self.grad_accum - 1):
                with self._autocast():
                    out = self.model(input_ids=x, labels=x)
                (out.loss / self.grad_accum).backward()
            sums += torch.stack(
                [out.loss.detach().float(), out.lm_loss.detach().float(), _aux(out, x).detach().float()]
            )
            router_stats.append(list(getattr(out, "router_stats", None) or []))
            if (micro_depth := getattr(out, "exit_depth", None)) is not None:
                depth = micro_depth.detach().float() + (depth if depth is not None else 0.0)
        grad_norm = self._clip()
        sums = all_reduce_mean(sums / self.grad_accum)
        exit_depth = all_reduce_mean(depth / self.grad_accum).item() if depth is not None else None
        finite = bool(torch.isfinite(sums).all() and torch.isfinite(grad_norm))
        hooks = unwrap(self.model)
        if finite:
            if self.update_guard:
                finite = self._guarded_step()
            else:  # lr and eps are validated finite: only an overflowing update can go non-finite
                self.optimizer.step()
        if finite:
            if isinstance(hooks, StepHooks):
                hooks.on_optimizer_step(self.step_reduce)
        elif isinstance(hooks, StepHooks):
            hooks.on_skipped_step()
        self.optimizer.zero_grad(set_to_none=True)
        lr = self.optimizer.param_groups[0]["lr"]
        with warnings.catch_warnings():  # a skipped step still advances the schedule; torch warns about that
            warnings.filterwarnings("ignore", message=".*lr_scheduler.step\\(\\)` before `optimizer.step")
            self.scheduler.step()
        loss, lm_loss, aux_loss = sums.tolist()
        return StepOutput(
            loss,
            lm_loss,
            aux_loss,
            float(grad_norm),
            lr,
            not finite,
            tokens * self.world_size,
            router_stats,
            exit_depth,
        )

    @torch.no_grad()
    def evaluate(self, batches: Iterable[torch.Tensor], max_batches: int) -> float:
        """Mean LM loss over up to `max_batches` validation batches, averaged over ranks."""
        self.model.eval()
        acc = torch.zeros(2, device=self.device)
        for x in islice(batches, max_batches):
            x = x.to(self.device, non_blocking=True)
            with self._autocast():
                out = self.model(input_ids=x, labels=x)
            acc += torch.stack([out.lm_loss.detach().float(), torch.ones((), device=self.device)])
        self.model.train()
        all_reduce_sum_(acc)
        return (acc[0] / acc[1].clamp(min=1)).item()
