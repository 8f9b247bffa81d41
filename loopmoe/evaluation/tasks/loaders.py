"""Read the local copies of the benchmark files into the schema lm-eval's own tasks expect.

Each function is an lm-eval ``custom_dataset`` callable: lm-eval calls it with the task's
``metadata`` (which carries ``data_dir``, injected by ``loopmoe.evaluation.harness``) and
``dataset_kwargs`` (``files``: the paths, relative to the data dir, that the task reads). Each
returns a ``DatasetDict`` whose split name and fields match the Hugging Face dataset the upstream
lm-eval task downloads, so the prompt templates can be copied from lm-eval verbatim and nothing is
ever fetched from the hub.

This module imports nothing of loopmoe: an exported task folder runs under ``lm_eval`` where loopmoe
is not installed. Its errors are plain ``ValueError`` / ``MissingDataError``; ``loopmoe.evaluation.harness``
turns them into loopmoe's own (``DataError``, ``MissingFileError``) for the command line.
"""

from __future__ import annotations

import bz2
import csv
import json
import re
from pathlib import Path

from datasets import Dataset, DatasetDict


class MissingDataError(FileNotFoundError):
    """A benchmark file is not in the data dir; the message names the path that was expected."""


def data_file(data_dir: str | Path | None, relative: str, task: str) -> Path:
    """The absolute path of ``relative`` under ``data_dir``, or a MissingDataError naming it."""
    if data_dir is None:
        raise MissingDataError(
            f"task {task!r} needs {relative} but no data dir is known: pass --data-dir DIR or set LOOPMOE_DATA_DIR "
            "(loopmoe eval), or --metadata data_dir=DIR (lm_eval)"
        )
    path = Path(data_dir) / relative
    if not path.is_file():
        raise MissingDataError(
            f"task {task!r}: expected data file {path} is missing; copy it there or point --data-dir / "
            "LOOPMOE_DATA_DIR at a folder that has it (see the data dir's SOURCES.md for the format)"
        )
    return path


def read_jsonl(path: Path) -> list[dict]:
    with open(path, encoding="utf-8") as fh:
        return [json.loads(line) for line in fh if line.strip()]


def read_labels(path: Path) -> list[str]:
    with open(path, encoding="utf-8") as fh:
        return [line.strip() for line in fh if line.strip()]


def _single_split(split: str, docs: list[dict]) -> DatasetDict:
    return DatasetDict({split: Dataset.from_list(docs)})


def _check_labels(task: str, docs: list[dict], labels: list[str], label_path: Path) -> None:
    if len(docs) != len(labels):
        raise ValueError(f"task {task!r}: {len(docs)} documents but {len(labels)} labels in {label_path}")


def piqa(data_dir=None, files=(), **_) -> DatasetDict:
    """``piqa/valid.jsonl`` + ``valid-labels.lst`` -> baber/piqa validation ``{goal, sol1, sol2, label}``."""
    docs_path, labels_path = (data_file(data_dir, f, "piqa") for f in files)
    docs, labels = read_jsonl(docs_path), read_labels(labels_path)
    _check_labels("piqa", docs, labels, labels_path)
    rows = [{"goal": d["goal"], "sol1": d["sol1"], "sol2": d["sol2"], "label": int(y)} for d, y in zip(docs, labels)]
    return _single_split("validation", rows)


def siqa(data_dir=None, files=(), **_) -> DatasetDict:
    """``siqa/dev.jsonl`` + ``dev-labels.lst`` -> lighteval/siqa validation (``label`` is "1".."3")."""
    docs_path, labels_path = (data_file(data_dir, f, "social_iqa") for f in files)
    docs, labels = read_jsonl(docs_path), read_labels(labels_path)
    _check_labels("social_iqa", docs, labels, labels_path)
    keys = ("context", "question", "answerA", "answerB", "answerC")
    return _single_split("validation", [{**{k: d[k] for k in keys}, "label": y} for d, y in zip(docs, labels)])


def arc(data_dir=None, files=(), **_) -> DatasetDict:
    """AI2 ARC jsonl -> allenai/ai2_arc test ``{id, question, choices: {text, label}, answerKey}``."""
    (path,) = (data_file(data_dir, f, "arc") for f in files)
    rows = []
    for d in read_jsonl(path):
        choices = d["question"]["choices"]
        rows.append(
            {
                "id": d["id"],
                "question": d["question"]["stem"],
                "choices": {"text": [c["text"] for c in choices], "label": [c["label"] for c in choices]},
                "answerKey": d["answerKey"],
            }
        )
    return _single_split("test", rows)


def boolq(data_dir=None, files=(), **_) -> DatasetDict:
    """SuperGLUE BoolQ jsonl (label "true"/"false") -> aps/super_glue boolq validation (label 0=no, 1=yes)."""
    (path,) = (data_file(data_dir, f, "boolq") for f in files)
    rows = [
        {"question": d["question"], "passage": d["passage"], "idx": d["idx"], "label": _boolean(d["label"])}
        for d in read_jsonl(path)
    ]
    return _single_split("validation", rows)


def _boolean(label) -> int:
    if isinstance(label, str):
        if label.lower() not in ("true", "false"):
            raise ValueError(f"boolq label must be 'true' or 'false', got {label!r}")
        return int(label.lower() == "true")
    return int(bool(label))


def copa(data_dir=None, files=(), **_) -> DatasetDict:
    """SuperGLUE COPA jsonl, already in the aps/super_glue copa schema."""
    (path,) = (data_file(data_dir, f, "copa") for f in files)
    return _single_split("validation", read_jsonl(path))


_OBQA_CHOICE = re.compile(r"\(([A-Z])\)\s*")


def openbookqa(data_dir=None, files=(), **_) -> DatasetDict:
    """OBQA Main TSV (choices as "(A) .. (B) ..") -> allenai/openbookqa main test."""
    (path,) = (data_file(data_dir, f, "openbookqa") for f in files)
    rows = []
    with open(path, encoding="utf-8", newline="") as fh:
        for rec in csv.DictReader(fh, delimiter="\t", quoting=csv.QUOTE_NONE):
            parts = _OBQA_CHOICE.split(rec["Choices"].strip())  # ['', 'A', text, 'B', text, ...]
            labels, texts = parts[1::2], [t.strip() for t in parts[2::2]]
            rows.append(
                {
                    "id": rec["ID"],
                    "question_stem": rec["Question Stem"],
                    "choices": {"text": texts, "label": labels},
                    "answerKey": rec["Answer Key"],
                }
            )
    return _single_split("test", rows)


def lambada(data_dir=None, files=(), **_) -> DatasetDict:
    """llm-foundry LAMBADA ``{context, continuation}`` -> EleutherAI/lambada_openai test ``{text}``.

    The conversion cut the original text at its last space, so ``context + " " + continuation``
    restores it and lm-eval's ``text.split(' ')`` recovers the same context and target word.
    """
    (path,) = (data_file(data_dir, f, "lambada_openai") for f in files)
    return _single_split("test", [{"text": d["context"] + " " + d["continuation"]} for d in read_jsonl(path)])


def hellaswag(data_dir=None, files=(), **_) -> DatasetDict:
    """llama.cpp's 6-line HellaSwag file -> validation ``{ctx, endings, label}`` (see prompts.hellaswag_process_docs)."""
    (path,) = (data_file(data_dir, f, "hellaswag") for f in files)
    opener = bz2.open if path.suffix == ".bz2" else open
    with opener(path, "rt", encoding="utf-8") as fh:
        lines = fh.read().split("\n")
    while lines and not lines[-1]:
        lines.pop()
    if len(lines) % 6:
        raise ValueError(f"{path}: expected 6 lines per item (context, label, 4 endings), got {len(lines)} lines")
    rows = [
        {"ctx": lines[i], "label": lines[i + 1].strip(), "endings": lines[i + 2 : i + 6]}
        for i in range(0, len(lines), 6)
    ]
    return _single_split("validation", rows)


def winogrande(data_dir=None, files=(), **_) -> DatasetDict:
    """WinoGrande dev as partial-scoring docs ``{context_options, continuation, gold}``.

    Accepts the llm-foundry form directly, and the original ``{sentence, option1, option2,
    answer}`` form, converted the way lm-eval's winogrande task splits the sentence at "_".
    """
    (path,) = (data_file(data_dir, f, "winogrande") for f in files)
    rows = []
    for d in read_jsonl(path):
        if "sentence" in d:
            cut = d["sentence"].index("_")
            d = {
                "context_options": [d["sentence"][:cut] + d["option1"], d["sentence"][:cut] + d["option2"]],
                "continuation": d["sentence"][cut + 1 :],
                "gold": int(d["answer"]) - 1,
            }
        rows.append(
            {"context_options": list(d["context_options"]), "continuation": d["continuation"], "gold": int(d["gold"])}
        )
    return _single_split("validation", rows)
