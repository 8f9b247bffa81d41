"""Adaptive depth: exits that are exact where they must be, skip real compute, and keep one KV rule."""

import pytest
import torch
from transformers.cache_utils import DynamicCache

from loopmoe import LoopMoEConfig, LoopMoEForCausalLM
from loopmoe.flops import count_forward_flops
from loopmoe.model.adaptive import ExitPolicy
from tests.conftest import TINY

SMALL = dict(TINY, num_prelude_layers=1, num_coda_layers=1, num_loops=3)  # a looped core between a prelude and a coda


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return LoopMoEForCausalLM(LoopMoEConfig(**SMALL)).eval()


@pytest.fixture(scope="module")
def ids():
    torch.manual_seed(1)
    return torch.randint(0, 97, (2, 12))


@torch.no_grad()
def test_a_threshold_that_never_exits_is_full_depth_bit_for_bit(model, ids):
    out = model(ids, use_cache=False, exit_criterion="latent", exit_threshold=0.0)
    assert torch.equal(out.logits, model(ids, use_cache=False).logits)
    assert out.exit_loops.eq(3).all()
    prompt = ids[:1, :5]
    plain = model.generate(prompt, do_sample=False, max_new_tokens=8)
    assert torch.equal(plain, model.generate(prompt, do_sample=False, max_new_tokens=8, exit_criterion="cosine"))


@torch.no_grad()
def test_exit_after_one_iteration_is_the_t1_forward_bit_for_bit(model, ids):
    out = model(ids, use_cache=False, exit_criterion="latent", exit_threshold=1e9)
    assert torch.equal(out.logits, model(ids, use_cache=False, num_loops=1).logits)
    assert out.exit_loops.eq(1).all()


@torch.no_grad()
def test_cached_decoding_equals_the_uncached_forward_under_the_same_exits(model, ids):
    torch.manual_seed(2)
    exits = torch.randint(1, 4, ids.shape)
    full = model(ids, use_cache=False, exit_loops=exits)
    assert torch.equal(full.exit_loops, exits)
    assert not torch.allclose(full.logits, model(ids, use_cache=False).logits)  # the exits change the output
    cache = DynamicCache()
    steps = [model(ids[:, :4], past_key_values=cache, use_cache=True, exit_loops=exits[:, :4]).logits]
    for t in range(4, ids.shape[1]):
        steps.append(
            model(ids[:, t : t + 1], past_key_values=cache, use_cache=True, exit_loops=exits[:, t : t + 1]).logits
        )
    torch.testing.assert_close(torch.cat(steps, dim=1), full.logits, rtol=1e-5, atol=1e-5)


@torch.no_grad()
def test_an_exited_tokens_later_slots_hold_its_latest_keys_and_values(model, ids):
    exits = torch.full(ids.shape, 3)
    exits[0, 5] = 1  # position 5 of row 0 stops after the first iteration
    exits[1, 7] = 2
    cache = DynamicCache()
    model(ids, past_key_values=cache, use_cache=True, exit_loops=exits)
    core = model.model
    for layer in range(2):
        first, second, third = (cache.layers[core.slot("core", layer, k, 3).cache_index] for k in range(3))
        for later in (second, third):  # row 0, position 5: iteration 0's key/value at this layer
            assert torch.equal(later.keys[0, :, 5], first.keys[0, :, 5])
            assert torch.equal(later.values[0, :, 5], first.values[0, :, 5])
        assert torch.equal(third.keys[1, :, 7], second.keys[1, :, 7])  # row 1, position 7: iteration 1's
        assert not torch.equal(third.keys[1, :, 6], second.keys[1, :, 6])  # an active neighbour moved on


@torch.no_grad()
def test_exits_skip_the_core_compute_they_save(model, ids):
    def flops(**kwargs):
        return count_forward_flops(model, ids, **kwargs)

    full, t1 = flops(), flops(num_loops=1)
    per_iteration = (full - t1) / 2
    half = torch.full(ids.shape, 3)
    half[:, ::2] = 1  # half the tokens stop after one iteration
    saved = full - flops(exit_loops=half)
    # Each exited token skips two iterations of its own work; attention over all keys stays for the others.
    assert saved > 0.8 * per_iteration  # about one iteration's worth of the whole batch
    assert flops(exit_loops=torch.ones_like(ids)) == pytest.approx(t1, rel=1e-6)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        (dict(exit_criterion="energy", exit_threshold=0.1), "unknown exit criterion 'energy'"),
        (dict(exit_criterion="gate", exit_threshold=0.5), "this model has none: use one of latent"),
        (dict(exit_criterion="latent", exit_threshold=-1.0), "must be a finite number >= 0"),
        (dict(exit_criterion="latent", exit_threshold=float("nan")), "must be a finite number >= 0"),
        (dict(exit_criterion="cosine", exit_threshold=3.0), "lies in [0, 2]"),
        (dict(exit_criterion="latent", min_loops=4), "need 1 <= min_loops <= max_loops"),
        (dict(exit_threshold=0.1), "need an exit_criterion"),
    ],
)
def test_bad_exit_settings_name_the_fix(model, ids, kwargs, message):
    with pytest.raises(ValueError, match=message.replace("[", r"\[").replace("(", r"\(")), torch.no_grad():
        model(ids, use_cache=False, **kwargs)


def test_exit_on_a_model_that_does_not_loop_is_refused():
    vanilla = LoopMoEForCausalLM(LoopMoEConfig(**{**SMALL, "num_loops": 1})).eval()
    with pytest.raises(ValueError, match="early exit needs a looped model"), torch.no_grad():
        vanilla(torch.zeros(1, 3, dtype=torch.long), exit_criterion="latent", exit_threshold=0.1)


def test_the_command_lines_exit_spec():
    assert ExitPolicy.parse("latent:0.03") == ExitPolicy("latent", 0.03)
    with pytest.raises(ValueError, match="give CRITERION:THRESHOLD"):
        ExitPolicy.parse("latent")
    with pytest.raises(ValueError, match="is not a number"):
        ExitPolicy.parse("latent:abc")


@torch.no_grad()
def test_the_analytic_adaptive_flops_match_the_counted_ones(model, ids):
    from loopmoe.budget import adaptive_flops_per_token

    exits = torch.full(ids.shape, 3)
    exits[:, ::3] = 1
    exits[:, 1::3] = 2
    counted = count_forward_flops(model, ids, exit_loops=exits) / ids.numel()
    predicted = adaptive_flops_per_token(model.config, ids.shape[1], exits.float().mean().item())
    assert counted == pytest.approx(predicted, rel=0.02)


@torch.no_grad()
def test_a_generation_config_carries_the_loop_settings(model, ids):
    from transformers import GenerationConfig

    prompt = ids[:1, :5]
    deeper = model.generate(prompt, do_sample=False, max_new_tokens=6, num_loops=5)
    early = model.generate(prompt, do_sample=False, max_new_tokens=6, exit_criterion="latent", exit_threshold=1e9)
    config = GenerationConfig(do_sample=False, max_new_tokens=6, num_loops=5)
    assert torch.equal(model.generate(prompt, generation_config=config), deeper)
    config = GenerationConfig(do_sample=False, max_new_tokens=6, exit_criterion="latent", exit_threshold=1e9)
    assert torch.equal(model.generate(prompt, generation_config=config), early)
