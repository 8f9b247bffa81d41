"""``loopmoe train --nproc-per-node N``: the workers torchrun would start, with one-line failures.

torchrun ends a failed run with its own ~20-line traceback (``ChildFailedError``) below the one line our
ranks print; the launcher reports a failure as at most one line and exits non-zero, and a successful run
through it is the run torchrun gives."""

import json
import os
import subprocess
import sys

import pytest

from loopmoe.cli.main import main, parse_args
from loopmoe.cli.train import TrainOptions
from loopmoe.options import given_overrides, options_from
from loopmoe.training import read_metrics
from tests.distributed.test_parity import LOOPMOE_ARGS, ROOT

TINY = [
    *LOOPMOE_ARGS,
    "data.seq_len=32",
    "train.micro_batch_size=2",
    "train.max_steps=3",
    "schedule.warmup_steps=1",
    "train.eval_every=3",
    "train.eval_batches=1",
    "train.checkpoint_every=3",
]


def _run(*argv: str, omp: str | None = "1") -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    env.pop("OMP_NUM_THREADS", None)
    if omp is not None:
        env["OMP_NUM_THREADS"] = omp
    return subprocess.run([sys.executable, *argv], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)


def _launch_standin(tmp_path, *endings: str, omp: str | None = "1") -> subprocess.CompletedProcess:
    code = (
        "import sys; from loopmoe.distributed.launch import launch; "
        f"sys.exit(launch([{str(tmp_path)!r}, *sys.argv[1:]], nproc_per_node=2, "
        "module='tests.distributed.launch_standin'))"
    )
    return _run("-c", code, *endings, omp=omp)


@pytest.mark.distributed
def test_a_config_error_is_one_line_without_a_traceback():
    proc = _run("-m", "loopmoe", "train", "--nproc-per-node", "2", "configs/debug.toml", "optim.lr=nan")
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == ["loopmoe train: error: optim.lr = nan: must be a finite number"]
    assert "Traceback" not in proc.stdout + proc.stderr


@pytest.mark.distributed
def test_workers_get_torchruns_environment(tmp_path):
    # OMP_NUM_THREADS unset: the launcher sets it to 1 for the workers, as torchrun does (without its banner).
    proc = _launch_standin(tmp_path, omp=None)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout + proc.stderr == ""
    envs = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)]
    for rank, env in enumerate(envs):
        assert env["RANK"] == env["LOCAL_RANK"] == str(rank)
        assert env["WORLD_SIZE"] == env["LOCAL_WORLD_SIZE"] == "2"
        assert env["OMP_NUM_THREADS"] == "1"
        assert env["MASTER_ADDR"] and int(env["MASTER_PORT"]) > 0
    assert envs[0]["MASTER_PORT"] == envs[1]["MASTER_PORT"]


@pytest.mark.distributed
@pytest.mark.parametrize(
    ("ending", "status", "said"),
    [
        ("rank1=2", 2, None),  # a loopmoe error: the worker already printed it, the launcher adds nothing
        ("rank1=3", 3, "exit code 3"),
        ("rank1=SIGKILL", 137, "killed by SIGKILL"),
    ],
)
def test_a_failed_worker_is_one_line_naming_its_rank(tmp_path, ending, status, said):
    proc = _launch_standin(tmp_path, ending)
    assert proc.returncode == status
    assert "Traceback" not in proc.stderr and "ChildFailedError" not in proc.stderr
    lines = proc.stderr.strip().splitlines()
    if said is None:
        assert lines == []
    else:
        assert len(lines) == 1, proc.stderr
        assert ": error: process rank 1 failed first" in lines[0] and said in lines[0], lines[0]


@pytest.mark.distributed
def test_a_run_through_the_launcher_is_the_torchrun_run(tmp_path):
    # The corpus that ships with Python: the test needs no data folder (a fresh clone has none).
    launched, torchran = tmp_path / "launched", tmp_path / "torchrun"
    proc = _run(
        "-m",
        "loopmoe",
        "train",
        "--nproc-per-node",
        "2",
        "configs/debug.toml",
        "--out",
        str(launched),
        *TINY,
        "data.source=embedded",
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert json.loads(proc.stdout[proc.stdout.index("{") :])["step"] == 3
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"]
    proc = _run(
        *torchrun[1:],
        "-m",
        "loopmoe",
        "train",
        "configs/debug.toml",
        "--out",
        str(torchran),
        *TINY,
        "data.source=embedded",
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    keys = ("step", "loss", "lm_loss", "aux_loss", "grad_norm", "lr", "val_loss")
    ours, theirs = ([{k: r.get(k) for k in keys} for r in read_metrics(out)] for out in (launched, torchran))
    assert len(ours) == 3 and ours == theirs
    assert (launched / "final" / "model.safetensors").read_bytes() == (
        torchran / "final" / "model.safetensors"
    ).read_bytes()


def _options(argv: list[str]) -> TrainOptions:
    args = parse_args(argv)
    opts = options_from(TrainOptions, args)
    opts.overrides = [*opts.overrides, *given_overrides(args)]
    return opts


def test_workers_run_the_same_command_less_the_launcher():
    argv = ["train", "--nproc-per-node", "2", "c.toml", "--train.max_steps", "5", "--out", "o", "--restart", "a.b=1"]
    opts = _options(argv)
    assert opts.worker_command() == ["train", "c.toml", "a.b=1", "train.max_steps=5", "--out", "o", "--restart"]
    again = _options(opts.worker_command())
    assert again.nproc_per_node is None and again.worker_command() == opts.worker_command()


@pytest.mark.parametrize(
    ("argv", "env", "message"),
    [
        (["--nnodes", "2"], {}, "need --nproc-per-node N"),
        (["--nproc-per-node", "2"], {"RANK": "0"}, "drop it when running under torchrun"),
        (["--nproc-per-node", "0"], {}, "must be whole numbers >= 1"),
    ],
)
def test_launcher_options_that_cannot_work_are_one_line(argv, env, message, monkeypatch, capsys):
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    assert main(["train", "configs/debug.toml", *argv]) == 2
    err = capsys.readouterr().err
    assert message in err and len(err.strip().splitlines()) == 1
