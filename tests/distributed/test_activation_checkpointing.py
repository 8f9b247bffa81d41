"""Activation checkpointing per executed slot: same losses and gradients, fewer saved activations."""

import pytest
import torch

from loopmoe import LoopMoEForCausalLM
from loopmoe.distributed.parallelize import apply_activation_checkpointing

CONFIGS = {
    "looped": dict(num_loops=3, num_prelude_layers=1, router_bias_update_rate=0.01, input_injection="add"),
    "vanilla": dict(num_loops=1),
}


def train(cfg, mode: str, steps: int = 10, every: int = 2):
    torch.manual_seed(0)
    model = LoopMoEForCausalLM(cfg).train()
    apply_activation_checkpointing(model, mode, every)
    calls = []  # a pre-hook: a recomputation may stop early, before the layer's forward returns
    model.model.core[0].register_forward_pre_hook(lambda *_: calls.append(1))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    g = torch.Generator().manual_seed(1)
    losses = []
    for _ in range(steps):
        x = torch.randint(0, cfg.vocab_size, (4, 24), generator=g)
        loss = model(input_ids=x, labels=x).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
        model.on_optimizer_step()
        losses.append(loss.item())
    biases = torch.cat([layer.mlp.gate.expert_bias for layer in model.model.core])
    return torch.tensor(losses), len(calls) // steps, biases


@pytest.mark.parametrize("name", list(CONFIGS))
@pytest.mark.parametrize("mode", ["full", "selective"])
def test_checkpointed_training_equals_plain_training(tiny_config, name, mode):
    cfg = tiny_config(**CONFIGS[name])
    plain, plain_calls, plain_bias = train(cfg, "none")
    ours, calls, bias = train(cfg, mode)
    torch.testing.assert_close(ours, plain, rtol=1e-6, atol=0)
    # The router's bias counts are taken once per forward, not again when a region recomputes.
    assert torch.equal(bias, plain_bias)
    T = cfg.num_loops
    assert plain_calls == T  # core.0 runs once per iteration
    if mode == "full":
        assert calls == 2 * T  # and once more per iteration to recompute in backward
    else:  # every 2nd executed slot (1-based): core.0 sits at slots P + k*C, i.e. 1-based P + k*C + 1
        P, C = cfg.num_prelude_layers, cfg.num_core_layers
        assert calls == T + sum((P + k * C + 1) % 2 == 0 for k in range(T))


@pytest.mark.filterwarnings("ignore::FutureWarning")  # transformers renames gradient_ to activation_checkpointing
def test_gradient_checkpointing_enable_is_full_checkpointing(tiny_config):
    cfg = tiny_config(num_loops=2)
    torch.manual_seed(0)
    model = LoopMoEForCausalLM(cfg).train()
    x = torch.randint(0, cfg.vocab_size, (2, 16))
    ref = torch.autograd.grad(model(input_ids=x, labels=x).loss, list(model.parameters()), allow_unused=True)
    model.gradient_checkpointing_enable()
    assert model.is_gradient_checkpointing
    calls = []
    model.model.core[0].register_forward_pre_hook(lambda *_: calls.append(1))
    loss = model(input_ids=x, labels=x).loss
    ours = torch.autograd.grad(loss, list(model.parameters()), allow_unused=True)
    assert len(calls) == 2 * cfg.num_loops
    for a, b in zip(ours, ref):
        assert (a is None) == (b is None)
        if a is not None:
            torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-8)
    model.gradient_checkpointing_disable()
    assert model.model.checkpoint_policy is None


def test_unknown_mode_names_the_choices(tiny_config):
    model = LoopMoEForCausalLM(tiny_config())
    with pytest.raises(ValueError, match="none.*full.*selective"):
        apply_activation_checkpointing(model, "partial")


@pytest.mark.filterwarnings("ignore::FutureWarning")  # transformers renames gradient_ to activation_checkpointing
def test_transformers_trainer_with_gradient_checkpointing(tmp_path, tiny_config):
    from transformers import Trainer, TrainingArguments

    cfg = tiny_config(num_loops=2)
    torch.manual_seed(0)
    model = LoopMoEForCausalLM(cfg)
    g = torch.Generator().manual_seed(0)
    data = [{"input_ids": ids, "labels": ids} for ids in torch.randint(0, cfg.vocab_size, (8, 16), generator=g)]
    args = TrainingArguments(
        output_dir=str(tmp_path),
        max_steps=3,
        per_device_train_batch_size=2,
        gradient_checkpointing=True,
        logging_steps=1,
        save_strategy="no",
        report_to=[],
        use_cpu=True,
    )
    trainer = Trainer(model=model, args=args, train_dataset=data)
    trainer.train()
    assert model.model.checkpoint_policy is not None  # the Trainer turned it on through our model
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    assert len(losses) == 3 and all(torch.isfinite(torch.tensor(losses)))
