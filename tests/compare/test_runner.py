"""The comparison is controlled: both sides differ only in [model]; options validate; data is optional."""

import pytest

from loopmoe.balance import balance
from loopmoe.compare import CompareOptions
from loopmoe.compare.runner import available_tasks, run_config_for
from loopmoe.presets import get_preset


def test_both_models_train_under_identical_conditions(tmp_path):
    opts = CompareOptions(out=tmp_path).validate()
    result = balance(get_preset("small"), opts.num_loops, seq_len=opts.seq_len)
    ref = run_config_for(opts, result.reference, seed=3).to_dict()
    looped = run_config_for(opts, result.looped, seed=3).to_dict()
    assert {k: v for k, v in ref.items() if k != "model"} == {k: v for k, v in looped.items() if k != "model"}
    assert ref["train"]["seed"] == 3 and ref["data"]["data_dir"] == str(tmp_path / "data")
    assert (ref["model"]["config"]["num_loops"], looped["model"]["config"]["num_loops"]) == (1, 2)
    assert looped["model"]["config"]["num_experts"] == result.looped.num_experts


def test_options_validate_and_tokens_set_steps():
    opts = CompareOptions(tokens=1_000_000).validate()
    assert opts.steps == -(-1_000_000 // (opts.micro_batch_size * opts.seq_len))
    for bad, message in (
        ({"tokens": 10}, "less than one batch"),
        ({"warmup_steps": 500}, "--warmup-steps"),
        ({"seeds": ()}, "--seeds"),
        ({"strategy": "x"}, "--strategy"),
    ):
        with pytest.raises(ValueError, match=message):
            CompareOptions(**bad).validate()


def test_downstream_tasks_follow_the_data_that_is_present(tmp_path, monkeypatch):
    monkeypatch.setenv("LOOPMOE_DATA_DIR", str(tmp_path))
    assert available_tasks() == ()  # a fresh machine: the main job still runs, without downstream tasks
    (tmp_path / "copa").mkdir()
    (tmp_path / "copa" / "val.jsonl").write_text("{}\n")
    assert available_tasks() == ("copa",)
