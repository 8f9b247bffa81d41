"""A task described by a JSONL file and a small YAML runs without any Python from the user."""

from __future__ import annotations

import json

import pytest

from loopmoe.evaluation.custom_task import load_task_file
from loopmoe.evaluation.tasks.loaders import MissingDataError

DOCS = [
    {"country": "France", "options": ["Paris", "Rome", "Oslo"], "answer": "Paris"},
    {"country": "Italy", "options": ["Paris", "Rome", "Oslo"], "answer": 1},
    {"country": "Norway", "options": ["Paris", "Rome", "Oslo"], "answer": "2"},
]


@pytest.fixture
def task_file(tmp_path):
    (tmp_path / "capitals.jsonl").write_text("\n".join(json.dumps(d) for d in DOCS) + "\n")
    path = tmp_path / "capitals.yaml"
    path.write_text(
        'jsonl: capitals.jsonl\nprompt: "Q: What is the capital of {country}?\\nA:"\nchoices: options\ngold: answer\n'
    )
    return path


def test_config_renders_prompt_choices_and_gold(task_file):
    cfg = load_task_file(task_file)
    assert cfg["task"] == "capitals"
    assert cfg["doc_to_text"](DOCS[0]) == "Q: What is the capital of France?\nA:"
    assert cfg["doc_to_choice"](DOCS[0]) == ["Paris", "Rome", "Oslo"]
    assert [cfg["doc_to_target"](d) for d in DOCS] == [0, 1, 2]


def test_custom_task_runs_through_cli(run_eval, loopmoe_dir, task_file, tmp_path):
    out = tmp_path / "r.json"
    assert run_eval([str(loopmoe_dir), "--task-file", str(task_file), "--output", str(out)]) == 0
    rows = {(r["task"], r["metric"]): r for r in json.loads(out.read_text())["tasks"]}
    assert rows[("capitals", "acc")]["n"] == 3
    assert 0.0 <= rows[("capitals", "acc_norm")]["value"] <= 1.0


def test_bad_task_files_say_what_is_wrong(tmp_path, task_file):
    bad = tmp_path / "bad.yaml"
    bad.write_text("jsonl: capitals.jsonl\nprompt: x\n")
    with pytest.raises(ValueError, match=r"missing \['choices', 'gold'\]"):
        load_task_file(bad)
    bad.write_text("jsonl: nowhere.jsonl\nprompt: x\nchoices: options\ngold: answer\n")
    with pytest.raises(MissingDataError, match="nowhere.jsonl"):
        load_task_file(bad)
    cfg = load_task_file(task_file)
    with pytest.raises(ValueError, match="neither an index nor one of the choices"):
        cfg["doc_to_target"]({"country": "Spain", "options": ["Paris"], "answer": "Madrid"})


@pytest.fixture
def evil_metric(tmp_path):
    """A local "metric" script that touches a marker when imported (what evaluate.load would do)."""
    marker = tmp_path / "pwned"
    script = tmp_path / "mymetric" / "mymetric.py"
    script.parent.mkdir()
    script.write_text(f"open({str(marker)!r}, 'w').close()\n")
    return script.parent, marker


@pytest.mark.parametrize("metric", ["path", "unregistered"])
def test_metric_that_is_a_path_or_unknown_is_refused(run_eval, loopmoe_dir, task_file, tmp_path, evil_metric, metric):
    folder, marker = evil_metric
    name = str(folder) if metric == "path" else "mymetric"
    task_file.write_text(task_file.read_text() + f"metrics: [acc, {json.dumps(name)}]\n")
    with pytest.raises(ValueError, match=r"metric .*mymetric.* is not supported \(allowed: acc, acc_norm\)"):
        load_task_file(task_file)
    with pytest.raises(ValueError, match="is not supported"):
        run_eval([str(loopmoe_dir), "--task-file", str(task_file), "--output", str(tmp_path / "r.json")])
    assert not marker.exists()


def test_metrics_must_be_a_list_of_names(task_file):
    task_file.write_text(task_file.read_text() + "metrics: acc\n")
    with pytest.raises(ValueError, match="metrics must be a list"):
        load_task_file(task_file)
