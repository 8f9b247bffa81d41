"""α–β communication of one training step.

A collective over ``n`` devices moving ``B`` bytes per device costs ``steps * α + wire / β`` with
the ring algorithm's steps and bytes on the wire per device (``wire_bytes``); β is the slowest
link the group crosses (inside a node, or across nodes when the group is larger than one).

What a step communicates, per device:

- DDP: one all-reduce of the fp32 gradients per optimizer step (accumulation skips the sync on
  all but the last micro-batch), in 25 MiB buckets, overlapped with backward;
- FSDP2, per unit (each layer, and the root: embeddings, head, norm, conditioning): all-gathers
  of the weights (in the compute dtype) and one reduce-scatter of the fp32 gradients per step.
  **Loop-aware:** a core layer runs T times per forward. With ``reshard_after_forward`` it is
  gathered at every use, T times in forward and T times in backward; without, once for all T
  forward uses, kept into backward (memory in ``loopmoe.planning.memory``), and again for each
  backward use after the first, since FSDP2 reshards after each use's backward: T in all (counted
  on torch's FSDP2, docs/planning.md). The root is never resharded after forward;
- expert parallelism: an all_to_all of the routed tokens (``N k w`` activations, w = d, or the DCCA
  width: ``loopmoe.budget.all_to_all_row_bytes``) to their experts' devices and one back, per executed MoE slot, both again in backward (and once more in a
  checkpointed slot's recomputation): these sit on the critical path;
- a few small all-reduces per step (the loss, the update guard's verdict, router counts).

Overlap (stated, not measured per kernel): gradient reduction and weight gathering hide behind
compute up to ``Hardware.comm_overlap`` of the compute they run beside; expert all_to_all and the
small all-reduces never hide.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

from loopmoe.budget import ConfigLike, all_to_all_row_bytes, layer_shapes
from loopmoe.planning.hardware import Hardware
from loopmoe.planning.layout import Layout
from loopmoe.planning.memory import DTYPE_BYTES, checkpointed_slots, param_split

DDP_BUCKET_BYTES = 25 * 2**20


def wire_bytes(collective: str, nbytes: float, n: int) -> float:
    """Bytes each device sends in a ring ``collective`` over ``n`` devices.

    ``nbytes`` is the full buffer: the all-reduced tensor, the all-gathered output's input shard
    times n, the reduce-scattered input, or the all_to_all's send buffer.
    """
    if n <= 1:
        return 0.0
    if collective == "all_reduce":
        return 2 * (n - 1) / n * nbytes
    if collective in ("all_gather", "reduce_scatter", "all_to_all"):
        return (n - 1) / n * nbytes
    raise ValueError(f"unknown collective {collective!r}")


def latency_steps(collective: str, n: int) -> int:
    if n <= 1:
        return 0
    return 2 * (n - 1) if collective == "all_reduce" else n - 1


def collective_time(hw: Hardware, collective: str, nbytes: float, n: int) -> float:
    """Seconds of one ``collective`` of ``nbytes`` over ``n`` devices (α–β, ring)."""
    if n <= 1:
        return 0.0
    beta = hw.intra_node_bandwidth if n <= hw.devices_per_node else hw.inter_node_bandwidth
    return latency_steps(collective, n) * hw.latency_s + wire_bytes(collective, nbytes, n) / beta


@dataclass(frozen=True)
class CommPlan:
    """Seconds per optimizer step on one device, by kind; and how many collectives."""

    gradient_reduce: float
    weight_gather: float
    expert_all_to_all: float
    small: float
    collectives: dict  # collective kind -> calls per step
    hideable: float  # the part that may overlap compute (gradient reduce + weight gather)
    fsdp2_framework: float = 0.0  # FSDP2's own work around its collectives (exposed)

    @property
    def total(self) -> float:
        return self.gradient_reduce + self.weight_gather + self.expert_all_to_all + self.small + self.fsdp2_framework

    def as_dict(self) -> dict:
        return {**asdict(self), "total": self.total}


def core_gathers_per_micro_batch(cfg: ConfigLike, layout: Layout) -> int:
    """All-gathers of one core layer per micro-batch under FSDP2 (counted on torch's FSDP2): 2T when
    it reshards after every forward use; else T, gathered once for the T forward uses and kept
    into backward, where FSDP2 reshards after the backward of each use, so the T - 1 earlier
    iterations' backward gather it again."""
    return 2 * cfg.num_loops if layout.reshard_after_forward else cfg.num_loops


def plan_comm(cfg: ConfigLike, layout: Layout, hw: Hardware) -> CommPlan:
    n = layout.devices
    calls: dict[str, int] = {}
    if n == 1:
        return CommPlan(0.0, 0.0, 0.0, 0.0, calls, 0.0)
    split = param_split(cfg, layout.seq_len)
    dense = split.total - split.experts
    experts_local = split.experts / layout.ep
    grad_bytes = 4 * (dense + experts_local)  # fp32 gradients of this device's (unsharded) parameters

    reduce = gather = 0.0
    if layout.strategy == "ddp":
        buckets = max(1, math.ceil(grad_bytes / DDP_BUCKET_BYTES))
        reduce = buckets * collective_time(hw, "all_reduce", grad_bytes / buckets, n)
        calls["all_reduce"] = buckets
    else:
        pbytes = DTYPE_BYTES[layout.dtype]
        expert = cfg.num_experts * layer_shapes(cfg, True).expert
        unit_core = split.layer_core - expert + expert / layout.ep
        unit_plain = split.layer_plain - expert + expert / layout.ep
        plain_layers = cfg.num_prelude_layers + cfg.num_coda_layers
        per_use = 2 if layout.reshard_after_forward else 1
        core_gathers = core_gathers_per_micro_batch(cfg, layout) * cfg.num_core_layers
        units = [(unit_core, core_gathers), (unit_plain, per_use * plain_layers), (split.globals, 1)]
        for size, count in units:
            gather += count * layout.grad_accum * collective_time(hw, "all_gather", pbytes * size, n)
            calls["all_gather"] = calls.get("all_gather", 0) + count * layout.grad_accum
        for size, count in ((unit_core, cfg.num_core_layers), (unit_plain, plain_layers), (split.globals, 1)):
            reduce += count * collective_time(hw, "reduce_scatter", 4 * size, n)
            calls["reduce_scatter"] = calls.get("reduce_scatter", 0) + count

    a2a = 0.0
    if layout.ep > 1:
        N, act = layout.tokens_per_micro_batch, DTYPE_BYTES[layout.dtype]
        per_slot = 4  # dispatch + combine, forward and backward
        slots = cfg.executed_depth()
        count = (per_slot * slots + 2 * checkpointed_slots(cfg, layout)) * layout.grad_accum
        a2a = count * collective_time(hw, "all_to_all", N * all_to_all_row_bytes(cfg, act), layout.ep)
        calls["all_to_all"] = count

    small_count = 2 + (1 if layout.update_guard else 0) + (1 if cfg.router_bias_update_rate > 0 else 0)
    small = small_count * collective_time(hw, "all_reduce", 64, n)
    calls["all_reduce"] = calls.get("all_reduce", 0) + small_count
    fsdp2 = (calls.get("all_gather", 0) + calls.get("reduce_scatter", 0)) * hw.fsdp2_call_overhead_s
    return CommPlan(reduce, gather, a2a, small, calls, reduce + gather, fsdp2)
