"""Re-running a finished run trains nothing and reports the finished run's final metrics; a re-run that
changes a setting of the run is refused or warns by one rule, finished or mid-run."""

import copy
import json

import pytest

from loopmoe.training import load_run_config, read_metrics, run_training
from loopmoe.training.rerun import setting_changes
from tests.training.standins import data_factory, model_factory

ARGS = [
    "data.seq_len=16",
    "train.micro_batch_size=4",
    "train.grad_accum=1",
    "train.max_steps=6",
    "schedule.warmup_steps=1",
    "train.eval_every=3",
    "train.eval_batches=2",
    "train.checkpoint_every=3",
]


def test_rerun_of_a_finished_run(tmp_path):
    cfg = load_run_config(None, ARGS)
    first = run_training(cfg, tmp_path, model_factory=model_factory, data_factory=data_factory)
    again = run_training(cfg, tmp_path, model_factory=model_factory, data_factory=data_factory)
    assert len(read_metrics(tmp_path)) == 6
    for key in ("step", "loss", "val_loss", "tokens"):
        assert again[key] == first[key], key


# ---- One rule for what a re-run may change (loopmoe.training.rerun), finished or mid-run ----


def _run(tmp_path, *extra, **kwargs):
    cfg = load_run_config(None, [*ARGS, *extra])
    return run_training(cfg, tmp_path, model_factory=model_factory, data_factory=data_factory, **kwargs)


def _recorded(tmp_path):
    return json.loads((tmp_path / "run_config.json").read_text()), json.loads(
        (tmp_path / "final" / "run_config.json").read_text()
    )


def test_a_changed_seed_of_a_finished_run_is_refused_and_not_recorded(tmp_path):
    first = _run(tmp_path)
    before = _recorded(tmp_path)
    with pytest.raises(ValueError, match=r"cannot resume .*train\.seed: 0 -> 1.*--restart.*new --out") as err:
        _run(tmp_path, "train.seed=1")
    assert "\n" not in str(err.value)
    assert _recorded(tmp_path) == before  # run_config.json still says seed 0, the seed the weights were trained with
    assert len(read_metrics(tmp_path)) == 6
    again = _run(tmp_path, "train.seed=1", restart=True)  # the named fix: train again from step 0
    assert _recorded(tmp_path)[0]["train"]["seed"] == 1
    assert again["loss"] != first["loss"]


def test_a_changed_lr_of_a_finished_run_warns_and_is_not_recorded(tmp_path):
    first = _run(tmp_path)
    before = _recorded(tmp_path)
    with pytest.warns(
        UserWarning, match=r"finished at step 6.*optim\.lr: 0\.0003 -> 0\.01; train\.eval_every: 3 -> 2.*not used"
    ):
        again = _run(tmp_path, "optim.lr=0.01", "train.eval_every=2")
    assert _recorded(tmp_path) == before
    assert again["loss"] == first["loss"]


def test_a_changed_seed_mid_run_is_refused_before_anything_is_loaded(tmp_path):
    _run(tmp_path, "train.max_steps=3")
    with pytest.raises(ValueError, match=r"cannot resume .*step_0000003.*train\.seed: 0 -> 1.*--restart"):
        _run(tmp_path, "train.seed=1")
    assert json.loads((tmp_path / "run_config.json").read_text())["train"]["seed"] == 0
    assert len(read_metrics(tmp_path)) == 3


@pytest.mark.parametrize(
    ("override", "key"),
    [("data.seq_len=8", r"data\.seq_len: 16 -> 8"), ("model.num_loops=3", r"different model \(model\.num_loops")],
)
def test_a_changed_model_or_data_setting_is_refused_finished_or_mid_run(tmp_path, override, key):
    _run(tmp_path, "train.max_steps=3")
    with pytest.raises(ValueError, match=rf"cannot resume .*{key}"):  # mid-run
        _run(tmp_path, override)
    _run(tmp_path)
    with pytest.raises(ValueError, match=rf"cannot resume .*{key}"):  # finished
        _run(tmp_path, override)


def test_a_changed_cadence_mid_run_warns_naming_each_key(tmp_path):
    _run(tmp_path, "train.max_steps=3")
    with pytest.warns(
        UserWarning,
        match=r"resuming at step 3 with .*train\.eval_every: 3 -> 2; train\.log_every: 10 -> 1.*from step 4",
    ):
        _run(tmp_path, "train.eval_every=2", "train.log_every=1")
    assert json.loads((tmp_path / "run_config.json").read_text())["train"]["eval_every"] == 2  # used from step 4


def test_every_setting_is_compared():
    saved = load_run_config(None, ARGS).to_dict()
    for section, table in saved.items():
        for key, value in table.items():
            changed = copy.deepcopy(saved)
            changed[section][key] = {"x": 1} if isinstance(value, dict) else ["changed"]
            (change,) = setting_changes(saved, changed)
            assert change.key.startswith(f"{section}.{key}")
            fixed = (section in ("model", "data") and key != "data_dir") or (section, key) == ("train", "seed")
            assert change.fixed == fixed, change.key
