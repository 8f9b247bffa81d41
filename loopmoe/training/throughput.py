"""Throughput of a training run: tokens/s, model FLOPs utilisation (MFU) and the time left.

MFU is ``loopmoe.hardware.mfu`` (the one formula, shared with the planner), where

- model FLOPs per trained token = 3 x the analytic forward FLOPs per token of ``loopmoe.budget``
  (``loopmoe.hardware.model_flops_per_token``: forward + backward, which costs twice the forward),
  with attention scores over the full S x S matmuls and, for a learned exit gate, the readouts of
  its training loss (``Budget.exit_gate_flops_per_token``); activation checkpointing's recomputation is
  not counted (it is hardware, not model, FLOPs);
- the peak is ``train.peak_tflops`` per accelerator when the run config gives it, else the
  datasheet dense BF16 peak of a known GPU (``loopmoe.hardware.SPECS``, matched on the CUDA device
  name). It is a configured or looked-up value, never measured: a measured matmul peak would
  vary with the load of the machine and make MFU of the same run differ between two launches.
  On CPU, or an unknown GPU without ``train.peak_tflops``, MFU is not reported.
"""

from __future__ import annotations

from time import perf_counter
from typing import Any

import torch

from loopmoe import hardware
from loopmoe.budget import compute_budget
from loopmoe.config import LoopMoEConfig


def peak_flops_per_s(device: torch.device, configured_tflops: float | None) -> float | None:
    """Peak FLOP/s of one accelerator: ``configured_tflops`` when given, else the datasheet value of a
    known CUDA device, else None (CPU, unknown GPU: no MFU)."""
    if configured_tflops is not None:
        return configured_tflops * 1e12
    if device.type != "cuda":
        return None
    spec = hardware.spec_for_cuda_name(torch.cuda.get_device_name(device))
    return spec.bf16_flops if spec is not None else None


def training_flops_per_token(model: Any, seq_len: int) -> float | None:
    """3 x the analytic forward FLOPs per token of a LoopMoE model at ``seq_len`` (None for another model),
    the readouts of a learned exit gate's training loss included."""
    config = getattr(model, "config", None)
    if not isinstance(config, LoopMoEConfig):
        return None
    budget = compute_budget(config, seq_len)
    return hardware.model_flops_per_token(budget.flops_per_token + budget.exit_gate_flops_per_token)


def format_duration(seconds: float) -> str:
    """``3725 -> '1:02:05'``, ``65 -> '1:05'``."""
    s = max(0, round(seconds))
    h, rest = divmod(s, 3600)
    m, s = divmod(rest, 60)
    return f"{h}:{m:02d}:{s:02d}" if h else f"{m}:{s:02d}"


class Throughput:
    """Tokens/s and MFU over the window since the previous report, and the ETA of the run.

    ``report(step, tokens)`` takes the step just finished and the tokens seen so far; the ETA
    extrapolates the mean time per step of this process (since ``start_step``) to ``max_steps``.
    """

    def __init__(
        self,
        start_step: int,
        max_steps: int,
        tokens: int = 0,
        flops_per_token: float | None = None,
        peak_flops: float | None = None,
        world_size: int = 1,
    ):
        self.start_step, self.max_steps = start_step, max_steps
        self.flops_per_token = flops_per_token
        self.peak_total = peak_flops * world_size if peak_flops is not None else None
        self.t_start = self.t_last = perf_counter()
        self.tokens_last = tokens

    def report(self, step: int, tokens: int) -> dict[str, float | None]:
        now = perf_counter()
        window = max(now - self.t_last, 1e-9)
        tokens_per_s = (tokens - self.tokens_last) / window
        self.t_last, self.tokens_last = now, tokens
        per_step = (now - self.t_start) / max(step - self.start_step, 1)
        return {
            "tokens_per_s": tokens_per_s,
            "mfu": self.mfu(tokens_per_s),
            "eta_s": per_step * (self.max_steps - step),
        }

    def mfu(self, tokens_per_s: float) -> float | None:
        """Model FLOPs utilisation at ``tokens_per_s`` (all processes), or None when a factor is unknown."""
        if self.flops_per_token is None or not self.peak_total:
            return None
        return hardware.mfu(tokens_per_s, self.flops_per_token, self.peak_total)
