"""Train with `run_training` (alone or under torchrun) on the synthetic loader.

usage: python -m tests.distributed.train_standin OUT_DIR [section.key=value ...]
(from the repository root, or with it on PYTHONPATH; under torchrun: ``torchrun ... -m tests.distributed.train_standin``)
With PARITY_MODEL=loopmoe the real LoopMoE (built from the [model] overrides) replaces the stand-in.
With STANDIN_KILL_IN=WHAT:N the process SIGKILLs itself at the N-th call of WHAT, one of torch_save
(a checkpoint file about to be written), sha (checksumming while sealing or verifying), publish
(a sealed checkpoint about to be renamed into place), rmtree (a folder about to be deleted) or
metrics_rewrite (a resume's rewrite of metrics.jsonl: its new version written, not yet renamed over
the old one).
With STANDIN_DUMP_ROUTERS=1 each rank saves its final router biases into OUT_DIR/routers_rank<r>.pt.
With STANDIN_DISK_FULL_RANK=R, rank R's own checkpoint file (rank_<R>.pt) fails with ENOSPC.
"""

import errno
import os
import signal
import sys

import torch

import loopmoe.training.checkpoint as checkpoint
import loopmoe.training.metrics as metrics
import loopmoe.training.run as run
from loopmoe.distributed.env import env_world_size
from loopmoe.distributed.parallelize import unwrap
from loopmoe.model.moe import TopKRouter
from loopmoe.training import load_run_config, run_training
from tests.training.standins import data_factory, model_factory


def _kill_at(owner, attr: str, n: int) -> None:
    real, calls = getattr(owner, attr), [0]

    def wrapper(*args, **kwargs):
        calls[0] += 1
        if calls[0] == n:
            os.kill(os.getpid(), signal.SIGKILL)
        return real(*args, **kwargs)

    setattr(owner, attr, wrapper)


_TARGETS = {
    "torch_save": (torch, "save"),
    "sha": (checkpoint, "_sha256"),
    "publish": (checkpoint, "publish_directory"),
    "rmtree": (checkpoint.shutil, "rmtree"),
}


def _kill_in_metrics_rewrite(n: int) -> None:
    real, calls = metrics.atomic_write_text, [0]

    def write(path, text):
        if os.path.basename(path) == metrics.METRICS_FILE:
            calls[0] += 1
            if calls[0] == n:  # the process dies at the rename, so replacing it for everyone is harmless
                os.replace = lambda *args, **kwargs: os.kill(os.getpid(), signal.SIGKILL)
        return real(path, text)

    metrics.atomic_write_text = write


def _dump_routers_before_export() -> None:
    real = run._export_final

    def export(model, bundle, cfg, out_dir, info, *args):
        biases = [m.expert_bias.clone() for m in unwrap(model).modules() if isinstance(m, TopKRouter)]
        torch.save(biases, f"{out_dir}/routers_rank{info.rank}.pt")
        return real(model, bundle, cfg, out_dir, info, *args)

    run._export_final = export


def _disk_full_on(rank: int) -> None:
    real = torch.save

    def save(obj, f, *args, **kwargs):
        if str(f).endswith(f"rank_{rank:05d}.pt"):
            raise OSError(errno.ENOSPC, "No space left on device")
        return real(obj, f, *args, **kwargs)

    torch.save = save


if __name__ == "__main__":
    out_dir, overrides = sys.argv[1], sys.argv[2:]
    if kill_in := os.environ.get("STANDIN_KILL_IN"):
        what, n = kill_in.split(":")
        if what == "metrics_rewrite":
            _kill_in_metrics_rewrite(int(n))
        else:
            _kill_at(*_TARGETS[what], int(n))
    if (full := os.environ.get("STANDIN_DISK_FULL_RANK")) is not None:
        _disk_full_on(int(full))
    if os.environ.get("STANDIN_DUMP_ROUTERS"):
        _dump_routers_before_export()
    cfg = load_run_config(None, overrides, world_size=env_world_size())
    if os.environ.get("PARITY_MODEL") == "loopmoe":
        from loopmoe.training.builders import default_model_factory as model_factory
    run_training(cfg, out_dir, model_factory=model_factory, data_factory=data_factory)
