"""Atomic checkpoints: keep-last-k, and incomplete or corrupt ones skipped with a warning."""

import json

import pytest
import torch

from loopmoe.training import CheckpointManager, build_optimizer, build_scheduler, load_run_config
from loopmoe.training.checkpoint import MARKER, CheckpointMeta, _files, _sha256
from tests.training.standins import TinyMoELM, standin_overrides


def _state(seed):
    torch.manual_seed(seed)
    cfg = load_run_config(None, standin_overrides())
    model = TinyMoELM()
    opt = build_optimizer(model, cfg)
    model(input_ids=torch.zeros(1, 4, dtype=torch.long), labels=torch.zeros(1, 4, dtype=torch.long)).loss.backward()
    opt.step()
    return model, opt, build_scheduler(opt, cfg)


def _save(mgr, step, seed=0):
    model, opt, sched = _state(seed)
    mgr.save(CheckpointMeta(step=step, tokens=step * 10, skipped_steps=0), model, opt, sched, {"position": step})
    return model


def test_atomic_layout_and_keep_last(tmp_path):
    mgr = CheckpointManager(tmp_path, keep_last=2)
    # (debris of a crashed save is removed when a run starts, under the run lock: test_reliability.py)
    for step in (10, 20, 30):
        _save(mgr, step)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["step_0000020", "step_0000030"]
    assert {"model.pt", "optim.pt", "scheduler.pt", "rank_00000.pt", "meta.json", MARKER} <= {
        p.name for p in (tmp_path / "step_0000030").iterdir()
    }


def test_resume_restores_state(tmp_path):
    mgr = CheckpointManager(tmp_path, keep_last=2)
    saved = _save(mgr, 10, seed=1)
    model, opt, sched = _state(seed=2)
    restored = mgr.load_latest(model, opt, sched)
    assert restored.meta.step == 10 and restored.meta.tokens == 100 and restored.loader_state == {"position": 10}
    assert all(torch.equal(a, b) for a, b in zip(saved.state_dict().values(), model.state_dict().values()))


@pytest.mark.parametrize("damage", ["no_marker", "checksum", "unloadable"])
def test_bad_latest_falls_back_with_warning(tmp_path, damage):
    mgr = CheckpointManager(tmp_path, keep_last=3)
    _save(mgr, 10)
    _save(mgr, 20)
    latest = tmp_path / "step_0000020"
    if damage == "no_marker":
        (latest / MARKER).unlink()
    elif damage == "checksum":
        with (latest / "model.pt").open("r+b") as fh:
            fh.seek(100)
            fh.write(b"\x00garbage\x00")
    else:  # file replaced by one that is not a checkpoint, manifest rewritten to match
        (latest / "optim.pt").write_bytes(b"not a torch file")
        manifest = {str(f.relative_to(latest)): _sha256(f) for f in _files(latest)}
        (latest / MARKER).write_text(json.dumps({"files": manifest}))
    model, opt, sched = _state(seed=3)
    with pytest.warns(UserWarning, match="skipping checkpoint"):
        restored = mgr.load_latest(model, opt, sched)
    assert restored.meta.step == 10
