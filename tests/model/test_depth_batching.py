"""Continuous depth batching: every sequence gets the tokens batch-1 adaptive generation gives it, while
rows at different iterations share one core forward and finished sequences hand their slot on.

The model runs in float64 with IterAdaLN's modulation and the concat injection made non-trivial (both
start as the identity), so a row given another row's iteration index, or the wrong slot's keys and
values, changes the tokens; float64 keeps batching's rounding far below any exit threshold or argmax gap.
"""

import pytest
import torch

from loopmoe import LoopMoEConfig, LoopMoEForCausalLM
from loopmoe.model.adaptive import ExitPolicy
from loopmoe.model.conditioning import IterationEncoder, ZeroInitLinear
from loopmoe.model.depth_batching import DepthBatchingDecoder, sampler
from tests.conftest import TINY

LOOPED = dict(TINY, num_prelude_layers=1, num_coda_layers=1, num_loops=3, input_injection="concat")
NEW = 5  # new tokens per prompt


def _looped(**overrides) -> LoopMoEForCausalLM:
    torch.manual_seed(0)
    model = LoopMoEForCausalLM(LoopMoEConfig(**LOOPED, **overrides)).eval().double()
    with torch.no_grad():  # IterAdaLN's zero-initialised modulation made to depend strongly on the iteration
        for module in model.modules():
            if isinstance(module, ZeroInitLinear):
                module.weight.normal_(0, 0.2)
                module.bias.normal_(0, 0.2)
        for linear in (model.model.iter_encoder.fc1, model.model.iter_encoder.fc2):
            linear.weight.normal_(0, 1.0)
        if model.model.exit_gate is not None:  # a gate that halts some tokens early and others late
            model.model.exit_gate.weight.normal_(0, 1.0)
    return model


@pytest.fixture(scope="module")
def model():
    return _looped()


@pytest.fixture(scope="module")
def prompts():
    g = torch.Generator().manual_seed(1)
    return [torch.randint(0, 97, (n,), generator=g) for n in (2, 6, 4, 5)]  # 4 requests for 2 slots


def _one_by_one(model, prompts, **kwargs):
    return [model.generate(p[None], do_sample=False, max_new_tokens=NEW, pad_token_id=0, **kwargs)[0] for p in prompts]


@pytest.mark.parametrize(
    ("criterion", "threshold"),  # each exits at mixed depths on this model (asserted below)
    [("latent", 0.55), ("cosine", 0.1), ("kl", 1e-3), ("entropy", 4.5685), ("gate", 0.7)],
)
def test_each_sequence_gets_the_tokens_of_batch1_adaptive_generation(model, prompts, criterion, threshold):
    if criterion == "gate":  # the learned exit gate's criterion, on a model with one
        model = _looped(exit_gate=True)
    decoder = DepthBatchingDecoder(model, ExitPolicy(criterion, threshold), batch_slots=2)
    out = decoder.generate(prompts, NEW, output_logits=True)
    adaptive = dict(
        exit_criterion=criterion, exit_threshold=threshold, output_logits=True, return_dict_in_generate=True
    )
    for p, got, logits in zip(prompts, out.sequences, out.logits, strict=True):
        want = model.generate(p[None], do_sample=False, max_new_tokens=NEW, pad_token_id=0, **adaptive)
        assert torch.equal(got, want.sequences[0])
        torch.testing.assert_close(logits.float(), torch.cat(want.logits), rtol=1e-6, atol=1e-6)  # generate's fp32
    loops = torch.cat(out.exit_loops)
    assert len(loops.unique()) > 1  # the exits really differ between tokens...
    assert out.stats.mixed_steps > 0  # ...and rows at different iterations shared a core forward
    assert out.stats.iterations == int(loops.sum()) < out.stats.full_iterations
    assert out.stats.new_tokens == len(prompts) * NEW


def test_without_exits_it_is_lockstep_batched_generation(model, prompts):
    longest = max(len(p) for p in prompts)
    ids = torch.stack([torch.cat([torch.zeros(longest - len(p), dtype=torch.long), p]) for p in prompts])
    mask = torch.stack([torch.arange(longest) >= longest - len(p) for p in prompts]).long()  # left padding
    batched = model.generate(ids, attention_mask=mask, do_sample=False, max_new_tokens=NEW, pad_token_id=0)
    expected = [row[longest - len(p) :] for row, p in zip(batched, prompts)]
    for policy in (None, ExitPolicy("latent", 0.0)):  # full depth, and a criterion that never fires
        out = DepthBatchingDecoder(model, policy, batch_slots=3).generate(prompts, NEW)
        for got, want in zip(out.sequences, expected, strict=True):
            assert torch.equal(got, want)
        assert out.stats.iterations == out.stats.full_iterations and out.stats.mixed_steps == 0


@torch.no_grad()
def test_replayed_exits_keep_the_kv_rule_of_the_uncached_forward(model, prompts):
    g = torch.Generator().manual_seed(2)
    forced = [torch.randint(1, 4, (len(p) + NEW - 1,), generator=g) for p in prompts]
    out = DepthBatchingDecoder(model, batch_slots=2).generate(prompts, NEW, exit_loops=forced, output_logits=True)
    assert out.stats.mixed_steps > 0
    for p, sequence, loops, replay, got in zip(prompts, out.sequences, out.exit_loops, forced, out.logits, strict=True):
        assert torch.equal(loops, replay)
        # One uncached forward over the whole sequence under the same exits gives every new token's logits.
        logits = model(sequence[None, :-1], use_cache=False, exit_loops=replay[None]).logits[0, len(p) - 1 :]
        torch.testing.assert_close(got, logits, rtol=0, atol=1e-10)
        assert torch.equal(logits.argmax(-1), sequence[len(p) :])


@pytest.mark.parametrize(
    ("conditioning", "injection"), [("adaln_iter", "add"), ("iter_embedding", "none"), ("adaln_token", "concat")]
)
@torch.no_grad()
def test_every_iteration_conditioning_and_injection_run_per_row(prompts, conditioning, injection):
    torch.manual_seed(0)
    config = LoopMoEConfig(**{**LOOPED, "iter_conditioning": conditioning, "input_injection": injection})
    model = LoopMoEForCausalLM(config).eval().double()
    for p in model.parameters():  # the zero-initialised conditioning made to matter
        if not p.any():
            p.normal_(0, 0.3)
    g = torch.Generator().manual_seed(3)
    forced = [torch.randint(1, 4, (len(p) + NEW - 1,), generator=g) for p in prompts]
    out = DepthBatchingDecoder(model, batch_slots=2).generate(prompts, NEW, exit_loops=forced, output_logits=True)
    assert out.stats.mixed_steps > 0
    for p, sequence, replay, got in zip(prompts, out.sequences, forced, out.logits, strict=True):
        logits = model(sequence[None, :-1], use_cache=False, exit_loops=replay[None]).logits[0, len(p) - 1 :]
        torch.testing.assert_close(got, logits, rtol=0, atol=1e-10)


def test_a_sequence_that_ends_hands_its_slot_to_a_waiting_prompt(model, prompts):
    adaptive = dict(exit_criterion="cosine", exit_threshold=0.1)
    requests = [prompts[2], prompts[0], prompts[1]]  # the first one's greedy continuation varies most
    new = _one_by_one(model, requests[:1], **adaptive)[0][len(requests[0]) :].tolist()
    stop = next(j for j in range(1, NEW) if new[j] not in new[:j])  # this new token ends the first sequence
    out = DepthBatchingDecoder(model, ExitPolicy("cosine", 0.1), batch_slots=2).generate(requests, NEW, new[stop])
    for got, want in zip(out.sequences, _one_by_one(model, requests, eos_token_id=new[stop], **adaptive), strict=True):
        assert torch.equal(got, want)
    assert len(out.sequences[0]) == len(requests[0]) + stop + 1  # stopped at (and kept) the EOS token


def test_a_per_token_iteration_index_is_the_int_encoding_bit_for_bit(model):
    encoder = model.model.iter_encoder
    assert isinstance(encoder, IterationEncoder)
    like = torch.zeros(1, dtype=torch.float64)
    k = torch.tensor([[0, 2, 1], [5, 0, 3]])
    table = encoder(k, like)  # [2, 3, r]
    assert table.shape == (2, 3, LOOPED["iter_cond_rank"])
    for i in range(2):
        for j in range(3):
            assert torch.equal(table[i, j], encoder(int(k[i, j]), like))


def test_sampling_draws_valid_tokens_in_every_slot(model, prompts):
    torch.manual_seed(3)
    sample = sampler(temperature=1.0, top_p=0.9, top_k=20)
    out = DepthBatchingDecoder(model, ExitPolicy("latent", 0.55), batch_slots=2).generate(prompts, NEW, sample=sample)
    for p, sequence in zip(prompts, out.sequences):
        assert torch.equal(sequence[: len(p)], p) and len(sequence) == len(p) + NEW
        assert int(sequence.min()) >= 0 and int(sequence.max()) < 97


@pytest.mark.parametrize(
    ("build", "message"),
    [
        (lambda m: DepthBatchingDecoder(m, batch_slots=0), "batch_slots=0: must be >= 1"),
        (lambda m: DepthBatchingDecoder(m).generate([[]], 2), "prompt 0 is empty"),
        (lambda m: DepthBatchingDecoder(m).generate([], 2), "no prompt to continue"),
        (lambda m: DepthBatchingDecoder(m).generate([[1, 2]], 0), "max_new_tokens=0: must be >= 1"),
        (lambda m: DepthBatchingDecoder(m, ExitPolicy("energy", 0.1)), "unknown exit criterion 'energy'"),
        (
            lambda m: DepthBatchingDecoder(m).generate([[1, 2]], 3, exit_loops=[torch.ones(2)]),
            "exit_loops[0] has 2 entries",
        ),
        (lambda m: DepthBatchingDecoder(m.model), "decodes a LoopMoEForCausalLM"),
    ],
)
def test_bad_settings_name_the_fix(model, build, message):
    with pytest.raises(ValueError, match=message.replace("[", r"\[")):
        build(model)
