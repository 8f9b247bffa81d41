"""Training loader determinism, exact resume, rank split; fixed validation batches."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from loopmoe.data import TokenBatchLoader, validation_batches

TOKENS = np.arange(5_000, dtype=np.uint16)  # position == value, so windows are easy to check


def take(loader: TokenBatchLoader, count: int) -> list[torch.Tensor]:
    return [next(loader) for _ in range(count)]


def test_batches_are_contiguous_windows_of_the_tokens():
    batch = next(TokenBatchLoader(TOKENS, batch_size=4, seq_len=16, seed=0))
    assert batch.shape == (4, 16) and batch.dtype == torch.long
    for row in batch:
        assert torch.equal(row, torch.arange(row[0], row[0] + 16))


def test_same_seed_same_batches_other_seed_differs():
    a = take(TokenBatchLoader(TOKENS, batch_size=4, seq_len=16, seed=3), 5)
    b = take(TokenBatchLoader(TOKENS, batch_size=4, seq_len=16, seed=3), 5)
    c = take(TokenBatchLoader(TOKENS, batch_size=4, seq_len=16, seed=4), 5)
    assert all(torch.equal(x, y) for x, y in zip(a, b))
    assert not all(torch.equal(x, y) for x, y in zip(a, c))


def test_epoch_visits_disjoint_windows_and_then_rolls_over():
    loader = TokenBatchLoader(TOKENS, batch_size=8, seq_len=50, seed=1)
    steps = loader.steps_per_epoch()
    starts = torch.cat(take(loader, steps))[:, 0].tolist()
    assert len(set(starts)) == len(starts) == steps * 8
    assert len({s % 50 for s in starts}) == 1  # one offset per epoch
    next(loader)
    assert (loader.epoch, loader.step) == (1, 1)


@pytest.mark.parametrize("taken", [0, 3, 12, 25])  # 12 steps per epoch: includes the epoch boundary
def test_resume_gives_identical_next_batches(taken):
    kwargs = dict(batch_size=8, seq_len=50, seed=7)
    uninterrupted = TokenBatchLoader(TOKENS, **kwargs)
    assert uninterrupted.steps_per_epoch() == 12
    take(uninterrupted, taken)
    state = json.loads(json.dumps(uninterrupted.state_dict()))  # survives a checkpoint round trip
    restored = TokenBatchLoader(TOKENS, **{**kwargs, "seed": 0})
    restored.load_state_dict(state)
    for expected, got in zip(take(uninterrupted, 15), take(restored, 15)):
        assert torch.equal(expected, got)


@pytest.mark.parametrize("world_size", [2, 4])
def test_ranks_split_the_single_process_global_batch(world_size):
    per_rank = 3
    single = TokenBatchLoader(TOKENS, batch_size=per_rank * world_size, seq_len=20, seed=5)
    ranks = [
        TokenBatchLoader(TOKENS, batch_size=per_rank, seq_len=20, seed=5, rank=r, world_size=world_size)
        for r in range(world_size)
    ]
    for _ in range(single.steps_per_epoch() + 3):  # across an epoch boundary
        assert torch.equal(next(single), torch.cat([next(loader) for loader in ranks]))


def test_resume_with_a_different_world_size_and_same_global_batch():
    single = TokenBatchLoader(TOKENS, batch_size=4, seq_len=20, seed=2)
    take(single, 5)
    ranks = [TokenBatchLoader(TOKENS, batch_size=2, seq_len=20, rank=r, world_size=2) for r in range(2)]
    for loader in ranks:
        loader.load_state_dict(single.state_dict())
    assert torch.equal(next(single), torch.cat([next(loader) for loader in ranks]))


def test_resume_with_another_global_batch_continues_at_the_same_window():
    # A checkpoint of micro-batch x world = 4 resumed at 8 (e.g. (dp, ep) = (2, 2) with micro-batch 1 resumed
    # at one process with micro-batch 8): the next batch of 8 is the next two batches of 4.
    small = TokenBatchLoader(TOKENS, batch_size=4, seq_len=20, seed=3)
    take(small, 4)
    large = TokenBatchLoader(TOKENS, batch_size=8, seq_len=20, seed=3)
    large.load_state_dict(small.state_dict())
    assert torch.equal(next(large), torch.cat([next(small), next(small)]))


def test_mismatched_state_and_bad_layouts_fail_clearly():
    loader = TokenBatchLoader(TOKENS, batch_size=4, seq_len=20)
    next(loader)  # 4 windows read: not a whole batch of 8
    with pytest.raises(ValueError, match="read 4 windows.*not a whole number of this loader's batches of 8"):
        TokenBatchLoader(TOKENS, batch_size=8, seq_len=20).load_state_dict(loader.state_dict())
    with pytest.raises(ValueError, match="seq_len.*same shards and seq_len"):
        TokenBatchLoader(TOKENS, batch_size=4, seq_len=10).load_state_dict(loader.state_dict())
    with pytest.raises(ValueError, match="fewer than one global batch"):
        TokenBatchLoader(TOKENS[:98], batch_size=4, seq_len=20)  # needs 4*20 + 19 (worst offset)
    with pytest.raises(ValueError, match="rank"):
        TokenBatchLoader(TOKENS, batch_size=4, seq_len=20, rank=2, world_size=2)
    with pytest.raises(ValueError, match="positive"):
        TokenBatchLoader(TOKENS, batch_size=0, seq_len=20)


def test_validation_batches_fixed_spread_and_rank_split():
    first = list(validation_batches(TOKENS, batch_size=4, seq_len=25, num_batches=3))
    again = list(validation_batches(TOKENS, batch_size=4, seq_len=25, num_batches=3))
    assert len(first) == 3 and all(torch.equal(a, b) for a, b in zip(first, again))
    starts = torch.cat(first)[:, 0].tolist()
    assert starts == sorted(set(starts)) and all(s % 25 == 0 for s in starts)
    assert starts[-1] > 4_000  # spread over the whole split, not just its start
    halves = [
        list(validation_batches(TOKENS, batch_size=2, seq_len=25, num_batches=3, rank=r, world_size=2))
        for r in range(2)
    ]
    for step in range(3):
        assert torch.equal(first[step], torch.cat([halves[0][step], halves[1][step]]))
    assert len(list(validation_batches(TOKENS, batch_size=4, seq_len=25))) == 50  # None: every full batch
    assert len(list(validation_batches(TOKENS, batch_size=4, seq_len=25, num_batches=999))) == 50


def test_validation_errors():
    with pytest.raises(ValueError, match="raise val_fraction"):
        list(validation_batches(TOKENS[:10], batch_size=4, seq_len=25))
    with pytest.raises(ValueError, match="num_batches"):
        list(validation_batches(TOKENS, batch_size=4, seq_len=25, num_batches=0))


def test_end_to_end_on_shards(corpus_file, tiny_tokenizer, tmp_path):
    from loopmoe.data import open_source, prepare_shards

    shards = prepare_shards(
        open_source(corpus_file, chunk_chars=2000), tiny_tokenizer, tmp_path / "s", val_fraction=0.2, progress=False
    )
    loader = TokenBatchLoader(shards.tokens("train"), batch_size=2, seq_len=32, seed=0)
    batch = next(loader)
    assert batch.shape == (2, 32) and int(batch.max()) < tiny_tokenizer.vocab_size
    val = next(validation_batches(shards.tokens("val"), batch_size=2, seq_len=32, num_batches=1))
    assert val.shape == (2, 32)
