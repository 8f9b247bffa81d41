"""A study's ledger lets it finish over several machines: recorded runs are reused, stale ones refused."""

import json
import shutil

import pytest

import loopmoe.training
from loopmoe.compare import CompareOptions, runner
from loopmoe.compare.ledger import MARKER, Ledger
from loopmoe.errors import ConfigError
from tests.compare import TINY_COMPARE


def _opts(tmp_path, out="cmp", **kw):
    return CompareOptions(
        **{
            **TINY_COMPARE,
            "arms": ("reference", "looped"),
            "tasks": (),
            "text": "",
            "depth_loops": (1, 2),
            "out": tmp_path / out,
            "ledger": tmp_path / "ledger",
            **kw,
        }
    )


@pytest.fixture
def trained(monkeypatch):
    calls: list[str] = []
    real = loopmoe.training.run_training

    def spy(cfg, run_dir, *args, **kwargs):
        calls.append(run_dir.parent.name + "/" + run_dir.name)
        return real(cfg, run_dir, *args, **kwargs)

    monkeypatch.setattr(loopmoe.training, "run_training", spy)
    return calls


@pytest.fixture(scope="module")
def recorded(tmp_path_factory):
    """One study of seed 0 recorded in a ledger (trained once for the module); tests copy its ledger."""
    root = tmp_path_factory.mktemp("recorded")
    return root, runner.run_comparison(_opts(root), log=lambda *a: None)


def _ledger_of(recorded, tmp_path):
    shutil.copytree(recorded[0] / "ledger", tmp_path / "ledger")
    return tmp_path / "ledger"


def test_a_fresh_machine_reuses_the_recorded_runs_and_trains_only_new_ones(recorded, tmp_path, trained):
    first = recorded[1]
    ledger = _ledger_of(recorded, tmp_path)
    assert (ledger / MARKER).is_file()
    entry = json.loads((ledger / "seed0" / "looped.json").read_text())
    assert entry["identity"]["run_config"]["model"]["config"]["num_loops"] == 2
    assert entry["record"]["val_loss"] == first.runs["looped"][0].val_loss
    before = {p: p.read_text() for p in ledger.rglob("*.json")}

    # another machine: no run folders, the ledger only; a new seed is added to the study
    logs: list[str] = []
    second = runner.run_comparison(_opts(tmp_path, seeds=(0, 1)), log=logs.append)
    assert trained == ["seed1/reference", "seed1/looped"]
    assert sum("recorded in the ledger, reused" in line for line in logs) == 2
    for arm in ("reference", "looped"):
        assert second.runs[arm][0].to_dict() == first.runs[arm][0].to_dict()
        assert set(second.runs[arm]) == {0, 1}
    # entries of the reused runs were not rewritten; the new seed's were added
    assert all(p.read_text() == text for p, text in before.items())
    assert (ledger / "seed1" / "reference.json").is_file()
    assert "looped - reference" in (tmp_path / "cmp" / "report.md").read_text()


def test_entries_of_other_settings_or_evaluation_are_never_silently_used(recorded, tmp_path, trained):
    _ledger_of(recorded, tmp_path)
    # an arm whose settings changed: refused before anything trains, naming the difference and the fix
    with pytest.raises(ConfigError, match=r"ledger entry .*seed0.*optim\.lr 0\.003 -> 0\.001.*--fresh"):
        runner.run_comparison(_opts(tmp_path, out="other", lr=1e-3), log=lambda *a: None)
    assert trained == []
    # --fresh moves the stale entries aside (never deletes them) and trains anew
    runner.run_comparison(_opts(tmp_path, out="other", lr=1e-3, fresh=True), log=lambda *a: None)
    assert (tmp_path / "ledger" / "seed0" / "looped.json.prev-1").is_file()
    assert json.loads((tmp_path / "ledger" / "seed0" / "looped.json").read_text())["identity"]["run_config"]["optim"][
        "lr"
    ] == pytest.approx(1e-3)
    # another depth curve: the entry cannot answer without a checkpoint (it would train again, saying why)
    shutil.rmtree(tmp_path / "other")
    trained.clear()
    logs: list[str] = []
    opts = _opts(tmp_path, out="other", lr=1e-3, depth_loops=(1, 2, 3), report_only=True)
    runner.claim_out_dir(_opts(tmp_path, out="other", lr=1e-3), log=lambda *a: None)
    missing = runner.run_comparison(opts, log=logs.append).missing
    assert trained == [] and len(missing) == 2
    assert any("other evaluation settings" in line and "depth_loops" in line for line in logs)


def test_a_ledger_is_only_written_into_its_own_folder_and_a_broken_entry_names_the_fix(tmp_path):
    users = tmp_path / "mine"
    users.mkdir()
    (users / "notes.txt").write_text("keep")
    with pytest.raises(ConfigError, match="holds no ledger"):
        Ledger.open(users, create=True)
    with pytest.raises(ConfigError, match="--ledger"):
        runner.run_comparison(_opts(tmp_path, ledger=tmp_path / "cmp" / "ledger"), log=lambda *a: None)
    ledger = Ledger.open(tmp_path / "ledger", create=True)
    ledger.path(0, "looped").parent.mkdir(parents=True)
    ledger.path(0, "looped").write_text('{"schema": 1, "identity": {}}')
    with pytest.raises(ConfigError, match=r"lacks data, evaluation, record; restore it"):
        ledger.entry(0, "looped")
    ledger.path(0, "looped").write_text("{not json")
    with pytest.raises(ConfigError, match="not valid JSON"):
        ledger.entry(0, "looped")
