"""Deterministic, resumable batches of token windows for training and validation.

Training sampling: each epoch cuts the train tokens into non-overlapping windows
of ``seq_len`` tokens, starting at an epoch-specific offset in ``[0, seq_len)``
(so window boundaries move between epochs), and visits them in a permutation
drawn from ``numpy.random.default_rng([seed, epoch])``. Step ``s`` of an epoch
takes the global batch ``perm[s*G:(s+1)*G]`` with ``G = batch_size * world_size``;
rank ``r`` gets rows ``[r*batch_size, (r+1)*batch_size)`` of it. Hence a 1-process
run with ``batch_size=G`` sees exactly the tokens of an N-process run, and the
position is fully described by ``(seed, epoch, step)``: a restored loader
continues with the very batches an uninterrupted run would have produced. The
remainder of an epoch smaller than one global batch is dropped.

Batches are ``input_ids`` LongTensors of shape ``(batch_size, seq_len)``; the model
uses ``labels = input_ids`` and shifts internally (HF convention).
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import numpy as np
import torch

from loopmoe.errors import DataError

_STATE_VERSION = 1


class TokenBatchLoader:
    """Endless iterator of training batches over a flat token array (e.g. a shard memmap)."""

    def __init__(
        self,
        tokens: np.ndarray,
        *,
        batch_size: int,
        seq_len: int,
        seed: int = 0,
        rank: int = 0,
        world_size: int = 1,
    ) -> None:
        _check_layout(batch_size, seq_len, rank, world_size)
        self.tokens = tokens
        self.batch_size = batch_size
        self.seq_len = seq_len
        self.seed = seed
        self.rank = rank
        self.world_size = world_size
        self.global_batch_size = batch_size * world_size
        self.epoch = 0
        self.step = 0
        if ((len(tokens) - (seq_len - 1)) // seq_len) // self.global_batch_size == 0:  # worst epoch offset
            raise DataError(
                f"{len(tokens)} training tokens are fewer than one global batch of "
                f"{self.global_batch_size} x {seq_len} (+ up to {seq_len - 1} offset): "
                "lower batch_size or seq_len, or use more data"
            )
        self._cached_epoch: int | None = None
        self._offset = 0
        self._order = np.zeros(0, dtype=np.int64)

    def steps_per_epoch(self, epoch: int | None = None) -> int:
        """Number of full global batches in ``epoch`` (default: the current one)."""
        offset = self._epoch_offset(self.epoch if epoch is None else epoch)
        return ((len(self.tokens) - offset) // self.seq_len) // self.global_batch_size

    def __iter__(self) -> TokenBatchLoader:
        return self

    def __next__(self) -> torch.Tensor:
        if self.step >= self.steps_per_epoch():
            self.epoch += 1
            self.step = 0
        offset, order = self._epoch_plan()
        first = self.step * self.global_batch_size + self.rank * self.batch_size
        starts = offset + order[first : first + self.batch_size] * self.seq_len
        self.step += 1
        return _gather(self.tokens, starts, self.seq_len)

    def state_dict(self) -> dict[str, Any]:
        """Position after the last batch returned; restore with ``load_state_dict``."""
        return {
            "version": _STATE_VERSION,
            "seed": self.seed,
            "epoch": self.epoch,
            "step": self.step,
            "seq_len": self.seq_len,
            "global_batch_size": self.global_batch_size,
            "num_tokens": len(self.tokens),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Continue from ``state``, also at another layout: a state saved with global batch ``G'``
        (another world size or micro-batch) continues at window ``step * G'`` of the epoch, the very
        windows an uninterrupted run would read next, provided that is a whole number of batches."""
        expected = {
            "version": _STATE_VERSION,
            "seq_len": self.seq_len,
            "num_tokens": len(self.tokens),
        }
        mismatched = {k: (state.get(k), v) for k, v in expected.items() if state.get(k) != v}
        if mismatched:
            raise DataError(
                f"loader state does not match this loader (saved, current): {mismatched}; resume with the "
                "same shards and seq_len"
            )
        consumed = int(state["step"]) * int(state["global_batch_size"])  # windows read in this epoch
        if consumed % self.global_batch_size:
            raise DataError(
                f"the saved loader had read {consumed} windows of its epoch, not a whole number of this loader's "
                f"batches of {self.global_batch_size} (batch_size * world_size); resume with a micro-batch and "
                "world size whose product divides the global batch the run was checkpointed at"
            )
        self.seed = int(state["seed"])
        self.epoch = int(state["epoch"])
        self.step = consumed // self.global_batch_size
        self._cached_epoch = None

    def _epoch_offset(self, epoch: int) -> int:
        return int(np.random.default_rng([self.seed, epoch, 0]).integers(self.seq_len))

    def _epoch_plan(self) -> tuple[int, np.ndarray]:
        if self._cached_epoch != self.epoch:
            self._offset = self._epoch_offset(self.epoch)
            windows = (len(self.tokens) - self._offset) // self.seq_len
            self._order = np.random.default_rng([self.seed, self.epoch, 1]).permutation(windows)
            self._cached_epoch = self.epoch
        return self._offset, self._order


def validation_batches(
    tokens: np.ndarray,
    *,
    batch_size: int,
    seq_len: int,
    num_batches: int | None = None,
    rank: int = 0,
    world_size: int = 1,
) -> Iterator[torch.Tensor]:
    """Fixed validation batches: the same windows on every call.

    ``num_batches`` global batches of non-overlapping windows spread evenly over the
    whole split (so a few batches still sample every held-out document region);
    ``None`` or more than the split holds means every full global batch. Ranks split
    each global batch as in training.
    """
    _check_layout(batch_size, seq_len, rank, world_size)
    if num_batches is not None and num_batches <= 0:
        raise ValueError(f"num_batches must be positive or None (all), got {num_batches}")
    global_batch = batch_size * world_size
    available = (len(tokens) // seq_len) // global_batch
    if available == 0:
        raise DataError(
            f"{len(tokens)} validation tokens are fewer than one global batch of {global_batch} x {seq_len}: "
            "raise val_fraction, or lower batch_size or seq_len"
        )
    count = available if num_batches is None else min(num_batches, available)
    windows = count * global_batch
    indices = (np.arange(windows) * (len(tokens) // seq_len)) // windows
    for step in range(count):
        first = step * global_batch + rank * batch_size
        yield _gather(tokens, indices[first : first + batch_size] * seq_len, seq_len)


def _gather(tokens: np.ndarray, starts: np.ndarray, seq_len: int) -> torch.Tensor:
    rows = np.stack([np.asarray(tokens[start : start + seq_len], dtype=np.int64) for start in starts])
    return torch.from_numpy(rows)


def _check_layout(batch_size: int, seq_len: int, rank: int, world_size: int) -> None:
    if batch_size <= 0 or seq_len <= 0:
        raise ValueError(f"batch_size and seq_len must be positive, got {batch_size} and {seq_len}")
    if world_size <= 0 or not 0 <= rank < world_size:
        raise ValueError(f"need 0 <= rank < world_size, got rank={rank}, world_size={world_size}")
