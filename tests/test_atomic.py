"""What loopmoe may delete: only what it created, recognised by its mark, never by a look-alike name."""

import os

import pytest

from loopmoe.atomic import OUTPUT_MARKER, atomic_directory, check_no_overlap, clean_stale_temporaries
from loopmoe.errors import ConfigError


def test_users_files_that_look_like_debris_survive_a_cleanup(tmp_path):
    users = [
        tmp_path / ".bashrc.old-2020",
        tmp_path / ".plan.staging-v2",
        tmp_path / "notes" / ".draft.tmp-final",
        tmp_path / ".notes.txt.tmp-4194999-x",  # an older loopmoe's name, or a user's: not ours to judge
        tmp_path / "step_0000006.tmp-4194999",  # a checkpoint's name, but not in a checkpoints folder
    ]
    ours = [
        tmp_path / ".metrics.jsonl.loopmoe-tmp-4194999-q",
        tmp_path / "data" / ".shards.loopmoe-staging-4194999-abc",
        tmp_path / "checkpoints" / "step_0000006.tmp-4194999",
        tmp_path / "checkpoints" / ".step_0000003.loopmoe-old-4194999",
    ]
    for path in users + ours:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text("x")
    removed = clean_stale_temporaries(tmp_path, held=True)
    assert sorted(removed) == sorted(ours)
    assert all(p.exists() for p in users)


def test_a_live_writers_temporary_is_kept_without_the_lock(tmp_path):
    live = tmp_path / f".shards.loopmoe-staging-{os.getppid()}-abc"
    dead = tmp_path / ".shards.loopmoe-staging-4194999-abc"
    live.mkdir()
    dead.mkdir()
    assert clean_stale_temporaries(tmp_path, held=False) == [dead]


def _publish(destination, text="new", **kwargs):
    with atomic_directory(destination, **kwargs) as staging:
        (staging / "model.safetensors").write_text(text)


def test_a_folder_loopmoe_wrote_is_replaced(tmp_path):
    out = tmp_path / "export"
    _publish(out, "first")
    assert (out / OUTPUT_MARKER).is_file()
    _publish(out, "second")
    assert (out / "model.safetensors").read_text() == "second"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["export"]  # the old version is gone, nothing else


def test_a_users_folder_is_refused_or_moved_aside_never_deleted(tmp_path):
    out = tmp_path / "mine"
    out.mkdir()
    (out / "notes.txt").write_text("keep me")
    with pytest.raises(ConfigError, match="--overwrite"):
        _publish(out)
    assert (out / "notes.txt").read_text() == "keep me" and not (out / "model.safetensors").exists()
    with pytest.warns(UserWarning, match="moved the previous contents"):
        _publish(out, overwrite=True)
    (previous,) = tmp_path.glob("mine.previous-*")
    assert (previous / "notes.txt").read_text() == "keep me"
    assert (out / "model.safetensors").read_text() == "new"


def test_an_empty_folder_is_used_and_a_file_is_refused(tmp_path):
    (tmp_path / "empty").mkdir()
    _publish(tmp_path / "empty")
    assert (tmp_path / "empty" / "model.safetensors").exists()
    (tmp_path / "file").write_text("a regular file")
    with pytest.raises(ConfigError, match="is not a folder"):
        _publish(tmp_path / "file", overwrite=True)
    assert (tmp_path / "file").read_text() == "a regular file"
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []


@pytest.mark.parametrize(("output", "relation"), [("run", "is"), ("run/final/x", "lies inside"), (".", "contains")])
def test_outputs_that_overlap_inputs_are_refused(tmp_path, output, relation):
    with pytest.raises(ConfigError, match=relation):
        check_no_overlap(tmp_path / output, {"checkpoint": tmp_path / "run"})
    check_no_overlap(tmp_path / "elsewhere", {"checkpoint": tmp_path / "run"})
