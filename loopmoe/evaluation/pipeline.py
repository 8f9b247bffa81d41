"""The evaluation pipeline behind ``loopmoe eval`` and ``loopmoe compare``: which text, how it is scored, how
tasks are run at a loop count, and the stored evaluation of a finished training run.

Both commands find a held-out text the same way (``find_text``: as given, else under the data folder),
score it with ``text_scores`` and run tasks with ``task_scores`` (at the trained depth or any other, or under
an exit policy: adaptive depth).

``evaluate_run`` is a run folder's evaluation, as ``loopmoe compare`` makes it for every finished run
``OUT/seed{S}/{ARM}``: an ``eval/`` folder, one JSON file per measurement, each written atomically as
``{"params": ..., "result": ..., "wall_s": ...}``. ``params`` holds everything the result depends on (the
SHA-256 of the exported weights, the held-out batches, the task list and limit, the text and its window): a
file whose params match is reused, anything else is measured anew. So the stage is resumable (a kill loses
at most the measurement in progress), a re-run costs nothing, and a retrained run or a changed
``--task-limit`` is never reported from stale numbers.

- ``depth.json``: the test-time depth curve (``loopmoe.evaluation.depth.depth_curve``) on the training
  run's own validation batches, with the FLOPs executed at each depth and the expert load of the trained one.
  A looped model runs at every ``--depth-loops`` count it can (an ``iter_embedding`` model stops at its
  ``max_loops``, and its vectors beyond the trained T are untrained); a Vanilla MoE has one depth, its own.
- ``cosine.json`` (looped runs): per core layer, the cosine similarity of its output hidden state between
  adjacent iterations at the trained depth (``loopmoe.evaluation.depth.iteration_cosine``), on the same
  validation batches.
- ``exit/CRITERION_THRESHOLD_MIN-MAX.json`` (looped runs, only the policies asked for): the adaptive-depth
  sweep (``loopmoe.evaluation.early_exit``), one exit policy's held-out loss on the same validation batches,
  its mean executed iterations and FLOPs per token; the policy is part of the params, so a changed one is
  measured anew and an added one alone.
- ``text.json``: perplexity and bits per byte of a held-out text (WikiText-2's test set by default)
  with a sliding window of the training sequence length.
- ``tasks.json``: the zero-shot downstream tasks (``loopmoe.evaluation.harness``).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import time
from collections.abc import Callable, Iterable, Sequence
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Any, cast

import torch

from loopmoe.atomic import atomic_write_text
from loopmoe.errors import DataError
from loopmoe.evaluation.depth import DepthCurve, depth_curve, iteration_cosine
from loopmoe.evaluation.early_exit import ExitPoint, IterationTally, early_exit, exit_point, exit_point_of, parse_sweep
from loopmoe.evaluation.harness import SHIPPED_TASKS, evaluate_tasks, required_files, summarize, wrap_model
from loopmoe.evaluation.loading import load_hf_tokenizer, load_model, test_time_depth
from loopmoe.evaluation.perplexity import evaluate_perplexity
from loopmoe.model.adaptive import ExitPolicy
from loopmoe.paths import shared_data_dir

EVAL_DIR = "eval"
EXIT_DIR = "exit"  # under EVAL_DIR: one stored adaptive-depth sweep point per exit policy
# The held-out text `--text auto` picks, relative to the data folder, and what the report calls it.
DEFAULT_TEXT = "wikitext2/wiki.test.raw.crlf"
DEFAULT_TEXT_NAME = "WikiText-2 test"


def find_text(name: str | Path, data_dir: Path | None) -> Path:
    """``name`` as given if it exists, else the same relative path inside the data folder if that exists."""
    path = Path(name)
    if not path.exists() and not path.is_absolute() and data_dir is not None and (data_dir / path).exists():
        return data_dir / path
    return path


def resolve_text(text: str) -> Path | None:
    """The held-out text file of ``--text`` ('auto': WikiText-2's test set if the data folder has it; '': none)."""
    if not text:
        return None
    data = shared_data_dir()
    if text == "auto":
        return data / DEFAULT_TEXT if data is not None and (data / DEFAULT_TEXT).is_file() else None
    path = find_text(text, data)
    if not path.is_file():
        raise DataError(
            f"--text {text!r}: no such file (nor under the data folder {data}); pass a text file, 'auto' or ''"
        )
    return path


def text_scores(
    model,
    tokenizer,
    texts: Sequence[Path],
    *,
    window: int | None,
    stride: int | None,
    batch_size: int,
    max_tokens: int | None,
    num_loops: int | None = None,
    exit_policy: ExitPolicy | None = None,
) -> list[dict[str, Any]]:
    """Loss, perplexity and bits per byte of each text (``PerplexityResult.as_dict()``, JSON-ready).

    ``exit_policy``: scored under adaptive depth (``early_exit``), each text's dict then also holding
    ``"exit"``, its ``ExitPoint``: the mean core iterations executed over every position of its windows,
    and the FLOPs per token at the window length.
    """
    scores = []
    for text in texts:
        tally = IterationTally()
        with early_exit(model, exit_policy, tally) if exit_policy is not None else nullcontext() as resolved:
            result = evaluate_perplexity(
                model,
                tokenizer,
                text,
                window=window,
                stride=stride,
                batch_size=batch_size,
                max_tokens=max_tokens,
                num_loops=num_loops,
            )
        record = result.as_dict()
        if resolved is not None:
            record["exit"] = exit_point_of(model.config, resolved, result.loss, tally.mean, result.window).to_dict()
        scores.append(record)
    return scores


def task_scores(
    model,
    lm,
    tasks: Sequence[str | dict[str, Any]],
    data_dir: Path | None,
    *,
    num_loops: int | None = None,
    limit: int | None = None,
    num_fewshot: int = 0,
    log_samples: bool = False,
    manager=None,
    exit_policy: ExitPolicy | None = None,
) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """The tasks scored by ``lm`` (``harness.wrap_model(model, ...)``) with the core run ``num_loops`` times
    (None: as trained), or under adaptive depth with ``exit_policy`` (every loglikelihood forward lm-eval
    makes): ``harness.summarize``'s rows and lm-eval's own results."""
    with test_time_depth(model, num_loops), early_exit(model, exit_policy) if exit_policy else nullcontext():
        raw = evaluate_tasks(
            lm, tasks, data_dir, limit=limit, num_fewshot=num_fewshot, log_samples=log_samples, manager=manager
        )
    return summarize(raw), raw


def cached(path: Path, params: dict[str, Any], compute: Callable[[], Any]) -> dict[str, Any]:
    """The record stored in ``path`` if it was measured with ``params``; else ``compute()``'s, stored atomically.

    A record is ``{"params", "result", "wall_s"}`` (``wall_s``: the seconds the measurement took).
    """
    params = json.loads(json.dumps(params))  # as it reads back (tuples become lists)
    try:
        saved = json.loads(path.read_text())
        if saved["params"] == params and "result" in saved:
            return cast(dict[str, Any], saved)
    except (OSError, ValueError, KeyError, TypeError):
        pass
    t0 = time.perf_counter()
    result = compute()
    path.parent.mkdir(parents=True, exist_ok=True)
    record = {"params": params, "result": result, "wall_s": time.perf_counter() - t0}
    atomic_write_text(path, json.dumps(record, indent=2))
    return record


def files_sha256(paths: Iterable[Path]) -> str:
    """One hash over the bytes of ``paths``, in the order given (a missing file hashes as its name)."""
    digest = hashlib.sha256()
    for path in paths:
        if not path.is_file():
            digest.update(f"missing:{path.name}".encode())
            continue
        with open(path, "rb") as handle:
            for block in iter(lambda: handle.read(1 << 20), b""):
                digest.update(block)
    return digest.hexdigest()


def weights_sha256(model_dir: Path) -> str:
    """One hash over the exported weights: a retrained run's evaluations are never reused."""
    return files_sha256(sorted(model_dir.glob("*.safetensors")))


def task_data_sha256(tasks: Sequence[str], data_dir: Path | None) -> str:
    """One hash over the data files the shipped ``tasks`` read: edited data is measured again."""
    shipped = [t for t in tasks if t in SHIPPED_TASKS]
    if data_dir is None or not shipped:
        return ""
    return files_sha256([Path(data_dir) / relative for task in shipped for relative in required_files(task)])


def batches_sha256(batches: Sequence[torch.Tensor]) -> str:
    """One hash over the held-out token batches (the shards they come from may be rebuilt from other text)."""
    digest = hashlib.sha256()
    for batch in batches:
        digest.update(batch.to(torch.int64).contiguous().numpy().tobytes())
    return digest.hexdigest()


@dataclass
class RunEvaluation:
    """Every measurement of a finished run; ``to_dict`` is its JSON (a run's ``eval`` in results.json)."""

    depth: DepthCurve
    expert_load: dict[str, list[float]]  # the depth curve's, at the trained depth
    text: dict[str, Any] | None  # PerplexityResult.as_dict(); None without a text
    tasks: list[dict[str, Any]]  # harness.summarize rows; [] without tasks
    wall_s: dict[str, float | None]  # measurement -> the seconds it took when it was made
    # core layer -> cosine of its output between adjacent iterations (None: not measured, a run evaluated
    # before it was; {}: a Vanilla MoE). Written only when measured, so older results.json files round-trip.
    iteration_cosine: dict[str, list[float]] | None = None
    # The adaptive-depth sweep (``early_exit.exit_sweep``) on the depth curve's batches, one point per policy of
    # ``exit_sweep``; None where none was asked for or the run does not loop. Written only when measured.
    exit_sweep: list[ExitPoint] | None = None

    def to_dict(self) -> dict[str, Any]:
        out = {
            "depth": self.depth.to_dict(),
            "expert_load": self.expert_load,
            "text": self.text,
            "tasks": self.tasks,
            "wall_s": self.wall_s,
        }
        if self.iteration_cosine is not None:
            out["iteration_cosine"] = self.iteration_cosine
        if self.exit_sweep is not None:
            out["exit_sweep"] = [point.to_dict() for point in self.exit_sweep]
        return out

    @classmethod
    def from_dict(cls, raw: dict[str, Any]) -> RunEvaluation:
        return cls(
            depth=DepthCurve.from_dict(raw["depth"]),
            expert_load=raw["expert_load"],
            text=raw["text"],
            tasks=raw["tasks"],
            wall_s=raw.get("wall_s", {}),
            iteration_cosine=raw.get("iteration_cosine"),
            exit_sweep=None if raw.get("exit_sweep") is None else [ExitPoint.from_dict(p) for p in raw["exit_sweep"]],
        )


def evaluate_run(
    run_dir: Path,
    *,
    val_batches: Callable[[], Iterable[torch.Tensor]],
    seq_len: int,
    depth_loops: Iterable[int],
    text: Path | None,
    text_tokens: int | None,
    tasks: tuple[str, ...],
    task_limit: int | None,
    exit_sweep: Sequence[str] = (),
    log=print,
) -> RunEvaluation:
    """Every measurement of the finished run in ``run_dir`` (its ``final/`` export), cached in ``run_dir/eval``.

    ``exit_sweep``: the exit policies (``early_exit.parse_sweep``'s items) a looped run is measured under.
    The model is loaded only if some measurement is not stored yet.
    """
    final, folder = run_dir / "final", run_dir / EVAL_DIR
    sha = weights_sha256(final)
    loaded: dict[str, Any] = {}

    def model():
        if "model" not in loaded:
            loaded["model"] = load_model(final)
        return loaded["model"]

    def batches() -> list[torch.Tensor]:
        if "batches" not in loaded:
            loaded["batches"] = list(val_batches())
        return loaded["batches"]

    def shape() -> list[int]:
        return [len(batches()), *batches()[0].shape]

    # Every stored measurement is keyed on the content of what it read (weights, held-out batches, text,
    # task data) as well as its settings: edited data is measured again, never answered from the store.
    content = batches_sha256(batches())

    loops = sorted(set(depth_loops))
    records = {
        "depth": cached(
            folder / "depth.json",
            {"model": sha, "batches": shape(), "batches_sha256": content, "loops": loops, "seq_len": seq_len},
            lambda: depth_curve(model(), batches(), loops, seq_len).to_dict(),
        ),
    }
    depth = DepthCurve.from_dict(records["depth"]["result"])
    if depth.trained_loops > 1:
        records["cosine"] = cached(
            folder / "cosine.json",
            {"model": sha, "batches": shape(), "batches_sha256": content, "seq_len": seq_len},
            lambda: iteration_cosine(model(), batches()),
        )
    sweep: list[ExitPoint] | None = None
    if depth.trained_loops > 1 and exit_sweep:
        # One file per policy, keyed on the policy as given (max_loops None: the trained T, which the weights
        # fix): a policy added to the sweep is measured alone, a changed one is never answered from the store.
        sweep, sweep_wall = [], 0.0

        def measure(policy: ExitPolicy) -> Callable[[], dict[str, Any]]:
            return lambda: exit_point(model(), batches(), policy, seq_len).to_dict()

        for policy in parse_sweep(exit_sweep):
            record = cached(
                folder / EXIT_DIR / exit_file(policy),
                {
                    "model": sha,
                    "batches": shape(),
                    "batches_sha256": content,
                    "seq_len": seq_len,
                    "policy": dataclasses.asdict(policy),
                },
                measure(policy),
            )
            sweep.append(ExitPoint.from_dict(record["result"]))
            sweep_wall += record.get("wall_s") or 0.0
        records["exit_sweep"] = {"wall_s": sweep_wall}
    if text is not None:
        window = seq_len

        def perplexity() -> dict[str, Any]:
            log(f"   {run_dir}: perplexity of {text.name}")
            (scores,) = text_scores(
                model(),
                load_hf_tokenizer(final),
                [text],
                window=window,
                stride=max(1, window // 2),
                batch_size=8,
                max_tokens=text_tokens,
            )
            return scores

        records["text"] = cached(
            folder / "text.json",
            {
                "model": sha,
                "text": str(text),
                "text_sha256": files_sha256([text]),
                "max_tokens": text_tokens,
                "window": window,
            },
            perplexity,
        )
    if tasks:

        def downstream() -> list[dict[str, Any]]:
            log(f"   {run_dir}: downstream tasks {', '.join(tasks)} (limit {task_limit} documents each)")
            lm = wrap_model(model(), load_hf_tokenizer(final), batch_size=32)
            return task_scores(model(), lm, list(tasks), shared_data_dir(), limit=task_limit)[0]

        records["tasks"] = cached(
            folder / "tasks.json",
            {
                "model": sha,
                "tasks": list(tasks),
                "limit": task_limit,
                "data_sha256": task_data_sha256(tasks, shared_data_dir()),
            },
            downstream,
        )
    return RunEvaluation(
        depth=depth,
        expert_load=depth.expert_load,
        text=records["text"]["result"] if "text" in records else None,
        tasks=records["tasks"]["result"] if "tasks" in records else [],
        wall_s={name: record.get("wall_s") for name, record in records.items()},
        iteration_cosine=records["cosine"]["result"] if "cosine" in records else {},
        exit_sweep=sweep,
    )


def exit_file(policy: ExitPolicy) -> str:
    """The file name of a policy's stored sweep point, e.g. ``latent_0.03_1-T.json`` (T: the trained depth)."""
    return f"{policy.criterion}_{policy.threshold!r}_{policy.min_loops}-{policy.max_loops or 'T'}.json"
