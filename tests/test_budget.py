"""Analytic budgets: formulas of docs/design.md §6, and the FLOP audit's own correctness."""

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from loopmoe import LoopMoEForCausalLM
from loopmoe.budget import all_to_all_bytes_per_token, all_to_all_row_bytes, compute_budget
from loopmoe.flops import count_forward_flops


def test_vanilla_budget_matches_design_formulas(tiny_config):
    cfg = tiny_config(shared_expert_intermediate_size=8)
    d, H, Hkv, hd, E, k, f, fs, V, L, S = 32, 4, 2, 8, 4, 2, 16, 8, 97, 2, 64
    A = d * H * hd + 2 * d * Hkv * hd + H * hd * d
    F, G, R = 3 * d * f, 3 * d * fs, d * E
    norms = 2 * hd + 2 * d
    b = compute_budget(cfg, S)
    assert b.total_params == L * (A + norms + E * F + G + R) + 2 * V * d + d
    assert b.active_params == L * (A + norms + k * F + G + R) + 2 * V * d + d
    assert b.flops_per_token == 2 * L * (A + k * F + G + R) + L * 4 * hd * H * S + 2 * V * d
    assert b.attn_ffn_ratio == pytest.approx((A + 2 * hd) / (k * F + G))


@pytest.mark.parametrize("router_input", ["hidden", "descended"])
def test_dcca_budget_matches_design_formulas_and_the_model(tiny_config, router_input):
    """BigMac's DCCA layer: experts at width r, plus the descending and ascending projections."""
    cfg = tiny_config(
        expert_type="dcca", dcca_dim=12, dcca_router_input=router_input, shared_expert_intermediate_size=8
    )
    d, r, H, Hkv, hd, E, k, f, fs, V, L, S = 32, 12, 4, 2, 8, 4, 2, 16, 8, 97, 2, 64
    A = d * H * hd + 2 * d * Hkv * hd + H * hd * d
    F, G, D = 3 * r * f, 3 * d * fs, 2 * d * r
    R = (d if router_input == "hidden" else r) * E
    norms = 2 * hd + 2 * d
    b = compute_budget(cfg, S)
    assert b.total_params == L * (A + norms + E * F + G + R + D) + 2 * V * d + d
    assert b.active_params == L * (A + norms + k * F + G + R + D) + 2 * V * d + d
    assert b.flops_per_token == 2 * L * (A + k * F + G + R + D) + L * 4 * hd * H * S + 2 * V * d
    assert b.attn_ffn_ratio == pytest.approx((A + 2 * hd) / (k * F + G + D))
    model = LoopMoEForCausalLM(cfg).eval()
    assert sum(p.numel() for p in model.parameters()) == b.total_params
    x = torch.randint(0, 97, (2, 64))
    assert count_forward_flops(model, x) == pytest.approx(b.flops_per_token * x.numel(), rel=1e-6)


def test_all_to_all_bytes_per_token(tiny_config):
    """BigMac's eq. 1 per token: 2 * k * w * bytes * (ep - 1) / ep per executed MoE layer; DCCA sends r/d of it."""
    swiglu = tiny_config(num_loops=3, num_prelude_layers=1)  # 1 + 2 * 3 = 7 executed MoE layers
    dcca = tiny_config(num_loops=3, num_prelude_layers=1, expert_type="dcca", dcca_dim=12)
    assert all_to_all_bytes_per_token(swiglu, ep=4) == 2 * 2 * 32 * 2 * 3 / 4 * 7
    assert all_to_all_bytes_per_token(swiglu, ep=2, bytes_per_element=4, num_loops=1) == 2 * 2 * 32 * 4 / 2 * 3
    assert all_to_all_bytes_per_token(dcca, ep=8) / all_to_all_bytes_per_token(swiglu, ep=8) == pytest.approx(12 / 32)
    assert all_to_all_bytes_per_token(swiglu, ep=4, backward=True) == 4 * 2 * 32 * 2 * 3 / 4 * 7  # both passes
    assert all_to_all_row_bytes(dcca, bytes_per_element=4) == 2 * 12 * 4  # one exchange's send rows
    assert all_to_all_bytes_per_token(dcca, ep=1) == 0  # one rank: no rows leave it
    with pytest.raises(ValueError, match="ep must be a whole number >= 1"):
        all_to_all_bytes_per_token(dcca, ep=0)


def test_flops_grow_linearly_with_sequence_length(tiny_config):
    cfg = tiny_config(num_loops=2)
    b1, b2 = compute_budget(cfg, 100), compute_budget(cfg, 200)
    executed = cfg.executed_depth()
    assert b2.flops_per_token - b1.flops_per_token == executed * 4 * cfg.head_dim * cfg.num_attention_heads * 100


def test_audit_counts_attention_that_plain_flopcounter_misses(tiny_config):
    """torch's FlopCounterMode alone misses the CPU SDPA kernel; the audit must not."""
    model = LoopMoEForCausalLM(tiny_config()).eval()
    x = torch.randint(0, 97, (2, 64))
    audited = count_forward_flops(model, x)
    cfg = model.config
    scores = cfg.executed_depth() * 4 * cfg.head_dim * cfg.num_attention_heads * 64 * x.numel()
    with FlopCounterMode(display=False) as plain, torch.no_grad():
        model(input_ids=x, use_cache=False)
    assert audited - plain.get_total_flops() in (0, scores)  # 0 once torch learns the CPU kernel
    assert audited == pytest.approx(compute_budget(cfg, 64).flops_per_token * x.numel(), rel=1e-6)


def test_bad_seq_len(tiny_config):
    with pytest.raises(ValueError, match="seq_len"):
        compute_budget(tiny_config(), 0)
