"""Fault injection: `kill -9` at random moments (during training and inside checkpoint writes) never
loses a finished checkpoint, never leaves a corrupt one in place, and the run resumed after any
number of kills logs the same losses as an uninterrupted one."""

import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from loopmoe.training import read_metrics
from loopmoe.training.checkpoint import CorruptCheckpointError, list_checkpoints, verify

ROOT = Path(__file__).resolve().parents[2]
MODULE = "tests.distributed.train_standin"
KEEP_LAST = 3
ARGS = [
    "data.seq_len=16",
    "train.micro_batch_size=4",
    "train.grad_accum=1",
    "train.max_steps=16",
    "schedule.warmup_steps=3",
    "train.eval_every=4",
    "train.eval_batches=1",
    "train.checkpoint_every=2",
    f"train.keep_last={KEEP_LAST}",
    "optim.lr=1e-2",
]
KEYS = ("loss", "lm_loss", "aux_loss", "grad_norm", "lr", "tokens", "val_loss")


def _popen(out: Path, kill_in: str | None = None) -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    env.pop("STANDIN_KILL_IN", None)
    env.pop("STANDIN_CRASH_AT_BATCH", None)
    if kill_in:
        env["STANDIN_KILL_IN"] = kill_in
    return subprocess.Popen(
        [sys.executable, "-m", MODULE, str(out), *ARGS],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )


def _verified(out: Path) -> list[int]:
    """Steps of the checkpoints in place; every one of them must verify."""
    steps = []
    for step, path in list_checkpoints(out / "checkpoints"):
        try:
            verify(path)
        except CorruptCheckpointError as e:  # pragma: no cover - the failure being tested for
            pytest.fail(f"a checkpoint in place does not verify after a kill: {e}")
        steps.append(step)
    return steps


def _logged_steps(out: Path) -> int:
    try:
        return len((out / "metrics.jsonl").read_text().splitlines())
    except FileNotFoundError:
        return 0


def _kill_when(proc: subprocess.Popen, out: Path, step: int, delay: float) -> None:
    """SIGKILL `proc` a moment after it has logged `step` (or when it ends by itself)."""
    deadline = time.monotonic() + 120
    while proc.poll() is None and _logged_steps(out) < step and time.monotonic() < deadline:
        time.sleep(0.005)
    time.sleep(delay)
    if proc.poll() is None:
        proc.send_signal(signal.SIGKILL)
    proc.wait()


def _check_after_kill(out: Path, before: list[int]) -> list[int]:
    after = _verified(out)
    for step in before:  # a finished checkpoint is only ever removed by pruning, behind newer verified ones
        assert step in after or sum(s > step for s in after) >= KEEP_LAST, (step, before, after)
    assert not before or (after and max(after) >= max(before)), (before, after)
    return after


def _fault_injection(tmp_path: Path, kills: list[str | tuple[int, float]]) -> None:
    reference = _popen(tmp_path / "reference")
    assert reference.wait() == 0, reference.stderr.read()
    out, steps = tmp_path / "killed", []
    for kill in kills:
        if isinstance(kill, str):  # deterministic: inside a checkpoint write
            proc = _popen(out, kill_in=kill)
            proc.wait()
        else:  # at a random moment after a given step was logged
            proc = _popen(out)
            _kill_when(proc, out, *kill)
        assert proc.returncode in (-signal.SIGKILL, 0), proc.stderr.read()
        steps = _check_after_kill(out, steps)
    final = _popen(out)
    assert final.wait() == 0, final.stderr.read()
    expected, got = read_metrics(tmp_path / "reference"), read_metrics(out)
    assert [r["step"] for r in got] == list(range(1, 17))
    for key in KEYS:
        assert [r.get(key) for r in got] == [r.get(key) for r in expected], key
    assert not [p for p in (out / "checkpoints").iterdir() if ".tmp" in p.name]
    assert not [p for p in out.iterdir() if ".tmp-" in p.name]  # e.g. a killed rewrite's `.metrics.jsonl.tmp-PID-*`


def test_kill_9_inside_checkpoint_writes_and_at_random_moments(tmp_path):
    """The short sample (about 40 s on 2 busy cores); `test_kill_9_many_times` is the long one."""
    rng = random.Random(1234)
    _fault_injection(
        tmp_path,
        [
            "publish:3",  # third checkpoint sealed, not yet renamed into place
            "rmtree:1",  # the start-up cleanup of that debris (or pruning) about to delete a folder
            "metrics_rewrite:1",  # a resume's rewrite of metrics.jsonl written, not yet renamed into place
            (rng.randint(6, 14), rng.uniform(0, 0.05)),
        ],
    )


@pytest.mark.slow
@pytest.mark.parametrize("seed", range(3))
def test_kill_9_many_times(tmp_path, seed):
    rng = random.Random(seed)
    kills: list[str | tuple[int, float]] = [
        f"{rng.choice(['torch_save', 'sha', 'publish', 'rmtree'])}:{rng.randint(1, 12)}" for _ in range(4)
    ]
    kills += ["metrics_rewrite:1"]
    kills += [(rng.randint(1, 15), rng.uniform(0, 0.1)) for _ in range(6)]
    rng.shuffle(kills)
    _fault_injection(tmp_path, kills)
