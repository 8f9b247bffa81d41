"""`loopmoe plan`: the table, pure JSON, the measured parameter and optimizer memory, errors."""

import json

import torch

from loopmoe.cli.main import main
from loopmoe.planning import Layout, get_hardware, plan_step
from loopmoe.presets import get_preset


def test_plan_json_is_pure_json(capsys):
    assert (
        main(
            [
                "plan",
                "configs/debug.toml",
                "model.num_loops=2",
                "--hardware",
                "h100",
                "--devices",
                "8",
                "dist.strategy=fsdp2",
                "--json",
            ]
        )
        == 0
    )
    data = json.loads(capsys.readouterr().out)  # the whole output parses
    assert data["layout"]["devices"] == 8 and data["layout"]["strategy"] == "fsdp2"
    assert data["tokens_per_s"] > 0 and 0 < data["mfu"] < 1 and data["fits"]
    assert set(data["compute"]) >= {"gemm", "attention", "elementwise", "overhead", "optimizer", "total"}


def test_plan_table(capsys):
    assert main(["plan", "configs/debug.toml", "--hardware", "a100"]) == 0
    out = capsys.readouterr().out
    for row in ("tokens/s", "step time", "exposed communication", "peak memory / device", "MFU"):
        assert row in out


def test_plan_errors_name_the_fix(capsys):
    assert main(["plan", "configs/debug.toml", "--hardware", "h1000"]) == 2
    assert "did you mean 'h100'" in capsys.readouterr().err
    assert main(["plan", "configs/debug.toml", "trian.max_steps=3", "--hardware", "h100"]) == 2
    assert "train" in capsys.readouterr().err


def test_parameter_and_optimizer_memory_exactly_as_measured():
    from loopmoe.model import LoopMoEForCausalLM

    cfg = get_preset("debug", num_loops=2, num_core_layers=2)
    model = LoopMoEForCausalLM(cfg)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    ids = torch.randint(0, cfg.vocab_size, (2, 16))
    model(input_ids=ids, labels=ids).loss.backward()
    opt.step()
    params = sum(p.numel() * p.element_size() for p in model.parameters())
    grads = sum(p.grad.numel() * p.grad.element_size() for p in model.parameters() if p.grad is not None)
    state = sum(v.numel() * v.element_size() for s in opt.state.values() for k, v in s.items() if k != "step")
    plan = plan_step(cfg, Layout(micro_batch=2, seq_len=16), get_hardware("h100"))
    assert plan.memory.params == params
    assert plan.memory.grads == grads
    assert plan.memory.optimizer == state
