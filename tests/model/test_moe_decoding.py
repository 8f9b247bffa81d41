"""Decoding: the MoE's few-token expert path and compiled greedy decoding without recompiles.

``SparseMoE`` sends up to ``FEW_TOKENS`` tokens at inference through ``experts_few_tokens`` (the
groups formed on the host, one product per selected expert and projection); everything else takes
the sorted path. Both compute the same function; the tests pin that, and that the few-token path
reads each selected expert once.
"""

import pytest
import torch
from torch._dynamo.utils import counters

from loopmoe import LoopMoEForCausalLM
from loopmoe.model import moe as moe_module
from loopmoe.model.kernels import experts as experts_module
from loopmoe.model.kernels.experts import FEW_TOKENS
from tests.model.test_moe import DCCA, make_moe, reference_moe

CASES = [
    {},
    {"num_experts_per_tok": 3},  # k > 2: the combine sums three products, in expert order here
    {"router_score": "sigmoid", "norm_topk_prob": False},
    {"shared_expert_intermediate_size": 24},
    DCCA,
]


@pytest.mark.parametrize("overrides", CASES)
@pytest.mark.parametrize("tokens", [1, 2, 5, FEW_TOKENS])
def test_few_token_path_equals_the_sorted_path_and_the_reference(tiny_config, monkeypatch, tokens, overrides):
    moe = make_moe(tiny_config(**overrides))
    x = torch.randn(1, tokens, 32)
    calls = []
    few = moe_module.experts_few_tokens
    monkeypatch.setattr(moe_module, "experts_few_tokens", lambda *a: calls.append(1) or few(*a))
    with torch.inference_mode():
        out, _ = moe(x, router_stats=False)
    assert calls == [1]  # the few-token path ran
    sorted_out, _ = moe(x)  # gradients on: the sorted path
    assert len(calls) == 1
    torch.testing.assert_close(out, sorted_out.detach(), atol=1e-5, rtol=1e-5)
    ref = reference_moe(moe, x.reshape(-1, 32)).view(1, tokens, 32)
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)


def test_more_tokens_take_the_sorted_path(tiny_config, monkeypatch):
    moe = make_moe(tiny_config())
    monkeypatch.setattr(moe_module, "experts_few_tokens", lambda *a: pytest.fail("few-token path above FEW_TOKENS"))
    with torch.inference_mode():
        moe(torch.randn(1, FEW_TOKENS + 1, 32), router_stats=False)


@pytest.mark.parametrize("tokens", [1, 6])
def test_few_token_path_reads_each_selected_expert_once(tiny_config, monkeypatch, tokens):
    moe = make_moe(tiny_config(num_experts=8, num_experts_per_tok=2))
    x = torch.randn(tokens, 32)
    weights = []
    linear = experts_module.linear
    monkeypatch.setattr(experts_module, "linear", lambda a, w: weights.append(w) or linear(a, w))
    with torch.inference_mode():
        _, _, topk_w, topk_idx = moe.gate(x)
        moe._dispatch(x, topk_w, topk_idx)
    selected = sorted(set(topk_idx.flatten().tolist()))
    assert len(weights) == 2 * len(selected)  # gate_up and down, once per selected expert
    read = {w.data_ptr() for w in weights}
    expected = {moe.experts.gate_up_proj[e].data_ptr() for e in selected}
    expected |= {moe.experts.down_proj[e].data_ptr() for e in selected}
    assert read == expected


# --- compiled greedy decoding ---------------------------------------------------------------------

# Projections of 256 x 256 and experts of 256 x 256: the sizes at which the eager decoding matmul
# (``kernels.linear``) takes its thread-split path, which used to break the compiled graph at every
# projection (torch.get_num_threads is not traceable) and recompile per layer and cache length.
DECODE = dict(
    vocab_size=300,
    hidden_size=256,
    num_core_layers=1,
    num_attention_heads=4,
    num_key_value_heads=4,
    head_dim=64,
    num_experts=4,
    num_experts_per_tok=2,
    moe_intermediate_size=256,
)


@pytest.mark.parametrize(("cache", "graphs"), [("dynamic", 3), ("static", 2)])
def test_compiled_greedy_decoding_compiles_a_bounded_number_of_graphs(tiny_config, cache, graphs):
    """Prefill, then decoding: dynamic cache one graph per shape until dynamo marks the cache length
    dynamic (3), static cache one per shape (2); tokens as in eager mode, no graph breaks."""
    torch._dynamo.reset()
    counters.clear()
    torch.manual_seed(0)
    model = LoopMoEForCausalLM(tiny_config(**DECODE)).eval()
    for p in model.parameters():  # routing that differs between tokens
        torch.nn.init.normal_(p, std=0.05)
    prompts = torch.randint(0, 300, (2, 5), generator=torch.Generator().manual_seed(1))
    kw = dict(max_new_tokens=10, do_sample=False)
    if cache == "static":
        kw["cache_implementation"] = "static"
    before = torch.get_num_threads()
    torch.set_num_threads(2)  # the thread-split path of eager decoding
    try:
        with torch.inference_mode():
            eager = model.generate(prompts, **kw)
            model.compile(backend="aot_eager")
            compiled = model.generate(prompts, **kw)
    finally:
        torch.set_num_threads(before)
        torch._dynamo.reset()
    assert torch.equal(compiled, eager)
    assert counters["graph_break"] == {}
    assert counters["stats"]["unique_graphs"] == graphs
