"""Test-wide settings: never touch a hub, keep CPU threads predictable, shared tiny configs."""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pytest
import torch

from loopmoe.testing.tiny_run import TINY_RUN  # a real two-step run of a tiny LoopMoE, through the export

torch.set_num_threads(2)


def pytest_collection_modifyitems(config, items):
    """Tests marked ``cuda`` (tests/gpu/) are skipped, with the reason, on a machine without a GPU."""
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU: torch.cuda.is_available() is False")
    for item in items:
        if item.get_closest_marker("cuda"):
            item.add_marker(skip)


def pytest_runtest_logreport(report):
    """With ``$LOOPMOE_RECORD_SKIPS`` set, append the node id of every skipped test to that file.

    ``.ci/run`` runs the suite once with the data folder hidden (a fresh clone without ../shared) and
    then, with the data, only the tests that skipped: both conditions, at about the cost of one run.
    """
    record = os.environ.get("LOOPMOE_RECORD_SKIPS")
    if record and report.skipped and report.when in ("setup", "call"):
        with open(record, "a", encoding="utf-8") as fh:
            fh.write(report.nodeid + "\n")


TINY = dict(
    vocab_size=97,
    hidden_size=32,
    num_core_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    head_dim=8,
    num_experts=4,
    num_experts_per_tok=2,
    moe_intermediate_size=16,
    max_position_embeddings=256,
    iter_cond_rank=16,
    iter_pe_dim=16,
)


@pytest.fixture
def tiny_config():
    """A factory of tiny LoopMoE configs: ``tiny_config(num_loops=3, ...)``."""
    from loopmoe import LoopMoEConfig

    def make(**overrides):
        return LoopMoEConfig(**{**TINY, **overrides})

    return make


@pytest.fixture(scope="session")
def trained_run(tmp_path_factory):
    """The output folder of a finished tiny training run (``final/`` holds the exported model)."""
    from pathlib import Path

    from loopmoe.training import load_run_config, run_training

    out = tmp_path_factory.mktemp("run")
    config = Path(__file__).resolve().parents[1] / "configs" / "debug.toml"
    run_training(load_run_config(config, TINY_RUN), out)
    return out
