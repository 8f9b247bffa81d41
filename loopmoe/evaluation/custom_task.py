"""Turn a small YAML description of a JSONL multiple-choice task into an lm-eval task config.

Lets a user add a benchmark without writing Python or an lm-eval YAML::

    task: capitals                    # name in the results (default: the file's stem)
    jsonl: capitals.jsonl             # relative to this file, else to the data dir
    prompt: "Q: What is the capital of {country}?\\nA:"
    choices: options                  # a field holding the list of choices, or a list of templates
    gold: answer                      # a field holding the gold index, or the gold choice's text
    target_delimiter: " "             # optional, lm-eval's default
    metrics: [acc, acc_norm]          # optional; only these two (never a path or a script)

Choices are scored as ``prompt + target_delimiter + choice`` by log-likelihood, as lm-eval does.
"""

from __future__ import annotations

from functools import partial
from pathlib import Path
from typing import Any

import yaml

from loopmoe.errors import DataError, MissingFileError
from loopmoe.evaluation.tasks.loaders import MissingDataError, read_jsonl

REQUIRED = ("jsonl", "prompt", "choices", "gold")
OPTIONAL = ("task", "target_delimiter", "metrics")
# Scores lm-eval computes itself for a multiple-choice task. Anything else would reach lm-eval's
# get_metric, which falls back to ``evaluate.load(name)`` and imports a script from a path: refused.
METRICS = ("acc", "acc_norm")


class MissingTaskData(MissingDataError, MissingFileError):
    """A task file's data is not there: the task loaders' error, and loopmoe's for the command line."""


def load_task_file(path: str | Path, data_dir: str | Path | None = None) -> dict[str, Any]:
    """An inline lm-eval task config (callables included) for the task described in ``path``."""
    path = Path(path)
    if not path.is_file():
        raise MissingFileError(f"task file {path} not found")
    try:
        spec = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as error:
        raise DataError(f"task file {path} is not valid YAML: {error}") from None
    except UnicodeDecodeError as error:
        raise DataError(f"task file {path} is not UTF-8 text: {error}") from None
    if not isinstance(spec, dict):
        raise DataError(
            f"task file {path} must be a YAML mapping with fields {', '.join(REQUIRED)}, got a {type(spec).__name__}"
        )
    for key in ("jsonl", "prompt"):
        if key in spec and not isinstance(spec[key], str):
            raise DataError(f"task file {path}: {key} must be a string, got {spec[key]!r}")
    if "gold" in spec and not isinstance(spec["gold"], str):
        raise DataError(f"task file {path}: gold must be a field name, got {spec['gold']!r}")
    if "choices" in spec and not (
        isinstance(spec["choices"], str)
        or (isinstance(spec["choices"], list) and spec["choices"] and all(isinstance(c, str) for c in spec["choices"]))
    ):
        raise DataError(
            f"task file {path}: choices must be a field name or a non-empty list of templates, got {spec['choices']!r}"
        )
    missing = [k for k in REQUIRED if k not in spec]
    unknown = [k for k in spec if k not in REQUIRED + OPTIONAL]
    if missing or unknown:
        raise DataError(
            f"task file {path}: missing {missing or 'nothing'}, unknown {unknown or 'nothing'}; "
            f"fields are {', '.join(REQUIRED)} (required) and {', '.join(OPTIONAL)}"
        )
    jsonl = _find_jsonl(spec["jsonl"], path.parent, data_dir)
    choices = spec["choices"]
    return {
        "task": spec.get("task", path.stem),
        "custom_dataset": partial(_dataset, jsonl, spec["gold"], choices),
        "output_type": "multiple_choice",
        "test_split": "test",
        "doc_to_text": partial(_render, spec["prompt"]),
        "doc_to_choice": partial(_choices, choices),
        "doc_to_target": partial(_gold, spec["gold"], choices),
        "target_delimiter": spec.get("target_delimiter", " "),
        "metric_list": [
            {"metric": m, "aggregation": "mean", "higher_is_better": True}
            for m in _metrics(spec.get("metrics", ["acc", "acc_norm"]), path)
        ],
        "metadata": {"version": 0, "task_file": str(path)},
    }


def _metrics(metrics: Any, path: Path) -> list[str]:
    if not isinstance(metrics, list) or not metrics:
        raise DataError(f"task file {path}: metrics must be a list of names from {', '.join(METRICS)}, got {metrics!r}")
    for metric in metrics:
        if metric not in METRICS:
            raise DataError(
                f"task file {path}: metric {metric!r} is not supported (allowed: {', '.join(METRICS)}); "
                "metrics are names, never paths or scripts to load"
            )
    return list(metrics)


def _find_jsonl(name: str, task_dir: Path, data_dir: str | Path | None) -> Path:
    candidates = [Path(name)] if Path(name).is_absolute() else [task_dir / name]
    if data_dir is not None and not Path(name).is_absolute():
        candidates.append(Path(data_dir) / name)
    for candidate in candidates:
        if candidate.is_file():
            return candidate
    raise MissingTaskData(f"task data {name!r} not found; looked for {' and '.join(map(str, candidates))}")


def _dataset(jsonl: Path, gold: str, choices: str | list[str], **_):
    """The JSONL as a one-split dataset, the gold field resolved to an index up front (a column
    mixing indices and choice texts cannot be stored, and a bad gold value surfaces before scoring)."""
    from datasets import Dataset, DatasetDict

    try:
        raw = read_jsonl(jsonl)
    except (ValueError, UnicodeDecodeError) as error:
        raise DataError(f"task data {jsonl} is not valid JSON lines: {error}") from None
    if not raw:
        raise DataError(f"task data {jsonl} holds no documents")
    for number, doc in enumerate(raw, start=1):
        if not isinstance(doc, dict):
            raise DataError(f"task data {jsonl}: document {number} is a {type(doc).__name__}, not a JSON object")
    docs = [{**doc, gold: _gold(gold, choices, doc)} for doc in raw]
    try:
        return DatasetDict({"test": Dataset.from_list(docs)})
    except (TypeError, ValueError) as error:  # pyarrow: a field holding different types in different documents
        raise DataError(
            f"task data {jsonl}: each field must hold one type in every document ({type(error).__name__}: {error})"
        ) from None


def _render(template: str, doc: dict) -> str:
    try:
        return template.format_map(doc)
    except KeyError as err:
        raise DataError(f"template {template!r} uses field {err} that the document lacks ({sorted(doc)})") from None


def _choices(choices: str | list[str], doc: dict) -> list[str]:
    if isinstance(choices, str):
        if choices not in doc:
            raise DataError(f"choices field {choices!r} is missing from a document ({sorted(doc)})")
        if not isinstance(doc[choices], list) or not doc[choices]:
            raise DataError(f"choices field {choices!r} must hold a non-empty list, got {doc[choices]!r}")
        return [str(c) for c in doc[choices]]
    return [_render(t, doc) for t in choices]


def _gold(field: str, choices: str | list[str], doc: dict) -> int:
    if field not in doc:
        raise DataError(f"gold field {field!r} is missing from a document ({sorted(doc)})")
    value = doc[field]
    if isinstance(value, bool) or not isinstance(value, (int, str)):
        raise DataError(f"gold field {field!r} must be an index or a choice's text, got {value!r}")
    options = _choices(choices, doc)
    if isinstance(value, str):
        if value in options:
            return options.index(value)
        if not value.strip().isdigit():
            raise DataError(f"gold value {value!r} is neither an index nor one of the choices {options}")
        value = int(value)
    if not 0 <= value < len(options):
        raise DataError(
            f"gold index {value} is out of range for {len(options)} choices {options} (indices are 0-based: "
            f"0 to {len(options) - 1})"
        )
    return value
