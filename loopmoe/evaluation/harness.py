"""Run zero-shot tasks through lm-evaluation-harness 0.4 on an in-memory model, fully offline.

The shipped tasks are lm-eval YAMLs in ``tasks/`` that read local files through a
``custom_dataset`` loader; the data dir is only known at run time, so it travels as task
metadata (lm-eval passes metadata to the loader), and the YAMLs stay static package data.
A TaskManager restricted to that folder (``include_defaults=False``) keeps lm-eval from indexing
or ever resolving its own hub-backed task of the same name.
"""

from __future__ import annotations

import time
import traceback
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from loopmoe.console import quiet_lm_eval, status
from loopmoe.errors import ConfigError, DataError, MissingFileError
from loopmoe.evaluation.tasks import loaders
from loopmoe.evaluation.tasks.loaders import MissingDataError, data_file

TASKS_DIR = Path(__file__).parent / "tasks"
SHIPPED_TASKS = tuple(sorted(p.stem for p in TASKS_DIR.glob("*.yaml")))
# In lm-eval the shipped tasks are named ``loopmoe_<task>`` (their YAMLs' ``task:``): lm-eval's own tasks of
# the plain names are hub-backed and stay its own, so `lm_eval --include_path` shadows nothing and warns
# about nothing. loopmoe's own surfaces (--tasks, results, reports) use the plain names.
LM_EVAL_PREFIX = "loopmoe_"


def lm_eval_name(task: str) -> str:
    """The name lm-eval knows a task by: ``loopmoe_piqa`` for the shipped ``piqa``, any other unchanged."""
    return LM_EVAL_PREFIX + task if task in SHIPPED_TASKS else task


def plain_name(name: str) -> str:
    """The inverse of ``lm_eval_name``: ``piqa`` for ``loopmoe_piqa``, any other name unchanged."""
    task = name.removeprefix(LM_EVAL_PREFIX)
    return task if name.startswith(LM_EVAL_PREFIX) and task in SHIPPED_TASKS else name


def _plain_names(results: dict[str, Any]) -> dict[str, Any]:
    """lm-eval's results dict with every per-task section keyed by the plain task names."""
    return {
        key: {plain_name(k): v for k, v in value.items()} if isinstance(value, dict) else value
        for key, value in results.items()
    }


# Stderr of the perplexity aggregate is bootstrapped; lm-eval's default of 100k resamples is
# minutes of CPU for no gain at the precision reported here.
BOOTSTRAP_ITERS = 1000
REPORTED_METRICS = ("acc", "acc_norm", "perplexity")


def resolve_tasks(names: Sequence[str]) -> list[str]:
    """Expand ``all`` into the shipped tasks; other names are kept, once each, in order.

    A name that is not shipped is looked up among lm-eval's own tasks by ``task_manager``.
    """
    out: list[str] = []
    for name in names:
        for task in SHIPPED_TASKS if name == "all" else (name,):
            if task not in out:
                out.append(task)
    return out


def required_files(task: str) -> list[str]:
    """The data files a shipped task reads, relative to the data dir (from its YAML)."""
    from lm_eval.tasks._yaml_loader import load_yaml

    cfg = load_yaml(TASKS_DIR / f"{task}.yaml", resolve_func=False)
    return list(cfg["dataset_kwargs"]["files"])


def check_task_files(tasks: Sequence[str], data_dir: str | Path | None) -> None:
    """Fail before any model work if a shipped task's file is missing, naming the expected path."""
    for task in tasks:
        if task in SHIPPED_TASKS:
            for relative in required_files(task):
                data_file(data_dir, relative, task)


def task_manager(data_dir: str | Path | None, tasks: Sequence[str | dict[str, Any]] = ()):
    """A TaskManager for ``tasks``, with ``data_dir`` as every task's metadata; raises for an unknown name.

    Shipped tasks only: the shipped folder alone (``include_defaults=False``), so lm-eval never indexes its
    own tasks. Any other name is one of lm-eval's own tasks (its data read from the local datasets cache,
    the hub being offline): lm-eval's index is added; the shipped tasks keep their ``loopmoe_`` names in
    it (``lm_eval_name``). lm-eval's tasks run lm-eval's own installed code only.
    """
    from lm_eval.tasks import TaskManager

    names = [t for t in tasks if isinstance(t, str)]
    manager = TaskManager(
        include_path=str(TASKS_DIR),
        include_defaults=any(t not in SHIPPED_TASKS for t in names),
        metadata={"data_dir": None if data_dir is None else str(data_dir)},
    )
    unknown = [t for t in names if lm_eval_name(t) not in manager.all_tasks]
    if unknown:
        raise ConfigError(
            f"unknown task {', '.join(map(repr, unknown))}: choose from the shipped tasks ({', '.join(SHIPPED_TASKS)}), "
            "'all', any lm-eval task (`lm_eval ls tasks`) whose dataset is in the local datasets cache, or add your "
            "own with --task-file"
        )
    return manager


def wrap_model(model, tokenizer, *, batch_size: int | str = 8, device: str | None = None):
    """lm-eval's HFLM around an already loaded model and tokenizer (no hub access); ``batch_size`` may be
    ``"auto"`` / ``"auto:N"`` (lm-eval finds the largest that fits)."""
    from lm_eval.models.huggingface import HFLM

    device = device or str(next(model.parameters()).device)
    # backend="causal": LoopMoE is not in transformers' own causal-LM name list, which HFLM consults.
    with quiet_lm_eval():  # HFLM warns that an already loaded model is not a name: that is what we mean
        return HFLM(pretrained=model, tokenizer=tokenizer, backend="causal", batch_size=batch_size, device=device)


@contextmanager
def task_data_errors() -> Iterator[None]:
    """The task loaders' own errors (they import nothing of loopmoe) as loopmoe's, for the command line."""
    try:
        yield
    except MissingDataError as e:
        raise MissingFileError(str(e)) from None
    except ValueError as e:
        if e.__traceback__ is not None and any(
            frame.f_code.co_filename == loaders.__file__ for frame, _ in traceback.walk_tb(e.__traceback__)
        ):
            raise DataError(str(e)) from None
        raise


def evaluate_tasks(
    lm,
    tasks: Sequence[str | dict[str, Any]],
    data_dir: str | Path | None,
    *,
    limit: int | None = None,
    num_fewshot: int = 0,
    log_samples: bool = False,
    manager=None,
) -> dict[str, Any]:
    """``lm_eval.simple_evaluate`` on task names and/or inline task configs (dicts).

    ``manager``: a ``task_manager(data_dir, tasks)`` built earlier (to reject unknown names before
    loading a model), else built here. Returns lm-eval's own results dict (``results``, ``n-samples``,
    ``configs``, and ``samples`` with ``log_samples``).
    """
    from lm_eval import simple_evaluate

    check_task_files([t for t in tasks if isinstance(t, str)], data_dir)
    t0 = time.perf_counter()
    with quiet_lm_eval(), task_data_errors():
        results = simple_evaluate(
            model=lm,
            tasks=[lm_eval_name(t) if isinstance(t, str) else t for t in tasks],
            num_fewshot=num_fewshot,
            limit=limit,
            task_manager=manager if manager is not None else task_manager(data_dir, tasks),
            bootstrap_iters=BOOTSTRAP_ITERS,
            log_samples=log_samples,
        )
    if results is None:  # only on non-zero ranks under multi-process lm-eval
        raise RuntimeError("lm-eval returned no results on this process")
    results = _plain_names(results)
    scored = ", ".join(
        f"{task} ({counts.get('effective', '?')} docs)" for task, counts in results.get("n-samples", {}).items()
    )
    status(f"lm-eval: {scored} in {time.perf_counter() - t0:.1f} s")
    return results


def summarize(results: dict[str, Any]) -> list[dict[str, Any]]:
    """One row per (task, metric) of ``REPORTED_METRICS``: value, stderr and the number of docs scored."""
    rows = []
    for task, metrics in results["results"].items():
        n = results.get("n-samples", {}).get(task, {}).get("effective")
        for name in REPORTED_METRICS:
            key = f"{name},none"
            if key not in metrics:
                continue
            stderr = metrics.get(f"{name}_stderr,none")
            rows.append(
                {
                    "task": task,
                    "metric": name,
                    "value": float(metrics[key]),
                    "stderr": float(stderr) if isinstance(stderr, (int, float)) else None,
                    "n": n,
                }
            )
    return rows
