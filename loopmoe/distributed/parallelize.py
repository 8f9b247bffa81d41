"""Parallelism applied as functions over a finished model (torchtitan style).

Modules never know how they are parallelised: the trainer builds the plain model, then calls
one of these. Keeping it outside the modules lets the same model run alone, under DDP or
under FSDP2 without any change to its code.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager, nullcontext
from typing import Any, cast

import torch
from torch import nn
from torch.distributed.device_mesh import DeviceMesh, init_device_mesh
from torch.distributed.fsdp import FSDPModule, MixedPrecisionPolicy, fully_shard
from torch.nn.parallel import DistributedDataParallel as DDP


def build_mesh(world_size: int, device_type: str) -> DeviceMesh:
    """A 1-D data-parallel mesh over all ranks."""
    return init_device_mesh(device_type, (world_size,), mesh_dim_names=("dp",))


def apply_ddp(model: nn.Module, device: torch.device | None = None) -> DDP:
    """Wrap in DistributedDataParallel (replicated weights, all-reduced gradients).

    `find_unused_parameters` stays on: with top-k routing an expert may receive no token in a
    micro-batch, and its parameters then get no gradient.
    """
    device_ids = [device.index] if device is not None and device.type == "cuda" else None
    return DDP(model, device_ids=device_ids, find_unused_parameters=True)


def _shard_units(model: nn.Module) -> list[nn.Module]:
    """Children that get their own FSDP unit: each entry of every nn.ModuleList (the layers)."""
    return [m for mod in model.modules() if isinstance(mod, nn.ModuleList) for m in mod]


def apply_fsdp2(model: nn.Module, mesh: DeviceMesh, param_dtype: torch.dtype | None = None) -> nn.Module:
    """Shard parameters with FSDP2 (`fully_shard`): one unit per layer, then the root.

    Per-layer units bound peak memory to about one layer's full parameters. `param_dtype`
    (bf16 on GPU) casts parameters for compute while gradients reduce in fp32.
    """
    mp = (
        MixedPrecisionPolicy(param_dtype=param_dtype, reduce_dtype=torch.float32)
        if param_dtype
        else MixedPrecisionPolicy()
    )
    for unit in _shard_units(model):
        fully_shard(unit, mesh=mesh, mp_policy=mp)
    fully_shard(model, mesh=mesh, mp_policy=mp)
    return model


ACTIVATION_CHECKPOINTING = ("none", "full", "selective")


def apply_activation_checkpointing(model: nn.Module, mode: str, every: int = 2) -> nn.Module:
    """Recompute activations in backward instead of keeping them (torchtitan's full / selective AC).

    ``full``: every executed (iteration, layer) slot is a checkpoint region; ``selective``: every
    ``every``-th executed slot (1-based, so ``every=2`` checkpoints the 2nd, 4th, ...); ``none``
    turns it off. The unit is the executed slot, not the module: a core layer runs T times and each
    run keeps or drops its own activations. Apply before DDP / FSDP2 wrapping or after; either works.
    """
    if mode not in ACTIVATION_CHECKPOINTING:
        raise ValueError(f"activation checkpointing must be one of {ACTIVATION_CHECKPOINTING}, got {mode!r}")
    if mode == "selective" and every < 1:
        raise ValueError(f"selective activation checkpointing needs every >= 1, got {every}")
    targets = [m for m in unwrap(model).modules() if hasattr(m, "checkpoint_policy")]
    if not targets:
        raise ValueError(f"{type(unwrap(model)).__name__} has no executed slots to checkpoint (no checkpoint_policy)")
    policy = {
        "none": None,
        "full": lambda slot: True,
        "selective": lambda slot: (slot.cache_index + 1) % every == 0,
    }[mode]
    for m in targets:
        cast(Any, m).checkpoint_policy = policy  # a plain attribute the model declares, not a submodule
    return model


def unwrap(model: nn.Module) -> nn.Module:
    """The user's module under a DDP wrapper (FSDP2 modifies modules in place, so: itself)."""
    return model.module if isinstance(model, DDP) else model


@contextmanager
def gradient_sync(model: nn.Module, enabled: bool) -> Iterator[None]:
    """Skip the gradient all-reduce/reduce-scatter on all but the last micro-batch.

    Gradient accumulation is then one communication per optimizer step instead of one per
    micro-batch, with the same result.
    """
    if isinstance(model, DDP):
        with nullcontext() if enabled else model.no_sync():
            yield
    elif isinstance(model, FSDPModule):
        model.set_requires_gradient_sync(enabled)
        try:
            yield
        finally:
            model.set_requires_gradient_sync(True)
    else:
        yield
