"""Generation on the GPU: the KV cache changes nothing, at the trained depth and at a test-time depth,
and LoopMoE decodes the same tokens as transformers' Qwen3-MoE with the same weights.

On the H100 the cached step logits equalled a full forward's to 1.4e-6 (bound: 1e-4).
"""

import pytest
import torch

from bench.gpu_cases import build_model, compare, random_ids

pytestmark = pytest.mark.cuda

NEW_TOKENS = 64
PROMPT_LEN = 16


@pytest.fixture(scope="module")
def model():
    from loopmoe.presets import get_preset

    cfg = get_preset("bench", num_loops=2, pad_token_id=0)
    m = build_model(cfg, 0, torch.device("cuda")).eval()
    m.generation_config.pad_token_id = 0
    m.generation_config.eos_token_id = None
    return m


@pytest.mark.parametrize("num_loops", [None, 3], ids=["T2-trained", "T3-test-time"])
def test_cached_decoding_equals_uncached_and_full_forward(model, num_loops, device):
    kw = {} if num_loops is None else {"num_loops": num_loops}
    prompt = random_ids(model.config.vocab_size, (2, PROMPT_LEN), 5, device)
    mask = torch.ones_like(prompt)
    common = dict(input_ids=prompt, attention_mask=mask, max_new_tokens=NEW_TOKENS, do_sample=False, **kw)
    with torch.no_grad():
        cached = model.generate(**common, use_cache=True, return_dict_in_generate=True, output_logits=True)
        uncached = model.generate(**common, use_cache=False)
        seq = cached.sequences
        assert seq.shape == uncached.shape and torch.equal(seq, uncached), (
            f"cached and uncached greedy decoding diverge at new token "
            f"{int((seq != uncached).any(0).nonzero()[0]) - PROMPT_LEN if seq.shape == uncached.shape else '?'}"
        )
        full = model(input_ids=seq, use_cache=False, **kw).logits[:, PROMPT_LEN - 1 : -1].float()
    errors = compare(torch.stack(cached.logits, dim=1), full)
    assert errors["max_abs"] <= 1e-4, errors


def test_greedy_tokens_equal_transformers_qwen3_moe(device):
    """Batch 1 (transformers 5.17's own ``generate`` failed at batch 8 on the H100, a transformers bug)."""
    from loopmoe.testing import hf_parity

    qwen = hf_parity.qwen_model("grouped_mm", seed=0)
    ours = hf_parity.ours_from_qwen(qwen)
    ids = random_ids(qwen.config.vocab_size, (1, PROMPT_LEN), 7, device)
    tokens = []
    with torch.no_grad():
        for m in (qwen.to(device).eval(), ours.to(device).eval()):
            m.generation_config.pad_token_id = 0
            m.generation_config.eos_token_id = None
            tokens.append(
                m.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=NEW_TOKENS, do_sample=False)
            )
    assert torch.equal(tokens[0], tokens[1]), (tokens[0], tokens[1])
