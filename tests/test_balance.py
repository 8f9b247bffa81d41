"""Capacity balancing meets its targets on real models, and fails clearly when it cannot."""

import pytest

from loopmoe import LoopMoEForCausalLM
from loopmoe.balance import balance, granularity_control
from loopmoe.presets import get_preset


@pytest.mark.parametrize(
    "preset, loops, seq_len",
    [("debug", 2, 128), ("small", 2, 256), ("small", 4, 1024), ("bench", 4, 1024), ("paper-3b", 4, 2048)],
)
def test_capacity_balancing_meets_tolerances(preset, loops, seq_len):
    result = balance(get_preset(preset), loops, seq_len=seq_len)
    ref, looped = result.reference, result.looped
    assert abs(result.deviations["total_params"]) <= 0.01
    assert abs(result.deviations["flops_per_token"]) <= 0.01
    assert abs(result.deviations["attn_ffn_ratio"]) <= 0.05
    assert looped.executed_depth() == ref.executed_depth()
    assert (looped.hidden_size, looped.vocab_size) == (ref.hidden_size, ref.vocab_size)
    assert looped.num_loops == loops and looped.iter_conditioning == "iteradaln"


def test_balanced_budget_is_the_real_models_budget():
    result = balance(get_preset("debug"), 2, seq_len=128)
    for cfg, budget in ((result.reference, result.reference_budget), (result.looped, result.looped_budget)):
        assert sum(p.numel() for p in LoopMoEForCausalLM(cfg).parameters()) == budget.total_params


def test_naive_strategy_keeps_shapes_and_divides_ratio():
    result = balance(get_preset("debug"), 4, strategy="naive", seq_len=128)
    ref, looped = result.reference, result.looped
    assert (looped.num_attention_heads, looped.head_dim, looped.moe_intermediate_size) == (
        ref.num_attention_heads,
        ref.head_dim,
        ref.moe_intermediate_size,
    )
    assert looped.num_experts > ref.num_experts
    assert result.deviations["attn_ffn_ratio"] == pytest.approx(-0.75, abs=1e-6)
    assert abs(result.deviations["total_params"]) <= 0.01


def test_prelude_and_coda():
    result = balance(get_preset("small"), 2, seq_len=256, num_prelude_layers=1, num_coda_layers=1)
    looped = result.looped
    assert (looped.num_prelude_layers, looped.num_core_layers, looped.num_coda_layers) == (1, 1, 1)
    assert abs(result.deviations["flops_per_token"]) <= 0.01


def test_infeasible_target_names_what_to_change():
    with pytest.raises(ValueError) as err:
        balance(get_preset("debug"), 4, seq_len=2048)
    message = str(err.value)
    assert "attn_ffn_ratio" in message or "flops_per_token" in message
    assert "Try another loop count" in message


def test_bad_loop_counts_and_references():
    with pytest.raises(ValueError, match="divisors of 4"):
        balance(get_preset("debug"), 3)
    with pytest.raises(ValueError, match="must be a Vanilla MoE"):
        balance(get_preset("debug", num_loops=2, num_core_layers=2), 2)
    with pytest.raises(ValueError, match="strategy must be one of"):
        balance(get_preset("debug"), 2, strategy="magic")


@pytest.mark.parametrize(
    "reference, loops, target",
    [
        (get_preset("small"), 1, "dcca"),  # a Vanilla MoE with DCCA experts against a SwiGLU one
        (get_preset("small", shared_expert_intermediate_size=128), 2, "dcca"),
        (get_preset("small", expert_type="dcca"), 2, None),  # a DCCA reference, DCCA by default
        (get_preset("small", expert_type="dcca", dcca_dim=48), 2, "swiglu"),
    ],
)
def test_balancing_to_and_from_dcca_experts(reference, loops, target):
    """BigMac's low-dimension experts as a reference or a target: the budgets still match, and
    they are the real models' (projections and r-wide experts counted)."""
    result = balance(reference, loops, seq_len=256, expert_type=target)
    looped = result.looped
    assert looped.expert_type == (target or reference.expert_type)
    if looped.expert_type == "dcca":  # the reference's r, or BigMac's d / 4 against a SwiGLU reference
        assert looped.dcca_dim == (reference.dcca_dim or reference.hidden_size // 4)
        assert looped.dcca_router_input == "hidden"
    else:
        assert looped.dcca_dim is None
    assert abs(result.deviations["total_params"]) <= 0.01
    assert abs(result.deviations["flops_per_token"]) <= 0.01
    assert abs(result.deviations["attn_ffn_ratio"]) <= 0.05
    if reference.shared_expert_intermediate_size:  # shared experts keep their share of the FFN weights
        assert looped.shared_expert_intermediate_size > 0
    for cfg, budget in ((result.reference, result.reference_budget), (looped, result.looped_budget)):
        assert sum(p.numel() for p in LoopMoEForCausalLM(cfg).parameters()) == budget.total_params


def test_dcca_target_errors_name_the_fix():
    with pytest.raises(ValueError, match=r"0 < r < hidden_size \(64\)"):
        balance(get_preset("debug"), 2, expert_type="dcca", dcca_dim=64)
    with pytest.raises(ValueError, match="set expert_type='dcca', or drop dcca_dim"):
        balance(get_preset("debug"), 2, dcca_dim=16)
    with pytest.raises(ValueError, match="expert_type must be one of"):
        balance(get_preset("debug"), 2, expert_type="bigmac")


def test_granularity_control_of_a_dcca_model_takes_its_experts():
    result = balance(get_preset("small"), 2, seq_len=256, expert_type="dcca")
    control = granularity_control(result)
    looped = result.looped
    assert (control.num_loops, control.expert_type, control.dcca_dim) == (1, "dcca", looped.dcca_dim)
    assert (control.moe_intermediate_size, control.num_experts_per_tok) == (
        looped.moe_intermediate_size,
        looped.num_experts_per_tok,
    )
    assert sum(p.numel() for p in LoopMoEForCausalLM(control).parameters()) == pytest.approx(
        result.reference_budget.total_params, rel=0.02
    )


def _loop_counts(preset: str) -> list[int]:
    depth = get_preset(preset).executed_depth()
    return [t for t in (2, 3, 4) if depth % t == 0]


@pytest.mark.parametrize("preset, loops", [(p, t) for p in ("paper-3b", "paper-9b") for t in _loop_counts(p)])
def test_hardware_multiples_hold_on_paper_presets_and_budgets_still_match(preset, loops):
    result = balance(get_preset(preset), loops, expert_multiple=8, head_dim_multiple=16)
    looped = result.looped
    assert looped.num_experts % 8 == 0 and looped.head_dim % 16 == 0
    for target, tolerance in result.tolerances.items():
        assert abs(result.deviations[target]) <= tolerance, target
    assert looped.executed_depth() == result.reference.executed_depth()


@pytest.mark.parametrize("preset, loops", [(p, t) for p in ("debug", "small", "bench") for t in _loop_counts(p)])
def test_hardware_multiples_on_small_presets_hold_or_name_the_constraint(preset, loops):
    # E' of a few dozen cannot move in steps of 8 and keep 1% parameters: the error says what to relax.
    try:
        result = balance(get_preset(preset), loops, expert_multiple=8)
    except ValueError as e:
        assert "relax expert_multiple (--expert-multiple, now 8)" in str(e)
    else:
        assert result.looped.num_experts % 8 == 0
        assert all(abs(result.deviations[k]) <= tol for k, tol in result.tolerances.items())


def test_expert_multiple_one_is_the_unconstrained_solver():
    assert balance(get_preset("bench"), 4, expert_multiple=1).looped == balance(get_preset("bench"), 4).looped
    with pytest.raises(ValueError, match="expert_multiple must be a whole number >= 1"):
        balance(get_preset("bench"), 4, expert_multiple=0)
    with pytest.raises(ValueError, match="head_dim_multiple must be even"):
        balance(get_preset("bench"), 4, head_dim_multiple=9)
