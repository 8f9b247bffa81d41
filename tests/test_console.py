"""Console output off a terminal (CI logs, files): no live bars, one summary line per job, and no
chatter from lm-eval, datasets, transformers or git."""

import logging
import os
import subprocess
import sys
from pathlib import Path

import pytest
import tqdm.std

from loopmoe.console import Progress, quiet_lm_eval
from tests.evaluation.conftest import data_dir, gpt2_tokenizer, loopmoe_dir  # noqa: F401  (fixtures)

ROOT = Path(__file__).resolve().parents[1]


def test_progress_off_a_terminal_is_one_summary_line(capsys):
    with Progress("tokenising corpus", unit="doc") as bar:
        for _ in range(50):
            bar.update(2, tokens=123)
    err = capsys.readouterr().err  # pytest's capture is not a terminal
    assert err.count("\n") == 1 and "\r" not in err
    assert err.startswith("tokenising corpus: 100 docs in ") and err.rstrip().endswith("(tokens=123)")
    with Progress("silent", unit="doc", enabled=False) as bar:
        bar.update(1)
    assert capsys.readouterr().err == ""


def test_quiet_lm_eval_restores_what_it_changes():
    import lm_eval.evaluator

    init, git_hash = vars(tqdm.std.tqdm)["__init__"], lm_eval.evaluator.get_git_commit_hash
    level = logging.getLogger("lm_eval").level
    with quiet_lm_eval():
        assert tqdm.std.tqdm(range(3)).disable  # off a terminal every bar is off, even one asked for
        assert logging.getLogger("lm_eval").level == logging.ERROR
    assert vars(tqdm.std.tqdm)["__init__"] is init and lm_eval.evaluator.get_git_commit_hash is git_hash
    assert logging.getLogger("lm_eval").level == level
    assert not tqdm.std.tqdm(range(3), disable=False).disable


@pytest.fixture(scope="module")
def model_dir(request):
    """tests/evaluation's tiny LoopMoE with the GPT-2 tokenizer, when the task files are there too."""
    from loopmoe.evaluation.harness import check_task_files

    try:
        check_task_files(["piqa", "arc_easy"], request.getfixturevalue("data_dir"))
    except (FileNotFoundError, ValueError):
        pytest.skip("the piqa / arc_easy files are not in the shared data dir")
    return request.getfixturevalue("loopmoe_dir")


def test_eval_in_a_log_is_a_few_plain_lines(model_dir, tmp_path):
    # From a folder outside any git repository (lm-eval asks git for a commit), stderr a pipe.
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    argv = [sys.executable, "-m", "loopmoe", "eval", str(model_dir), "--tasks", "piqa,arc_easy", "--limit", "3"]
    result = subprocess.run(argv, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr
    err = result.stderr
    for noise in (
        "\r",
        "it/s",
        "Map",
        "fatal: not a git repository",
        "num_fewshot",
        "Custom kwargs",
        "Loading weights",
    ):
        assert noise not in err, (noise, err)
    assert err.splitlines() == [line for line in err.splitlines() if line.startswith("lm-eval: ")]
    assert "piqa (3 docs)" in err and "arc_easy (3 docs)" in err
    assert "| piqa " in result.stdout  # the results table
