"""Multi-process resume reads DCP checkpoints without running code from them (one-process gloo, no torchrun)."""

import io
import json
import os
import pickle

import pytest
import torch
import torch.distributed as dist
from torch.distributed.checkpoint.metadata import Metadata, MetadataIndex
from torch.distributed.checkpoint.planner import LoadItemType, ReadItem

from loopmoe.training import CheckpointManager
from loopmoe.training import checkpoint as checkpoint_module
from loopmoe.training.checkpoint import MARKER, CheckpointMeta, _files, _sha256
from loopmoe.training.safe_dcp import SafeLoadPlanner, UnsafeCheckpointError, load_dcp_metadata
from tests.training.test_checkpoint import _state


class _TouchMarker:
    """Unpickling this calls open(marker, "w"): the file appears if the loader runs code."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


@pytest.fixture
def one_process_group(tmp_path, monkeypatch):
    """A world-size-1 gloo group, with the checkpoint manager taking its multi-process (DCP) path."""
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    monkeypatch.setattr(checkpoint_module, "is_distributed", lambda: True)
    yield
    dist.destroy_process_group()


def _reseal(path):
    """Rewrite COMPLETE so the tampered checkpoint passes its checksums (an attacker can do this too)."""
    manifest = {"files": {str(f.relative_to(path)): _sha256(f) for f in _files(path) if f.name != MARKER}}
    (path / MARKER).write_text(json.dumps(manifest, indent=1, sort_keys=True))


def _save(tmp_path, seed=1):
    mgr = CheckpointManager(tmp_path / "ckpt", keep_last=2)
    model, opt, sched = _state(seed)
    path = mgr.save(CheckpointMeta(step=10, tokens=100, skipped_steps=0), model, opt, sched, {"position": 10})
    return mgr, model, path


def test_dcp_resume_round_trip(tmp_path, one_process_group):
    mgr, saved, path = _save(tmp_path)
    assert (path / "dcp" / ".metadata").is_file()
    assert isinstance(load_dcp_metadata(path / "dcp" / ".metadata"), Metadata)
    model, opt, sched = _state(seed=2)
    restored = mgr.load_latest(model, opt, sched)
    assert restored is not None and restored.meta.step == 10
    assert all(torch.equal(a, b) for a, b in zip(saved.state_dict().values(), model.state_dict().values()))
    assert opt.state_dict()["state"]  # the optimizer moments came back too


def test_crafted_dcp_metadata_is_refused(tmp_path, one_process_group):
    mgr, _, path = _save(tmp_path)
    marker = tmp_path / "pwned"
    metadata = path / "dcp" / ".metadata"
    metadata.write_bytes(pickle.dumps(_TouchMarker(marker)))
    _reseal(path)
    model, opt, sched = _state(seed=2)
    with pytest.raises(UnsafeCheckpointError, match=r"\.metadata: refused to load io\.open") as info:
        mgr.load_latest(model, opt, sched)
    assert str(metadata) in str(info.value) and "never runs code" in str(info.value)
    assert not marker.exists()


def test_crafted_dcp_metadata_is_refused_directly(tmp_path):
    marker = tmp_path / "pwned"
    metadata = tmp_path / ".metadata"
    metadata.write_bytes(pickle.dumps(_TouchMarker(marker)))
    with pytest.raises(UnsafeCheckpointError, match=r"refused to load io\.open"):
        load_dcp_metadata(metadata)
    assert not marker.exists()


def test_crafted_dcp_bytes_entry_is_refused(tmp_path):
    marker = tmp_path / "pwned"
    buffer = io.BytesIO()
    torch.save(_TouchMarker(marker), buffer)
    buffer.seek(0)
    planner = SafeLoadPlanner()
    planner.state_dict, planner.flatten_state_dict = {}, False
    item = ReadItem(LoadItemType.BYTE_IO, MetadataIndex("optim.x"), [], MetadataIndex("optim.x"), [], [])
    with pytest.raises(UnsafeCheckpointError, match="'optim.x' refused"):
        planner.load_bytes(item, buffer)
    assert not marker.exists() and not os.path.exists("pwned")
