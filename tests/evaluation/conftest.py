"""Tiny offline models (LoopMoE and GPT-2) with the shared GPT-2 tokenizer, and a CLI runner."""

from __future__ import annotations

import argparse
import os

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

from loopmoe.paths import shared_data_dir


@pytest.fixture(scope="session")
def data_dir():
    d = shared_data_dir()
    if d is None or not (d / "tokenizers/gpt2/tokenizer.json").is_file():
        pytest.skip("shared data dir with tokenizers/gpt2/tokenizer.json not available")
    return d


@pytest.fixture(scope="session")
def gpt2_tokenizer(data_dir):
    from loopmoe.data import load_tokenizer

    return load_tokenizer(data_dir / "tokenizers/gpt2/tokenizer.json").to_transformers()


@pytest.fixture(scope="session")
def loopmoe_dir(tmp_path_factory, gpt2_tokenizer):
    """A randomly initialised 2-layer, 2-loop LoopMoE saved with the GPT-2 tokenizer."""
    from loopmoe import LoopMoEForCausalLM
    from loopmoe.presets import get_preset

    torch.manual_seed(0)
    model = LoopMoEForCausalLM(get_preset("debug", vocab_size=len(gpt2_tokenizer), num_loops=2, num_core_layers=2))
    path = tmp_path_factory.mktemp("loopmoe")
    model.save_pretrained(path)
    gpt2_tokenizer.save_pretrained(path)
    return path


@pytest.fixture(scope="session")
def gpt2_dir(tmp_path_factory, gpt2_tokenizer):
    """A randomly initialised tiny GPT2LMHeadModel saved with the GPT-2 tokenizer."""
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    config = GPT2Config(vocab_size=len(gpt2_tokenizer), n_positions=512, n_embd=32, n_layer=2, n_head=2)
    path = tmp_path_factory.mktemp("gpt2")
    GPT2LMHeadModel(config).save_pretrained(path)
    gpt2_tokenizer.save_pretrained(path)
    return path


def _run_eval(argv: list[str]) -> int:
    from loopmoe.cli import eval as eval_cli

    parser = argparse.ArgumentParser(prog="loopmoe")
    eval_cli.add_parser(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(["eval", *argv])
    return args.run(args)


@pytest.fixture
def run_eval():
    """``run_eval(argv)`` runs ``loopmoe eval ARGV`` in-process through the subcommand's own parser."""
    return _run_eval
