"""``loopmoe eval`` gives exactly the numbers of lm-eval's HFLM running lm-eval's own task definitions."""

from __future__ import annotations

import json
from functools import partial
from pathlib import Path

import lm_eval
import pytest
from lm_eval import simple_evaluate
from lm_eval.models.huggingface import HFLM
from lm_eval.tasks import TaskManager
from lm_eval.tasks._yaml_loader import load_yaml

from loopmoe.evaluation.harness import BOOTSTRAP_ITERS, required_files
from loopmoe.evaluation.tasks import loaders

UPSTREAM = Path(lm_eval.__file__).parent / "tasks"
# task -> (lm-eval's own YAML, our loader of the same local file into that task's HF schema)
CASES = {
    "piqa": ("piqa/piqa.yaml", loaders.piqa),
    "lambada_openai": ("lambada/lambada_openai.yaml", loaders.lambada),
}
LIMIT = 20


def upstream_config(task: str, data_dir: Path) -> dict:
    """lm-eval's YAML for ``task`` unchanged except that the dataset comes from the local file."""
    yaml_path, loader = CASES[task]
    cfg = load_yaml(UPSTREAM / yaml_path)
    for key in ("dataset_path", "dataset_name", "training_split", "tag"):
        cfg.pop(key, None)
    cfg["custom_dataset"] = partial(loader, data_dir=data_dir, files=required_files(task))
    return cfg


@pytest.mark.parametrize("model_fixture", ["gpt2_dir"])
def test_cli_equals_hflm_with_upstream_tasks(run_eval, request, model_fixture, data_dir, tmp_path):
    model_dir = request.getfixturevalue(model_fixture)
    out = tmp_path / "ours.json"
    assert (
        run_eval(
            [
                str(model_dir),
                "--tasks",
                ",".join(CASES),
                "--limit",
                str(LIMIT),
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
    ours = json.loads(out.read_text())["lm_eval"]["results"]

    lm = HFLM(pretrained=str(model_dir), batch_size=4, device="cpu")  # lm-eval loads the directory itself
    theirs = simple_evaluate(
        model=lm,
        tasks=[upstream_config(t, data_dir) for t in CASES],
        num_fewshot=0,
        limit=LIMIT,
        bootstrap_iters=BOOTSTRAP_ITERS,
        log_samples=False,
        task_manager=TaskManager(include_defaults=False),
    )["results"]

    for task in CASES:
        metrics = [k for k in theirs[task] if k.endswith(",none") and "stderr" not in k]
        assert metrics, task
        for key in metrics:
            assert ours[task][key] == theirs[task][key], (task, key)
    assert ours["piqa"]["acc_stderr,none"] == theirs["piqa"]["acc_stderr,none"]
