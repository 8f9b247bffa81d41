"""The checks the benchmarks run before timing (``loopmoe.testing.hf_parity``), and how they turn
timings into ratios."""

import pytest
import torch

from bench import common
from loopmoe.testing import hf_parity

TINY = dict(
    hf_parity.QWEN_CONFIG,
    vocab_size=128,
    hidden_size=32,
    num_hidden_layers=2,
    num_attention_heads=2,
    num_key_value_heads=2,
    head_dim=16,
    intermediate_size=64,
    moe_intermediate_size=24,
    num_experts=4,
)


@pytest.fixture(scope="module")
def models():
    ref = hf_parity.qwen_model("grouped_mm", config=TINY)
    return hf_parity.ours_from_qwen(ref), ref


def test_converted_model_passes_the_logit_and_training_checks(models):
    ours, ref = models
    assert hf_parity.check_logits(ours, ref, vocab=TINY["vocab_size"]) < 1e-5
    ids = torch.randint(2, TINY["vocab_size"], (2, 16), generator=torch.Generator().manual_seed(0))
    diffs = hf_parity.check_training(ours.train(), ref.train(), ids)
    assert set(diffs) == {"loss", "lm_head_grad", "embedding_grad"} and max(diffs.values()) < 1e-5


def test_training_check_catches_a_wrong_model(models):
    ours, ref = models
    ids = torch.randint(2, TINY["vocab_size"], (2, 16), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ours.lm_head.weight[5] += 0.5
    try:
        with pytest.raises(AssertionError, match="differ from transformers"):
            hf_parity.check_training(ours.train(), ref.train(), ids)
    finally:
        with torch.no_grad():
            ours.lm_head.weight[5] -= 0.5


def test_speedup_pairs_runs_of_the_same_round():
    # Round 1 ran slowly for both (the machine drifted): paired ratios stay 2.0, the ratio of medians would not.
    stats = {
        "ours": {"median": 2.0, "rounds": {0: 1.0, 1: 3.0, 2: 2.0}},
        "ref": {"median": 5.0, "rounds": {0: 2.0, 1: 6.0, 3: 9.0}},
    }
    s = common.speedup(stats, "ours", "ref")
    assert s == {"median": 2.0, "min": 2.0, "max": 2.0, "pairs": 2}
    assert common.speedup({"a": {"median": 2.0}, "b": {"median": 3.0}}, "a", "b")["median"] == 1.5
