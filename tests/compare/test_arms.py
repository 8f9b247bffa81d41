"""The arms of a comparison: the granularity control's shape, ablations that switch one thing, specs that validate."""

import pytest

from loopmoe.balance import DEFAULT_STRATEGY, balance, granularity_control
from loopmoe.compare import CompareOptions
from loopmoe.compare.arms import ArmSpec, arm_spec_from_table, resolve_arms
from loopmoe.model import LoopMoEForCausalLM
from loopmoe.presets import get_preset


def _params(config) -> int:
    return sum(p.numel() for p in LoopMoEForCausalLM(config).parameters())


@pytest.mark.parametrize("loops", [2, 4])
def test_granularity_control_has_the_looped_experts_at_the_reference_total(loops):
    reference = get_preset("small")
    result = balance(reference, loops, strategy="capacity", seq_len=256)
    control = granularity_control(result)
    looped = result.looped
    # the looped model's experts, the reference's everything else, no looping
    assert (control.moe_intermediate_size, control.num_experts_per_tok) == (
        looped.moe_intermediate_size,
        looped.num_experts_per_tok,
    )
    assert control.shared_expert_intermediate_size == looped.shared_expert_intermediate_size
    assert control.num_loops == 1 and control.iter_conditioning == "none"
    for key in ("hidden_size", "num_core_layers", "num_attention_heads", "num_key_value_heads", "head_dim"):
        assert getattr(control, key) == getattr(reference, key)
    assert control.num_experts != reference.num_experts
    # total parameters, counted on the real models: the closest expert count, so within half of
    # one expert per layer, and neither neighbour is closer
    target = _params(reference)
    actual = _params(control)
    one_expert_everywhere = _params(control.__class__(**{**control.to_dict(), "num_experts": control.num_experts + 1}))
    step = one_expert_everywhere - actual
    assert abs(actual - target) <= step / 2
    assert abs(actual - target) / target < 0.02
    for neighbour in (control.num_experts - 1, control.num_experts + 1):
        other = _params(control.__class__(**{**control.to_dict(), "num_experts": neighbour}))
        assert abs(other - target) >= abs(actual - target)


def test_ablations_switch_only_their_setting_and_balancing_settings_rebalance():
    opts = CompareOptions(
        arms=("reference", "looped", "granularity", "cond", "sandwich", "T4", "naive"),
        arm={
            "cond": ArmSpec("looped", iter_conditioning="none", seeds=(0,)),
            "sandwich": ArmSpec("looped", norm_scheme="depth_scaled_sandwich"),
            "T4": ArmSpec("looped", num_loops=4),
            "naive": ArmSpec("looped", strategy="naive"),
        },
    ).validate()
    arms = resolve_arms(opts, get_preset("small"))
    looped = arms["looped"].config.architecture_dict()
    for name, key, value in (
        ("cond", "iter_conditioning", "none"),
        ("sandwich", "norm_scheme", "depth_scaled_sandwich"),
    ):
        changed = arms[name].config.architecture_dict()
        assert changed[key] == value
        assert {k: v for k, v in changed.items() if k != key} == {k: v for k, v in looped.items() if k != key}
    assert arms["T4"].config.num_loops == 4 and arms["T4"].balanced.strategy == opts.strategy == DEFAULT_STRATEGY
    assert arms["naive"].config.moe_intermediate_size == get_preset("small").moe_intermediate_size
    assert arms["granularity"].config.num_experts == granularity_control(arms["looped"].balanced).num_experts
    assert arms["cond"].seeds == (0,) and arms["looped"].seeds == opts.seeds
    # runs: seed by seed through the arms on --seeds, then the arms with seeds of their own
    assert CompareOptions(
        seeds=(0, 1), arms=("reference", "cond", "looped"), arm={"cond": ArmSpec("looped", seeds=(5,))}
    ).run_plan() == [(0, "reference"), (0, "looped"), (1, "reference"), (1, "looped"), (5, "cond")]


@pytest.mark.parametrize(
    ("table", "message"),
    [
        ({"num_loops": 4}, r"\[arm.x\] has no kind: add kind = one of"),
        ({"kind": "loooped"}, r"arm.x.kind = 'loooped': must be one of .*did you mean 'looped'"),
        ({"kind": "reference", "num_loops": 4}, r"sets num_loops, which a reference arm does not have"),
        ({"kind": "granularity", "iter_conditioning": "none"}, r"may set num_loops, strategy, prelude, .*lr\); remove"),
        ({"kind": "reference", "num_loops": 2}, r"it may set norm_scheme, qk_norm, initializer_range, lr\)"),
        ({"kind": "looped", "seeds": [-1]}, r"seed -1 is negative; seeds are whole numbers >= 0"),
        ({"kind": "looped", "seeds": [0, 0]}, r"names a seed twice"),
        ({"kind": "looped", "lr": 0.0}, r"lr = 0.0: must be a positive number"),
        ({"kind": "looped", "prelude": -1}, r"prelude = -1: must be a whole number of layers >= 0"),
        ({"kind": "looped", "iter_conditioning": "adaln"}, r"arm.x.iter_conditioning = 'adaln': must be one of"),
        ({"kind": "looped", "loops": 4}, r"unknown key 'arm.x.loops'.*num_loops"),
        ({"kind": "looped", "num_loops": 1}, r"needs at least 2 loops"),
        ({"kind": "looped", "seeds": []}, r"give at least one seed"),
    ],
)
def test_arm_tables_are_checked_naming_the_fix(table, message):
    with pytest.raises(ValueError, match=message):
        arm_spec_from_table("x", table)


def test_arm_names_and_selection_are_checked():
    with pytest.raises(ValueError, match=r"arm name 'a b' must be a folder name"):
        arm_spec_from_table("a b", {"kind": "looped"})
    with pytest.raises(
        ValueError,
        match=r"--arms: unknown arm 'granular'; choose from granularity, granularity_matched, looped, reference",
    ):
        CompareOptions(arms=("reference", "granular")).validate()
    with pytest.raises(ValueError, match="names an arm twice"):
        CompareOptions(arms=("looped", "looped")).validate()


def test_compare_derives_the_looped_model_budget_shows():
    """`loopmoe compare --reference paper-3b` trains the looped model `loopmoe budget paper-3b` shows: the
    balancing options are one set (BalanceOptions), hardware grid included (experts a multiple of 8)."""
    from loopmoe.cli.budget import BudgetOptions
    from loopmoe.cli.main import build_parser
    from loopmoe.options import options_from

    reference = get_preset("paper-3b")
    opts = CompareOptions(reference="paper-3b", num_loops=4, seq_len=2048).validate()
    looped = resolve_arms(opts, reference)["looped"].config
    budget = options_from(
        BudgetOptions, build_parser().parse_args(["budget", "paper-3b", "--num-loops", "4", "--seq-len", "2048"])
    )
    shown = budget.derive(reference, 4, seq_len=2048, iter_conditioning=budget.iter_conditioning).looped
    assert looped.architecture_dict() == shown.architecture_dict()
    assert looped.num_experts % 8 == 0 and looped.head_dim % 16 == 0
