"""CLI conventions users bring from torchtitan / transformers: --version, --section.key=value flags,
help generated from the config dataclasses, a description for every subcommand."""

import json
import subprocess
import sys

import pytest
import torch
import transformers

import loopmoe
from loopmoe.cli.main import build_parser, main
from loopmoe.config import CONFIG_FIELDS, config_field_help
from loopmoe.training.config import ModelSection


def _subcommands() -> dict:
    return build_parser()._subparsers._group_actions[0].choices


def test_version_names_loopmoe_torch_and_transformers():
    result = subprocess.run(
        [sys.executable, "-m", "loopmoe", "--version"], capture_output=True, text=True, timeout=120, check=True
    )
    assert result.stdout.strip() == (
        f"loopmoe {loopmoe.__version__} (torch {torch.__version__}, transformers {transformers.__version__})"
    )


@pytest.mark.parametrize(
    "spelling",
    [
        ["optim.lr=0.002", "model.hidden_size=96"],
        ["--optim.lr=0.002", "--model.hidden_size=96"],
        ["--optim.lr", "0.002", "--model.hidden_size", "96"],
    ],
)
def test_override_spellings_are_equivalent(spelling, capsys):
    assert main(["train", "configs/debug.toml", "--dry-run", *spelling]) == 0
    config = json.loads(capsys.readouterr().out.split("\n\nmodel:")[0])
    assert config["optim"]["lr"] == 0.002
    assert config["model"]["fields"] == {"hidden_size": 96}


def test_every_model_config_field_has_a_meaning():
    meaning = config_field_help()
    assert set(meaning) == set(CONFIG_FIELDS)
    assert all(len(text.split()) >= 2 for text in meaning.values()), meaning


def test_train_help_lists_every_model_field_with_its_meaning():
    text = " ".join(_subcommands()["train"].format_help().split())
    meaning = config_field_help()
    for name in CONFIG_FIELDS:
        if name in ("vocab_size", "pad_token_id", "bos_token_id", "eos_token_id"):  # the tokenizer's
            assert f"--model.{name} " not in text
            continue
        assert f"--model.{name} " in text
        if name in ModelSection.__dataclass_fields__:  # a [model] key of its own (model.num_loops), with its help
            continue
        # the help as written in LoopMoEConfig's docstring, in plain text (argparse re-wraps it)
        assert " ".join(meaning[name].replace("``", "").rstrip(".").split()) in text, name


def test_every_subcommand_has_a_description():
    for name, sub in _subcommands().items():
        assert sub.description and len(sub.description.split()) >= 8, name
