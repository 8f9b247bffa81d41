"""2-process DDP and FSDP2 runs (gloo) match a single-process run with the same global batch."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

from loopmoe.training import read_metrics

ROOT = Path(__file__).resolve().parents[2]
MODULE = "tests.distributed.train_standin"  # a module: run with `-m`, importable through PYTHONPATH=ROOT
ARGS = [
    "data.seq_len=16",
    "train.micro_batch_size=4",
    "train.global_batch_size=8",
    "train.max_steps=20",
    "schedule.warmup_steps=3",
    "train.eval_every=10",
    "train.eval_batches=2",
    "train.checkpoint_every=10",
    "optim.lr=1e-2",
]
# The real model: a looped LoopMoE with IterAdaLN, prelude and expert routing, sized for 2 CPU processes.
LOOPMOE_ARGS = [
    "model.preset=debug",
    "model.num_loops=2",
    "model.num_core_layers=1",
    "model.num_prelude_layers=1",
    "model.hidden_size=32",
    "model.head_dim=8",
    "model.moe_intermediate_size=32",
    "optim.lr=3e-3",
]


def _launch(
    out_dir: Path,
    nproc: int,
    *extra: str,
    crash_at_batch: int | None = None,
    real_model: bool = False,
    env_extra: dict[str, str] | None = None,
) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1", **(env_extra or {})}
    env.pop("PARITY_MODEL", None)
    if real_model:
        env["PARITY_MODEL"] = "loopmoe"
        extra = (*LOOPMOE_ARGS, *extra)
    env.pop("STANDIN_CRASH_AT_BATCH", None)
    if crash_at_batch is not None:
        env["STANDIN_CRASH_AT_BATCH"] = str(crash_at_batch)
    launcher = (
        [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}", "-m"]
        if nproc > 1
        else [sys.executable, "-m"]
    )
    return subprocess.run(
        [*launcher, MODULE, str(out_dir), *ARGS, *extra], env=env, capture_output=True, text=True, timeout=300
    )


@pytest.fixture(scope="module")
def single_losses(tmp_path_factory):
    out = tmp_path_factory.mktemp("single")
    proc = _launch(out, 1)
    assert proc.returncode == 0, proc.stderr
    return [r["loss"] for r in read_metrics(out)]


def _assert_close(losses, reference):
    assert len(losses) == len(reference) == 20
    for step, (a, b) in enumerate(zip(losses, reference), start=1):
        assert abs(a - b) <= 1e-4 * abs(b), f"step {step}: {a} vs {b}"


@pytest.mark.distributed
def test_ddp_matches_single_process(tmp_path, single_losses):
    proc = _launch(tmp_path, 2, "dist.strategy=ddp")
    assert proc.returncode == 0, proc.stderr[-3000:]
    _assert_close([r["loss"] for r in read_metrics(tmp_path)], single_losses)


@pytest.mark.distributed
def test_fsdp2_matches_single_process_across_a_dcp_resume(tmp_path, single_losses):
    # Micro-batch 13 is step 13 on each rank: killed after the step-10 DCP checkpoint, then resumed.
    killed = _launch(tmp_path, 2, "dist.strategy=fsdp2", crash_at_batch=13)
    assert killed.returncode != 0
    assert (tmp_path / "checkpoints" / "step_0000010" / "dcp").is_dir()
    proc = _launch(tmp_path, 2, "dist.strategy=fsdp2")
    assert proc.returncode == 0, proc.stderr[-3000:]
    records = read_metrics(tmp_path)
    assert [r["step"] for r in records] == list(range(1, 21))
    _assert_close([r["loss"] for r in records], single_losses)
    assert (tmp_path / "final" / "config.json").exists()


@pytest.fixture(scope="module")
def single_loopmoe_losses(tmp_path_factory):
    out = tmp_path_factory.mktemp("single_loopmoe")
    proc = _launch(out, 1, real_model=True)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return [r["loss"] for r in read_metrics(out)]


@pytest.mark.distributed
@pytest.mark.parametrize("strategy", ["ddp", "fsdp2"])
def test_real_loopmoe_matches_single_process(tmp_path, single_loopmoe_losses, strategy):
    proc = _launch(tmp_path, 2, f"dist.strategy={strategy}", real_model=True)
    assert proc.returncode == 0, proc.stderr[-3000:]
    # Every parameter gets a gradient each step (experts are stacked tensors), so DDP neither searches the
    # graph for unused ones nor warns that it found none.
    assert "find_unused_parameters" not in proc.stderr, proc.stderr[-3000:]
    _assert_close([r["loss"] for r in read_metrics(tmp_path)], single_loopmoe_losses)


@pytest.fixture(scope="module")
def fsdp2_loopmoe_losses(tmp_path_factory):
    out = tmp_path_factory.mktemp("fsdp2_loopmoe")
    proc = _launch(out, 2, "dist.strategy=fsdp2", real_model=True)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return [r["loss"] for r in read_metrics(out)]


@pytest.mark.distributed
@pytest.mark.parametrize("mode", ["full", "selective"])
def test_activation_checkpointing_under_fsdp2_keeps_the_losses(tmp_path, fsdp2_loopmoe_losses, mode):
    proc = _launch(tmp_path, 2, "dist.strategy=fsdp2", f"train.activation_checkpointing={mode}", real_model=True)
    assert proc.returncode == 0, proc.stderr[-3000:]
    losses = [r["loss"] for r in read_metrics(tmp_path)]
    assert len(losses) == len(fsdp2_loopmoe_losses) == 20
    for step, (a, b) in enumerate(zip(losses, fsdp2_loopmoe_losses), start=1):
        assert abs(a - b) <= 1e-6 * abs(b), f"step {step}: {a} vs {b}"
