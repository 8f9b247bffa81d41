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
        ({"expert_type": "bigmac"}, "expert_type must be one of"),
        (
            {"expert_type": "dcca", "dcca_dim": 0},
            r"0 < d_e < hidden_size \(32\), got 0; BigMac uses d_e = hidden_size // 4 = 8",
        ),
        ({"expert_type": "dcca", "dcca_dim": -4}, r"0 < d_e < hidden_size \(32\)"),
        ({"expert_type": "dcca", "dcca_dim": 32}, r"0 < d_e < hidden_size \(32\), got 32"),
        ({"expert_type": "dcca", "dcca_dim": 8.0}, "must be a whole number"),
        ({"dcca_dim": 8}, "set expert_type='dcca', or drop dcca_dim"),
        ({"dcca_router_input": "descended"}, "set expert_type='dcca', or drop dcca_router_input"),
        ({"expert_type": "dcca", "dcca_router_input": "low"}, "dcca_router_input must be one of"),
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
    assert tiny_config().dcca_dim is None
    assert tiny_config(expert_type="dcca").dcca_dim == 8  # BigMac's r = d / 4
    assert tiny_config(expert_type="dcca", dcca_dim=12).dcca_dim == 12


def test_config_round_trips_through_auto_config(tiny_config, tmp_path):
    cfg = tiny_config(
        num_loops=2, norm_scheme="sandwich", input_injection="concat", expert_type="dcca", dcca_router_input="descended"
    )
    cfg.save_pretrained(tmp_path)
    loaded = AutoConfig.from_pretrained(tmp_path)
    assert isinstance(loaded, LoopMoEConfig)
    assert loaded.architecture_dict() == cfg.architecture_dict()
