"""The cost of one training step: compute per executed slot, communication, memory.

Compute is simulated op by op. ``loopmoe.planning.trace`` runs the real model's forward and
backward on one micro-batch of ``N`` tokens under fake tensors (real shapes, no data) and tallies
what every executed (iteration, layer) slot dispatches; each part is then charged on the
hardware profile:

- every matmul at its own shape, forward and backward (``kernel_timing.gemm_seconds``: measured on a
  CPU, the roofline's compute side with a GEMM-efficiency curve on an accelerator); the expert
  kernel's per-group matmuls for balanced routing (``N k ep / E`` rows per local expert);
- every fused-attention call at its shape (``kernel_timing.attention_seconds``);
- every other computing op's bytes (inputs + outputs) at the element-wise bandwidth (on a CPU fitted
  on real training steps: reductions and norms stream below a copy's rate), and the elements
  of exp / log / softmax / SiLU-family ops at ``Hardware.transcendental_s`` each (the roofline's
  memory side, and a CPU's slower transcendental math);
- a fixed cost per dispatched op (``Hardware.op_overhead_s``: launch, dispatch, autograd);
- activation checkpointing reruns the forward of every checkpointed slot during backward.

Then the optimizer step (AdamW, clipping and the update guard: the bytes per parameter and ops
per layer ``trace.optimizer_tally`` measures), and communication (``loopmoe.planning.comm``). The
step time is ``compute + exposed communication``, where the exposed part is what cannot hide
behind compute. The traced forward FLOPs are checked against ``loopmoe.budget.compute_budget``
(the one home of the FLOP formulas): ``forward_flops_check``.
"""

from __future__ import annotations

from dataclasses import asdict, astuple, dataclass

from loopmoe import hardware
from loopmoe.budget import ConfigLike, compute_budget
from loopmoe.planning.comm import CommPlan, plan_comm
from loopmoe.planning.hardware import Hardware, attention_flops
from loopmoe.planning.kernel_timing import attention_seconds, gemm_seconds
from loopmoe.planning.layout import Layout
from loopmoe.planning.memory import DTYPE_BYTES, MemoryPlan, checkpointed_slots, param_split, plan_memory
from loopmoe.planning.trace import PhaseTally, Tally, expert_kernel, optimizer_tally, step_tally


@dataclass(frozen=True)
class PartTime:
    """Seconds of one traced part, by kind of work, and the FLOPs it runs."""

    gemm: float = 0.0
    attention: float = 0.0
    elementwise: float = 0.0
    overhead: float = 0.0
    flops: float = 0.0

    def __add__(self, o: PartTime) -> PartTime:
        return PartTime(*(a + b for a, b in zip(astuple(self), astuple(o), strict=True)))

    def __mul__(self, x: float) -> PartTime:
        return PartTime(*(a * x for a in astuple(self)))

    @property
    def total(self) -> float:
        return self.gemm + self.attention + self.elementwise + self.overhead


def tally_time(t: Tally, hw: Hardware, dtype: str, backward: bool) -> PartTime:
    """What ``hw`` spends on one traced tally (traced in fp32: element-wise bytes scale to ``dtype``)."""
    gemm = sum(c * gemm_seconds(hw, m, n, k, dtype) for (m, n, k), c in t.gemms.items())
    attention = sum(c * attention_seconds(hw, shape, backward, dtype) for shape, c in t.attention.items())
    scores = sum(c * attention_flops(shape, backward) for shape, c in t.attention.items())
    scale = DTYPE_BYTES[dtype] / 4
    return PartTime(
        gemm=gemm,
        attention=attention,
        elementwise=t.bytes * scale / hw.elementwise_rate + t.transcendental * hw.transcendental_s,
        overhead=t.ops * hw.op_overhead_s,
        flops=t.gemm_flops() + scores,
    )


def phase_times(p: PhaseTally, hw: Hardware, dtype: str) -> tuple[PartTime, PartTime]:
    return tally_time(p.forward, hw, dtype, False), tally_time(p.backward, hw, dtype, True)


@dataclass(frozen=True)
class ComputePlan:
    """Seconds per optimizer step on one device, by part."""

    gemm: float
    attention: float
    elementwise: float
    overhead: float  # framework ops
    recompute: float  # checkpointed slots' forward rerun (already inside the parts above)
    optimizer: float
    executed_flops: float  # FLOPs the device runs, recomputation included

    @property
    def total(self) -> float:
        return self.gemm + self.attention + self.elementwise + self.overhead + self.optimizer

    def as_dict(self) -> dict:
        return {**asdict(self), "total": self.total}


def plan_compute(cfg: ConfigLike, layout: Layout, hw: Hardware) -> ComputePlan:
    N, dtype = layout.tokens_per_micro_batch, layout.dtype
    P, Q, C, T = cfg.num_prelude_layers, cfg.num_coda_layers, cfg.num_core_layers, cfg.num_loops
    plain_slots, core_slots = P + Q, C * T
    rerun = checkpointed_slots(cfg, layout)
    core_share = core_slots / max(1, plain_slots + core_slots)
    traced = step_tally(cfg, layout.micro_batch, layout.seq_len, hw.device_type)
    experts = expert_kernel(cfg, N, layout.ep, hw.device_type)
    core_f, core_b = phase_times(traced.core_slot + experts, hw, dtype)
    plain_f, plain_b = phase_times(traced.plain_slot + experts, hw, dtype)
    iter_f, iter_b = phase_times(traced.iteration, hw, dtype)
    reuse_f, reuse_b = phase_times(traced.reuse, hw, dtype)
    base_f, base_b = phase_times(traced.base, hw, dtype)
    recompute = core_f * (rerun * core_share) + plain_f * (rerun * (1 - core_share))
    micro = (
        (core_f + core_b) * core_slots
        + (plain_f + plain_b) * plain_slots
        + (iter_f + iter_b) * (T - 1)
        + (reuse_f + reuse_b) * (C * (T - 1))
        + base_f
        + base_b
        + recompute
    )
    # Once per step: clipping, guard, AdamW over this device's parameters.
    split = param_split(cfg, layout.seq_len)
    dense, expert_params = split.total - split.experts, split.experts
    shard = layout.devices if layout.sharded else 1
    on_device = dense / shard + expert_params / (layout.ep * (layout.devices // layout.ep if layout.sharded else 1))
    opt = optimizer_tally(layout.update_guard)
    t_opt = opt.bytes_per_param * on_device / hw.memory_bandwidth
    t_opt += (opt.ops_per_layer * cfg.unique_layers + opt.ops_fixed) * hw.op_overhead_s
    accum = layout.grad_accum
    return ComputePlan(
        gemm=accum * micro.gemm,
        attention=accum * micro.attention,
        elementwise=accum * micro.elementwise,
        overhead=accum * micro.overhead,
        recompute=accum * recompute.total,
        optimizer=t_opt,
        executed_flops=accum * micro.flops,
    )


def forward_flops_check(cfg: ConfigLike, seq_len: int) -> tuple[float, float]:
    """(forward FLOPs per token of the traced slots + the LM head, from ``loopmoe.budget``) for one
    sequence: equal when the trace sees every matmul of every slot that the budget counts. (The traced
    base is left out: the fused loss computes the head's gradients inside forward.)"""
    traced = step_tally(cfg, 1, seq_len)
    experts = expert_kernel(cfg, seq_len)
    P, Q, C, T = cfg.num_prelude_layers, cfg.num_coda_layers, cfg.num_core_layers, cfg.num_loops

    def fwd(p: PhaseTally) -> float:
        return p.forward.gemm_flops() + sum(c * attention_flops(s, False) for s, c in p.forward.attention.items())

    ours = (
        C * T * fwd(traced.core_slot)
        + (P + Q) * fwd(traced.plain_slot)
        + (T - 1) * fwd(traced.iteration)
        + C * (T - 1) * fwd(traced.reuse)
        + (C * T + P + Q) * experts.forward.gemm_flops()
        + 2 * seq_len * cfg.vocab_size * cfg.hidden_size
    )
    return ours / seq_len, compute_budget(cfg, seq_len).flops_per_token


@dataclass(frozen=True)
class StepPlan:
    """A predicted training step: what the plan prints and ``--json`` writes."""

    layout: Layout
    hardware: str
    compute: ComputePlan
    comm: CommPlan
    memory: MemoryPlan
    step_time: float
    exposed_comm: float
    tokens_per_s: float  # over all devices
    mfu: float  # loopmoe.hardware.mfu: model FLOPs (3 x forward, no recomputation) / (peak x devices)
    fits: bool
    total_params: int
    active_params: int
    flops_per_token: int  # forward, from loopmoe.budget

    def as_dict(self) -> dict:
        return {
            "layout": self.layout.as_dict(),
            "hardware": self.hardware,
            "tokens_per_s": self.tokens_per_s,
            "step_time_s": self.step_time,
            "exposed_comm_s": self.exposed_comm,
            "mfu": self.mfu,
            "fits": self.fits,
            "peak_memory_bytes": self.memory.peak,
            "total_params": self.total_params,
            "active_params": self.active_params,
            "flops_per_token": self.flops_per_token,
            "compute": self.compute.as_dict(),
            "comm": self.comm.as_dict(),
            "memory": self.memory.as_dict(),
        }


def plan_step(cfg: ConfigLike, layout: Layout, hw: Hardware) -> StepPlan:
    """Predict one optimizer step of ``cfg`` under ``layout`` on ``hw``."""
    compute = plan_compute(cfg, layout, hw)
    comm = plan_comm(cfg, layout, hw)
    memory = plan_memory(cfg, layout, hw)
    # Backward (2/3.5 of the slot work) is what gradient reduction / weight gathering can hide behind.
    hide = hw.comm_overlap * min(comm.hideable, compute.total - compute.optimizer)
    exposed = comm.total - hide
    step = compute.total + exposed
    budget = compute_budget(cfg, layout.seq_len)
    tps = layout.tokens_per_step / step
    mfu = hardware.mfu(
        tps, hardware.model_flops_per_token(budget.flops_per_token), hw.peak(layout.dtype) * layout.devices
    )
    return StepPlan(
        layout=layout,
        hardware=hw.name,
        compute=compute,
        comm=comm,
        memory=memory,
        step_time=step,
        exposed_comm=exposed,
        tokens_per_s=tps,
        mfu=mfu,
        fits=memory.peak <= hw.memory_bytes,
        total_params=budget.total_params,
        active_params=budget.active_params,
        flops_per_token=budget.flops_per_token,
    )
