"""Bad evaluation inputs fail with a ValueError that names the problem, never a traceback from inside a library."""

from __future__ import annotations

import json
import shutil

import pytest

from loopmoe.evaluation.custom_task import load_task_file


def test_eval_on_an_empty_text_file(run_eval, loopmoe_dir, tmp_path):
    empty = tmp_path / "empty.txt"
    empty.write_text("")
    with pytest.raises(ValueError, match="empty.txt is empty"):
        run_eval([str(loopmoe_dir), "--text", str(empty)])


def _task(tmp_path, docs, yaml_text='jsonl: t.jsonl\nprompt: "{q}"\nchoices: options\ngold: answer\n'):
    (tmp_path / "t.jsonl").write_text("".join(json.dumps(d) + "\n" for d in docs))
    path = tmp_path / "t.yaml"
    path.write_text(yaml_text)
    return path


def test_out_of_range_gold_index(tmp_path):
    cfg = load_task_file(_task(tmp_path, [{"q": "x", "options": ["a", "b"], "answer": 2}]))
    with pytest.raises(ValueError, match=r"gold index 2 is out of range for 2 choices.*0 to 1"):
        cfg["custom_dataset"]()
    with pytest.raises(ValueError, match="gold index -1 is out of range"):
        cfg["doc_to_target"]({"q": "x", "options": ["a", "b"], "answer": -1})


def test_malformed_task_yaml(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("jsonl: [unclosed\nprompt: x\n")
    with pytest.raises(ValueError, match="bad.yaml is not valid YAML"):
        load_task_file(bad)
    bad.write_text("- a list\n- not a mapping\n")
    with pytest.raises(ValueError, match="must be a YAML mapping"):
        load_task_file(bad)


def test_truncated_safetensors(loopmoe_dir, tmp_path):
    from loopmoe.evaluation.loading import load_model

    copy = tmp_path / "m"
    shutil.copytree(loopmoe_dir, copy)
    weights = copy / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    with pytest.raises(ValueError, match="model.safetensors is truncated or corrupt.*copy or export"):
        load_model(copy)
