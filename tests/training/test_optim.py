"""Schedule shapes and weight-decay groups."""

import itertools

import pytest
import torch
from torch import nn

from loopmoe.training.config import load_run_config
from loopmoe.training.optim import WarmupCosine, WarmupStableDecay, build_optimizer, build_scheduler


def test_warmup_cosine_shape():
    f = WarmupCosine(warmup_steps=10, total_steps=110, min_lr_ratio=0.1)
    assert f(0) == pytest.approx(0.1) and f(9) == pytest.approx(1.0)
    assert f(60) == pytest.approx(0.55)  # half-way through the cosine
    assert f(110) == pytest.approx(0.1) and f(500) == pytest.approx(0.1)
    values = [f(s) for s in range(10, 111)]
    assert all(a >= b for a, b in itertools.pairwise(values))


def test_wsd_shape():
    f = WarmupStableDecay(warmup_steps=10, total_steps=100, decay_fraction=0.2, min_lr_ratio=0.0)
    assert f(4) == pytest.approx(0.5)
    assert all(f(s) == 1.0 for s in range(10, 80))
    assert f(90) == pytest.approx(0.5) and f(100) == pytest.approx(0.0)


def test_scheduler_drives_optimizer_lr():
    cfg = load_run_config(
        None,
        [
            "train.max_steps=20",
            "schedule.warmup_steps=4",
            "optim.lr=1.0",
            "schedule.kind=wsd",
            "schedule.decay_fraction=0.5",
            "schedule.min_lr_ratio=0.0",
        ],
    )
    model = nn.Linear(2, 2)
    opt = build_optimizer(model, cfg)
    sched = build_scheduler(opt, cfg)
    lrs = []
    for _ in range(20):
        lrs.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    assert lrs[:5] == pytest.approx([0.25, 0.5, 0.75, 1.0, 1.0]) and lrs[-1] == pytest.approx(0.1)


def test_no_decay_on_norms_biases_and_vectors():
    model = nn.Sequential(nn.Embedding(10, 4), nn.LayerNorm(4), nn.Linear(4, 4))
    model.register_parameter("gate", nn.Parameter(torch.ones(4)))
    opt = build_optimizer(model, load_run_config(None, ["optim.weight_decay=0.1"]))
    decay, no_decay = opt.param_groups
    assert decay["weight_decay"] == 0.1 and {tuple(p.shape) for p in decay["params"]} == {(10, 4), (4, 4)}
    assert no_decay["weight_decay"] == 0.0 and len(no_decay["params"]) == 4  # norm w/b, linear bias, gate
