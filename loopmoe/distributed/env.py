"""Process-group setup and teardown from torchrun's environment variables.

Everything distributed reads the world through these helpers, so that a single-process run
(no torchrun, or torchrun with one process) needs no process group at all.
"""

from __future__ import annotations

import ctypes
import os
import signal
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import cast

import torch
import torch.distributed as dist

from loopmoe.errors import LoopMoEError, RunError


@dataclass(frozen=True)
class DistInfo:
    """Where this process sits: rank, world size, local rank and the device it should use."""

    rank: int
    world_size: int
    local_rank: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


def env_world_size() -> int:
    """World size announced by torchrun (1 when not launched by it)."""
    return int(os.environ.get("WORLD_SIZE", "1"))


def init_distributed() -> DistInfo:
    """Initialise the default process group when torchrun started more than one process.

    gloo on CPU, nccl on CUDA; each process takes GPU `LOCAL_RANK`. Safe to call twice.
    """
    world_size = env_world_size()
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if torch.cuda.is_available():
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
    else:
        device = torch.device("cpu")
    if world_size > 1 and not dist.is_initialized():
        backend = "nccl" if device.type == "cuda" else "gloo"
        dist.init_process_group(backend=backend, device_id=device if device.type == "cuda" else None)
    return DistInfo(rank=rank, world_size=world_size, local_rank=local_rank, device=device)


def teardown_distributed(failed: bool = False) -> None:
    """Destroy the process group if this process has one (call once, at the end of a run).

    ``failed``: this process is ending on an exception. Then there is no barrier: the other ranks may
    never reach one (a rank that failed alone would wait there forever); they learn of the failure
    at their next ``collective_stage`` boundary, or from the closed connection when this process exits.
    """
    if dist.is_available() and dist.is_initialized():
        if not failed:
            dist.barrier()
        dist.destroy_process_group()


class PeerRankError(RunError):
    """Another rank failed at a stage every rank takes part in; the message is that rank's error."""


@contextmanager
def collective_stage(stage: str) -> Iterator[None]:
    """Run a stage of rank-local work whose failure on any one rank must stop every rank.

    Every error on one rank reaches all ranks: at the end of the stage the ranks all-reduce one flag
    ("did this rank fail?"), and if any did, they exchange the messages and every rank raises, the
    failed one its own error, the others ``PeerRankError`` carrying the first failed rank's message (so
    rank 0 prints a one-line error whichever rank failed). The body must not itself enter a collective
    that a failing rank would skip; that is what makes the flag the only thing a rank waits for. A
    single process runs the body as it is. ``KeyboardInterrupt`` and other ``BaseException`` are not
    caught: the process ends and its peers see the closed connection.
    """
    if not is_distributed():
        yield
        return
    try:
        yield
    except Exception as err:
        _agree(stage, err)
        raise
    _agree(stage, None)


def _agree(stage: str, err: Exception | None) -> None:
    backend = dist.get_backend()
    device = torch.device("cuda", torch.cuda.current_device()) if backend == "nccl" else torch.device("cpu")
    flag = torch.tensor([0.0 if err is None else 1.0], device=device)
    dist.all_reduce(flag, op=dist.ReduceOp.MAX)
    if not flag.item():
        return
    mine = None if err is None else (isinstance(err, LoopMoEError), f"{type(err).__name__}: {err}", str(err))
    reports = all_gather_object(mine)
    if err is not None:
        return  # the caller re-raises this rank's own error
    rank, report = next((r, m) for r, m in enumerate(reports) if m is not None)
    user_error, described, message = cast(tuple[bool, str, str], report)
    if user_error:
        raise PeerRankError(f"rank {rank}: {message}")
    first = described.splitlines()[0] if described else ""
    raise PeerRankError(f"process rank {rank} failed during {stage} ({first}); its traceback says where")


_PR_SET_PDEATHSIG = 1


def end_with_parent(sig: signal.Signals = signal.SIGTERM) -> bool:
    """Ask the kernel to send this process ``sig`` when its parent (the launcher) dies (Linux only).

    A worker started by ``loopmoe train --nproc-per-node`` or torchrun is otherwise orphaned when the
    launcher is killed (``kill -9``) and trains on unsupervised. Returns whether it was set. If the
    parent died before this call, the process ends at once.
    """
    if not sys.platform.startswith("linux"):
        return False
    parent = os.getppid()
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        if libc.prctl(_PR_SET_PDEATHSIG, int(sig), 0, 0, 0) != 0:
            return False
    except (OSError, AttributeError):
        return False
    if parent == 1 or os.getppid() != parent:  # the launcher is already gone
        os.kill(os.getpid(), sig)
    return True


def is_distributed() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def all_reduce_mean(tensor: torch.Tensor) -> torch.Tensor:
    """Average a tensor over ranks in place (identity in a single process); returns it."""
    if is_distributed():
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
        tensor /= dist.get_world_size()
    return tensor


def all_reduce_sum_(tensor: torch.Tensor) -> None:
    """Sum a tensor over ranks in place; the `reduce_fn` handed to `StepHooks.on_optimizer_step`."""
    if is_distributed():
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM)


def barrier() -> None:
    if is_distributed():
        dist.barrier()


def broadcast_object(obj: object, src: int = 0) -> object:
    """Send a picklable object from `src` to every rank (identity in a single process)."""
    if not is_distributed():
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=src)
    return box[0]


def all_gather_object(obj: object) -> list[object]:
    """Every rank's picklable ``obj``, in rank order (``[obj]`` in a single process)."""
    if not is_distributed():
        return [obj]
    out: list[object] = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out
