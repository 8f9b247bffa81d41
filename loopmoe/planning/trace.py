"""Framework ops per executed slot, counted on the real model at a tiny width.

How many ops a layer dispatches (each with a fixed launch / dispatch / autograd cost) depends on
its structure (conditioning, norms, QK-norm, shared experts), not on its width, so the planner
counts them on a tiny instance of the same structure: the real ``LoopMoEForCausalLM`` and the
real ``Trainer`` step, under a dispatch mode that counts every aten op by phase (forward,
backward, the rest: clipping, guard, optimizer). Four tiny models separate the per-slot counts
from the fixed ones (``C`` = core layers, ``T`` = loops, ``P`` = prelude layers)::

    A: C=1, T=1      B: C=2, T=1      L: C=1, T=2      D: P=1, C=1, T=1
    core slot = B - A      iteration = L - A - core slot (forward and backward)      plain slot = D - A      base = A - core slot

Expert matmuls run inside one custom op (``loopmoe::experts_loop``), which counts as one op here:
the cost model adds their per-expert matmuls itself. A few hundred milliseconds per structure,
cached.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

from loopmoe.budget import ConfigLike
from loopmoe.config import CONFIG_FIELDS, LoopMoEConfig


@dataclass(frozen=True)
class PhaseOps:
    forward: int
    backward: int
    other: int  # clipping, update guard, optimizer step, zero_grad (per step)

    def __sub__(self, o: PhaseOps) -> PhaseOps:
        return PhaseOps(self.forward - o.forward, self.backward - o.backward, self.other - o.other)


@dataclass(frozen=True)
class OpCounts:
    core_slot: PhaseOps  # one executed core slot (other: per unique core layer)
    plain_slot: PhaseOps  # one prelude / coda slot (other: per unique layer)
    iteration: PhaseOps  # per core iteration beyond the first (conditioning signal, injection)
    base: PhaseOps  # embedding, final norm, loss, and the step's fixed ops


# The structural fields that change the op sequence of a layer; widths are replaced by tiny ones.
_STRUCTURE = (
    "qk_norm",
    "shared_expert_intermediate_size",
    "router_score",
    "norm_topk_prob",
    "router_z_loss_coef",
    "router_bias_update_rate",
    "iter_conditioning",
    "input_injection",
    "norm_scheme",
    "tie_word_embeddings",
    "num_experts_per_tok",
    "num_experts",
)


def structure_key(cfg: ConfigLike) -> tuple:
    return tuple(
        (k, bool(getattr(cfg, k)) if k == "shared_expert_intermediate_size" else getattr(cfg, k)) for k in _STRUCTURE
    )


def op_counts(cfg: ConfigLike) -> OpCounts:
    """Per-slot and fixed op counts of ``cfg``'s structure (cached by structure)."""
    return _op_counts(structure_key(cfg))


@functools.lru_cache(maxsize=64)
def _op_counts(key: tuple) -> OpCounts:
    s = dict(key)
    k = min(s["num_experts_per_tok"], 4)
    tiny = dict(
        vocab_size=64,
        hidden_size=32,
        num_attention_heads=2,
        num_key_value_heads=1,
        head_dim=8,
        num_experts=max(k, min(s["num_experts"], 8)),
        num_experts_per_tok=k,
        moe_intermediate_size=16,
        shared_expert_intermediate_size=16 if s["shared_expert_intermediate_size"] else 0,
        max_position_embeddings=64,
        iter_cond_rank=8,
        iter_pe_dim=8,
        **{
            n: s[n]
            for n in _STRUCTURE
            if n not in ("shared_expert_intermediate_size", "num_experts", "num_experts_per_tok")
        },
    )
    a = _trace(tiny, C=1, T=1, P=0)
    b = _trace(tiny, C=2, T=1, P=0)
    looped = _trace(tiny, C=1, T=2, P=0)
    d = _trace(tiny, C=1, T=1, P=1)
    core = b - a
    per_slot = PhaseOps(core.forward, core.backward, 0)  # a loop adds slots, not unique layers
    return OpCounts(core_slot=core, plain_slot=d - a, iteration=looped - a - per_slot, base=a - core)


def _trace(fields: dict, C: int, T: int, P: int) -> PhaseOps:
    import torch
    from torch.utils._python_dispatch import TorchDispatchMode

    from loopmoe.model import LoopMoEForCausalLM
    from loopmoe.training.trainer import Trainer

    fields = dict(fields)
    if T == 1 and fields["input_injection"] != "none":
        fields["input_injection"] = "none"  # injection needs T > 1; the iteration difference counts it
    cfg = LoopMoEConfig(num_core_layers=C, num_loops=T, num_prelude_layers=P, **fields)
    assert set(fields) <= set(CONFIG_FIELDS)
    with torch.random.fork_rng():
        torch.manual_seed(0)
        model = LoopMoEForCausalLM(cfg).train()
        ids = torch.randint(0, cfg.vocab_size, (2, 16))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda step: 1.0)
    trainer = Trainer(model, opt, sched, grad_accum=1, grad_clip=1.0, device=torch.device("cpu"), autocast_dtype=None)
    trainer.train_step(iter([ids]))  # optimizer state exists from here on, as in a long run
    counts = {"forward": 0, "backward": 0, "other": 0}
    in_forward = [False]

    def pre(*_):
        in_forward[0] = True

    def post(*_):
        in_forward[0] = False

    class Count(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            if torch._C._current_graph_task_id() != -1:
                counts["backward"] += 1
            else:
                counts["forward" if in_forward[0] else "other"] += 1
            return func(*args, **(kwargs or {}))

    h1, h2 = model.register_forward_pre_hook(pre), model.register_forward_hook(post)
    try:
        with Count():
            trainer.train_step(iter([ids]))
    finally:
        h1.remove()
        h2.remove()
    return PhaseOps(counts["forward"], counts["backward"], counts["other"])
