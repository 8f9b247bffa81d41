"""Run-config parsing: typed overrides, and errors that name the key and the fix."""

from pathlib import Path

import pytest

from loopmoe.training.config import load_run_config

CONFIGS = Path(__file__).resolve().parents[2] / "configs"


def test_overrides_are_typed_by_field():
    cfg = load_run_config(
        None,
        [
            "train.max_steps=300",
            "optim.lr=3e-4",
            "optim.betas=[0.9, 0.99]",
            "schedule.kind=wsd",
            "data.source=tinyshakespeare",
            "model.hidden_size=32",
        ],
    )
    assert cfg.train.max_steps == 300 and cfg.optim.lr == 3e-4 and cfg.optim.betas == (0.9, 0.99)
    assert cfg.schedule.kind == "wsd" and cfg.model.fields == {"hidden_size": 32}


def test_toml_file_and_int_for_float(tmp_path):
    path = tmp_path / "run.toml"
    path.write_text(
        '[model]\npreset = "debug"\nnum_loops = 3\nnum_experts = 8\n[optim]\nlr = 1\n[train]\nmax_steps = 500\n'
    )
    cfg = load_run_config(path)
    assert cfg.model.num_loops == 3 and cfg.model.fields == {"num_experts": 8}
    assert cfg.optim.lr == 1.0 and isinstance(cfg.optim.lr, float)


def test_unknown_key_suggests_closest():
    with pytest.raises(ValueError, match=r"unknown key 'train.max_step'.*did you mean 'train.max_steps'"):
        load_run_config(None, ["train.max_step=3"])
    with pytest.raises(ValueError, match=r"did you mean 'train'"):
        load_run_config(None, ["trian.max_steps=3"])


def test_bad_type_and_bad_choice():
    with pytest.raises(ValueError, match=r"train.max_steps = 'abc': expected int"):
        load_run_config(None, ["train.max_steps=abc"])
    with pytest.raises(ValueError, match=r"schedule.kind = 'cosin'.*did you mean 'cosine'"):
        load_run_config(None, ["schedule.kind=cosin"])
    with pytest.raises(ValueError, match=r"optim.betas"):
        load_run_config(None, ["optim.betas=0.9"])


def test_contradictions_name_the_fix():
    with pytest.raises(ValueError, match=r"schedule.warmup_steps = 100 must be in \[0, train.max_steps = 50\)"):
        load_run_config(None, ["train.max_steps=50"])
    with pytest.raises(
        ValueError, match=r"not divisible by train.micro_batch_size x world size = 8 x 2; use a multiple of 16"
    ):
        load_run_config(None, ["train.global_batch_size=24"], world_size=2)
    with pytest.raises(ValueError, match=r"train.grad_accum = 2 contradicts train.global_batch_size"):
        load_run_config(None, ["train.global_batch_size=32", "train.grad_accum=2"])
    with pytest.raises(ValueError, match=r"section.key=value"):
        load_run_config(None, ["max_steps"])


def test_global_batch_derives_grad_accum():
    cfg = load_run_config(None, ["train.global_batch_size=32", "train.micro_batch_size=4"], world_size=2)
    assert cfg.grad_accum_for(2) == 4 and cfg.global_batch_for(2) == 32


@pytest.mark.parametrize("path", sorted(CONFIGS.glob("*.toml")), ids=lambda p: p.name)
def test_shipped_configs_validate(path):
    load_run_config(path)


@pytest.mark.parametrize("path", sorted(CONFIGS.glob("*.toml")), ids=lambda p: p.name)
def test_shipped_configs_build_a_model_config(path):
    from loopmoe.training.builders import build_model_config

    cfg = load_run_config(path)
    model_cfg = build_model_config(cfg, vocab_size=1000)
    assert model_cfg.vocab_size == 1000
    assert model_cfg.num_loops == (cfg.model.num_loops or model_cfg.num_loops)


def test_unknown_model_field_is_rejected():
    from loopmoe.training.builders import build_model_config

    cfg = load_run_config(None, ["model.hiden_size=32"])
    with pytest.raises(ValueError, match="hidden_size"):
        build_model_config(cfg, vocab_size=100)


def test_an_explicit_model_config_is_stored_in_full_and_round_trips():
    import json

    from loopmoe.presets import get_preset
    from loopmoe.training.builders import build_model_config
    from loopmoe.training.config import ModelSection, RunConfig, config_from_dict

    model = get_preset("debug", num_loops=2, vocab_size=300)
    cfg = RunConfig(model=ModelSection.of(model)).validate()
    stored = json.loads(json.dumps(cfg.to_dict()))
    assert stored["model"]["config"]["num_loops"] == 2 and stored["model"]["preset"] is None
    again = config_from_dict(stored).validate()
    assert again == cfg and again.to_dict() == stored
    assert build_model_config(again, vocab_size=300).to_dict() == model.to_dict()
    with pytest.raises(ValueError, match="vocab_size=100"):
        build_model_config(again, vocab_size=100)
    with pytest.raises(ValueError, match="model.config is a complete model config"):
        RunConfig(model=ModelSection(preset="debug", config=model)).validate()
