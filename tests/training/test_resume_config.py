"""Resuming with a changed config: the model must match (checked before loading), a new optimizer or
schedule applies exactly from the resumed step, and max_steps cannot go below the checkpoint."""

import pytest
import torch

from loopmoe.training import load_run_config, read_metrics, run_training
from loopmoe.training.checkpoint import _scheduler_state
from loopmoe.training.optim import apply_optim_settings, build_optimizer, build_scheduler
from tests.training.standins import TinyMoELM, data_factory, standin_overrides


def sized_model(cfg, vocab):
    """A stand-in whose width follows [model] hidden_size, so a changed model has other shapes."""
    return TinyMoELM(vocab, d=cfg.model.fields.get("hidden_size", 32))


def _cfg(**extra):
    base = {
        "train.max_steps": 4,
        "train.checkpoint_every": 2,
        "train.eval_batches": 0,
        "schedule.warmup_steps": 1,
    }
    return load_run_config(None, standin_overrides(**{**base, **extra}))


def _train(cfg, out):
    return run_training(cfg, out, model_factory=sized_model, data_factory=data_factory)


def test_changed_model_is_refused_before_loading(tmp_path):
    _train(_cfg(), tmp_path)
    with pytest.raises(ValueError, match=r"different model \(model\.fields\.hidden_size: None -> 48\).*new --out"):
        _train(_cfg(**{"model.hidden_size": 48, "train.max_steps": 6}), tmp_path)


def test_max_steps_below_the_checkpoint_is_refused(tmp_path):
    _train(_cfg(), tmp_path)
    with pytest.raises(ValueError, match=r"train.max_steps = 2 is below the step of the checkpoint to resume, 4"):
        _train(_cfg(**{"train.max_steps": 2}), tmp_path)


@pytest.mark.parametrize(
    "changed",
    [{"train.max_steps": 8}, {"train.max_steps": 8, "optim.lr": 0.02, "schedule.min_lr_ratio": 0.5}],
    ids=["max_steps", "lr_and_schedule"],
)
def test_changed_schedule_applies_from_the_resumed_step(tmp_path, changed):
    reference = _train(_cfg(**changed), tmp_path / "reference")
    _train(_cfg(), tmp_path / "resumed")
    with pytest.warns(UserWarning, match=r"resuming at step 4 with a changed schedule .*apply from step 5") as seen:
        _train(_cfg(**changed), tmp_path / "resumed")
    expected = [r["lr"] for r in read_metrics(tmp_path / "reference")][4:]
    got = [r["lr"] for r in read_metrics(tmp_path / "resumed")]
    # the lr's jump is said in numbers: the one step 5 would have had, and the one it gets
    before = build_scheduler(build_optimizer(TinyMoELM(), _cfg()), _cfg())
    for _ in range(4):
        before.optimizer.step()
        before.step()
    message = str(seen[0].message)
    assert f"jumps from {before.get_last_lr()[0]:.3g} to {got[4]:.3g} at step 5" in message
    assert [r["step"] for r in read_metrics(tmp_path / "resumed")] == list(range(1, 9))
    assert got[4:] == expected
    assert reference["step"] == 8


def test_restored_optimizer_takes_every_new_setting():
    old = _cfg(**{"train.max_steps": 10})
    new = _cfg(
        **{"train.max_steps": 20, "optim.lr": 0.05, "optim.betas": "[0.8, 0.9]", "optim.eps": 1e-6},
        **{"optim.weight_decay": 0.3, "schedule.kind": "wsd"},
    )
    model = TinyMoELM()
    opt = build_optimizer(model, old)
    sched = build_scheduler(opt, old)
    for _ in range(3):
        opt.step()
        sched.step()
    opt2 = build_optimizer(model, new)
    sched2 = build_scheduler(opt2, new)
    opt2.load_state_dict(opt.state_dict())
    sched2.load_state_dict(_scheduler_state(sched))
    apply_optim_settings(opt2, sched2, new)
    fresh = build_optimizer(model, new)
    fresh_sched = build_scheduler(fresh, new)
    for _ in range(3):
        fresh.step()
        fresh_sched.step()
    for g, f in zip(opt2.param_groups, fresh.param_groups):
        assert {k: g[k] for k in ("lr", "initial_lr", "betas", "eps", "weight_decay")} == {
            k: f[k] for k in ("lr", "initial_lr", "betas", "eps", "weight_decay")
        }
    sched2.step()
    fresh_sched.step()
    assert sched2.get_last_lr() == fresh_sched.get_last_lr()
    assert torch.equal(torch.tensor(sched2.base_lrs), torch.tensor(fresh_sched.base_lrs))
