"""torch.compile: the MoE's custom ops, a fullgraph MoE, regional compilation of the looped model
(``apply_compile``, with and without activation checkpointing), whole-model inference and decoding.

Most tests compile with the ``aot_eager`` backend: dynamo, AOTAutograd and the ops' fake kernels,
without inductor's C++ code generation, which takes tens of seconds per graph on a small CPU. The
``slow`` tests repeat training and decoding with inductor.
"""

import pytest
import torch
from torch._dynamo.utils import counters

from loopmoe import LoopMoEForCausalLM
from loopmoe.distributed.parallelize import apply_activation_checkpointing, apply_compile
from loopmoe.model.kernels.experts import experts_grouped_mm, experts_loop, experts_reference
from tests.model.test_moe import make_moe

FAST = "aot_eager"


@pytest.fixture(autouse=True)
def fresh_dynamo():
    torch._dynamo.reset()
    counters.clear()
    yield
    torch._dynamo.reset()


def unique_graphs() -> int:
    return counters["stats"]["unique_graphs"]


# --- (a) the custom ops --------------------------------------------------------------------------

E, D, F_ = 5, 16, 8  # D * 4 bytes a multiple of 16: grouped GEMM operands must be aligned
COUNTS = torch.tensor([3, 0, 5, 1, 0])  # experts 1 and 4 get no rows


def expert_inputs(requires_grad: bool = True, dtype=torch.float32):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(int(COUNTS.sum()), D, generator=g, dtype=dtype)
    w_gate_up = torch.randn(E, 2 * F_, D, generator=g, dtype=dtype) * 0.3
    w_down = torch.randn(E, D, F_, generator=g, dtype=dtype) * 0.3
    return [t.requires_grad_(requires_grad) for t in (x, w_gate_up, w_down)]


@pytest.mark.parametrize("requires_grad", [True, False])
@pytest.mark.parametrize("op", ["experts_loop", "experts_grouped_mm"])
def test_opcheck_experts(op, requires_grad):
    x, w_gate_up, w_down = expert_inputs(requires_grad)
    extra = (not requires_grad,) if op == "experts_loop" else ()  # the loop's `decoding` flag
    torch.library.opcheck(getattr(torch.ops.loopmoe, op).default, (x, w_gate_up, w_down, COUNTS, *extra))


@pytest.mark.parametrize("op", ["experts_loop", "experts_grouped_mm"])
@pytest.mark.parametrize("needs", [(True, True, True), (True, False, False), (False, True, True)])
def test_opcheck_experts_backward(op, needs):
    x, w_gate_up, w_down = expert_inputs(requires_grad=False)
    extra = (False,) if op == "experts_loop" else ()
    _, *saved = getattr(torch.ops.loopmoe, op)(x, w_gate_up, w_down, COUNTS, *extra)
    gy = torch.randn_like(x)
    backward = getattr(torch.ops.loopmoe, f"{op}_backward").default
    torch.library.opcheck(backward, (gy, x, w_gate_up, w_down, COUNTS, *saved, *needs))
    grads = backward(gy, x, w_gate_up, w_down, COUNTS, *saved, *needs)
    for grad, like, needed in zip(grads, (x, w_gate_up, w_down), needs):
        assert grad.shape == (like.shape if needed else (0,))


def test_opcheck_one_token_and_counts():
    x, w_gate_up, w_down = expert_inputs(requires_grad=False)
    topk_w, topk_idx = torch.tensor([[0.7, 0.3]]), torch.tensor([[2, 0]])
    torch.library.opcheck(torch.ops.loopmoe.experts_few_tokens.default, (x[:1], w_gate_up, w_down, topk_w, topk_idx))
    torch.library.opcheck(torch.ops.loopmoe.add_expert_counts_.default, (torch.zeros(4), torch.tensor([1.0, 0, 2, 3])))


@pytest.mark.parametrize("fn", [experts_loop, experts_grouped_mm])
@pytest.mark.parametrize("compiled", [False, True])
def test_experts_forward_and_backward_equal_the_reference(fn, compiled):
    x, w_gate_up, w_down = expert_inputs()
    run = torch.compile(fn, backend=FAST, fullgraph=True) if compiled else fn
    gy = torch.randn_like(x)
    ours = run(x, w_gate_up, w_down, COUNTS)
    ours_grads = torch.autograd.grad(ours, (x, w_gate_up, w_down), gy)
    ref = experts_reference(x, w_gate_up, w_down, COUNTS)
    ref_grads = torch.autograd.grad(ref, (x, w_gate_up, w_down), gy)
    torch.testing.assert_close(ours, ref, rtol=1e-5, atol=1e-6)
    for name, a, b in zip(("x", "gate_up", "down"), ours_grads, ref_grads):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6, msg=f"gradient of {name}")
    assert torch.all(ours_grads[1][[1, 4]] == 0) and torch.all(ours_grads[2][[1, 4]] == 0)


# --- (b) the MoE layer in one graph --------------------------------------------------------------


MOE_CONFIGS = {
    "loop": {},
    "grouped_mm_shared_sigmoid_bias": {
        "moe_implementation": "grouped_mm",
        "shared_expert_intermediate_size": 24,
        "router_score": "sigmoid",
        "router_bias_update_rate": 0.01,
    },
    "dcca_grouped_mm_shared_descended_router": {  # BigMac's low-dimension experts
        "moe_implementation": "grouped_mm",
        "expert_type": "dcca",
        "dcca_router_input": "descended",
        "shared_expert_intermediate_size": 24,
    },
}


@pytest.mark.parametrize("name", MOE_CONFIGS)
def test_fullgraph_moe_inference(tiny_config, name):
    moe = make_moe(tiny_config(**MOE_CONFIGS[name])).eval()
    compiled = torch.compile(moe, backend=FAST, fullgraph=True)
    with torch.no_grad():
        for shape in [(2, 7), (1, 1)]:  # sorted dispatch; the single-token path
            x = torch.randn(*shape, 32)
            ours, _ = compiled(x, router_stats=False)
            ref, _ = moe(x, router_stats=False)
            torch.testing.assert_close(ours, ref, rtol=1e-5, atol=1e-6)
        x = torch.randn(2, 7, 32)
        _, ours_stats = compiled(x)
        _, ref_stats = moe(x)
        torch.testing.assert_close(ours_stats.aux_loss, ref_stats.aux_loss)
        assert torch.equal(ours_stats.experts, ref_stats.experts)


@pytest.mark.parametrize("name", MOE_CONFIGS)
def test_fullgraph_moe_training(tiny_config, name):
    cfg = tiny_config(**{**MOE_CONFIGS[name], "router_bias_update_rate": 0.01})
    results = []
    for compile_it in (False, True):
        moe = make_moe(cfg).train()
        run = torch.compile(moe, backend=FAST, fullgraph=True) if compile_it else moe
        x = torch.randn(2, 7, 32, generator=torch.Generator().manual_seed(1), requires_grad=True)
        out, stats = run(x)
        (out.square().mean() + stats.aux_loss + stats.z_loss).backward()
        grads = [x.grad] + [p.grad for p in moe.parameters()]
        results.append((out, grads, moe.gate.pending_counts.clone()))
    (ref, ref_grads, ref_counts), (ours, ours_grads, ours_counts) = results
    torch.testing.assert_close(ours, ref, rtol=1e-5, atol=1e-6)
    for a, b in zip(ours_grads, ref_grads):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    assert torch.equal(ours_counts, ref_counts) and ref_counts.sum() == 2 * 7 * cfg.num_experts_per_tok


# --- (c) regional compilation of the looped model ------------------------------------------------

LOOPED = dict(num_loops=2, num_prelude_layers=1, num_coda_layers=1, router_bias_update_rate=0.01)  # iteradaln


def train(cfg, compile_kwargs=None, ac="none", steps=3):
    torch.manual_seed(0)
    model = LoopMoEForCausalLM(cfg).train()
    apply_activation_checkpointing(model, ac)
    if compile_kwargs is not None:
        apply_compile(model, **compile_kwargs)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    g = torch.Generator().manual_seed(1)
    losses, counts = [], []
    for _ in range(steps):
        x = torch.randint(0, cfg.vocab_size, (2, 16), generator=g)
        loss = model(input_ids=x, labels=x).loss
        loss.backward()
        counts.append(torch.cat([layer.mlp.gate.pending_counts for layer in model.model.core]))
        opt.step()
        opt.zero_grad()
        model.on_optimizer_step()
        losses.append(loss.item())
    return torch.tensor(losses), torch.stack(counts), model


def check_regional_training(cfg, backend: str, ac: str):
    ref_losses, ref_counts, _ = train(cfg, ac=ac)
    losses, counts, model = train(cfg, dict(backend=backend), ac=ac)
    torch.testing.assert_close(losses, ref_losses, rtol=1e-5, atol=0)
    # The router counts are taken once per step (not again when a checkpointed region recomputes).
    assert torch.equal(counts, ref_counts)
    # One graph per kind of layer (prelude/coda, modulated core): the T runs of a core layer share one.
    assert unique_graphs() == 2
    assert all(layer._compiled_call_impl is not None for layer in (*model.model.prelude, *model.model.core))


@pytest.mark.parametrize("ac", ["none", "full"])
def test_regional_compile_trains_like_eager(tiny_config, ac):
    check_regional_training(tiny_config(**LOOPED), FAST, ac)


def test_regional_compile_trains_dcca_like_eager(tiny_config):
    check_regional_training(tiny_config(**LOOPED, expert_type="dcca"), FAST, "full")


def test_regional_compile_keeps_state_dict_keys(tiny_config):
    model = LoopMoEForCausalLM(tiny_config(**LOOPED))
    keys = list(model.state_dict())
    apply_compile(model, backend=FAST)
    assert list(model.state_dict()) == keys


@pytest.mark.parametrize("use_cache", [False, True])
def test_regional_compile_inference(tiny_config, use_cache):
    """Cacheless forwards run compiled; with a KV cache the layers fall back to eager (no recompiles)."""
    cfg = tiny_config(**LOOPED)
    torch.manual_seed(0)
    model = LoopMoEForCausalLM(cfg).eval()
    x = torch.randint(0, cfg.vocab_size, (2, 12))
    with torch.no_grad():
        ref = model(input_ids=x, use_cache=use_cache).logits
        ref_tokens = model.generate(x[:1], max_new_tokens=4, do_sample=False) if use_cache else None
        apply_compile(model, backend=FAST)
        torch.testing.assert_close(model(input_ids=x, use_cache=use_cache).logits, ref, rtol=1e-5, atol=1e-5)
        if use_cache:
            assert torch.equal(model.generate(x[:1], max_new_tokens=4, do_sample=False), ref_tokens)
    assert unique_graphs() == (0 if use_cache else 2)


# --- (d), (e) whole-model compilation: inference forward and greedy decoding ---------------------


def test_whole_model_inference_forward(tiny_config):
    cfg = tiny_config(**LOOPED)
    torch.manual_seed(0)
    model = LoopMoEForCausalLM(cfg).eval()
    x = torch.randint(0, cfg.vocab_size, (2, 12))
    compiled = torch.compile(model, backend=FAST, fullgraph=True)
    with torch.no_grad():
        torch.testing.assert_close(compiled(input_ids=x).logits, model(input_ids=x).logits, rtol=0, atol=1e-5)


def check_greedy_decoding(cfg, backend: str, batch: int):
    """Greedy tokens of a compiled model equal eager ones: batch 1 decodes through the single-token
    experts path, batch 2 (left-padded) through the sorted dispatch with a token mask."""
    torch.manual_seed(0)
    model = LoopMoEForCausalLM(cfg).eval()
    prompts = torch.randint(0, cfg.vocab_size, (batch, 7), generator=torch.Generator().manual_seed(2))
    mask = torch.ones_like(prompts)
    mask[1:, :3] = 0
    with torch.no_grad():
        ref = model.generate(prompts, attention_mask=mask, max_new_tokens=6, do_sample=False)
        model.compile(backend=backend)
        ours = model.generate(prompts, attention_mask=mask, max_new_tokens=6, do_sample=False)
    assert torch.equal(ours, ref)
    assert counters["graph_break"] == {}


@pytest.mark.parametrize("expert_type", ["swiglu", "dcca"])
def test_whole_model_greedy_decoding(tiny_config, expert_type):
    check_greedy_decoding(tiny_config(**LOOPED, expert_type=expert_type), FAST, batch=1)


@pytest.mark.slow
def test_whole_model_greedy_decoding_batched(tiny_config):
    check_greedy_decoding(tiny_config(**LOOPED), FAST, batch=2)


# --- inductor ------------------------------------------------------------------------------------


@pytest.mark.slow
@pytest.mark.parametrize("ac", ["none", "full"])
def test_regional_compile_trains_like_eager_inductor(tiny_config, ac):
    check_regional_training(tiny_config(**LOOPED), "inductor", ac)


@pytest.mark.slow
@pytest.mark.parametrize("batch", [1, 2])
def test_whole_model_greedy_decoding_inductor(tiny_config, batch):
    check_greedy_decoding(tiny_config(**LOOPED), "inductor", batch)
