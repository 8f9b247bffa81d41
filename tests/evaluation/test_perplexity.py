"""The strided sliding window scores each token once, with the context it claims to use."""

from __future__ import annotations

import json
import math

import pytest
import torch
import torch.nn.functional as F
from transformers import GPT2Config, GPT2LMHeadModel

from loopmoe.evaluation.perplexity import evaluate_perplexity, sliding_window_nll, window_spans

TEXT = "The quick brown fox jumps over the lazy dog. " * 6 + "Pack my box with five dozen liquor jugs."


@pytest.fixture(scope="module")
def tiny_gpt2(gpt2_tokenizer):
    torch.manual_seed(0)
    return GPT2LMHeadModel(
        GPT2Config(vocab_size=len(gpt2_tokenizer), n_positions=128, n_embd=32, n_layer=2, n_head=2)
    ).eval()


@pytest.mark.parametrize(("n", "window", "stride"), [(10, 4, 2), (11, 4, 3), (5, 8, 4), (30, 7, 1)])
def test_each_target_scored_once_with_enough_context(n, window, stride):
    targets = []
    for begin, end, first in window_spans(n, window, stride):
        assert end - begin <= window and begin < first <= end
        for j in range(first, end):
            assert j - begin >= min(j, window - stride)  # context: everything, or at least window - stride
            targets.append(j)
    assert targets == list(range(1, n))


@torch.no_grad()
def test_matches_direct_per_token_computation(tiny_gpt2):
    torch.manual_seed(1)
    ids = torch.randint(0, 1000, (23,))
    window, stride = 8, 3
    nll, count = sliding_window_nll(tiny_gpt2, ids, window=window, stride=stride, batch_size=2)
    expected = 0.0
    for begin, end, first in window_spans(len(ids), window, stride):
        for j in range(first, end):  # token j given exactly ids[begin:j]
            logits = tiny_gpt2(ids[begin:j][None]).logits[0, -1]
            expected += F.cross_entropy(logits[None], ids[j][None]).item()
    assert count == len(ids) - 1
    assert nll == pytest.approx(expected, rel=1e-5)


@torch.no_grad()
def test_text_file_perplexity_and_bits_per_byte(tiny_gpt2, gpt2_tokenizer, tmp_path):
    path = tmp_path / "heldout.txt"
    path.write_text(TEXT)
    ids = [gpt2_tokenizer.eos_token_id] + gpt2_tokenizer(TEXT)["input_ids"]
    assert len(ids) <= 128  # one window of full context: a single forward is the reference
    logits = tiny_gpt2(torch.tensor([ids])).logits[0, :-1]
    direct = F.cross_entropy(logits, torch.tensor(ids[1:]), reduction="sum").item()
    result = evaluate_perplexity(tiny_gpt2, gpt2_tokenizer, path, window=128, stride=64)
    assert result.tokens == len(ids) - 1 and result.bytes == len(TEXT.encode())
    assert result.nll == pytest.approx(direct, rel=1e-5)
    assert result.perplexity == pytest.approx(math.exp(direct / (len(ids) - 1)), rel=1e-5)
    assert result.bits_per_byte == pytest.approx(direct / math.log(2) / len(TEXT.encode()), rel=1e-5)
    cut = evaluate_perplexity(tiny_gpt2, gpt2_tokenizer, path, window=16, stride=8, max_tokens=20)
    assert cut.tokens == 20 and cut.bytes < result.bytes


def test_cli_perplexity_with_test_time_depth(run_eval, loopmoe_dir, tmp_path):
    path = tmp_path / "heldout.txt"
    path.write_text(TEXT)
    out = tmp_path / "r.json"
    for loops in ("1", "3"):
        assert (
            run_eval(
                [
                    str(loopmoe_dir),
                    "--text",
                    str(path),
                    "--window",
                    "32",
                    "--stride",
                    "16",
                    "--num-loops",
                    loops,
                    "--output",
                    str(out),
                ]
            )
            == 0
        )
        (row,) = json.loads(out.read_text())["perplexity"]
        assert math.isfinite(row["loss"]) and row["bits_per_byte"] > 0
