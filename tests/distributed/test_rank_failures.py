"""Every error on one rank reaches all ranks: a failure of either rank at each stage of a 2-process run
(startup, resume, training, export) ends every rank within a bounded time, with one line and no traceback
(``loopmoe.distributed.env.collective_stage``); and workers end when their launcher dies."""

import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.distributed.test_parity import ROOT
from tests.training.standins import standin_overrides

BOUND_S = 120  # a hang is what this catches; a healthy 2-process run here takes ~10 s
ARGS = standin_overrides(
    **{"train.max_steps": 2, "train.checkpoint_every": 2, "train.eval_every": 2, "schedule.warmup_steps": 1}
)


def _train(out: Path, *extra: str, fail: str | None = None, wait: bool = True):
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    env.pop("STANDIN_FAIL", None)
    if fail:
        env["STANDIN_FAIL"] = fail
    command = ["train", "configs/debug.toml", "--out", str(out), *ARGS, *extra]
    code = (
        "import sys; from loopmoe.distributed.launch import launch; "
        "sys.exit(launch(sys.argv[1:], nproc_per_node=2, module='tests.distributed.fault_standin'))"
    )
    argv = [sys.executable, "-c", code, *command]
    if not wait:
        return subprocess.Popen(argv, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    return subprocess.run(argv, cwd=ROOT, env=env, capture_output=True, text=True, timeout=BOUND_S)


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    out = tmp_path_factory.mktemp("trained") / "run"
    proc = _train(out)
    assert proc.returncode == 0, proc.stderr
    return out


def _one_line_error(proc: subprocess.CompletedProcess, *said: str) -> None:
    assert proc.returncode == 2, proc.stderr
    assert "Traceback" not in proc.stderr, proc.stderr
    errors = [line for line in proc.stderr.splitlines() if "error:" in line]
    assert len(errors) == 1, proc.stderr
    for text in said:
        assert text in errors[0], errors[0]


@pytest.mark.distributed
@pytest.mark.parametrize("rank", [0, 1])
@pytest.mark.parametrize(
    ("stage", "said"),
    [
        ("startup", "wandb"),
        ("resume", "cannot resume from"),
        ("train", "disk full while writing the run's logs"),
        ("export", "disk full while writing the final model"),
    ],
)
def test_a_failure_on_either_rank_at_any_stage_ends_every_rank(request, tmp_path, stage, rank, said):
    out = tmp_path / "run"
    if stage == "resume":
        shutil.copytree(request.getfixturevalue("trained"), out)
    proc = _train(out, "train.max_steps=4", fail=f"{stage}:{rank}")  # raises TimeoutExpired if any rank hangs
    _one_line_error(proc, said)


@pytest.mark.distributed
def test_a_tensorboard_file_under_two_processes_is_one_line(tmp_path):
    out = tmp_path / "run"
    out.mkdir()
    (out / "tensorboard").write_text("mine")
    _one_line_error(_train(out), "tensorboard is a file, not a folder")


def _children(pid: int) -> list[int]:
    found = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[1]) == pid:
            found.append(int(stat.parent.name))
    return found


@pytest.mark.distributed
@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="the parent-death signal is Linux's")
def test_workers_end_when_the_launcher_is_killed(tmp_path):
    launcher = _train(tmp_path / "run", "train.max_steps=100000", "train.checkpoint_every=100000", wait=False)
    try:
        deadline = time.monotonic() + BOUND_S
        while not (tmp_path / "run" / "metrics.jsonl").exists():  # the workers are training
            assert time.monotonic() < deadline and launcher.poll() is None, launcher.communicate()
            time.sleep(0.5)
        workers = _children(launcher.pid)
        assert len(workers) == 2
        launcher.kill()
        launcher.wait()
        deadline = time.monotonic() + 30
        while any(
            Path(f"/proc/{w}").exists() and "Z" not in Path(f"/proc/{w}/stat").read_text().split()[2] for w in workers
        ):
            assert time.monotonic() < deadline, "workers kept running after the launcher was killed"
            time.sleep(0.2)
    finally:
        if launcher.poll() is None:
            launcher.kill()


@pytest.mark.distributed
def test_ctrl_c_under_the_launcher_is_one_line_without_tracebacks(tmp_path):
    launcher = _train(tmp_path / "run", "train.max_steps=100000", "train.checkpoint_every=100000", wait=False)
    deadline = time.monotonic() + BOUND_S
    while not (tmp_path / "run" / "metrics.jsonl").exists():
        assert time.monotonic() < deadline and launcher.poll() is None, launcher.communicate()
        time.sleep(0.5)
    launcher.send_signal(signal.SIGINT)  # what Ctrl-C sends; the launcher forwards it to the workers
    _, err = launcher.communicate(timeout=BOUND_S)
    assert launcher.returncode == 130
    assert "Traceback" not in err and "KeyboardInterrupt" not in err, err
    # besides progress (the start banner, time-stamped step lines), one line
    progress = re.compile(r"^(\d\d:\d\d:\d\d |  model: |  data: )")
    assert [line for line in err.splitlines() if not progress.match(line)] == [
        "loopmoe train: interrupted; re-run the same command to resume from the last checkpoint"
    ], err
