"""metrics.jsonl survives a kill mid-append: a torn last line is dropped, other damage is named."""

import json

import pytest

from loopmoe.training import load_run_config, read_metrics, run_training
from loopmoe.training.metrics import METRICS_FILE, MetricsLogger
from tests.training.standins import data_factory, model_factory, standin_overrides


def _write(path, steps, tail=""):
    path.write_text("".join(json.dumps({"step": s, "loss": 1.0}) + "\n" for s in steps) + tail)


def test_torn_last_line_is_dropped_with_a_warning(tmp_path):
    _write(tmp_path / METRICS_FILE, [1, 2, 3], tail='{"step": 4, "lo')
    with pytest.warns(UserWarning, match=rf"{METRICS_FILE}:4: dropping a torn last line"):
        assert [r["step"] for r in read_metrics(tmp_path)] == [1, 2, 3]
    with pytest.warns(UserWarning, match="torn"):
        MetricsLogger(tmp_path, enabled=True, max_steps=10, start_step=2).close()
    assert [r["step"] for r in read_metrics(tmp_path)] == [1, 2]  # rewritten without the torn line


def test_damage_before_the_last_line_names_file_and_line(tmp_path):
    _write(tmp_path / METRICS_FILE, [1], tail="garbage\n" + json.dumps({"step": 2}) + "\n")
    for call in (lambda: read_metrics(tmp_path), lambda: MetricsLogger(tmp_path, True, 10, start_step=1)):
        with pytest.raises(ValueError, match=rf"{METRICS_FILE}:2: not a metrics record"):
            call()


def test_resume_after_a_torn_append(tmp_path):
    cfg = load_run_config(
        None,
        standin_overrides(
            **{"train.max_steps": 4, "train.checkpoint_every": 2, "train.eval_batches": 0, "schedule.warmup_steps": 1}
        ),
    )
    run_training(cfg, tmp_path, max_steps=2, model_factory=model_factory, data_factory=data_factory)
    with (tmp_path / METRICS_FILE).open("a") as fh:
        fh.write('{"step": 3, "loss": 0.')  # killed mid-append
    with pytest.warns(UserWarning, match="torn"):
        run_training(cfg, tmp_path, model_factory=model_factory, data_factory=data_factory)
    assert [r["step"] for r in read_metrics(tmp_path)] == [1, 2, 3, 4]
