"""LoopMoEConfig validates itself and names the fix."""

import pytest
from transformers import AutoConfig

from loopmoe import LoopMoEConfig


@pytest.mark.parametrize(
    "overrides, message",
    [
        ({"num_attention_heads": 6, "num_key_value_heads": 4}, "multiple of num_key_value_heads"),
        ({"num_experts_per_tok": 5}, "cannot exceed num_experts"),
        ({"iter_conditioning": "adaln"}, "iter_conditioning must be one of"),
        ({"input_injection": "add"}, "needs num_loops > 1"),
        ({"norm_scheme": "post"}, "norm_scheme must be one of"),
        ({"router_score": "relu"}, "router_score must be one of"),
        ({"head_dim": 7}, "even"),
        ({"num_loops": 0}, "num_loops must be a positive integer"),
        ({"num_loops": 8, "iter_conditioning": "iter_embedding", "max_loops": 4}, "raise max_loops"),
        ({"router_aux_loss_coef": -1.0}, ">= 0"),
    ],
)
def test_invalid_configs_name_the_fix(tiny_config, overrides, message):
    with pytest.raises(ValueError, match=message):
        tiny_config(**overrides)


def test_derived_defaults(tiny_config):
    assert tiny_config(num_loops=1).iter_conditioning == "none"
    assert tiny_config(num_loops=3).iter_conditioning == "iteradaln"
    assert LoopMoEConfig(hidden_size=1024).iter_cond_rank == 64
    cfg = tiny_config(num_loops=3, num_prelude_layers=1, num_coda_layers=2)
    assert cfg.executed_depth() == 1 + 2 * 3 + 2 == cfg.num_hidden_layers
    assert cfg.executed_depth(num_loops=5) == 13
    assert cfg.unique_layers == 5


def test_config_round_trips_through_auto_config(tiny_config, tmp_path):
    cfg = tiny_config(num_loops=2, norm_scheme="sandwich", input_injection="concat")
    cfg.save_pretrained(tmp_path)
    loaded = AutoConfig.from_pretrained(tmp_path)
    assert isinstance(loaded, LoopMoEConfig)
    assert loaded.architecture_dict() == cfg.architecture_dict()
