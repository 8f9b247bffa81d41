"""The whole model: every architectural switch builds, trains, counts right and generates exactly."""

import math

import pytest
import torch
from transformers import AutoModelForCausalLM

from loopmoe import LoopMoEForCausalLM
from loopmoe.budget import compute_budget
from loopmoe.flops import count_forward_flops
from loopmoe.presets import get_preset

VARIANTS = {
    "vanilla": {},
    "vanilla_shared_tied_noqk": {"shared_expert_intermediate_size": 24, "tie_word_embeddings": True, "qk_norm": False},
    "sigmoid_router": {"router_score": "sigmoid", "router_bias_update_rate": 0.01, "router_z_loss_coef": 1e-3},
    "iteradaln_prelude_coda": {"num_loops": 3, "num_prelude_layers": 1, "num_coda_layers": 1},
    "adaln_iter": {"num_loops": 2, "iter_conditioning": "adaln_iter"},
    "adaln_token_sandwich": {"num_loops": 2, "iter_conditioning": "adaln_token", "norm_scheme": "sandwich"},
    "iter_embedding_add": {"num_loops": 2, "iter_conditioning": "iter_embedding", "input_injection": "add"},
    "concat_depth_scaled": {
        "num_loops": 3,
        "num_prelude_layers": 1,
        "input_injection": "concat",
        "norm_scheme": "depth_scaled_sandwich",
    },
    "looped_no_conditioning": {"num_loops": 2, "iter_conditioning": "none"},
    "dcca_iteradaln_prelude_shared_sandwich": {
        "num_loops": 2,
        "num_prelude_layers": 1,
        "expert_type": "dcca",
        "shared_expert_intermediate_size": 24,
        "norm_scheme": "sandwich",
    },
    "dcca_vanilla_descended_router_depth_scaled": {
        "expert_type": "dcca",
        "dcca_dim": 12,
        "dcca_router_input": "descended",
        "norm_scheme": "depth_scaled_sandwich",
    },
}


def build(cfg, seed=0):
    torch.manual_seed(seed)
    return LoopMoEForCausalLM(cfg)


@pytest.mark.parametrize("name", VARIANTS)
def test_forward_backward_and_budget(tiny_config, name):
    cfg = tiny_config(**VARIANTS[name])
    model = build(cfg)
    x = torch.randint(0, cfg.vocab_size, (2, 24))
    out = model(input_ids=x, labels=x)
    assert torch.isfinite(out.loss)
    expected = out.lm_loss + cfg.router_aux_loss_coef * out.aux_loss + cfg.router_z_loss_coef * out.z_loss
    torch.testing.assert_close(out.loss, expected)
    out.loss.backward()
    assert all(
        p.grad is not None for n, p in model.named_parameters() if "lm_head" not in n or not cfg.tie_word_embeddings
    ), "a parameter gets no gradient"
    assert len(out.router_stats) == cfg.executed_depth()

    budget = compute_budget(cfg, seq_len=64)
    assert budget.total_params == sum(p.numel() for p in model.parameters())
    measured = count_forward_flops(model.eval(), torch.randint(0, cfg.vocab_size, (4, 64))) / (4 * 64)
    assert measured == pytest.approx(budget.flops_per_token, rel=0.02)


def test_active_params_count_only_routed_experts(tiny_config):
    cfg = tiny_config(num_loops=2)
    b = compute_budget(cfg, 64)
    expert = 3 * cfg.hidden_size * cfg.moe_intermediate_size
    assert b.total_params - b.active_params == cfg.unique_layers * (cfg.num_experts - cfg.num_experts_per_tok) * expert


def test_looping_divides_attention_ffn_ratio_by_loops(tiny_config):
    flat = compute_budget(tiny_config(num_core_layers=2), 64)
    looped = compute_budget(tiny_config(num_core_layers=2, num_loops=4), 64)
    assert looped.attn_ffn_ratio == pytest.approx(flat.attn_ffn_ratio / 4)
    a = 2 * 32 * 8 * (4 + 2) + 2 * 8  # projections + QK-norm
    assert flat.attn_ffn_ratio == pytest.approx(a / (2 * 3 * 32 * 16))


@pytest.mark.parametrize("conditioning", ["iteradaln", "adaln_iter", "adaln_token", "iter_embedding"])
def test_conditioning_starts_as_plain_weight_shared_block(tiny_config, conditioning):
    """Zero-initialised modulation / iteration embedding: at init the model is the plain loop."""
    cond = build(tiny_config(num_loops=3, iter_conditioning=conditioning))
    plain = build(tiny_config(num_loops=3, iter_conditioning="none"))
    plain.load_state_dict(cond.state_dict(), strict=False)
    x = torch.randint(0, 97, (2, 12))
    torch.testing.assert_close(cond(input_ids=x).logits, plain(input_ids=x).logits)


def test_iteradaln_modulation_depends_on_iteration_and_token(tiny_config):
    model = build(tiny_config(num_loops=2))
    layer = model.model.core[0]
    torch.nn.init.normal_(layer.modulation.w_mod.weight, std=0.5)
    h = torch.randn(1, 3, 32)
    v0, v1 = model.model.iter_encoder(0, h), model.model.iter_encoder(1, h)
    m0, m1 = layer.modulation(h, v0)[0], layer.modulation(h, v1)[0]
    assert not torch.allclose(m0, m1), "iteration index must change the modulation"
    assert not torch.allclose(m0[0, 0], m0[0, 1]), "the token's hidden state must change the modulation"


def test_iteradaln_decoding_path_equals_the_training_path(tiny_config):
    # At inference on a few rows the six modulations come from one [6d] product (fewer ops per step).
    model = build(tiny_config(num_loops=2))
    modulation = model.model.core[0].modulation
    torch.nn.init.normal_(modulation.w_mod.weight, std=0.5)
    torch.nn.init.normal_(modulation.w_mod.bias, std=0.5)
    h = torch.randn(1, 2, 32)
    v = model.model.iter_encoder(1, h)
    blocks = modulation(h, v)  # grad enabled: the six-product path
    with torch.no_grad():
        fused = modulation(h, v)
    assert len(fused) == 6
    for a, b in zip(blocks, fused):
        torch.testing.assert_close(a.detach(), b)


def test_concat_injection_starts_as_identity(tiny_config):
    concat = build(tiny_config(num_loops=3, input_injection="concat", iter_conditioning="none"))
    plain = build(tiny_config(num_loops=3, iter_conditioning="none"))
    plain.load_state_dict(concat.state_dict(), strict=False)
    x = torch.randint(0, 97, (1, 10))
    torch.testing.assert_close(concat(input_ids=x).logits, plain(input_ids=x).logits)


def test_add_injection_changes_later_iterations(tiny_config):
    add = build(tiny_config(num_loops=2, input_injection="add", iter_conditioning="none"))
    plain = build(tiny_config(num_loops=2, iter_conditioning="none"))
    plain.load_state_dict(add.state_dict())
    x = torch.randint(0, 97, (1, 10))
    assert not torch.allclose(add(input_ids=x).logits, plain(input_ids=x).logits)


def test_depth_scaled_sandwich_tinyinit(tiny_config):
    cfg = tiny_config(
        num_loops=3,
        num_prelude_layers=1,
        num_coda_layers=1,
        norm_scheme="depth_scaled_sandwich",
        hidden_size=64,
        head_dim=16,
        moe_intermediate_size=64,
    )
    model = build(cfg)
    L = cfg.executed_depth()
    layer = model.model.core[0]
    assert torch.allclose(layer.attn_out_norm.weight, torch.full((64,), 0.283 / math.sqrt(L)))
    assert torch.allclose(layer.mlp_out_norm.weight, torch.full((64,), 0.432 / math.sqrt(L)))
    std = layer.mlp.experts.gate_up_proj.std().item()
    assert std == pytest.approx(math.sqrt(1 / (2 * 64 * L)), rel=0.05)


def test_depth_scaled_gain_at_depth_one(tiny_config):
    layer = build(tiny_config(num_core_layers=1, norm_scheme="depth_scaled_sandwich")).model.core[0]
    assert torch.allclose(layer.attn_out_norm.weight, torch.full((32,), 0.283))
    sandwich = build(tiny_config(norm_scheme="sandwich")).model.core[0]
    assert torch.all(sandwich.attn_out_norm.weight == 1.0)


def test_kv_cache_has_one_slot_per_executed_layer(tiny_config):
    cfg = tiny_config(num_loops=3, num_prelude_layers=1, num_coda_layers=1)
    model = build(cfg).eval()
    x = torch.randint(0, 97, (1, 5))
    cache = model(input_ids=x, use_cache=True).past_key_values
    assert len(cache.layers) == cfg.executed_depth() == 1 + 2 * 3 + 1
    keys = [layer.keys for layer in cache.layers]
    assert all(k.shape == (1, 2, 5, 8) for k in keys)
    # Slots are distinct states: the same core layer at different iterations sees different inputs.
    core0 = [model.model.slot("core", 0, k).cache_index for k in range(3)]
    assert core0 == [1, 3, 5]
    assert not torch.allclose(keys[core0[0]], keys[core0[1]])
    assert model.model.slot("coda", 0).cache_index == 7
    deeper = model(input_ids=x, use_cache=True, num_loops=5).past_key_values
    assert len(deeper.layers) == 1 + 2 * 5 + 1


@pytest.mark.parametrize("expert_type", ["swiglu", "dcca"])
def test_incremental_decoding_matches_full_forward(tiny_config, expert_type):
    cfg = tiny_config(num_loops=3, num_prelude_layers=1, expert_type=expert_type)
    model = build(cfg).eval()
    x = torch.randint(0, 97, (2, 9))
    full = model(input_ids=x).logits
    out = model(input_ids=x[:, :6], use_cache=True)
    step = model(input_ids=x[:, 6:], past_key_values=out.past_key_values, use_cache=True).logits
    torch.testing.assert_close(step, full[:, 6:], atol=1e-5, rtol=1e-5)


GENERATE = {
    "greedy": dict(do_sample=False),
    "sampling": dict(do_sample=True, top_k=20, temperature=0.9),
    "beam": dict(do_sample=False, num_beams=3),
}


# Every mode at the trained and at a test-time depth; DCCA experts (BigMac) in each mode once.
GENERATION_CASES = [(mode, loops, "swiglu") for loops in (None, 5) for mode in GENERATE] + [
    ("greedy", 5, "dcca"),
    ("sampling", None, "dcca"),
    ("beam", None, "dcca"),
]


@pytest.mark.parametrize("mode, num_loops, expert_type", GENERATION_CASES)
def test_cached_and_uncached_generation_agree(tiny_config, mode, num_loops, expert_type):
    cfg = tiny_config(num_loops=3, num_prelude_layers=1, num_coda_layers=1, pad_token_id=0, expert_type=expert_type)
    model = build(cfg).eval()
    prompts = torch.randint(1, 97, (3, 7))
    mask = torch.ones_like(prompts)
    prompts[0, :3], mask[0, :3] = 0, 0  # left padding
    prompts[1, :1], mask[1, :1] = 0, 0
    results = []
    for use_cache in (True, False):
        torch.manual_seed(123)
        results.append(
            model.generate(
                prompts,
                attention_mask=mask,
                max_new_tokens=8,
                min_new_tokens=8,
                use_cache=use_cache,
                num_loops=num_loops,
                pad_token_id=0,
                **GENERATE[mode],
            )
        )
    assert torch.equal(results[0], results[1])


def test_left_padding_does_not_change_a_sequence(tiny_config):
    model = build(tiny_config(num_loops=2, pad_token_id=0)).eval()
    prompt = torch.randint(1, 97, (1, 6))
    alone = model.generate(prompt, max_new_tokens=6, do_sample=False, pad_token_id=0)
    padded = torch.cat([torch.zeros(1, 3, dtype=torch.long), prompt], dim=1)
    mask = torch.cat([torch.zeros(1, 3, dtype=torch.long), torch.ones(1, 6, dtype=torch.long)], dim=1)
    batch = model.generate(padded, attention_mask=mask, max_new_tokens=6, do_sample=False, pad_token_id=0)
    assert torch.equal(batch[0, 3:], alone[0])


def test_test_time_depth(tiny_config):
    model = build(tiny_config(num_loops=2)).eval()
    for layer in model.model.core:  # a trained-like, non-trivial modulation
        torch.nn.init.normal_(layer.modulation.w_mod.weight, std=0.2)
    x = torch.randint(0, 97, (1, 8))
    logits = {t: model(input_ids=x, num_loops=t).logits for t in (1, 2, 6)}
    torch.testing.assert_close(logits[2], model(input_ids=x).logits)
    assert not torch.allclose(logits[1], logits[2]) and not torch.allclose(logits[6], logits[2])
    out = model(input_ids=x, num_loops=6, output_hidden_states=True)
    assert len(out.hidden_states) == 1 + 2 * 6


def test_iter_embedding_depth_limit_is_a_clear_error(tiny_config):
    model = build(tiny_config(num_loops=2, iter_conditioning="iter_embedding", max_loops=4))
    with pytest.raises(ValueError, match="max_loops"):
        model(input_ids=torch.zeros(1, 3, dtype=torch.long), num_loops=5)


@pytest.mark.parametrize("tied, expert_type", [(False, "swiglu"), (True, "swiglu"), (False, "dcca")])
def test_save_and_load_roundtrip_through_auto_classes(tiny_config, tmp_path, tied, expert_type):
    cfg = tiny_config(
        num_loops=2, num_coda_layers=1, router_bias_update_rate=0.01, tie_word_embeddings=tied, expert_type=expert_type
    )
    model = build(cfg).eval()
    with torch.no_grad():
        model.model.core[0].mlp.gate.expert_bias.copy_(torch.tensor([0.1, -0.1, 0.2, 0.0]))
        model.model.core[0].modulation.w_mod.weight.normal_()
    model.save_pretrained(tmp_path)
    assert (tmp_path / "model.safetensors").is_file()
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    assert type(loaded) is LoopMoEForCausalLM
    saved, reloaded = model.state_dict(), loaded.state_dict()
    assert saved.keys() == reloaded.keys()
    assert all(torch.equal(saved[k], reloaded[k]) for k in saved), "weights must round-trip bit for bit"
    # Logits may differ in the last ulp: safetensors memory-maps tensors at other alignments, and
    # BLAS picks kernels by alignment.
    x = torch.randint(0, 97, (2, 10))
    torch.testing.assert_close(loaded(input_ids=x).logits, model(input_ids=x).logits, rtol=0, atol=1e-6)
    torch.testing.assert_close(loaded.model.core[0].mlp.gate.expert_bias, model.model.core[0].mlp.gate.expert_bias)
    if tied:
        assert loaded.lm_head.weight.data_ptr() == loaded.model.embed_tokens.weight.data_ptr()


def test_router_bias_update_through_model(tiny_config):
    model = build(tiny_config(router_bias_update_rate=0.05)).train()
    x = torch.randint(0, 97, (4, 16))
    model(input_ids=x, labels=x).loss.backward()
    reduced = []
    model.on_optimizer_step(reduce_fn=reduced.append)  # a data-parallel run all-reduces here
    biases = torch.stack([layer.mlp.gate.expert_bias for layer in model.model.core])
    assert biases.abs().sum() > 0
    assert torch.all(torch.isin(biases, torch.tensor([-0.05, 0.0, 0.05])))
    # One reduction for all routers: the counts of every layer in one tensor.
    assert len(reduced) == 1 and reduced[0].numel() == biases.numel()


def test_inputs_embeds_and_errors(tiny_config):
    model = build(tiny_config()).eval()
    x = torch.randint(0, 97, (1, 5))
    torch.testing.assert_close(model(inputs_embeds=model.model.embed_tokens(x)).logits, model(input_ids=x).logits)
    with pytest.raises(ValueError, match="exactly one"):
        model()
    with pytest.raises(ValueError, match="num_loops"):
        model(input_ids=x, num_loops=0)


def test_discarded_router_counts_do_not_move_biases(tiny_config):
    model = build(tiny_config(router_bias_update_rate=0.05)).train()
    x = torch.randint(0, 97, (4, 16))
    model(input_ids=x, labels=x)  # counts of a step that will be skipped
    model.on_skipped_step()
    model.on_optimizer_step()
    assert all(torch.all(layer.mlp.gate.expert_bias == 0) for layer in model.model.core)


def test_model_training_with_labels_skips_logits_and_keeps_the_loss():
    cfg = get_preset("debug")
    torch.manual_seed(0)
    model = LoopMoEForCausalLM(cfg).train()
    ids = torch.randint(0, cfg.vocab_size, (2, 24))
    fused = model(input_ids=ids, labels=ids)
    assert fused.logits is None
    g_fused = torch.autograd.grad(fused.loss, list(model.parameters()))
    unfused = model(input_ids=ids, labels=ids, skip_logits=False)
    assert unfused.logits is not None
    torch.testing.assert_close(fused.lm_loss, unfused.lm_loss, rtol=1e-6, atol=0)
    torch.testing.assert_close(fused.loss, unfused.loss, rtol=1e-6, atol=0)
    for a, b in zip(g_fused, torch.autograd.grad(unfused.loss, list(model.parameters()))):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-7)
    assert model.eval()(input_ids=ids, labels=ids).logits is not None  # evaluation keeps its logits
    with pytest.raises(ValueError, match="needs labels"):
        model(input_ids=ids, skip_logits=True)


def test_learned_router_bias_still_routes_when_its_updates_are_frozen(tiny_config, tmp_path):
    """router_bias_update_rate = 0 freezes a learned bias; it must not drop it from selection."""
    model = build(tiny_config(num_loops=2, router_bias_update_rate=0.05)).train()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    gen = torch.Generator().manual_seed(0)
    for _ in range(3):  # an odd count: with 4 experts, +-rate steps can cancel after an even one
        x = torch.randint(0, 97, (2, 12), generator=gen)
        model(input_ids=x, labels=x).loss.backward()
        opt.step()
        opt.zero_grad()
        model.on_optimizer_step()
    bias = model.model.core[0].mlp.gate.expert_bias
    assert bias.abs().sum() > 0, "the biases must have moved for this test to mean anything"
    model.save_pretrained(tmp_path)
    frozen = AutoModelForCausalLM.from_pretrained(tmp_path, router_bias_update_rate=0.0).eval()
    assert frozen.config.router_bias_update_rate == 0.0
    model.eval()
    x = torch.randint(0, 97, (2, 12), generator=gen)
    with torch.no_grad():
        a, b = model(input_ids=x), frozen(input_ids=x)
    assert a.router_stats is not None and b.router_stats is not None
    for s, t in zip(a.router_stats, b.router_stats):
        assert torch.equal(s.experts, t.experts), "routing changed after reloading with the bias frozen"
    torch.testing.assert_close(b.logits, a.logits, rtol=0, atol=1e-6)


def test_eager_attention_and_attention_weights_are_refused_not_faked(tiny_config, tmp_path):
    # Every kernel is fused (SDPA, flash, flex): "eager" would be SDPA under another name, and
    # output_attentions=True would have nothing to return, so both are errors naming the alternative.
    config = tiny_config(num_loops=2)
    model = build(config)
    model.save_pretrained(tmp_path)
    with pytest.raises(ValueError, match='use attn_implementation="sdpa"'):
        LoopMoEForCausalLM(tiny_config(num_loops=2, attn_implementation="eager"))
    with pytest.raises(ValueError, match="no eager attention"):
        AutoModelForCausalLM.from_pretrained(tmp_path, attn_implementation="eager")
    with pytest.raises(ValueError, match="no eager attention"):
        model.set_attn_implementation("eager")
    x = torch.randint(0, config.vocab_size, (1, 5))
    for module in (model, model.model):
        with pytest.raises(ValueError, match="cannot return attention weights"):
            module(input_ids=x, output_attentions=True)
    assert model(input_ids=x, output_attentions=False).logits.shape == (1, 5, config.vocab_size)
    assert model.config._attn_implementation == "sdpa"
