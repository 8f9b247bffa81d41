"""The evaluation stage of a comparison: what is measured of each finished run, stored with it.

Every finished run ``OUT/seed{S}/{ARM}`` gets an ``eval/`` folder, one JSON file per measurement,
each written atomically as ``{"params": ..., "result": ..., "wall_s": ...}``. ``params`` holds everything the
result depends on (the SHA-256 of the exported weights, the held-out batches, the task list and
limit, the text and its window): a file whose params match is reused, anything else is measured
anew. So the stage is resumable (a kill loses at most the measurement in progress), a re-run costs
nothing, and a retrained run or a changed ``--task-limit`` is never reported from stale numbers.

- ``depth.json``: held-out loss (the training run's own validation batches and loss, so the entry
  at the trained loop count reproduces its last ``val_loss``) at each loop count of the test-time
  depth curve, with the forward FLOPs per token executed at that depth (``loopmoe.budget``, audited
  against the real model by ``loopmoe.flops``), and the expert load of the trained depth (each expert's
  share of routed tokens per executed slot). A looped model runs at every ``--depth-loops`` count
  it can (``LoopMoEConfig.check_num_loops``: an ``iter_embedding`` model stops at its ``max_loops``,
  and its vectors beyond the trained T are untrained); a Vanilla MoE has one depth, its own.
- ``text.json``: perplexity and bits per byte of a held-out text (WikiText-2's test set by default)
  with a sliding window of the training sequence length.
- ``tasks.json``: the zero-shot downstream tasks (``loopmoe.evaluation.harness``).
"""

from __future__ import annotations

import hashlib
import json
import time
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any, cast

import torch

from loopmoe.atomic import atomic_write_text

EVAL_DIR = "eval"
# The test-time depth curve of issue 16: loss at these loop counts for every looped arm.
DEPTH_LOOPS = (1, 2, 3, 4, 6)
# The held-out text `--text auto` picks, relative to the data folder, and what the report calls it.
DEFAULT_TEXT = "wikitext2/wiki.test.raw.crlf"
DEFAULT_TEXT_NAME = "WikiText-2 test"


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


def weights_sha256(model_dir: Path) -> str:
    """One hash over the exported weights: a retrained run's evaluations are never reused."""
    digest = hashlib.sha256()
    for path in sorted(model_dir.glob("*.safetensors")):
        with open(path, "rb") as handle:
            for block in iter(lambda: handle.read(1 << 20), b""):
                digest.update(block)
    return digest.hexdigest()


@torch.no_grad()
def heldout_loss(
    model, batches: Iterable[torch.Tensor], num_loops: int | None = None, load: dict[str, Any] | None = None
) -> float:
    """Mean of the per-batch LM loss, as the trainer's evaluation computes it (``Trainer.evaluate``).

    ``load``: if given, filled with each executed (layer, iteration) slot's expert load summed over the batches.
    """
    kwargs = {} if num_loops is None else {"num_loops": num_loops}
    losses = []
    for x in batches:
        out = model(input_ids=x, labels=x, use_cache=False, **kwargs)
        losses.append(float(out.lm_loss))
        if load is not None:
            for stat in out.router_stats:
                load[stat.slot.name] = load.get(stat.slot.name, 0) + stat.load
    if not losses:
        raise ValueError("no held-out batches to evaluate: the comparison needs --eval-batches >= 1")
    return sum(losses) / len(losses)


def depth_curve(model, batches: list[torch.Tensor], loops: Iterable[int], seq_len: int) -> dict[str, Any]:
    """Held-out loss and executed forward FLOPs per token at each loop count (JSON-ready), and the expert
    load at the trained depth (each expert's share of routed tokens per executed slot).

    A Vanilla MoE is measured at its own depth only. A looped model at its trained T and every count in
    ``loops``; a count the model cannot run is listed under ``unrunnable`` with the reason.
    """
    from loopmoe.budget import compute_budget

    cfg = model.config
    trained = cfg.num_loops
    wanted = sorted({trained, *loops}) if trained > 1 else [trained]
    points: list[dict[str, Any]] = []
    unrunnable: dict[str, str] = {}
    load: dict[str, Any] = {}
    for t in wanted:
        try:
            cfg.check_num_loops(t)
        except ValueError as error:
            unrunnable[str(t)] = str(error)
            continue
        points.append(
            {
                "loops": t,
                "loss": heldout_loss(model, batches, t, load if t == trained else None),
                "flops_per_token": compute_budget(cfg, seq_len, num_loops=t).flops_per_token,
                # beyond the trained T an iter_embedding model adds vectors that never saw a gradient
                "untrained_iteration_vectors": bool(cfg.conditioning.embeds_iteration and t > trained),
            }
        )
    return {
        "trained_loops": trained,
        "points": points,
        "unrunnable": unrunnable,
        "expert_load": {k: (v / v.sum()).tolist() for k, v in load.items()},
    }


def resolve_text(text: str) -> Path | None:
    """The held-out text file of ``--text`` ('auto': WikiText-2's test set if the data folder has it; '': none)."""
    from loopmoe.paths import shared_data_dir

    if not text:
        return None
    data = shared_data_dir()
    if text == "auto":
        return data / DEFAULT_TEXT if data is not None and (data / DEFAULT_TEXT).is_file() else None
    path = Path(text)
    if not path.is_absolute() and not path.is_file() and data is not None:
        path = data / text
    if not path.is_file():
        raise ValueError(
            f"--text {text!r}: no such file (nor under the data folder {data}); pass a text file, 'auto' or ''"
        )
    return path


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
    log=print,
) -> dict[str, Any]:
    """Every measurement of the finished run in ``run_dir`` (its ``final/`` export), cached in ``run_dir/eval``.

    The model is loaded only if some measurement is not stored yet. Returns ``{"depth", "expert_load",
    "text", "tasks", "wall_s"}`` (``text`` None without a text, ``tasks`` [] without tasks; ``wall_s``: the
    seconds each measurement took when it was made).
    """
    from loopmoe.evaluation import load_hf_tokenizer, load_model

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

    loops = sorted(set(depth_loops))
    records = {
        "depth": cached(
            folder / "depth.json",
            {"model": sha, "batches": shape(), "loops": loops, "seq_len": seq_len},
            lambda: depth_curve(model(), batches(), loops, seq_len),
        ),
    }
    if text is not None:
        window = seq_len

        def perplexity() -> dict[str, Any]:
            from loopmoe.evaluation import evaluate_perplexity

            log(f"   {run_dir}: perplexity of {text.name}")
            tok = load_hf_tokenizer(final)
            result = evaluate_perplexity(
                model(), tok, text, window=window, stride=max(1, window // 2), batch_size=8, max_tokens=text_tokens
            )
            return result.as_dict()

        records["text"] = cached(
            folder / "text.json",
            {"model": sha, "text": str(text), "max_tokens": text_tokens, "window": window},
            perplexity,
        )
    if tasks:

        def downstream() -> list[dict[str, Any]]:
            from loopmoe.evaluation import evaluate_tasks, summarize, wrap_model
            from loopmoe.paths import shared_data_dir

            log(f"   {run_dir}: downstream tasks {', '.join(tasks)} (limit {task_limit} documents each)")
            lm = wrap_model(model(), load_hf_tokenizer(final), batch_size=32)
            return summarize(evaluate_tasks(lm, list(tasks), shared_data_dir(), limit=task_limit))

        records["tasks"] = cached(
            folder / "tasks.json", {"model": sha, "tasks": list(tasks), "limit": task_limit}, downstream
        )
    return {
        "depth": records["depth"]["result"],
        "expert_load": records["depth"]["result"]["expert_load"],
        "text": records["text"]["result"] if "text" in records else None,
        "tasks": records["tasks"]["result"] if "tasks" in records else [],
        "wall_s": {name: record.get("wall_s") for name, record in records.items()},
    }
