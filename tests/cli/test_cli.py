"""The command line: budget tables and JSON, checkpoints written by --save-dir, train --dry-run, errors."""

import json

import pytest
from transformers import AutoModelForCausalLM

from loopmoe.cli.main import main


def test_budget_table(capsys):
    assert main(["budget", "debug", "--num-loops", "2", "--seq-len", "128"]) == 0
    out = capsys.readouterr().out
    for row in ("total params", "active params", "FLOPs/token (S=128)", "attn/FFN active ratio", "deviation"):
        assert row in out


def test_paper_scale_presets_are_marked(capsys):
    assert main(["budget", "paper-9b", "--num-loops", "2"]) == 0
    assert "hardware grid" in capsys.readouterr().out  # balanced on the grid of references at paper scale
    assert main(["presets"]) == 0
    listing = capsys.readouterr().out
    assert "debug" in listing and listing.count("[paper scale]") == 2


def test_budget_json_and_save_dir(capsys, tmp_path):
    assert main(["budget", "debug", "--num-loops", "2", "--seq-len", "128", "--json", "--save-dir", str(tmp_path)]) == 0
    captured = capsys.readouterr()
    data = json.loads(captured.out)  # stdout is the JSON alone; "wrote DIR" status lines go to stderr
    assert captured.err.count("wrote ") == 2
    assert data["seq_len"] == 128
    for side in ("reference", "looped"):
        assert set(data[side]) >= {"config", "total_params", "active_params", "flops_per_token", "attn_ffn_ratio"}
        model = AutoModelForCausalLM.from_pretrained(tmp_path / side)
        assert sum(p.numel() for p in model.parameters()) == data[side]["total_params"]
        assert model.config.num_loops == data[side]["config"]["num_loops"]
    assert data["looped"]["config"]["num_loops"] == 2


def test_budget_with_dcca_experts_shows_the_all_to_all_volume(capsys):
    argv = ["budget", "debug", "--num-loops", "2", "--seq-len", "128", "--expert-type", "dcca", "--ep", "4"]
    assert main([*argv, "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert data["reference"]["config"]["expert_type"] == "swiglu"
    assert (data["looped"]["config"]["expert_type"], data["looped"]["config"]["dcca_dim"]) == ("dcca", 16)
    assert data["ep"] == 4 and data["a2a_dtype"] == "bfloat16"
    # 2 * k * width * 2 bytes * 3/4 per executed layer; DCCA sends r/d = 16/64 of the reference's
    assert data["reference"]["all_to_all_bytes_per_token"] == 2 * 2 * 64 * 2 * 3 / 4 * 4
    looped_k = data["looped"]["config"]["num_experts_per_tok"]
    assert data["looped"]["all_to_all_bytes_per_token"] == 2 * looped_k * 16 * 2 * 3 / 4 * 4
    assert main(argv) == 0
    table = capsys.readouterr().out
    assert "| expert type" in table and "dcca, width 16" in table
    assert "all_to_all bytes/token, forward (ep=4, bfloat16)" in table


def test_budget_from_config_file(tmp_path, capsys):
    path = tmp_path / "ref.toml"
    path.write_text('[model]\npreset = "debug"\nnum_experts = 16\n')
    assert main(["budget", str(path), "--num-loops", "2", "--seq-len", "128", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["reference"]["config"]["num_experts"] == 16


@pytest.mark.parametrize(
    "argv, message",
    [
        (["budget", "debgu", "--num-loops", "2"], "did you mean 'debug'"),
        (["budget", "debug", "--num-loops", "3"], "divisors of 4"),
        (["budget", "debug", "--num-loops", "2", "--prelude", "-1"], "num_prelude_layers must be a whole number >= 0"),
        (["budget", "debug", "--num-loops", "1", "--prelude", "2", "--coda", "2"], "fewer prelude + coda layers"),
        (["budget", "missing.toml", "--num-loops", "2"], "not found"),
        (["budget", "debug", "--num-loops", "2", "--dcca-dim", "16"], "set expert_type='dcca', or drop dcca_dim"),
        (["budget", "debug", "--num-loops", "2", "--expert-type", "dcca", "--dcca-dim", "64"], "0 < d_e < hidden_size"),
        (["train", "configs/debug.toml", "train.max_step=5", "--dry-run"], "did you mean 'train.max_steps'"),
    ],
)
def test_errors_are_one_line_with_the_fix(argv, message, capsys):
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err


def test_an_internal_error_keeps_its_traceback(monkeypatch):
    # Only loopmoe's error tree is a one-line message: anything else is a bug, whose location matters.
    import loopmoe.cli.budget

    def broken(*args, **kwargs):
        raise ValueError("an internal bug")

    monkeypatch.setattr(loopmoe.cli.budget, "load_model_config", broken)
    with pytest.raises(ValueError, match="an internal bug"):
        main(["budget", "debug", "--num-loops", "2"])


def test_loopmoe_traceback_shows_the_traceback_of_user_errors_too(monkeypatch):
    from loopmoe.errors import ConfigError

    monkeypatch.setenv("LOOPMOE_TRACEBACK", "1")
    with pytest.raises(ConfigError, match="divisors of 4"):
        main(["budget", "debug", "--num-loops", "3"])


def test_budget_json_into_a_closed_pipe_exits_quietly():
    import subprocess
    import sys

    # `true` exits without reading (as `head -1` does after its line, once the output outgrows the pipe)
    script = f"{sys.executable} -m loopmoe budget debug --num-loops 2 --json | true"
    result = subprocess.run(["bash", "-c", script], capture_output=True, text=True, timeout=120)
    assert "BrokenPipeError" not in result.stderr and "Traceback" not in result.stderr, result.stderr


def test_config_errors_are_printed_once_under_torchrun(monkeypatch, capsys):
    monkeypatch.setenv("RANK", "1")
    assert main(["train", "configs/debug.toml", "optim.lr=abc", "--dry-run"]) == 2
    assert capsys.readouterr().err == ""
    monkeypatch.setenv("RANK", "0")
    assert main(["train", "configs/debug.toml", "optim.lr=abc", "--dry-run"]) == 2
    err = capsys.readouterr().err
    assert err.count("error:") == 1 and "optim.lr" in err and "Traceback" not in err


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


@pytest.mark.parametrize(
    "command, options",
    [
        ("compare", "loopmoe.compare.CompareOptions"),
        ("budget", "loopmoe.cli.budget.BudgetOptions"),
        ("eval", "loopmoe.cli.eval.EvalOptions"),
        ("convert", "loopmoe.cli.convert.ConvertOptions"),
        ("train", "loopmoe.cli.train.TrainOptions"),
    ],
)
def test_help_lists_every_option_with_its_help_and_default(command, options):
    import dataclasses
    import importlib

    from loopmoe.cli.main import build_parser
    from loopmoe.options import flag_of

    module, name = options.rsplit(".", 1)
    cls = getattr(importlib.import_module(module), name)
    sub = build_parser()._subparsers._group_actions[0].choices[command]
    text = "".join(sub.format_help().split())  # argparse wraps lines, also at hyphens
    on_cli = [f for f in dataclasses.fields(cls) if f.metadata.get("cli", True)]  # cli=False: config files only
    for f in on_cli:
        assert "".join(f.metadata["help"].split()) in text
        if not f.metadata["positional"]:
            assert flag_of(cls, f.name) in text
    assert text.count("(default:") >= sum(
        f.default is not dataclasses.MISSING and f.default is not False and not f.metadata["positional"] for f in on_cli
    )


def test_train_help_and_flags_cover_every_run_config_key(capsys):
    import dataclasses
    from typing import get_type_hints

    from loopmoe.cli.main import build_parser
    from loopmoe.training.config import RunConfig

    sub = build_parser()._subparsers._group_actions[0].choices["train"]
    text = sub.format_help()
    for section, cls in get_type_hints(RunConfig).items():
        for f in dataclasses.fields(cls):
            if f.metadata["cli"]:
                assert f"--{section}.{f.name}" in text
    argv = ["train", "configs/debug.toml", "--dry-run", "--max-steps", "70", "--train.seed", "3"]
    assert main([*argv, "--optim.betas", "[0.8, 0.9]", "--model.num_loops", "2"]) == 0
    out = capsys.readouterr().out
    assert '"max_steps": 70' in out and '"seed": 3' in out and "0.8" in out and "0+4x2+0" in out
    assert main(["train", "configs/debug.toml", "--dry-run", "--schedule.kind", "cosin"]) == 2
    assert "did you mean 'cosine'" in capsys.readouterr().err


def test_a_busy_run_folder_is_one_line_not_a_traceback(tmp_path, capsys):
    from loopmoe.training.runlock import RunLock

    with RunLock(tmp_path):  # another run holds the folder
        code = main(["train", "configs/debug.toml", "--out", str(tmp_path)])
    err = capsys.readouterr().err
    assert code == 2
    assert err.startswith("loopmoe train: error: another loopmoe process (pid ")
    assert "Traceback" not in err and len(err.strip().splitlines()) == 1


def test_budget_hardware_multiples(capsys, tmp_path, monkeypatch):
    # paper-* presets default to --expert-multiple 8 --head-dim-multiple 16; flags override
    monkeypatch.chdir(tmp_path)  # the repository's bench/ folder would shadow the preset "bench"
    assert main(["budget", "paper-3b", "--num-loops", "2", "--json"]) == 0
    looped = json.loads(capsys.readouterr().out)["looped"]["config"]
    assert looped["num_experts"] % 8 == 0 and looped["head_dim"] % 16 == 0
    args = ["budget", "bench", "--num-loops", "4", "--json", "--expert-multiple", "4", "--head-dim-multiple", "16"]
    assert main(args) == 0
    looped = json.loads(capsys.readouterr().out)["looped"]["config"]
    assert looped["num_experts"] % 4 == 0 and looped["head_dim"] % 16 == 0
