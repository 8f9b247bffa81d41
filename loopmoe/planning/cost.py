"""The cost of one training step: compute per executed slot, communication, memory.

Compute, per device and micro-batch of ``N`` tokens, for every executed (iteration, layer) slot:

- each GEMM the slot runs (attention projections, router, the ``k`` routed experts as one GEMM per
  expert group of ``N k ep / E`` rows, shared experts, the IterAdaLN modulation), at the
  hardware's achieved rate for its shape (``Hardware.gemm_efficiency``: the roofline's compute
  side with the measured / typical small-GEMM falloff); backward is two GEMMs of the same size
  per forward GEMM (input and weight gradients);
- attention scores at the fused-attention rate (forward ``4 S^2 h_d H`` per sequence over the full
  S x S, the budget's convention; backward 2.5x);
- element-wise work: every saved activation written and read about four times (forward write,
  backward read, its gradient written and read), at the memory bandwidth (the roofline's memory
  side);
- a fixed cost per framework op (``loopmoe.planning.trace`` counts them on the real model), plus
  per expert-group matmul inside the expert kernel;
- activation checkpointing reruns the forward of every checkpointed slot during backward.

Then the LM head (fused loss: three GEMMs, all in forward), the optimizer (AdamW, clipping and
the update guard: memory-bound, ~64 bytes per parameter on the device), and communication
(``loopmoe.planning.comm``). The step time is ``compute + exposed communication``, where the
exposed part is what cannot hide behind compute. FLOP totals are checked against
``loopmoe.budget.compute_budget`` (the one home of the FLOP formulas): the GEMM list here only
adds the shapes that the rate depends on.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

from loopmoe.budget import ConfigLike, compute_budget
from loopmoe.config import ExpertType, IterConditioning, expert_width, router_width
from loopmoe.planning.comm import CommPlan, plan_comm
from loopmoe.planning.hardware import Hardware
from loopmoe.planning.layout import Layout
from loopmoe.planning.memory import (
    DTYPE_BYTES,
    MemoryPlan,
    checkpointed_slots,
    param_split,
    plan_memory,
    slot_activation_elements,
)
from loopmoe.planning.trace import op_counts

Gemm = tuple[int, int, int, int]  # (m, n, k, count): count GEMMs of [m, k] @ [k, n]
EXPERT_MATMULS_FORWARD, EXPERT_MATMULS_BACKWARD = 3, 6  # per expert group (loopmoe.model.kernels.experts)
ELEMENTWISE_PASSES = 4  # writes + reads of each saved activation per step (forward and backward)
OPTIMIZER_BYTES_PER_PARAM = 64  # AdamW (7 x 4 B), guard copy (6 x 4 B), finiteness check and clipping


def slot_gemms(cfg: ConfigLike, tokens: int, core: bool, ep: int = 1) -> list[Gemm]:
    """The forward GEMMs of one executed slot on ``tokens`` tokens (per device)."""
    d, H, Hkv, hd = cfg.hidden_size, cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
    k, E, f, fs = (
        cfg.num_experts_per_tok,
        cfg.num_experts,
        cfg.moe_intermediate_size,
        cfg.shared_expert_intermediate_size,
    )
    N, w = tokens, expert_width(cfg)  # w: the experts' row width (d, or the DCCA width)
    local_experts = max(1, E // ep)
    rows = max(1, round(N * k * ep / E))  # rows per expert group, balanced routing
    gemms: list[Gemm] = [
        (N, H * hd, d, 1),  # q
        (N, Hkv * hd, d, 2),  # k, v
        (N, d, H * hd, 1),  # o
        (N, E, router_width(cfg), 1),  # router
        (rows, f, w, 2 * local_experts),  # gate, up (per expert group)
        (rows, w, f, local_experts),  # down
    ]
    if ExpertType(cfg.expert_type).projects:
        gemms += [(N, w, d, 1), (N, d, w, 1)]  # DCCA's descend and ascend, once per token
    if fs:
        gemms += [(N, fs, d, 2), (N, d, fs, 1)]
    if core and IterConditioning(cfg.iter_conditioning).uses_token:
        r = cfg.iter_cond_rank
        gemms += [(N, r, d, 1), (N, 6 * d, r, 1)]  # W_h, W_mod
    return gemms


def gemm_flops(gemms: list[Gemm]) -> float:
    return sum(2 * m * n * k * c for m, n, k, c in gemms)


def gemm_time(hw: Hardware, gemms: list[Gemm], dtype: str) -> float:
    peak = hw.peak(dtype)
    return sum(c * 2 * m * n * k / (peak * hw.gemm_efficiency(m, n, k)) for m, n, k, c in gemms)


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
    N, S, dtype = layout.tokens_per_micro_batch, layout.seq_len, layout.dtype
    act = DTYPE_BYTES[dtype]
    P, Q, C, T = cfg.num_prelude_layers, cfg.num_coda_layers, cfg.num_core_layers, cfg.num_loops
    plain_slots, core_slots = P + Q, C * T
    rerun = checkpointed_slots(cfg, layout)
    core_share = core_slots / max(1, plain_slots + core_slots)
    rerun_core, rerun_plain = rerun * core_share, rerun * (1 - core_share)
    ops = op_counts(cfg)

    def slot(core: bool, count: float, recomputed: float):
        g = slot_gemms(cfg, N, core, layout.ep)
        fwd = gemm_time(hw, g, dtype)
        t_gemm = (3 * count + recomputed) * fwd  # forward + 2x backward, + rerun forward
        flops = (3 * count + recomputed) * gemm_flops(g)
        scores = 4 * S * S * cfg.head_dim * cfg.num_attention_heads * layout.micro_batch
        t_attn = (3.5 * count + recomputed) * scores / (hw.peak(dtype) * hw.attention_efficiency)
        flops += (3.5 * count + recomputed) * scores
        elems = slot_activation_elements(cfg, core) * N
        t_elem = (ELEMENTWISE_PASSES * count + 2 * recomputed) * elems * act / hw.memory_bandwidth
        o = ops.core_slot if core else ops.plain_slot
        groups = min(max(1, cfg.num_experts // layout.ep), N * cfg.num_experts_per_tok)
        per_fwd = o.forward + EXPERT_MATMULS_FORWARD * groups
        per_bwd = o.backward + EXPERT_MATMULS_BACKWARD * groups
        n_ops = count * (per_fwd + per_bwd) + recomputed * per_fwd
        return t_gemm, t_attn, t_elem, n_ops, flops, recomputed * fwd

    parts = [slot(True, core_slots, rerun_core), slot(False, plain_slots, rerun_plain)]
    t_gemm = sum(p[0] for p in parts)
    t_attn = sum(p[1] for p in parts)
    t_elem = sum(p[2] for p in parts)
    n_ops = sum(p[3] for p in parts)
    flops = sum(p[4] for p in parts)
    recompute = sum(p[5] for p in parts)
    # LM head with the fused loss (logits, their gradient, the head's and the input's gradients), and
    # the concat injection; per micro-batch.
    head: list[Gemm] = [(N, cfg.vocab_size, cfg.hidden_size, 3)]
    if cfg.input_injection == "concat":
        head.append((N, cfg.hidden_size, 2 * cfg.hidden_size, 3 * (T - 1)))
    t_gemm += gemm_time(hw, head, dtype)
    flops += gemm_flops(head)
    t_elem += ELEMENTWISE_PASSES * 3 * N * cfg.hidden_size * act / hw.memory_bandwidth
    n_ops += ops.base.forward + ops.base.backward + (T - 1) * (ops.iteration.forward + ops.iteration.backward)
    accum = layout.grad_accum
    # Once per step: clipping, guard, AdamW over this device's parameters.
    split = param_split(cfg, S)
    dense, experts = split.total - split.experts, split.experts
    shard = layout.devices if layout.sharded else 1
    on_device = dense / shard + experts / (layout.ep * (layout.devices // layout.ep if layout.sharded else 1))
    unique_other = C * ops.core_slot.other + (P + Q) * ops.plain_slot.other + ops.base.other
    t_opt = OPTIMIZER_BYTES_PER_PARAM * on_device / hw.memory_bandwidth + unique_other * hw.op_overhead_s
    return ComputePlan(
        gemm=accum * t_gemm,
        attention=accum * t_attn,
        elementwise=accum * t_elem,
        overhead=accum * n_ops * hw.op_overhead_s,
        recompute=accum * recompute,
        optimizer=t_opt,
        executed_flops=accum * flops,
    )


def forward_flops_check(cfg: ConfigLike, seq_len: int) -> tuple[float, float]:
    """(forward FLOPs per token from the GEMM list here, from ``loopmoe.budget``) for a one-device layout:
    equal when the shapes cover every matmul the budget counts."""
    N = seq_len
    P, Q, C, T = cfg.num_prelude_layers, cfg.num_coda_layers, cfg.num_core_layers, cfg.num_loops
    ours = (P + Q) * gemm_flops(slot_gemms(cfg, N, False)) + C * T * gemm_flops(slot_gemms(cfg, N, True))
    ours += cfg.executed_depth() * 4 * N * N * cfg.head_dim * cfg.num_attention_heads
    ours += 2 * N * cfg.vocab_size * cfg.hidden_size
    if cfg.input_injection == "concat":
        ours += (T - 1) * 2 * N * 2 * cfg.hidden_size * cfg.hidden_size
    return ours / N, compute_budget(cfg, seq_len).flops_per_token


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
    mfu: float  # model FLOPs (3 x forward, no recomputation) / (peak x devices)
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
    mfu = 3 * budget.flops_per_token * tps / (hw.peak(layout.dtype) * layout.devices)
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
