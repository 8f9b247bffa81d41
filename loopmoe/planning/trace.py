"""What one training step dispatches, op by op, traced on the real model at its real shapes.

The planner does not guess a layer's work from a formula: it runs the real ``LoopMoEForCausalLM``
forward and loss backward under ``FakeTensorMode`` (tensors with shapes and no data, so a
billion-parameter config traces in a fraction of a second and no memory) inside a dispatch mode
that tallies every aten op by phase:

- ``gemms``: every matmul with its ``(m, n, k)`` shape, backward shapes included (the input
  gradient ``[m, n] @ [n, k]`` and the weight gradient ``[k, m] @ [m, n]`` are different GEMMs
  from the forward's, and a thin one is slower per FLOP);
- ``attention``: every fused-attention call with its ``(batch, heads, S, head_dim)``;
- ``bytes``: the traffic of every other op that computes (inputs + outputs; views and
  allocations move nothing), which the cost model charges at the memory bandwidth;
- ``transcendental``: elements produced by exp / log / softmax / SiLU-family ops, which a CPU
  computes more slowly than it streams;
- ``ops``: every op dispatched, each with a fixed launch / dispatch / autograd cost.

The expert kernel (``loopmoe::experts_loop``) is one custom op here; its per-expert-group
matmuls and element-wise work depend on routing, which fake tensors do not have, so
``expert_kernel`` adds them for balanced routing. Five traces separate what every executed slot
costs from what the step costs once (``C`` = core layers, ``T`` = loops, ``P`` = prelude layers);
the step is ``base + C T core + (P + Q) plain + (T - 1) iteration + C (T - 1) reuse``::

    A: C=1, T=1     B: C=2, T=1     L: C=1, T=2     X: C=2, T=2     D: P=1, C=1, T=1
    core slot = B - A     reuse = X - L - 2 core slot     iteration = L - B - reuse
    plain slot = D - A     base = A - core slot

(a weight used in T iterations gets its gradient summed T - 1 times: the reuse, per core layer and
extra iteration; the concat injection's weight, used T - 1 times, is summed in the iteration
term once and not again beyond T = 2, a few [d, 2d] additions).

The optimizer step (clipping, the update guard, AdamW) reads real values (finiteness checks), so
it is tallied on a real tiny model instead (``optimizer_tally``): its ops per unique layer and its
bytes per parameter do not depend on the width.
"""

from __future__ import annotations

import functools
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

import torch
from torch._subclasses.fake_tensor import FakeTensorMode
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

from loopmoe.budget import ConfigLike
from loopmoe.config import CONFIG_FIELDS, LoopMoEConfig, expert_width
from loopmoe.model import LoopMoEForCausalLM
from loopmoe.model.kernels.cross_entropy import DEFAULT_CHUNK_BYTES
from loopmoe.training.trainer import Trainer

Shape = tuple[int, ...]

# Ops that only relabel memory (views), or allocate it without writing: dispatched, not moving bytes.
_NO_TRAFFIC = frozenset(
    {
        "view",
        "_unsafe_view",
        "as_strided",
        "slice",
        "select",
        "transpose",
        "t",
        "permute",
        "expand",
        "unsqueeze",
        "squeeze",
        "alias",
        "detach",
        "split",
        "split_with_sizes",
        "unbind",
        "reshape",
        "narrow",
        "chunk",
        "empty",
        "empty_like",
        "empty_strided",
        "new_empty",
        "new_empty_strided",
        "_local_scalar_dense",
        "lift_fresh",
    }
)
_GEMMS = frozenset({"mm", "addmm", "addmm_", "bmm", "baddbmm", "matmul"})
_TRANSCENDENTAL = frozenset(
    {
        "exp",
        "exp_",
        "log",
        "_log_softmax",
        "_log_softmax_backward_data",
        "_softmax",
        "_softmax_backward_data",
        "logsumexp",
        "silu",
        "silu_backward",
        "sigmoid",
        "sigmoid_backward",
        "tanh",
        "rsqrt",
        "sin",
        "cos",
    }
)


@dataclass
class Tally:
    """What one phase of some part of a step dispatches (see the module docstring)."""

    ops: float = 0
    bytes: float = 0
    transcendental: float = 0
    gemms: Counter = field(default_factory=Counter)  # (m, n, k) -> count
    attention: Counter = field(default_factory=Counter)  # (batch, heads, S, head_dim) -> count

    def __add__(self, o: Tally) -> Tally:
        return Tally(
            self.ops + o.ops,
            self.bytes + o.bytes,
            self.transcendental + o.transcendental,
            _combine(self.gemms, o.gemms, 1),
            _combine(self.attention, o.attention, 1),
        )

    def __sub__(self, o: Tally) -> Tally:
        return Tally(
            self.ops - o.ops,
            self.bytes - o.bytes,
            self.transcendental - o.transcendental,
            _combine(self.gemms, o.gemms, -1),
            _combine(self.attention, o.attention, -1),
        )

    def gemm_flops(self) -> float:
        return sum(2 * m * n * k * c for (m, n, k), c in self.gemms.items())


def _combine(a: Counter, b: Counter, sign: int) -> Counter:
    out = Counter(a)
    for key, c in b.items():
        out[key] += sign * c
    return Counter({key: c for key, c in out.items() if c})


@dataclass(frozen=True)
class PhaseTally:
    forward: Tally
    backward: Tally

    def __add__(self, o: PhaseTally) -> PhaseTally:
        return PhaseTally(self.forward + o.forward, self.backward + o.backward)

    def __sub__(self, o: PhaseTally) -> PhaseTally:
        return PhaseTally(self.forward - o.forward, self.backward - o.backward)


@dataclass(frozen=True)
class StepTally:
    core_slot: PhaseTally  # one executed core slot
    plain_slot: PhaseTally  # one prelude / coda slot
    iteration: PhaseTally  # per core iteration beyond the first (conditioning signal, injection)
    reuse: PhaseTally  # per core layer and iteration beyond the first: summing its weights' gradients
    base: PhaseTally  # embedding, final norm, LM head and loss


def step_tally(cfg: ConfigLike, micro_batch: int, seq_len: int, device_type: str = "cpu") -> StepTally:
    """The traced work of ``cfg`` on one micro-batch of ``micro_batch x seq_len`` tokens, with the
    kernels the model picks on ``device_type`` (cached)."""
    fields = tuple((k, getattr(cfg, k)) for k in CONFIG_FIELDS if k not in _LAYOUT_FIELDS)
    plain, looped = cfg.num_prelude_layers + cfg.num_coda_layers > 0, cfg.num_loops > 1
    return _step_tally(fields, micro_batch, seq_len, device_type, plain, looped, looped and cfg.num_core_layers > 1)


# The layer counts: the four traces set their own, so configs that differ only there share them.
_LAYOUT_FIELDS = ("num_core_layers", "num_loops", "num_prelude_layers", "num_coda_layers")


@functools.lru_cache(maxsize=256)
def _step_tally(
    fields: tuple, micro_batch: int, seq_len: int, device_type: str, plain: bool, looped: bool, reused: bool
) -> StepTally:
    base = dict(fields)
    base.update(max_position_embeddings=max(base["max_position_embeddings"], seq_len))

    def run(C: int, T: int, P: int) -> PhaseTally:
        f = dict(base, num_core_layers=C, num_loops=T, num_prelude_layers=P, num_coda_layers=0)
        if T == 1:
            f["input_injection"] = "none"  # injection needs T > 1; the iteration difference counts it
        return _trace(LoopMoEConfig(**f), micro_batch, seq_len, device_type)

    # (the plain slot, the iteration and the reuse are traced only where a config has them)
    nothing = PhaseTally(Tally(), Tally())
    a, b = run(1, 1, 0), run(2, 1, 0)
    core = b - a
    looped_1 = run(1, 2, 0) if looped else nothing
    reuse = run(2, 2, 0) - looped_1 - core - core if reused else nothing
    return StepTally(
        core_slot=core,
        plain_slot=run(1, 1, 1) - a if plain else nothing,
        iteration=looped_1 - b - reuse if looped else nothing,
        reuse=reuse,
        base=a - core,
    )


def _name(func) -> str:
    return func.overloadpacket.__name__


def loss_chunk_bytes(device_type: str) -> int:
    """The fused LM-head loss's chunk of fp32 logits on ``device_type``, as the model picks it there
    (``kernels.cross_entropy.DEFAULT_CHUNK_BYTES``; on a CPU, chunks that fit the cache, thousands of
    them for a large vocabulary; on a GPU, one)."""
    return DEFAULT_CHUNK_BYTES.get(device_type, DEFAULT_CHUNK_BYTES["cuda"])


def _trace(cfg: LoopMoEConfig, micro_batch: int, seq_len: int, device_type: str) -> PhaseTally:
    phases = {"forward": Tally(), "backward": Tally()}

    def nbytes(x) -> int:
        return x.numel() * x.element_size() if isinstance(x, torch.Tensor) else 0

    class Tallying(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            if func.namespace not in ("aten", "loopmoe"):
                return out  # prim.device and the like: Python-level queries fake tensors route here
            t = phases["backward" if torch._C._current_graph_task_id() != -1 else "forward"]
            t.ops += 1
            name = _name(func)
            if name in _GEMMS:
                a, b = args[-2], args[-1]  # (addmm: bias first)
                batch = a.shape[0] if a.dim() == 3 else 1
                t.gemms[(a.shape[-2], b.shape[-1], a.shape[-1])] += batch
            elif name.startswith("_scaled_dot_product"):
                q = args[1] if name.endswith("_backward") else args[0]  # (backward: the output gradient first)
                t.attention[tuple(q.shape)] += 1
            elif func.namespace == "loopmoe":
                pass  # the expert kernel: ``expert_kernel`` adds its work
            elif name not in _NO_TRAFFIC:
                moved = sum(nbytes(x) for x in tree_leaves((args, kwargs, out)))
                t.bytes += moved
                if name in _TRANSCENDENTAL:
                    t.transcendental += sum(x.numel() for x in tree_leaves(out) if isinstance(x, torch.Tensor))
            return out

    # Fake tensors live on the CPU: the fused loss is told the row chunks it takes on ``device_type``.
    chunk = loss_chunk_bytes(device_type)
    with FakeTensorMode(allow_non_fake_inputs=True):
        model = LoopMoEForCausalLM(cfg).train()  # (fake initialisation: no random numbers drawn)
        ids = torch.zeros(micro_batch, seq_len, dtype=torch.long)
        with Tallying():
            loss = model(input_ids=ids, labels=ids, loss_chunk_bytes=chunk).loss
            loss.backward()
    return PhaseTally(phases["forward"], phases["backward"])


def expert_kernel(cfg: ConfigLike, tokens: int, ep: int = 1, device_type: str = "cpu") -> PhaseTally:
    """The work inside one call of the expert kernel on ``tokens`` tokens per device, for balanced
    routing: ``N k`` rows over the local experts (``E / ep`` groups of ``N k ep / E`` rows each
    after the all_to_all). Per group, forward: gate and up ``[n, w] @ [w, f]``, down
    ``[n, f] @ [f, w]``; backward: ``gy W_d``, ``gy^T a``, the gate / up weight gradients and the
    input gradient (two GEMMs each). Element-wise: SiLU and the product in forward (5 passes over
    ``[M, f]``), the recomputed product, SiLU's backward and two products in backward (12 passes).
    Ops: on a CPU (``experts_loop``) one matmul per group and pass; on an accelerator
    (``experts_grouped_mm``) one grouped GEMM per projection whatever the group count.
    """
    k, E, f, w = cfg.num_experts_per_tok, cfg.num_experts, cfg.moe_intermediate_size, expert_width(cfg)
    groups = max(1, E // ep)
    rows_total = tokens * k  # rows this device's experts get, whatever ep is (balanced all_to_all)
    n = max(1, round(rows_total / groups))
    grouped = device_type != "cpu"
    fwd = Tally(
        ops=6 if grouped else 2 + 3 * groups,  # cumsum, 2 grouped GEMMs, chunk, silu, mul
        bytes=5 * rows_total * f * 4,
        transcendental=rows_total * f,
        gemms=_gemms([((n, f, w), 2 * groups), ((n, w, f), groups)]),
    )
    bwd = Tally(
        ops=14 if grouped else 8 + 6 * groups,  # 4 grouped GEMMs, the products, silu_backward, cat
        bytes=12 * rows_total * f * 4,
        transcendental=rows_total * f,
        gemms=_gemms([((n, f, w), groups), ((w, f, n), groups), ((f, w, n), 2 * groups), ((n, w, f), 2 * groups)]),
    )
    return PhaseTally(fwd, bwd)


def _gemms(items: list[tuple[Shape, int]]) -> Counter:
    out: Counter = Counter()
    for shape, count in items:  # shapes may coincide (f == w): add, do not overwrite
        out[shape] += count
    return out


# --- the optimizer step: measured on a real tiny model -----------------------------------------------


@dataclass(frozen=True)
class OptimizerTally:
    ops_per_layer: float  # per unique layer
    ops_fixed: float  # embedding, head, the step's bookkeeping
    bytes_per_param: float  # AdamW, clipping, the update guard's copy


def optimizer_tally(update_guard: bool = True) -> OptimizerTally:
    """Ops and traffic of the trainer's step outside forward and backward (cached)."""
    return _optimizer_tally(update_guard)


@functools.lru_cache(maxsize=4)
def _optimizer_tally(update_guard: bool) -> OptimizerTally:
    one, params1 = _trace_optimizer(1, update_guard)
    two, params2 = _trace_optimizer(2, update_guard)
    per_layer = two[0] - one[0]
    return OptimizerTally(
        ops_per_layer=per_layer,
        ops_fixed=one[0] - per_layer,
        bytes_per_param=(two[1] - one[1]) / (params2 - params1),
    )


# A width-32 model, whose step is almost all per-op cost (its arithmetic is negligible): the optimizer's
# tally, FSDP2's cost per call and the first of the calibration's fitted steps run it.
TINY: dict[str, Any] = dict(
    vocab_size=64,
    hidden_size=32,
    num_attention_heads=2,
    num_key_value_heads=1,
    head_dim=8,
    num_experts=4,
    num_experts_per_tok=2,
    moe_intermediate_size=16,
    max_position_embeddings=16,
    iter_cond_rank=8,
    iter_pe_dim=8,
    num_loops=1,
)


def tiny_trainer(layers: int, update_guard: bool = True, wrap=None):
    """A real tiny model (width 32) with its ``Trainer``, one step in (optimizer state exists, as in a
    long run), and its batch: for what does not depend on the width (ops per step). ``wrap``: applied
    to the model before the optimizer is built (a parallelism wrapper)."""
    return step_trainer(LoopMoEConfig(**TINY, num_core_layers=layers), 2, 16, update_guard, wrap)


def step_trainer(cfg: LoopMoEConfig, micro_batch: int, seq_len: int, update_guard: bool = True, wrap=None):
    """``cfg``'s model with the ``Trainer`` of ``loopmoe train`` (AdamW, clipping), one step in, and a
    ``[micro_batch, seq_len]`` batch of random tokens: a real training step to time."""
    with torch.random.fork_rng():
        torch.manual_seed(0)
        model = LoopMoEForCausalLM(cfg).train()
        ids = torch.randint(0, cfg.vocab_size, (micro_batch, seq_len))
    if wrap is not None:
        model = wrap(model)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda step: 1.0)
    trainer = Trainer(
        model,
        opt,
        sched,
        grad_accum=1,
        grad_clip=1.0,
        device=torch.device("cpu"),
        autocast_dtype=None,
        update_guard=update_guard,
    )
    trainer.train_step(iter([ids]))
    return model, trainer, ids


def _trace_optimizer(layers: int, update_guard: bool) -> tuple[tuple[int, int], int]:
    model, trainer, ids = tiny_trainer(layers, update_guard)
    counts = [0, 0]
    in_model = [False]
    model.register_forward_pre_hook(lambda *_: in_model.__setitem__(0, True))
    model.register_forward_hook(lambda *_: in_model.__setitem__(0, False))

    class Count(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            if torch._C._current_graph_task_id() == -1 and not in_model[0]:
                counts[0] += 1
                if _name(func) not in _NO_TRAFFIC:
                    counts[1] += sum(
                        x.numel() * x.element_size()
                        for x in tree_leaves((args, kwargs, out))
                        if isinstance(x, torch.Tensor)
                    )
            return out

    with Count():
        trainer.train_step(iter([ids]))
    return (counts[0], counts[1]), sum(p.numel() for p in model.parameters())
