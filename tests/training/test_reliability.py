"""Nothing is silently thrown away: unverifiable checkpoints stop the run, the run folder is locked,
a full disk says so, and debris of killed writes is cleaned when a run starts."""

import errno
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch

import loopmoe.training.checkpoint as ckpt_module
from loopmoe.training import CheckpointManager, load_run_config, read_metrics, run_training
from loopmoe.training.checkpoint import (
    MARKER,
    CheckpointDiskFullError,
    UnverifiableCheckpointsError,
    list_checkpoints,
    verify,
)
from loopmoe.training.runlock import RunDirBusyError, RunLock
from tests.training.standins import data_factory, model_factory
from tests.training.test_checkpoint import _save

ROOT = Path(__file__).resolve().parents[2]
ARGS = [
    "data.seq_len=16",
    "train.micro_batch_size=4",
    "train.grad_accum=1",
    "train.max_steps=6",
    "schedule.warmup_steps=1",
    "train.eval_every=3",
    "train.eval_batches=1",
    "train.checkpoint_every=3",
    "train.keep_last=2",
]


def _train(out, *extra, **kw):
    return run_training(
        load_run_config(None, [*ARGS, *extra]), out, model_factory=model_factory, data_factory=data_factory, **kw
    )


def _corrupt(path: Path) -> None:
    with (path / "model.pt").open("r+b") as fh:
        fh.seek(100)
        fh.write(b"\x00garbage\x00")


# ---------------------------------------------------------------- item 5: no silent restart
def test_unverifiable_checkpoints_stop_the_run_and_restart_moves_them_aside(tmp_path):
    _train(tmp_path)
    ckpts = [p for _, p in list_checkpoints(tmp_path / "checkpoints")]
    assert [p.name for p in ckpts] == ["step_0000003", "step_0000006"]
    _corrupt(ckpts[0])
    (ckpts[1] / MARKER).unlink()
    metrics_before = read_metrics(tmp_path)
    with pytest.warns(UserWarning, match="skipping checkpoint"), pytest.raises(UnverifiableCheckpointsError) as err:
        _train(tmp_path, "train.max_steps=9")
    message = str(err.value)
    assert "step_0000003: " in message and "checksum mismatch" in message
    assert "step_0000006: " in message and "no COMPLETE marker" in message
    assert "--restart" in message and "--out" in message
    assert [p for _, p in list_checkpoints(tmp_path / "checkpoints")] == ckpts  # nothing deleted
    assert read_metrics(tmp_path) == metrics_before

    config_before = (tmp_path / "run_config.json").read_text()
    with pytest.warns(UserWarning, match="moved the previous run .* aside"):
        result = _train(tmp_path, "train.max_steps=9", restart=True)
    assert result["step"] == 9
    # --restart moves the whole old run aside, its history intact: checkpoints, metrics, config, logs, final
    (aside,) = tmp_path.glob("restarted-*")
    assert {"checkpoints", "metrics.jsonl", "run_config.json", "tensorboard", "final"} <= {
        p.name for p in aside.iterdir()
    }
    assert sorted(p.name for p in (aside / "checkpoints").iterdir()) == ["step_0000003", "step_0000006"]
    assert read_metrics(aside) == metrics_before
    assert (aside / "run_config.json").read_text() == config_before
    assert [r["step"] for r in read_metrics(tmp_path)] == list(range(1, 10))


def test_pruning_keeps_verified_ones_and_never_deletes_an_unverifiable_one(tmp_path):
    mgr = CheckpointManager(tmp_path, keep_last=2)
    _save(mgr, 10)
    _save(mgr, 20)
    _corrupt(tmp_path / "step_0000020")
    mgr = CheckpointManager(tmp_path, keep_last=2)  # a new run: knows nothing about them yet
    with pytest.warns(UserWarning, match="keeping checkpoint .*step_0000020"):
        _save(mgr, 30)
        _save(mgr, 40)
    # the two newest *verified* (40, 30) are kept, 10 is pruned, the corrupt 20 is left in place
    assert sorted(p.name for p in tmp_path.iterdir()) == ["step_0000020", "step_0000030", "step_0000040"]


# ---------------------------------------------------------------- item 7: run-folder lock
def test_a_second_process_on_the_same_out_stops_at_once(tmp_path):
    holder = subprocess.Popen(
        [
            sys.executable,
            "-c",
            "import sys, time; from loopmoe.training.runlock import RunLock; "
            "RunLock(sys.argv[1]).acquire(); print('locked', flush=True); time.sleep(120)",
            str(tmp_path),
        ],
        stdout=subprocess.PIPE,
        text=True,
        env={"PYTHONPATH": str(ROOT), "PATH": ""},
    )
    try:
        assert holder.stdout.readline().strip() == "locked"
        with pytest.raises(
            RunDirBusyError, match=f"another loopmoe process \\(pid {holder.pid}\\) is using {tmp_path}"
        ):
            _train(tmp_path)
        assert not (tmp_path / "checkpoints").exists() and not (tmp_path / "metrics.jsonl").exists()
    finally:
        holder.kill()
        holder.wait()
    assert _train(tmp_path)["step"] == 6  # released by the kernel when its holder died


def test_lock_is_held_for_the_run_and_released_after(tmp_path, monkeypatch):
    seen = []
    real_save = CheckpointManager.save

    def save(self, meta, *a, **kw):
        with pytest.raises(RunDirBusyError):
            RunLock(tmp_path).acquire()
        seen.append(meta.step)
        return real_save(self, meta, *a, **kw)

    monkeypatch.setattr(CheckpointManager, "save", save)
    _train(tmp_path)
    assert len(seen) == 2
    RunLock(tmp_path).acquire().release()


def test_checkpoint_staging_names_are_private_to_the_process(tmp_path, monkeypatch):
    staged = []
    real_seal = CheckpointManager._seal
    monkeypatch.setattr(
        CheckpointManager, "_seal", lambda self, tmp, final: (staged.append(tmp.name), real_seal(self, tmp, final))
    )
    _save(CheckpointManager(tmp_path, keep_last=2), 10)
    import os

    assert staged == [f"step_0000010.tmp-{os.getpid()}"]


# ---------------------------------------------------------------- item 12: disk full, stale debris
@pytest.mark.parametrize("failure", ["enospc", "torch_runtime_error"])
def test_disk_full_says_so_and_keeps_the_previous_checkpoints(tmp_path, monkeypatch, failure):
    mgr = CheckpointManager(tmp_path, keep_last=2)
    _save(mgr, 10)
    real_save = torch.save

    def full_disk(obj, f, *a, **kw):
        if Path(f).name == "optim.pt":
            if failure == "enospc":
                raise OSError(errno.ENOSPC, "No space left on device")
            raise RuntimeError(
                "[enforce fail at inline_container.cc:778] . PytorchStreamWriter failed writing file "
                "data/0: file write failed; basic_ios::clear: iostream error"
            )
        return real_save(obj, f, *a, **kw)

    monkeypatch.setattr(torch, "save", full_disk)
    if failure == "torch_runtime_error":
        monkeypatch.setattr(ckpt_module.shutil, "disk_usage", lambda p: type("U", (), {"free": 12 << 20})())
    with pytest.raises(
        CheckpointDiskFullError,
        match=r"disk full while writing checkpoint step 20: \d+ MB free in .*"
        r"free space or lower train.keep_last",
    ):
        _save(mgr, 20)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["step_0000010"]
    verify(tmp_path / "step_0000010")


def test_other_write_errors_are_not_called_disk_full(tmp_path, monkeypatch):
    mgr = CheckpointManager(tmp_path, keep_last=2)
    monkeypatch.setattr(torch, "save", lambda *a, **kw: (_ for _ in ()).throw(OSError(errno.EACCES, "denied")))
    with pytest.raises(PermissionError):
        _save(mgr, 10)


def test_debris_of_killed_writes_is_cleaned_when_a_run_starts(tmp_path):
    _train(tmp_path, "train.max_steps=3")
    debris = [
        tmp_path / "checkpoints" / "step_0000006.tmp-4194999",
        tmp_path / "data" / ".shards.loopmoe-staging-4194999-abc",
        tmp_path / "data" / ".tokenizer.loopmoe-staging-4194999-x1y2",
        tmp_path / ".metrics.jsonl.loopmoe-tmp-4194999-q",
        tmp_path / "checkpoints" / ".step_0000003.loopmoe-old-4194999",
    ]
    for d in debris:
        if d.name.endswith("-q"):
            d.write_text("torn")
        else:
            d.mkdir(parents=True)
            (d / "model.pt").write_bytes(b"half")
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no "skipping checkpoint": debris is not a checkpoint
        # (only the announced schedule change of the longer run may warn)
        warnings.filterwarnings("ignore", message="resuming at step 3 with a changed schedule")
        assert _train(tmp_path)["step"] == 6
    assert [d for d in debris if d.exists()] == []
    assert [p.name for _, p in list_checkpoints(tmp_path / "checkpoints")] == ["step_0000003", "step_0000006"]


def test_shared_data_cache_keeps_live_writers_temporaries(tmp_path):
    import os

    from loopmoe.atomic import clean_stale_temporaries

    live = tmp_path / f".shards.loopmoe-staging-{os.getppid()}-abc"
    dead = tmp_path / ".shards.loopmoe-staging-4194999-abc"
    live.mkdir()
    dead.mkdir()
    assert clean_stale_temporaries(tmp_path, held=False) == [dead]
    assert live.exists()


def test_a_corrupt_checkpoint_is_moved_aside_not_overwritten(tmp_path):
    mgr = CheckpointManager(tmp_path, keep_last=3)
    _save(mgr, 10)
    _save(mgr, 20)
    _corrupt(tmp_path / "step_0000020")
    mgr = CheckpointManager(tmp_path, keep_last=3)
    with pytest.warns(UserWarning, match="skipping checkpoint"):
        assert mgr.load_latest(*ckpt_module_state()).meta.step == 10
    with pytest.warns(UserWarning, match="moved checkpoint step_0000020, which does not verify"):
        _save(mgr, 20)  # the resumed run reaches step 20 again
    verify(tmp_path / "step_0000020")
    (rejected,) = tmp_path.glob("rejected-*")
    assert [p.name for p in rejected.iterdir()] == ["step_0000020"]


def ckpt_module_state():
    from tests.training.test_checkpoint import _state

    return _state(seed=5)


def test_cleanup_does_not_sweep_a_whole_tree(tmp_path):
    from loopmoe.atomic import clean_stale_temporaries

    deep = tmp_path / "a" / "b" / "c" / ".notes.txt.loopmoe-tmp-4194999-x"
    near = tmp_path / "a" / "b" / ".notes.txt.loopmoe-tmp-4194999-x"
    for f in (deep, near):
        f.parent.mkdir(parents=True, exist_ok=True)
        f.write_text("x")
    assert clean_stale_temporaries(tmp_path, held=True) == [near]
    assert deep.exists()


def test_an_interrupted_final_export_leaves_the_previous_one_whole(tmp_path, monkeypatch):
    from tests.training.standins import TinyMoELM

    _train(tmp_path)
    final = tmp_path / "final"
    before = {p.name: p.read_bytes() for p in final.iterdir()}

    def torn(self, directory):  # dies halfway through writing the weights
        (Path(directory) / "pytorch_model.bin").write_bytes(b"torn")
        raise OSError(errno.EIO, "interrupted export")

    monkeypatch.setattr(TinyMoELM, "save_pretrained", torn)
    with pytest.raises(OSError, match="interrupted export"):
        _train(tmp_path)  # a finished run exports again
    assert {p.name: p.read_bytes() for p in final.iterdir()} == before  # staged: final/ is never torn
    assert not [p for p in tmp_path.iterdir() if "loopmoe-staging" in p.name]
