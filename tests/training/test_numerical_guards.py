"""Non-finite settings are refused; a non-finite update is rolled back; a diverged run aborts and
never exports a non-finite model."""

import math

import pytest
import torch

from loopmoe.config import LoopMoEConfig
from loopmoe.training import Trainer, build_optimizer, build_scheduler, load_run_config, run_training
from loopmoe.training.run import DivergedError, NonFiniteModelError, _refuse_nonfinite
from tests.training.standins import TinyMoELM, data_factory, model_factory, standin_overrides


@pytest.mark.parametrize(
    "override",
    [
        "optim.lr=inf",
        "optim.lr=nan",
        "train.grad_clip=nan",
        "optim.eps=nan",
        "optim.betas=[nan, 0.9]",
        "schedule.min_lr_ratio=nan",
        "data.val_fraction=nan",
        "optim.weight_decay=inf",
    ],
)
def test_nonfinite_settings_are_refused(override):
    with pytest.raises(ValueError, match="finite"):
        load_run_config(None, [*standin_overrides(), override])


@pytest.mark.parametrize(
    "field",
    [
        "rope_theta",
        "rms_norm_eps",
        "initializer_range",
        "router_aux_loss_coef",
        "router_z_loss_coef",
        "router_bias_update_rate",
    ],
)
@pytest.mark.parametrize("value", [float("nan"), float("inf")])
def test_nonfinite_model_floats_are_refused(field, value):
    with pytest.raises(ValueError, match=field):
        LoopMoEConfig(vocab_size=64, **{field: value}).validate()


def test_nonfinite_update_is_rolled_back():
    torch.manual_seed(0)
    cfg = load_run_config(None, standin_overrides())
    model = TinyMoELM()
    opt = build_optimizer(model, cfg)
    trainer = Trainer(
        model,
        opt,
        build_scheduler(opt, cfg),
        grad_accum=1,
        grad_clip=1.0,
        device=torch.device("cpu"),
        autocast_dtype=None,
    )
    batches = iter(data_factory(cfg, 0, 1).train)
    assert not trainer.train_step(batches).skipped
    before = {k: v.clone() for k, v in model.state_dict().items()}
    state_before = {k: v.clone() for k, v in opt.state[model.head.weight].items()}
    for g in opt.param_groups:  # what optim.lr=inf did: finite loss and gradients, non-finite update
        g["lr"] = float("inf")
    out = trainer.train_step(batches)
    assert out.skipped and math.isfinite(out.loss) and math.isfinite(out.grad_norm)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert all(torch.equal(state_before[k], v) for k, v in opt.state[model.head.weight].items())
    assert model.bias_updates == 1 and model.discarded_counts == 1


def test_diverged_run_aborts_after_max_skipped_steps(tmp_path):
    def nan_model(cfg, vocab):
        m = model_factory(cfg, vocab)
        m.nan_at_forward = set(range(3, 100))
        return m

    cfg = load_run_config(
        None,
        standin_overrides(**{"train.max_steps": 20, "train.max_skipped_steps": 4, "train.eval_batches": 0}),
    )
    with pytest.raises(DivergedError, match="4 consecutive steps"):
        run_training(cfg, tmp_path, model_factory=nan_model, data_factory=data_factory)
    assert not (tmp_path / "final").exists()


def test_nonfinite_model_is_not_exported(tmp_path):
    model = TinyMoELM()
    _refuse_nonfinite(model, tmp_path, torch.device("cpu"))
    with torch.no_grad():
        model.head.bias[0] = float("nan")
    with pytest.raises(NonFiniteModelError, match="head.bias"):
        _refuse_nonfinite(model, tmp_path, torch.device("cpu"))


def test_run_that_ends_non_finite_exports_nothing(tmp_path):
    def poisoned(cfg, vocab):
        m = model_factory(cfg, vocab)
        with torch.no_grad():
            m.norm.weight[0] = float("inf")  # every step is skipped (NaN loss); the weights stay non-finite
        return m

    cfg = load_run_config(
        None, standin_overrides(**{"train.max_steps": 2, "train.eval_batches": 0, "schedule.warmup_steps": 1})
    )
    with pytest.raises(NonFiniteModelError, match="norm.weight"):
        run_training(cfg, tmp_path, model_factory=poisoned, data_factory=data_factory)
    assert not (tmp_path / "final").exists()
