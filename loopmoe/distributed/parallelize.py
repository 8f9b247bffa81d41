"""Parallelism applied as functions over a finished model (torchtitan style).

``parallelize(model, dist, device)`` is the whole recipe a run applies (as torchtitan's
``parallelize_*``): activation checkpointing and regional compilation, then, under several
processes, expert parallelism and DDP or FSDP2 per ``[dist]``. The ``apply_*`` functions are its
steps; ``apply_expert_parallel`` (re-exported from ``expert_parallel``) splits the experts over "ep".
``clip_grad_norm_`` clips the gradients of a model whatever its layout.

Modules never know how they are parallelised: the trainer builds the plain model, then calls
``parallelize``. Keeping it outside the modules lets the same model run alone, under DDP or
under FSDP2 without any change to its code.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager, nullcontext
from typing import Any, cast

import torch
from torch import nn
from torch.distributed.device_mesh import DeviceMesh, init_device_mesh
from torch.distributed.fsdp import FSDPModule, MixedPrecisionPolicy, fully_shard
from torch.distributed.tensor import DTensor, Shard
from torch.nn.parallel import DistributedDataParallel as DDP
from transformers.cache_utils import Cache

from loopmoe.distributed.config import ActivationCheckpointing, DistSection
from loopmoe.distributed.env import is_distributed
from loopmoe.distributed.expert_parallel import (
    apply_expert_parallel as apply_expert_parallel,
)
from loopmoe.distributed.expert_parallel import (
    clip_expert_parallel_grad_norm_,
    expert_parallel_of,
    expert_parameters,
    moe_layers,
    reduce_expert_grads,
)
from loopmoe.errors import ConfigError
from loopmoe.model.slots import every_nth_slot, every_slot


def parallelize(
    model: nn.Module,
    dist: DistSection,
    device: torch.device,
    *,
    activation_checkpointing: str = "none",
    ac_every: int = 2,
    compile: bool = False,
) -> nn.Module:
    """``model`` on ``device``, laid out as ``dist`` says for this process group; returns the module to train.

    In order: activation checkpointing (``train.activation_checkpointing`` / ``train.ac_every``) and
    regional compilation (``train.compile``), both before wrapping, as torchtitan does; then, under
    several processes, the ``("dp", "ep")`` mesh, expert parallelism (``dist.ep > 1``) and DDP or
    FSDP2 (``dist.strategy``). In one process the model is returned unwrapped.
    """
    model.to(device)
    if activation_checkpointing != "none":
        apply_activation_checkpointing(model, activation_checkpointing, ac_every)
    if compile:
        apply_compile(model)
    if not is_distributed():
        return model
    mesh = build_mesh(torch.distributed.get_world_size(), device.type, dist.ep)
    if dist.ep > 1:
        apply_expert_parallel(model, mesh)
    if dist.strategy == "fsdp2":
        return apply_fsdp2(model, mesh, reshard_core_after_forward=dist.reshard_after_forward)
    return apply_ddp(model, device)


def build_mesh(world_size: int, device_type: str, ep: int = 1) -> DeviceMesh:
    """The 2-D ``("dp", "ep")`` mesh of ``world_size = dp x ep`` ranks (the ep ranks of a group are
    adjacent: ``rank = dp_index * ep + ep_index``). With ``ep = 1``, ``mesh["dp"]`` spans every rank."""
    if ep < 1 or world_size % ep:
        raise ConfigError(
            f"dist.ep = {ep} does not divide the {world_size} processes; launch a multiple of {ep} "
            f"processes (torchrun --nproc_per_node) or set dist.ep to a divisor of {world_size}"
        )
    return init_device_mesh(device_type, (world_size // ep, ep), mesh_dim_names=("dp", "ep"))


def _data_parallel_mesh(mesh: DeviceMesh) -> DeviceMesh:
    """The 1-D mesh over every rank, over which all but the experts are data-parallel."""
    if mesh.ndim == 1:
        return mesh
    return mesh["dp"] if mesh["ep"].size() == 1 else mesh._flatten("dp_ep")


def apply_ddp(model: nn.Module, device: torch.device | None = None) -> DDP:
    """Wrap in DistributedDataParallel (replicated weights, all-reduced gradients).

    `find_unused_parameters` is off: every parameter takes part in every step. An expert that
    receives no token in a micro-batch is a slice of the stacked ``Experts.gate_up_proj`` /
    ``down_proj`` tensors, which the other experts' tokens reach, so no whole parameter goes
    without a gradient (with the flag on, DDP traverses the autograd graph each step to find none,
    and warns so). A model that did leave a parameter unused fails loudly in DDP's reducer, not silently.
    Under expert parallelism DDP leaves the ep-local expert blocks alone: ``gradient_sync`` reduces
    them over their dp replicas only.
    """
    device_ids = [device.index] if device is not None and device.type == "cuda" else None
    experts = [name for name, _ in expert_parameters(model)]
    if experts:
        DDP._set_params_and_buffers_to_ignore_for_model(model, experts)
    return DDP(model, device_ids=device_ids, find_unused_parameters=False)


def _shard_units(model: nn.Module) -> list[nn.Module]:
    """Children that get their own FSDP unit: each entry of every nn.ModuleList (the layers)."""
    return [m for mod in model.modules() if isinstance(mod, nn.ModuleList) for m in mod]


def apply_fsdp2(
    model: nn.Module, mesh: DeviceMesh, param_dtype: torch.dtype | None = None, reshard_core_after_forward: bool = True
) -> nn.Module:
    """Shard parameters with FSDP2 (`fully_shard`): one unit per layer, then the root.

    Per-layer units bound peak memory to about one layer's full parameters. `param_dtype`
    (bf16 on GPU) casts parameters for compute while gradients reduce in fp32. A looped core layer
    runs T times per forward: `reshard_core_after_forward` gathers its weights at every use (2T
    all-gathers per micro-batch); False gathers them once and keeps them to the end of backward.

    Under expert parallelism (``apply_expert_parallel`` first) each layer's ep-local expert block
    is its own unit over ``mesh["dp"]``, sharded along dim 1 (dim 0, the expert, is already split
    over "ep", so a checkpoint sees the global tensor as Shard(0) over ep x Shard(1) over dp); FSDP2
    averages its gradient over dp and ``gradient_sync`` divides it by ep, so that, like every other
    gradient, it is divided by the world size. The rest is sharded over all ranks.
    """
    mp = (
        MixedPrecisionPolicy(param_dtype=param_dtype, reduce_dtype=torch.float32)
        if param_dtype
        else MixedPrecisionPolicy()
    )
    world = _data_parallel_mesh(mesh)
    if expert_parallel_of(model) is not None:
        for moe in moe_layers(model):
            fully_shard(moe.experts, mesh=mesh["dp"], mp_policy=mp, shard_placement_fn=lambda _: Shard(1))
    core = {id(m) for m in getattr(getattr(model, "model", None), "core", ())}
    for unit in _shard_units(model):
        keep = id(unit) in core and not reshard_core_after_forward
        fully_shard(unit, mesh=world, mp_policy=mp, reshard_after_forward=not keep)
    fully_shard(model, mesh=world, mp_policy=mp)
    return model


ACTIVATION_CHECKPOINTING = tuple(mode.value for mode in ActivationCheckpointing)


def apply_activation_checkpointing(model: nn.Module, mode: str, every: int = 2) -> nn.Module:
    """Recompute activations in backward instead of keeping them (torchtitan's full / selective AC).

    ``full``: every executed (iteration, layer) slot is a checkpoint region; ``selective``: every
    ``every``-th executed slot (1-based, so ``every=2`` checkpoints the 2nd, 4th, ...); ``none``
    turns it off. The unit is the executed slot, not the module: a core layer runs T times and each
    run keeps or drops its own activations. Apply before DDP / FSDP2 wrapping or after; either works.
    """
    if mode not in ACTIVATION_CHECKPOINTING:
        raise ConfigError(f"activation checkpointing must be one of {ACTIVATION_CHECKPOINTING}, got {mode!r}")
    if mode == "selective" and every < 1:
        raise ConfigError(f"selective activation checkpointing needs every >= 1, got {every}")
    targets = [m for m in unwrap(model).modules() if hasattr(m, "checkpoint_policy")]
    if not targets:
        raise ConfigError(f"{type(unwrap(model)).__name__} has no executed slots to checkpoint (no checkpoint_policy)")
    policy = {
        "none": None,
        "full": every_slot,
        "selective": every_nth_slot(every),
    }[mode]
    for m in targets:
        cast(Any, m).checkpoint_policy = policy  # a plain attribute the model declares, not a submodule
    return model


def apply_compile(model: nn.Module, fullgraph: bool = True, **compile_kwargs: Any) -> nn.Module:
    """Regional compilation (torchtitan style): ``torch.compile`` every decoder layer, in place.

    Each entry of every ``nn.ModuleList`` (prelude, core and coda layers) gets ``Module.compile``;
    the model's own forward, the loop over iterations and the choice of checkpointed slots among
    them, stays eager. Parameters and state-dict keys are unchanged (no ``_orig_mod.`` prefix).

    - Layers of the same kind share compiled graphs (dynamo inlines modules and guards on their
      structure, not their identity), so a model compiles a few graphs, not one per layer.
    - The T runs of a core layer pass the same kinds of arguments; the ``Slot`` stays outside (the
      layer gets only its KV-cache index, unused without a cache), so no run recompiles: one graph
      serves every iteration.
    - A call with a KV cache (``generate``, or an eval forward without ``use_cache=False``) runs
      the layer eagerly: the cache update indexes a Python list by the slot's cache index and
      checks the entry's state, so every executed slot, prefill and decoding step would specialise
      its own graph and soon exhaust dynamo's recompile limit. To compile decoding, compile the
      whole model instead (``torch.compile(model)`` or ``model.compile()``), one graph per step.
    - The MoE's experts are custom ops (``loopmoe::experts_loop`` on CPU, ``experts_grouped_mm``
      on CUDA; ``experts_one_token`` for batch-1 decoding) and so is the router's count update
      (``loopmoe::add_expert_counts_``): no graph breaks, hence ``fullgraph=True`` by default.
    - Composes with ``apply_activation_checkpointing`` (either order): a checkpointed slot wraps
      the compiled layer in ``torch.utils.checkpoint``, whose recomputation reruns the compiled
      graph; the router's counts are still taken once. Apply before DDP / FSDP2 wrapping
      (dynamo skips FSDP2's hooks).

    ``compile_kwargs`` go to ``torch.compile`` (``backend``, ``mode``, ``dynamic``, ...).
    """
    layers = _shard_units(unwrap(model))
    if not layers:
        raise ConfigError(f"{type(unwrap(model)).__name__} has no layers to compile (no nn.ModuleList)")
    for layer in layers:
        layer.compile(fullgraph=fullgraph, **compile_kwargs)  # sets layer._compiled_call_impl
        compiled = layer._compiled_call_impl
        assert compiled is not None
        layer._compiled_call_impl = _CachelessCompiled(compiled, layer._call_impl)
    return model


class _CachelessCompiled:
    """A compiled layer's call: the compiled graph, or eager when a KV cache comes along."""

    def __init__(self, compiled: Callable[..., Any], eager: Callable[..., Any]):
        self.compiled, self.eager = compiled, eager

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        with_cache = any(isinstance(a, Cache) for a in (*args, *kwargs.values()))
        return (self.eager if with_cache else self.compiled)(*args, **kwargs)


def unwrap(model: nn.Module) -> nn.Module:
    """The user's module under a DDP wrapper (FSDP2 modifies modules in place, so: itself)."""
    return model.module if isinstance(model, DDP) else model


def clip_grad_norm_(model: nn.Module, max_norm: float) -> torch.Tensor:
    """Clip the gradients of ``model`` (as ``parallelize`` returned it) to a global norm of ``max_norm``
    (``inf``: measure only); returns that norm before clipping, the same on every rank.

    The norm counts every parameter once whatever the layout: replicated under DDP, sharded
    DTensors under FSDP2 (their norm is reduced over the mesh), and ep-local expert blocks under
    expert parallelism (``clip_expert_parallel_grad_norm_`` sums their squares over the ep group).
    """
    if expert_parallel_of(unwrap(model)) is not None:
        return clip_expert_parallel_grad_norm_(unwrap(model), max_norm)
    params = [p for p in model.parameters() if p.grad is not None]
    norm = torch.nn.utils.clip_grad_norm_(params, max_norm, error_if_nonfinite=False)
    return norm.full_tensor() if isinstance(norm, DTensor) else norm


@contextmanager
def gradient_sync(model: nn.Module, enabled: bool) -> Iterator[None]:
    """Skip the gradient all-reduce/reduce-scatter on all but the last micro-batch.

    Gradient accumulation is then one communication per optimizer step instead of one per
    micro-batch, with the same result. Under DDP the ep-local expert blocks are reduced after the
    last micro-batch's backward (``reduce_expert_grads``); FSDP2 averages them over dp itself.
    """
    if isinstance(model, DDP):
        with nullcontext() if enabled else model.no_sync():
            yield
        if enabled:
            reduce_expert_grads(model.module)
    elif isinstance(model, FSDPModule):
        model.set_requires_gradient_sync(enabled)
        try:
            yield
        finally:
            model.set_requires_gradient_sync(True)
        if enabled:
            reduce_expert_grads(model, averaged_over_dp=True)
    else:
        yield
