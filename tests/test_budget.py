"""Analytic budgets: formulas of docs/design.md §6, and the FLOP audit's own correctness."""

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from loopmoe import LoopMoEForCausalLM
from loopmoe.budget import compute_budget
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
