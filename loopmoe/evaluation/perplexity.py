"""Held-out loss, perplexity and bits-per-byte with a strided sliding window.

Every token is scored exactly once; a window of ``window`` tokens advances by ``stride``, and only
the tokens not scored by the previous window count, so each has at least ``window - stride`` tokens
of context (all available context near the start). An end-of-text token is put in front of the
stream so its first token is scored too, as lm-eval's rolling loglikelihood does.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from loopmoe.data import load_shards
from loopmoe.errors import ConfigError, DataError, MissingFileError


@dataclass(frozen=True)
class PerplexityResult:
    """Totals for one held-out source; ``bits_per_byte`` divides by the UTF-8 size of the scored text."""

    name: str
    tokens: int
    bytes: int
    nll: float  # summed, nats
    window: int
    stride: int

    @property
    def loss(self) -> float:
        return self.nll / self.tokens

    @property
    def perplexity(self) -> float:
        return math.exp(self.loss)

    @property
    def bits_per_byte(self) -> float:
        return self.nll / (math.log(2) * self.bytes)

    def as_dict(self) -> dict:
        return {**asdict(self), "loss": self.loss, "perplexity": self.perplexity, "bits_per_byte": self.bits_per_byte}


def read_heldout_tokens(source: str | Path, tokenizer, max_tokens: int | None = None) -> tuple[np.ndarray, int]:
    """Token ids of a text file (tokenised here) or of the ``val`` split of a prepared shard folder,
    and the UTF-8 size of the text they spell (decoded when the text itself is not at hand or was cut)."""
    source = Path(source)
    if source.is_dir():
        ids = np.asarray(load_shards(source).tokens("val"), dtype=np.int64)
        if ids.size == 0:
            raise DataError(f"shard folder {source} has an empty val split: prepare it with val_fraction > 0")
    elif source.is_file():
        text = source.read_text(encoding="utf-8", errors="replace")  # universal newlines: CRLF files read as LF
        # verbose=False: a whole text is longer than model_max_length (the training length) on purpose;
        # it is scored in windows, so transformers' "longer than the maximum" warning is noise here.
        ids = np.asarray(tokenizer(text, add_special_tokens=False, verbose=False)["input_ids"], dtype=np.int64)
        if ids.size == 0:
            raise DataError(f"held-out text {source} is empty (no tokens): pass a file with text in it")
        if not max_tokens or ids.size <= max_tokens:
            return ids, len(text.encode("utf-8"))
    else:
        raise MissingFileError(f"held-out text {source} not found: pass a text file or a prepared shard folder")
    ids = ids[:max_tokens] if max_tokens else ids
    return ids, len(tokenizer.decode(ids.tolist(), clean_up_tokenization_spaces=False).encode("utf-8"))


def window_spans(n: int, window: int, stride: int) -> list[tuple[int, int, int]]:
    """``(begin, end, first_target)`` per window over ``n`` ids; targets ``first_target..end-1`` are scored.

    Position 0 is context only; every other position is a target in exactly one window.
    """
    if not 0 < stride <= window - 1:
        raise ConfigError(f"need 0 < stride < window, got stride={stride}, window={window}")
    spans, scored_to = [], 1
    begin = 0
    while scored_to < n:
        end = min(begin + window, n)
        spans.append((begin, end, scored_to))
        scored_to = end
        begin += stride
    return spans


@torch.no_grad()
def sliding_window_nll(
    model, ids: torch.Tensor, *, window: int, stride: int, batch_size: int = 1, num_loops: int | None = None
) -> tuple[float, int]:
    """Summed NLL (nats) and count of ``ids[1:]`` given their preceding ids, window by window."""
    device = next(model.parameters()).device
    spans = window_spans(len(ids), window, stride)
    kwargs = {"num_loops": num_loops} if num_loops is not None else {}
    total, count = 0.0, 0
    by_length: dict[int, list[tuple[int, int, int]]] = {}
    for span in spans:
        by_length.setdefault(span[1] - span[0], []).append(span)
    for _length, group in by_length.items():
        for i in range(0, len(group), batch_size):
            chunk = group[i : i + batch_size]
            inputs = torch.stack([ids[b:e] for b, e, _ in chunk]).to(device)
            logits = model(input_ids=inputs, use_cache=False, **kwargs).logits.float()
            for row, (b, e, first) in enumerate(chunk):
                pred = logits[row, first - b - 1 : e - b - 1]
                total += F.cross_entropy(pred, inputs[row, first - b :], reduction="sum").item()
                count += e - first
    return total, count


def evaluate_perplexity(
    model,
    tokenizer,
    source: str | Path,
    *,
    window: int | None = None,
    stride: int | None = None,
    batch_size: int = 1,
    max_tokens: int | None = None,
    num_loops: int | None = None,
) -> PerplexityResult:
    """Perplexity and bits-per-byte of ``source`` (text file or shard folder) under ``model``.

    ``window`` defaults to the model's context length (capped at 2048), ``stride`` to half of it.
    """
    max_pos = getattr(model.config, "max_position_embeddings", None) or getattr(model.config, "n_positions", 2048)
    assert max_pos is not None, "the model config's n_positions is None: no context length to window with"
    window = window or min(int(max_pos), 2048)
    stride = stride or max(1, window // 2)
    ids, n_bytes = read_heldout_tokens(source, tokenizer, max_tokens)
    prefix = tokenizer.eos_token_id if tokenizer.eos_token_id is not None else tokenizer.bos_token_id
    if prefix is None:
        raise DataError("the tokenizer has neither an EOS nor a BOS token to start the held-out stream with")
    stream = torch.from_numpy(np.concatenate([[prefix], ids]))
    nll, count = sliding_window_nll(
        model, stream, window=window, stride=stride, batch_size=batch_size, num_loops=num_loops
    )
    return PerplexityResult(name=str(source), tokens=count, bytes=n_bytes, nll=nll, window=window, stride=stride)
