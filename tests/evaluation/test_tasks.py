"""Every shipped task loads its local file and runs end to end on a tiny LoopMoE, offline."""

from __future__ import annotations

import json

import pytest

from loopmoe.evaluation.harness import SHIPPED_TASKS, required_files
from loopmoe.evaluation.tasks import loaders, prompts

ABSENT_HERE = {"arc_challenge", "winogrande"}  # not in the shared data; exercised with files written below


def test_shipped_task_list():
    assert set(SHIPPED_TASKS) == {
        "hellaswag",
        "piqa",
        "siqa",
        "arc_easy",
        "arc_challenge",
        "boolq",
        "copa",
        "openbookqa",
        "lambada_openai",
        "winogrande",
    }


def test_every_present_task_runs(run_eval, loopmoe_dir, data_dir, tmp_path):
    tasks = [t for t in SHIPPED_TASKS if t not in ABSENT_HERE]
    out = tmp_path / "results.json"
    assert (
        run_eval(
            [
                str(loopmoe_dir),
                "--tasks",
                ",".join(tasks),
                "--limit",
                "2",
                "--batch-size",
                "4",
                "--data-dir",
                str(data_dir),
                "--output",
                str(out),
            ]
        )
        == 0
    )
    rows = json.loads(out.read_text())["tasks"]
    for task in tasks:
        acc = [r for r in rows if r["task"] == task and r["metric"] == "acc"]
        assert len(acc) == 1 and 0.0 <= acc[0]["value"] <= 1.0 and acc[0]["n"] == 2, task
    assert any(r["task"] == "lambada_openai" and r["metric"] == "perplexity" for r in rows)
    assert any(r["task"] == "piqa" and r["metric"] == "acc_norm" for r in rows)


def _write_absent_task_files(root):
    (root / "arc").mkdir()
    arc = [
        {
            "id": f"q{i}",
            "question": {
                "stem": f"Which number is {i}?",
                "choices": [{"text": str(i + j), "label": "ABCD"[j]} for j in range(4)],
            },
            "answerKey": "A",
        }
        for i in range(3)
    ]
    (root / "arc/ARC-Challenge-Test.jsonl").write_text("\n".join(json.dumps(d) for d in arc) + "\n")
    (root / "winogrande").mkdir()
    wino = [
        {
            "context_options": [
                "The trophy didn't fit in the suitcase because the trophy",
                "The trophy didn't fit in the suitcase because the suitcase",
            ],
            "continuation": "was too big.",
            "gold": 0,
        },
        {"sentence": "Anna gave Mary a gift because _ was kind.", "option1": "Anna", "option2": "Mary", "answer": "1"},
    ]
    (root / "winogrande/winogrande_dev.jsonl").write_text("\n".join(json.dumps(d) for d in wino) + "\n")


def test_arc_challenge_and_winogrande_from_their_files(run_eval, loopmoe_dir, tmp_path):
    data = tmp_path / "data"
    data.mkdir()
    _write_absent_task_files(data)
    out = tmp_path / "r.json"
    assert (
        run_eval(
            [str(loopmoe_dir), "--tasks", "arc_challenge,winogrande", "--data-dir", str(data), "--output", str(out)]
        )
        == 0
    )
    rows = {(r["task"], r["metric"]): r for r in json.loads(out.read_text())["tasks"]}
    assert rows[("arc_challenge", "acc")]["n"] == 3
    assert rows[("winogrande", "acc")]["n"] == 2


def test_winogrande_sentence_form_matches_lm_eval_split(tmp_path):
    _write_absent_task_files(tmp_path)
    doc = loaders.winogrande(tmp_path, required_files("winogrande"))["validation"][1]
    assert doc["context_options"] == ["Anna gave Mary a gift because Anna", "Anna gave Mary a gift because Mary"]
    assert prompts.winogrande_doc_to_target(doc) == "was kind."
    assert prompts.winogrande_doc_to_text(doc) == 0


def test_loaders_produce_upstream_schema(data_dir):
    piqa = loaders.piqa(data_dir, required_files("piqa"))["validation"]
    assert len(piqa) == 1838 and set(piqa[0]) == {"goal", "sol1", "sol2", "label"}
    obqa = loaders.openbookqa(data_dir, required_files("openbookqa"))["test"][0]
    assert obqa["choices"] == {
        "text": [
            "make more phone calls",
            "quit eating lunch out",
            "buy less with monopoly money",
            "have lunch with friends",
        ],
        "label": ["A", "B", "C", "D"],
    }
    assert obqa["answerKey"] == "B"
    assert loaders.boolq(data_dir, required_files("boolq"))["validation"][0]["label"] in (0, 1)
    lam = loaders.lambada(data_dir, required_files("lambada_openai"))["test"][0]["text"]
    assert lam.endswith("I don't care about signs")


def test_hellaswag_context_follows_lm_eval():
    row = {
        "ctx": "Roof shingle removal: A man is sitting on a roof. he",
        "label": "3",
        "endings": ["is using wrap to wrap a pair of skis.", " a [title] b", "c", "d"],
    }
    from datasets import Dataset

    doc = prompts.hellaswag_process_docs(Dataset.from_list([row]))[0]
    assert doc["query"] == "Roof shingle removal: A man is sitting on a roof. He"
    assert doc["choices"][1] == "a. b" and doc["gold"] == 3


def test_missing_file_names_expected_path(run_eval, tmp_path):
    with pytest.raises(FileNotFoundError, match=str(tmp_path / "piqa" / "valid.jsonl")):
        run_eval([str(tmp_path / "no-model"), "--tasks", "piqa", "--data-dir", str(tmp_path)])


def test_unknown_task_lists_choices(run_eval, tmp_path):
    with pytest.raises(ValueError, match="hellaswag"):
        run_eval([str(tmp_path), "--tasks", "piqaa"])
