"""The command line: budget tables and JSON, checkpoints written by --save-dir, train --dry-run, errors."""

import json

import pytest
from transformers import AutoModelForCausalLM

from loopmoe.cli.main import main


def test_budget_table(capsys):
    assert main(["budget", "debug", "--loops", "2", "--seq-len", "128"]) == 0
    out = capsys.readouterr().out
    for row in ("total params", "active params", "FLOPs/token (S=128)", "attn/FFN active ratio", "deviation"):
        assert row in out


def test_paper_scale_presets_are_marked(capsys):
    assert main(["budget", "paper-9b", "--loops", "2"]) == 0
    assert "paper scale" in capsys.readouterr().out
    assert main(["presets"]) == 0
    listing = capsys.readouterr().out
    assert "debug" in listing and listing.count("[paper scale]") == 2


def test_budget_json_and_save_dir(capsys, tmp_path):
    assert main(["budget", "debug", "--loops", "2", "--seq-len", "128", "--json", "--save-dir", str(tmp_path)]) == 0
    text = capsys.readouterr().out
    data = json.loads(text[: text.rindex("}") + 1])
    assert data["seq_len"] == 128
    for side in ("reference", "looped"):
        assert set(data[side]) >= {"config", "total_params", "active_params", "flops_per_token", "attn_ffn_ratio"}
        model = AutoModelForCausalLM.from_pretrained(tmp_path / side)
        assert sum(p.numel() for p in model.parameters()) == data[side]["total_params"]
        assert model.config.num_loops == data[side]["config"]["num_loops"]
    assert data["looped"]["config"]["num_loops"] == 2


def test_budget_from_config_file(tmp_path, capsys):
    path = tmp_path / "ref.toml"
    path.write_text('[model]\npreset = "debug"\nnum_experts = 16\n')
    assert main(["budget", str(path), "--loops", "2", "--seq-len", "128", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["reference"]["config"]["num_experts"] == 16


@pytest.mark.parametrize(
    "argv, message",
    [
        (["budget", "debgu", "--loops", "2"], "Did you mean 'debug'"),
        (["budget", "debug", "--loops", "3"], "divisors of 4"),
        (["budget", "missing.toml", "--loops", "2"], "not found"),
        (["train", "configs/debug.toml", "train.max_step=5", "--dry-run"], "did you mean 'train.max_steps'"),
    ],
)
def test_errors_are_one_line_with_the_fix(argv, message, capsys):
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err


def test_train_dry_run_prints_config_and_budget(capsys):
    assert main(["train", "configs/debug.toml", "train.max_steps=70", "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert '"max_steps": 70' in out and "FLOPs/token" in out


def test_overrides_may_follow_options(capsys):
    assert main(["train", "configs/debug.toml", "--dry-run", "train.max_steps=70", "optim.lr=0.001"]) == 0
    out = capsys.readouterr().out
    assert '"max_steps": 70' in out and '"lr": 0.001' in out
    with pytest.raises(SystemExit):
        main(["train", "configs/debug.toml", "--dry-run", "--no-such-flag"])


def test_python_dash_m_entry_point():
    import subprocess
    import sys

    result = subprocess.run([sys.executable, "-m", "loopmoe", "presets"], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0 and "paper-3b" in result.stdout
