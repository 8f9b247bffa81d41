"""Distributed helpers: process-group lifecycle (`env`), the `[dist]` section (`config`) and the
parallelism functions (`parallelize`: the run's recipe, its steps, and gradient clipping at any layout)."""

from loopmoe.distributed.config import DistSection
from loopmoe.distributed.env import (
    DistInfo,
    all_reduce_mean,
    all_reduce_sum_,
    barrier,
    broadcast_object,
    init_distributed,
    is_distributed,
    teardown_distributed,
)
from loopmoe.distributed.parallelize import (
    apply_ddp,
    apply_expert_parallel,
    apply_fsdp2,
    build_mesh,
    clip_grad_norm_,
    gradient_sync,
    parallelize,
    unwrap,
)

__all__ = [
    "DistInfo",
    "DistSection",
    "all_reduce_mean",
    "all_reduce_sum_",
    "apply_ddp",
    "apply_expert_parallel",
    "apply_fsdp2",
    "barrier",
    "broadcast_object",
    "build_mesh",
    "clip_grad_norm_",
    "gradient_sync",
    "init_distributed",
    "is_distributed",
    "parallelize",
    "teardown_distributed",
    "unwrap",
]
