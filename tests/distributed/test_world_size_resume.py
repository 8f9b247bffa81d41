"""A checkpoint written by 2 processes is never silently dropped by a 1-process resume (and vice versa):
the run stops with an error naming the way out, and nothing is deleted or overwritten."""

from pathlib import Path

import pytest

from loopmoe.training import load_run_config, read_metrics, run_training
from loopmoe.training.checkpoint import WorldSizeMismatchError, list_checkpoints
from tests.distributed.test_parity import ARGS, _launch
from tests.training.standins import data_factory, model_factory

SHORT = ["train.max_steps=4", "train.checkpoint_every=2", "train.eval_every=2"]


def _snapshot(out: Path) -> dict[str, bytes]:
    return {str(p.relative_to(out)): p.read_bytes() for p in sorted((out / "checkpoints").rglob("*")) if p.is_file()}


@pytest.mark.distributed
def test_two_process_checkpoint_refused_by_one_process(tmp_path):
    proc = _launch(tmp_path, 2, "dist.strategy=fsdp2", *SHORT)
    assert proc.returncode == 0, proc.stderr[-3000:]
    before, metrics = _snapshot(tmp_path), read_metrics(tmp_path)
    assert [p.name for _, p in list_checkpoints(tmp_path / "checkpoints")] == ["step_0000002", "step_0000004"]
    cfg = load_run_config(None, [*ARGS, *SHORT, "train.max_steps=6"])
    with pytest.raises(WorldSizeMismatchError, match="written by 2 processes.*--nproc_per_node=2.*new --out"):
        run_training(cfg, tmp_path, model_factory=model_factory, data_factory=data_factory)
    assert _snapshot(tmp_path) == before and read_metrics(tmp_path) == metrics


@pytest.mark.distributed
def test_one_process_checkpoint_refused_by_two_processes(tmp_path):
    proc = _launch(tmp_path, 1, *SHORT)
    assert proc.returncode == 0, proc.stderr[-3000:]
    before, metrics = _snapshot(tmp_path), read_metrics(tmp_path)
    proc = _launch(tmp_path, 2, "dist.strategy=ddp", *SHORT, "train.max_steps=6")
    assert proc.returncode != 0
    assert "written by 1 process, this run has 2; resume without torchrun" in proc.stderr
    assert _snapshot(tmp_path) == before and read_metrics(tmp_path) == metrics
