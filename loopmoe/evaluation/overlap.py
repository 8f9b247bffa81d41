"""Overlap of evaluation text with a run's training data (is the "held-out" text really held out?).

Definition (used by the depth analysis and recorded in ``depth.json``): the **training overlap** of
token rows is the fraction of their ``NGRAM``-token windows (every window inside a row) that occur
verbatim somewhere in the training split of the run's token shards. 13 tokens is the window of
GPT-3's contamination study: long enough that natural text almost never repeats it by chance,
short enough to catch a copied passage. The text must be tokenised with the run's tokenizer (the
one saved beside a trained model is); a shard folder whose vocabulary differs is not compared.

"When known": a model exported by ``loopmoe train`` carries ``run_config.json``, whose
``data.data_dir`` holds the shards (``DATA_DIR/shards``). A model without it, or whose shards
are gone, has an unknown overlap (``None``) and no warning.

Cost: one pass over the training tokens, ``NGRAM`` vectorised multiply-adds per token (64-bit
polynomial hashes; a collision needs two different windows with equal hashes, about 2^-64 per
pair), in chunks of ``CHUNK`` tokens: seconds for a few hundred million tokens.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from loopmoe.data import load_shards
from loopmoe.errors import DataError

NGRAM = 13
WARN_ABOVE = 0.01  # share of windows; natural held-out text is far below it
CHUNK = 1 << 22
_BASE = np.uint64(0x9E3779B97F4A7C15)  # odd 64-bit multiplier (golden ratio): arithmetic wraps mod 2^64


def _window_hashes(ids: np.ndarray) -> np.ndarray:
    """64-bit hash of every ``NGRAM``-token window of the 1-D ``ids`` (``len(ids) - NGRAM + 1`` values)."""
    n = len(ids) - NGRAM + 1
    if n <= 0:
        return np.empty(0, dtype=np.uint64)
    ids = ids.astype(np.uint64, copy=False)
    h = np.zeros(n, dtype=np.uint64)
    with np.errstate(over="ignore"):
        for j in range(NGRAM):  # Horner: h = h * B + ids[i + j]
            h = h * _BASE + ids[j : j + n]
    return h


def training_shards(model_dir: str | Path) -> Path | None:
    """The token-shard folder of the run that trained ``model_dir``, if its ``run_config.json`` names one that exists."""
    config = Path(model_dir) / "run_config.json"
    if not config.is_file():
        return None
    data_dir = json.loads(config.read_text()).get("data", {}).get("data_dir")
    shards = Path(data_dir) / "shards" if data_dir else None
    return shards if shards is not None and (shards / "meta.json").is_file() else None


def ngram_overlap(rows: np.ndarray, train_tokens: np.ndarray) -> float:
    """Fraction of the ``NGRAM``-token windows of ``rows`` (``[n, S]``) that occur in ``train_tokens`` (1-D)."""
    held = np.concatenate([_window_hashes(np.asarray(row)) for row in rows])
    if held.size == 0:
        raise DataError(f"rows of fewer than {NGRAM} tokens have no {NGRAM}-token windows to compare")
    wanted = np.unique(held)
    found = np.zeros(wanted.size, dtype=bool)
    for start in range(0, len(train_tokens), CHUNK):
        chunk = np.asarray(train_tokens[start : start + CHUNK + NGRAM - 1])
        hashes = _window_hashes(chunk)
        found |= np.isin(wanted, hashes[np.isin(hashes, wanted)])
        if found.all():
            break
    return float(np.isin(held, wanted[found]).mean())


def training_overlap(model_dir: str | Path, rows: np.ndarray, vocab_size: int) -> dict:
    """``{"ngram": NGRAM, "fraction": f or None, "shards": path or None, "note": why unknown}`` for ``rows``."""

    shards = training_shards(model_dir)
    if shards is None:
        return {"ngram": NGRAM, "fraction": None, "shards": None, "note": "the run's training shards are not known"}
    loaded = load_shards(shards)
    if loaded.meta.vocab_size != vocab_size:
        note = f"the shards' vocabulary ({loaded.meta.vocab_size}) is not the tokenizer's ({vocab_size})"
        return {"ngram": NGRAM, "fraction": None, "shards": str(shards), "note": note}
    return {
        "ngram": NGRAM,
        "fraction": ngram_overlap(rows, loaded.tokens("train")),
        "shards": str(shards),
        "note": None,
    }
