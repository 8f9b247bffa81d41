"""Memory per device of one training step: parameters, gradients, optimizer state, activations.

Parameter counts come from ``loopmoe.budget`` (exact; a layer's are ``budget.layer_params``). Activations are what autograd saves per
executed slot, per token, in elements (read off the model's saved tensors; the tests check the
formula against ``saved_tensors_hooks`` on real models)::

    4d + (3 if qk_norm else 2)(q + kv) + [H + H_kv if qk_norm] + H + 2kw + 3kf + 2E + 6k + 10
        + 4 f_s (shared experts) + (2d + 2) (sandwich norms)
        + w (DCCA: the combined rows the ascending projection reads) + w (a DCCA router on the descended rows)
        + (9d + 2r + 1) (token-dependent modulation, IterAdaLN / adaln_token) or 4d (adaln_iter)

with ``q = H h_d``, ``kv = H_kv h_d``, ``w`` the experts' row width (d, or the DCCA width). The step's fixed part: the fused LM-head loss keeps the head's
gradient (``V d``, fp32) and two ``[N, d]`` tensors; RoPE tables ``2 S h_d``. A checkpointed slot
keeps only its input (``N d``) and recomputes the rest during its backward.

The peak is the largest of three moments (the trainer frees gradients after each step,
``zero_grad(set_to_none=True)``):

- the end of forward: parameters + optimizer state (+ buffers) + every saved activation + the
  fused LM-head loss's chunk of logits (``min(chunk, N V) x 4`` bytes in fp32, twice that in bf16;
  the chunk is ``trace.loss_chunk_bytes``, 16 MiB on a CPU);

- the start of backward: parameters + optimizer state (+ DDP buckets, FSDP2's gathered weights)
  + every saved activation + the gradients of the layers whose backward comes first (the whole
  core when it loops: its weights get gradients at the last iteration's backward, while the
  earlier iterations' activations are still alive) + one slot's backward workspace (its gradient
  buffers, and its recomputed activations when checkpointed);
- the optimizer step: parameters + gradients + optimizer state + the update guard's copy of
  parameters and optimizer state.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

from loopmoe.budget import ConfigLike, compute_budget, global_params, layer_params, layer_shapes
from loopmoe.config import ExpertType, IterConditioning, expert_width, router_width
from loopmoe.planning.hardware import Hardware
from loopmoe.planning.layout import Layout
from loopmoe.planning.trace import loss_chunk_bytes

DTYPE_BYTES = {"fp32": 4, "bf16": 2}
ADAMW_STATES = 2  # exp_avg, exp_avg_sq, fp32


@dataclass(frozen=True)
class ParamSplit:
    """Parameters of the model split by how they are sharded."""

    total: int
    experts: int  # routed-expert weights (sharded by expert parallelism)
    layer_core: int  # one core layer, everything included
    layer_plain: int  # one prelude / coda layer
    globals: int  # embeddings, head, final norm, conditioning encoder


def param_split(cfg: ConfigLike, seq_len: int) -> ParamSplit:
    """The model's parameters by sharding unit, each layer counted by ``budget.layer_params`` (the
    budget's own count, DCCA's projections and IterAdaLN's modulation included)."""
    plain, core = layer_shapes(cfg, core=False), layer_shapes(cfg, core=True)
    E = cfg.num_experts
    return ParamSplit(
        total=compute_budget(cfg, seq_len).total_params,
        experts=E * plain.expert * cfg.unique_layers,
        layer_core=layer_params(core, E),
        layer_plain=layer_params(plain, E),
        globals=global_params(cfg),
    )


def slot_activation_elements(cfg: ConfigLike, core: bool) -> int:
    """Elements autograd saves per token in one executed slot (the formula in the module docstring)."""
    d, H, Hkv, hd = cfg.hidden_size, cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
    k, f, E = cfg.num_experts_per_tok, cfg.moe_intermediate_size, cfg.num_experts
    q, kv = H * hd, Hkv * hd
    n = 4 * d + (3 if cfg.qk_norm else 2) * (q + kv) + ((H + Hkv) if cfg.qk_norm else 0) + H
    w = expert_width(cfg)
    n += 2 * k * w + 3 * k * f + 2 * E + 6 * k + 10
    if ExpertType(cfg.expert_type).projects:
        n += w + (w if router_width(cfg) != d else 0)
    n += 4 * cfg.shared_expert_intermediate_size
    if cfg.norm_scheme != "pre":
        n += 2 * d + 2
    cond = IterConditioning(cfg.iter_conditioning)
    if core and cond.uses_token:
        n += 9 * d + 2 * cfg.iter_cond_rank + 1
    elif core and cond.modulates:
        n += 4 * d
    return n


@dataclass(frozen=True)
class MemoryPlan:
    """Bytes per device at the step's peak, by kind."""

    params: float
    grads: float
    optimizer: float
    update_guard: float  # transient copy at the optimizer step
    comm_buffers: float  # DDP gradient buckets, FSDP2 gathered weights and unsharded gradients
    activations: float  # saved for backward, at the start of backward (checkpointing applied)
    workspace: float  # the larger transient: one slot's backward (with the gradients alive then) or the loss chunk
    peak: float  # the largest of the three moments, with the allocator's slack
    peak_moment: str  # "end of forward", "backward" or "optimizer step"

    def as_dict(self) -> dict:
        return asdict(self)


def checkpointed_slots(cfg: ConfigLike, layout: Layout) -> int:
    """Executed slots that recompute in backward (``apply_activation_checkpointing``'s policies)."""
    L = cfg.executed_depth()
    if layout.activation_checkpointing == "full":
        return L
    if layout.activation_checkpointing == "selective":
        return L // layout.ac_every  # 1-based every n-th slot in execution order
    return 0


def plan_memory(cfg: ConfigLike, layout: Layout, hw: Hardware) -> MemoryPlan:
    N = layout.tokens_per_micro_batch
    act = DTYPE_BYTES[layout.dtype]
    split = param_split(cfg, layout.seq_len)
    C, T = cfg.num_core_layers, cfg.num_loops
    # Parameters per device: experts over `ep`, everything over the FSDP2 group.
    dense = split.total - split.experts
    shard = layout.devices if layout.sharded else 1
    expert_shard = layout.ep * (layout.devices // layout.ep if layout.sharded else 1)
    on_device = dense / shard + split.experts / expert_shard
    params = 4 * on_device  # fp32 master weights (bf16 is autocast)
    grads = 4 * on_device
    optimizer = 4 * ADAMW_STATES * on_device
    guard = (params + optimizer) if layout.update_guard else 0.0

    comm = 0.0
    if layout.devices > 1 and layout.strategy == "ddp":
        comm = grads  # DDP's bucket buffers hold a second copy of the gradients
    elif layout.sharded:
        pbytes = DTYPE_BYTES[layout.dtype]
        experts_per_layer = split.experts / cfg.unique_layers / layout.ep
        unit_core = (split.layer_core - cfg.num_experts * layer_shapes(cfg, True).expert) + experts_per_layer
        if layout.reshard_after_forward:
            gathered = 2 * unit_core  # the unit in use and the prefetched next one
        else:
            gathered = dense + split.experts / layout.ep  # every unit stays gathered from forward to backward
        comm = pbytes * gathered + 4 * unit_core  # + one unit's unsharded fp32 gradient before reduce-scatter

    per_core = slot_activation_elements(cfg, core=True) * N * act
    per_plain = slot_activation_elements(cfg, core=False) * N * act
    executed = [per_plain] * cfg.num_prelude_layers + [per_core] * (C * T) + [per_plain] * cfg.num_coda_layers
    ckpt = checkpointed_slots(cfg, layout)
    if layout.activation_checkpointing == "full":
        saved = sum(N * cfg.hidden_size * act for _ in executed)
    elif layout.activation_checkpointing == "selective":
        saved = sum(N * cfg.hidden_size * act if (i + 1) % layout.ac_every == 0 else a for i, a in enumerate(executed))
    else:
        saved = sum(executed)
    fixed = (
        4 * cfg.vocab_size * cfg.hidden_size + 2 * N * cfg.hidden_size * act + 2 * layout.seq_len * cfg.head_dim * act
    )
    activations = saved + fixed
    # Backward of one slot allocates gradient buffers about as large as what the slot saved; a
    # checkpointed slot first recomputes its activations as well.
    workspace: float = max(executed) * (2 if ckpt else 1)
    # Gradients alive at the start of backward: the head's (the fused loss makes it in forward,
    # counted in `fixed`) and the first layers to get theirs: the whole core when it loops.
    first = split.layer_core * (C if T > 1 else 1) if C else split.layer_plain
    grads_at_backward = 4 * first / (shard if layout.sharded else 1)
    backward = params + optimizer + comm + activations + workspace + grads_at_backward
    # The end of forward: the fused LM-head loss holds one chunk of logits, turned into fp32
    # log-probabilities and the gradient in place (fp32: one buffer; bf16: the bf16 logits, their fp32
    # copy and the bf16 gradient).
    rows = max(1, loss_chunk_bytes(hw.device_type) // (4 * cfg.vocab_size))
    per_logit = 4 if layout.dtype == "fp32" else 2 * DTYPE_BYTES[layout.dtype] + 4
    loss_workspace = per_logit * min(rows, N) * cfg.vocab_size
    forward_end = params + optimizer + comm + activations + loss_workspace
    workspace = max(workspace + grads_at_backward, loss_workspace)
    step = params + grads + optimizer + guard + (comm if layout.strategy == "ddp" else 0.0)
    moment = max((backward, "backward"), (forward_end, "end of forward"), (step, "optimizer step"))[1]
    peak = max(backward, forward_end, step) * (1 + hw.allocator_overhead)
    return MemoryPlan(params, grads, optimizer, guard, comm, activations, workspace, peak, moment)
