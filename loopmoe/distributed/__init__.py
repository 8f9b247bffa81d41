"""Distributed helpers: process-group lifecycle (`env`) and parallelism functions (`parallelize`)."""

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
    gradient_sync,
    unwrap,
)

__all__ = [
    "DistInfo",
    "all_reduce_mean",
    "all_reduce_sum_",
    "apply_ddp",
    "apply_expert_parallel",
    "apply_fsdp2",
    "barrier",
    "broadcast_object",
    "build_mesh",
    "gradient_sync",
    "init_distributed",
    "is_distributed",
    "teardown_distributed",
    "unwrap",
]
