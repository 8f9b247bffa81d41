"""Test-wide settings: never touch a hub, keep CPU threads predictable, shared tiny configs."""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pytest
import torch

torch.set_num_threads(2)

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
