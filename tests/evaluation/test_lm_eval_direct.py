"""lm-evaluation-harness used directly on a loopmoe checkpoint, and lm-eval's options in `loopmoe eval`."""

from __future__ import annotations

import json

import pytest

from loopmoe.cli.main import main
from loopmoe.evaluation.harness import TASKS_DIR
from loopmoe.testing.without_loopmoe import run_without_loopmoe

# The documented command (README), in a process where loopmoe cannot be imported.
LM_EVAL = """
import runpy, sys
sys.argv = ["lm_eval", "--model", "hf", "--model_args", "pretrained={model},trust_remote_code=True",
            "--include_path", "{tasks}", "--metadata", "data_dir={data}", "--tasks", "loopmoe_arc_easy",
            "--limit", "6", "--batch_size", "3", "--device", "cpu", "--output_path", "lm_eval_out"]
runpy.run_module("lm_eval", run_name="__main__")
"""


def test_tasks_path_prints_the_task_folder(capsys):
    assert main(["tasks", "--path"]) == 0
    folder = capsys.readouterr().out.strip()
    assert folder == str(TASKS_DIR) and (TASKS_DIR / "arc_easy.yaml").is_file()
    assert main(["tasks"]) == 0
    # its name, its name in lm-eval (never one of lm-eval's own, so nothing is shadowed), its data files
    assert "arc_easy\tloopmoe_arc_easy\tarc/ARC-Easy-Test.jsonl" in capsys.readouterr().out.splitlines()


@pytest.mark.slow  # lm_eval indexes its ~15k own task files first (minutes on a busy CPU)
def test_lm_eval_cli_scores_the_export_as_loopmoe_eval_does(trained_run, data_dir, tmp_path, run_eval):
    model = trained_run / "final"
    run_without_loopmoe(LM_EVAL.format(model=model, tasks=TASKS_DIR, data=data_dir), tmp_path)
    (results_file,) = (tmp_path / "lm_eval_out").rglob("results_*.json")
    theirs = json.loads(results_file.read_text())["results"]["loopmoe_arc_easy"]  # lm-eval's name of ours

    ours_file = tmp_path / "ours.json"
    argv = [str(model), "--tasks", "arc_easy", "--limit", "6", "--batch-size", "3", "--output", str(ours_file)]
    assert run_eval([*argv, "--data-dir", str(data_dir)]) == 0
    ours = json.loads(ours_file.read_text())["lm_eval"]["results"]["arc_easy"]
    for metric in ("acc,none", "acc_norm,none"):
        assert theirs[metric] == ours[metric], metric


def test_eval_few_shot_auto_batch_and_logged_samples(trained_run, data_dir, tmp_path, run_eval):
    output = tmp_path / "results.json"
    argv = [str(trained_run / "final"), "--tasks", "arc_easy", "--limit", "3", "--data-dir", str(data_dir)]
    assert (
        run_eval([*argv, "--num-fewshot", "2", "--batch-size", "auto", "--log-samples", "--output", str(output)]) == 0
    )
    samples = [json.loads(line) for line in (tmp_path / "results.samples.arc_easy.jsonl").read_text().splitlines()]
    assert len(samples) == 3
    for sample in samples:
        context, _choice = sample["arguments"][0]
        assert context.count("Question:") == 3  # two examples, then the question
    assert json.loads(output.read_text())["tasks"][0]["n"] == 3


def test_eval_options_that_cannot_work_are_refused(trained_run, tmp_path, run_eval):
    model = str(trained_run / "final")
    with pytest.raises(ValueError, match="--log-samples .* --output"):
        run_eval([model, "--tasks", "arc_easy", "--log-samples"])
    with pytest.raises(ValueError, match="auto applies to lm-eval tasks only"):
        run_eval([model, "--text", str(tmp_path / "x.txt"), "--batch-size", "auto"])
    with pytest.raises(ValueError, match="must be a positive integer, 'auto' or 'auto:N'"):
        run_eval([model, "--tasks", "arc_easy", "--batch-size", "0"])


@pytest.mark.slow  # builds lm-eval's full task index
def test_eval_runs_any_lm_eval_task_whose_data_is_local(trained_run, tmp_path, run_eval, monkeypatch, capsys):
    """sciq is lm-eval's own task (not shipped): its dataset comes from the local datasets cache, here a stand-in."""
    import datasets

    row = {
        "question": "What gas do plants absorb?",
        "distractor1": "oxygen",
        "distractor2": "helium",
        "distractor3": "neon",
        "correct_answer": "carbon dioxide",
        "support": "Plants absorb carbon dioxide.",
    }
    cached = datasets.DatasetDict({s: datasets.Dataset.from_list([row] * 4) for s in ("train", "validation", "test")})
    requested = []
    monkeypatch.setattr(datasets, "load_dataset", lambda path, *a, **k: requested.append(path) or cached)
    output = tmp_path / "results.json"
    assert run_eval([str(trained_run / "final"), "--tasks", "sciq", "--limit", "2", "--output", str(output)]) == 0
    assert requested == ["allenai/sciq"]
    rows = json.loads(output.read_text())["tasks"]
    assert {(r["task"], r["metric"], r["n"]) for r in rows} == {("sciq", "acc", 2), ("sciq", "acc_norm", 2)}

    with pytest.raises(ValueError, match=r"unknown task 'no_such_task'.*lm_eval ls tasks"):
        run_eval([str(trained_run / "final"), "--tasks", "no_such_task"])
