"""Property test: loading a damaged checkpoint either works or says why, in one error of ours.

Any file of a checkpoint truncated, overwritten, bit-flipped or deleted, with its checksums left as they
were (bit rot, a bad copy) or rewritten to match (a hand edit, an attacker): ``load_latest`` restores the
run or raises a clear error (``LoopMoEError`` / ``ValueError``), never an exception from inside torch
or a ``KeyError`` from a state dict that lacks what loading needs."""

from __future__ import annotations

import shutil
import tempfile
import warnings
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from loopmoe.errors import LoopMoEError
from loopmoe.training import CheckpointManager
from tests.training.test_checkpoint import _save, _state
from tests.training.test_safe_dcp import _reseal

FILES = ["model.pt", "optim.pt", "scheduler.pt", "rank_00000.pt", "meta.json", "COMPLETE"]


@pytest.fixture(scope="module")
def pristine(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("pristine")
    _save(CheckpointManager(root, keep_last=1), 4)
    return root


def _damage(path: Path, how: str, at: float, data: bytes) -> None:
    raw = path.read_bytes()
    cut = int(at * len(raw))
    if how == "delete":
        path.unlink()
    elif how == "truncate":
        path.write_bytes(raw[:cut])
    elif how == "flip":
        path.write_bytes(raw[:cut] + bytes([raw[cut] ^ 0xFF]) + raw[cut + 1 :] if cut < len(raw) else raw)
    else:  # overwrite a stretch with other bytes
        path.write_bytes(raw[:cut] + data + raw[cut + len(data) :])


@settings(max_examples=40, deadline=5000, suppress_health_check=[HealthCheck.too_slow], derandomize=True)
@given(
    name=st.sampled_from(FILES),
    how=st.sampled_from(["delete", "truncate", "flip", "overwrite"]),
    at=st.floats(0, 1, exclude_max=True),
    data=st.binary(min_size=1, max_size=64),
    reseal=st.booleans(),
)
def test_a_damaged_checkpoint_loads_or_says_why(pristine, name, how, at, data, reseal):
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp) / "ckpt"
        shutil.copytree(pristine, root)
        (path,) = root.glob("step_*")
        _damage(path / name, how, at, data)
        if reseal and name != "COMPLETE":
            _reseal(path)
        model, opt, sched = _state(seed=1)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            try:
                state = CheckpointManager(root, keep_last=1).load_latest(model, opt, sched)
            except (LoopMoEError, ValueError):
                return
        assert state is not None and state.meta.step == 4


# Files that read and pass their (rewritten) checksums but do not hold what loading needs.
_WRONG = {
    "meta.json": ["{}", "[1]", '{"step": "4", "tokens": 0, "skipped_steps": 0}'],
    "rank_00000.pt": [{}, [1], {"rng": {}, "loader": {}}],
    "model.pt": [{}, "weights", "shapes"],
    "optim.pt": [{}, {"state": {}, "param_groups": []}],
    "scheduler.pt": [{}, []],
}


@pytest.mark.parametrize(("name", "content"), [(n, c) for n, cs in _WRONG.items() for c in cs])
def test_a_resealed_file_that_does_not_fit_is_skipped_and_changes_nothing(pristine, tmp_path, name, content):
    root = tmp_path / "ckpt"
    shutil.copytree(pristine, root)
    (path,) = root.glob("step_*")
    target = path / name
    if name == "meta.json":
        target.write_text(content)
    elif content in ("weights", "shapes"):  # the real names with the wrong shapes, or something not a tensor
        weights = torch.load(target, weights_only=True)
        torch.save({k: torch.zeros(1) if content == "shapes" else "w" for k in weights}, target)
    else:
        torch.save(content, target)
    _reseal(path)
    model, opt, sched = _state(seed=1)
    before = [t.clone() for t in model.state_dict().values()], opt.state_dict(), sched.state_dict()
    rng = torch.get_rng_state()
    with pytest.warns(UserWarning, match="skipping checkpoint"), pytest.raises(LoopMoEError, match="none verifies"):
        CheckpointManager(root, keep_last=1).load_latest(model, opt, sched)
    assert all(torch.equal(a, b) for a, b in zip(before[0], model.state_dict().values()))
    assert str(opt.state_dict()) == str(before[1]) and sched.state_dict() == before[2]
    assert torch.equal(torch.get_rng_state(), rng)
