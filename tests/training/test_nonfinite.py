"""A non-finite loss or gradient never reaches the weights; the step is skipped and logged."""

import math

import torch

from loopmoe.training import Trainer, build_optimizer, build_scheduler, load_run_config, read_metrics, run_training
from tests.training.standins import TinyMoELM, data_factory, model_factory, standin_overrides


def _trainer(model, cfg):
    opt = build_optimizer(model, cfg)
    return Trainer(
        model,
        opt,
        build_scheduler(opt, cfg),
        grad_accum=2,
        grad_clip=1.0,
        device=torch.device("cpu"),
        autocast_dtype=None,
    )


def _snapshot(model):
    return {k: v.clone() for k, v in model.state_dict().items()}


def _assert_same(a, b):
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_nan_loss_skips_update():
    torch.manual_seed(0)
    cfg = load_run_config(None, standin_overrides())
    model = TinyMoELM()
    model.nan_at_forward = {3}  # first micro-batch of step 2
    trainer = _trainer(model, cfg)
    batches = iter(data_factory(cfg, 0, 1).train)
    assert not trainer.train_step(batches).skipped
    before = _snapshot(model)
    out = trainer.train_step(batches)
    assert out.skipped and math.isnan(out.loss)
    _assert_same(before, _snapshot(model))
    assert model.bias_updates == 1 and all(p.grad is None for p in model.parameters())
    assert model.discarded_counts == 1
    assert not trainer.train_step(batches).skipped  # training continues normally


def test_inf_gradient_with_finite_loss_skips_update():
    torch.manual_seed(0)
    cfg = load_run_config(None, standin_overrides())
    model = TinyMoELM()
    trainer = _trainer(model, cfg)
    batches = iter(data_factory(cfg, 0, 1).train)
    handle = model.head.bias.register_hook(lambda g: g * float("inf"))
    before = _snapshot(model)
    out = trainer.train_step(batches)
    handle.remove()
    assert out.skipped and math.isfinite(out.loss) and not math.isfinite(out.grad_norm)
    _assert_same(before, _snapshot(model))


def test_skipped_step_is_logged(tmp_path):
    def nan_model(cfg, vocab):
        m = model_factory(cfg, vocab)
        m.nan_at_forward = {3}
        return m

    cfg = load_run_config(
        None, standin_overrides(**{"train.max_steps": 6, "train.checkpoint_every": 100, "train.eval_batches": 0})
    )
    result = run_training(cfg, tmp_path, model_factory=nan_model, data_factory=data_factory)
    records = read_metrics(tmp_path)
    assert [r["skipped"] for r in records] == [False, False, True, False, False, False]
    assert records[2]["skipped_steps"] == 1 and result["skipped_steps"] == 1
    assert all(math.isfinite(r["loss"]) for i, r in enumerate(records) if i != 2)
