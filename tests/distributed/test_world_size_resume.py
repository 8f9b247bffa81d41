"""A checkpoint written by 2 processes (DCP) resumes in 1 process, resharded, with the losses of an
uninterrupted run; a 1-process checkpoint (plain state dicts) is never silently dropped by a 2-process
resume: the run stops with an error naming the way out, and nothing is deleted or overwritten."""

import shutil
from pathlib import Path

import pytest

from loopmoe.training import load_run_config, read_metrics, run_training
from tests.distributed.test_parity import ARGS, _launch
from tests.training.standins import data_factory, model_factory

SHORT = ["train.max_steps=4", "train.checkpoint_every=2", "train.eval_every=2"]


def _snapshot(out: Path) -> dict[str, bytes]:
    return {str(p.relative_to(out)): p.read_bytes() for p in sorted((out / "checkpoints").rglob("*")) if p.is_file()}


@pytest.mark.distributed
def test_two_process_checkpoint_resumes_in_one_process(tmp_path):
    proc = _launch(tmp_path, 2, "dist.strategy=fsdp2", *SHORT, "train.max_steps=6")
    assert proc.returncode == 0, proc.stderr[-3000:]
    uninterrupted = [r["loss"] for r in read_metrics(tmp_path)]
    shutil.rmtree(tmp_path / "checkpoints" / "step_0000006")
    shutil.rmtree(tmp_path / "checkpoints" / "step_0000004")
    cfg = load_run_config(None, [*ARGS, *SHORT, "train.max_steps=6"])
    run_training(cfg, tmp_path, model_factory=model_factory, data_factory=data_factory)
    records = read_metrics(tmp_path)
    assert [r["step"] for r in records] == list(range(1, 7))
    for step, (a, b) in enumerate(zip([r["loss"] for r in records], uninterrupted), start=1):
        assert abs(a - b) <= 1e-4 * abs(b), f"step {step}: {a} vs {b}"


@pytest.mark.distributed
def test_one_process_checkpoint_refused_by_two_processes(tmp_path):
    proc = _launch(tmp_path, 1, *SHORT)
    assert proc.returncode == 0, proc.stderr[-3000:]
    before, metrics = _snapshot(tmp_path), read_metrics(tmp_path)
    proc = _launch(tmp_path, 2, "dist.strategy=ddp", *SHORT, "train.max_steps=6")
    assert proc.returncode != 0
    assert "written by 1 process, this run has 2; resume without torchrun" in proc.stderr
    assert _snapshot(tmp_path) == before and read_metrics(tmp_path) == metrics


@pytest.mark.distributed
def test_disk_full_on_one_rank_stops_every_rank_with_the_message(tmp_path):
    # Rank 1 cannot write its file of the step-2 checkpoint: both ranks stop (none waits in a barrier) and
    # both say why; the half-written checkpoint is removed.
    proc = _launch(tmp_path, 2, "dist.strategy=ddp", *SHORT, env_extra={"STANDIN_DISK_FULL_RANK": "1"})
    assert proc.returncode != 0
    lines = proc.stderr.splitlines()
    said = {line.split("]")[0] for line in lines if "disk full while writing checkpoint step 2" in line}
    assert said == {"[rank0", "[rank1"}, proc.stderr[-3000:]
    assert not any((tmp_path / "checkpoints").glob("step_*"))
