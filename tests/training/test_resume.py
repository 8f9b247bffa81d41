"""Exact resume: a run SIGKILLed after a checkpoint and re-run matches an uninterrupted run."""

import os
import subprocess
import sys
from pathlib import Path

from loopmoe.training import read_metrics

ROOT = Path(__file__).resolve().parents[2]
MODULE = "tests.distributed.train_standin"  # a module: run with `-m`, importable through PYTHONPATH=ROOT
ARGS = [
    "data.seq_len=16",
    "train.micro_batch_size=4",
    "train.grad_accum=2",
    "train.max_steps=16",
    "schedule.warmup_steps=3",
    "train.eval_every=4",
    "train.eval_batches=2",
    "train.checkpoint_every=5",
    "train.keep_last=2",
    "optim.lr=1e-2",
]


def _run(out_dir: Path, crash_at_batch: int | None = None) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    env.pop("STANDIN_CRASH_AT_BATCH", None)
    if crash_at_batch is not None:
        env["STANDIN_CRASH_AT_BATCH"] = str(crash_at_batch)
    return subprocess.run([sys.executable, "-m", MODULE, str(out_dir), *ARGS], env=env, capture_output=True, text=True)


def test_killed_run_resumes_exactly(tmp_path):
    full = _run(tmp_path / "full")
    assert full.returncode == 0, full.stderr
    # 2 micro-batches per step: batch 25 is inside step 13, after the step-10 checkpoint was written.
    killed = _run(tmp_path / "resumed", crash_at_batch=25)
    assert killed.returncode == -9, killed.stderr
    assert [r["step"] for r in read_metrics(tmp_path / "resumed")][-1] == 12
    assert sorted(p.name for p in (tmp_path / "resumed" / "checkpoints").iterdir()) == ["step_0000005", "step_0000010"]
    resumed = _run(tmp_path / "resumed")
    assert resumed.returncode == 0, resumed.stderr

    expected, got = read_metrics(tmp_path / "full"), read_metrics(tmp_path / "resumed")
    assert [r["step"] for r in got] == list(range(1, 17))
    for key in ("loss", "lm_loss", "aux_loss", "grad_norm", "lr", "tokens", "val_loss"):
        assert [r.get(key) for r in got] == [r.get(key) for r in expected], key
    assert (tmp_path / "resumed" / "final" / "config.json").exists()
