"""Study v2 (issue 23): fair arms, per-run identity, pre-registered statistics, diagnostics, chance caveats."""

import json

import pytest

from loopmoe.balance import balance, matched_granularity_control
from loopmoe.compare import CompareOptions
from loopmoe.compare.arms import ArmSpec, resolve_arms
from loopmoe.compare.diagnostics import clipped_fraction, dead_experts, held_out_gap
from loopmoe.compare.report import _downstream_section, arm_balancings, at_chance, budget_table
from loopmoe.compare.results import ArmRecord, RunRecord
from loopmoe.compare.stats import paired_difference
from loopmoe.compare.verdict import Declared, formulation, held_out_comparisons, single_seed_sentence, verdict
from loopmoe.evaluation.depth import DepthCurve
from loopmoe.evaluation.pipeline import RunEvaluation
from loopmoe.presets import get_preset
from tests.compare import TINY_COMPARE


def test_budget_table_shows_where_the_flops_go_and_marks_the_targets():
    table = budget_table(balance(get_preset("small"), 2, seq_len=256, strategy="per_layer"))
    for row in (
        "attention FLOPs/token",
        "executed FFN FLOPs/token",
        "IterAdaLN FLOPs/token",
        "rho_unique",
        "rho_per_layer",
    ):
        assert row in table
    per_layer = next(line for line in table.splitlines() if "rho_per_layer" in line)
    unique = next(line for line in table.splitlines() if "rho_unique" in line)
    assert "(target)" in per_layer and "(target)" not in unique  # per_layer's own reading is enforced
    naive = budget_table(balance(get_preset("small"), 2, seq_len=256, strategy="naive"))
    assert "reported, not enforced" in naive


def test_new_arm_kinds_and_settings_build_what_they_say():
    opts = CompareOptions(
        arms=("reference", "looped", "gm", "ref-sandwich", "ref-lr", "placed"),
        arm={
            "gm": ArmSpec("granularity_matched"),
            "ref-sandwich": ArmSpec("reference", norm_scheme="depth_scaled_sandwich", qk_norm=False),
            "ref-lr": ArmSpec("reference", lr=1.5e-3),
            "placed": ArmSpec("looped", prelude=1, coda=1),
        },
    ).validate()
    arms = resolve_arms(opts, get_preset("small"))
    assert (
        arms["gm"].config.architecture_dict()
        == matched_granularity_control(arms["looped"].balanced).architecture_dict()
    )
    assert arms["gm"].config.num_loops == 1
    ref = arms["ref-sandwich"].config
    assert (ref.norm_scheme, ref.qk_norm, ref.num_loops) == ("depth_scaled_sandwich", False, 1)
    assert arms["ref-lr"].lr == 1.5e-3 and arms["reference"].lr is None
    placed = arms["placed"].config
    assert (placed.num_prelude_layers, placed.num_core_layers, placed.num_loops, placed.num_coda_layers) == (1, 1, 2, 1)
    from loopmoe.compare.runner import arm_run_config

    assert arm_run_config(opts, arms["ref-lr"], 0).optim.lr == 1.5e-3
    assert arm_run_config(opts, arms["reference"], 0).optim.lr == opts.lr


def test_study_config_syntax_and_validation_before_anything_trains(tmp_path):
    config = tmp_path / "s.toml"
    config.write_text(
        'seeds = [0, 1, 2]\narms = ["reference", "looped", "gm", "bad"]\nprimary = ["looped", "reference"]\n'
        '[arm.gm]\nkind = "granularity_matched"\n[arm.bad]\nkind = "looped"\nseeds = [-1]\n'
    )
    with pytest.raises(ValueError, match=r"\[arm.bad\] seeds = \[-1\]: seed -1 is negative"):
        CompareOptions.from_toml(config)
    config.write_text('seeds = [0, 1]\narms = ["reference", "looped"]\nprimary = ["looped", "granularity"]\n')
    with pytest.raises(ValueError, match=r"--primary: 'granularity' is not an arm of this study"):
        CompareOptions.from_toml(config).validate()
    config.write_text('arms = ["reference", "looped"]\nprimary = ["looped", "reference"]\n')
    with pytest.raises(ValueError, match=r"share 1 seed\(s\); a paired test needs at least 2"):
        CompareOptions.from_toml(config).validate()
    with pytest.raises(ValueError, match=r"--seeds = \[0, -2\]: seed -2 is negative"):
        CompareOptions(seeds=(0, -2)).validate()
    ok = CompareOptions(seeds=(0, 1), primary=("looped", "reference")).validate()
    assert ok.primary == ("looped", "reference")


@pytest.mark.parametrize(
    ("secondary", "error"),
    [
        ('["looped-reference"]', r"'looped-reference' is not a difference of two different arms: write 'A - B'"),
        ('["looped - looped"]', r"is not a difference of two different arms"),
        ('["looped - granularity"]', r"'granularity' is not an arm of this study"),
        ('["reference - looped"]', r"is the primary comparison; a secondary is another pair"),
        ('["gm - reference", "reference - gm"]', r"'reference - gm' compares the same two arms as an earlier entry"),
    ],
)
def test_declared_secondaries_are_checked_before_anything_trains(tmp_path, secondary, error):
    config = tmp_path / "s.toml"
    config.write_text(
        'seeds = [0, 1]\narms = ["reference", "looped", "gm"]\nprimary = ["looped", "reference"]\n'
        f'secondary = {secondary}\n[arm.gm]\nkind = "granularity_matched"\n'
    )
    with pytest.raises(ValueError, match=error):
        CompareOptions.from_toml(config).validate()


def test_declared_secondaries_are_the_whole_holm_family():
    arms = {"reference": _arm("reference"), "looped": _arm("looped"), "pl": _arm("looped", strategy="per_layer")}
    runs = {
        "reference": {0: _run(5.00), 1: _run(5.10), 2: _run(4.95)},
        "looped": {0: _run(5.05), 1: _run(5.16), 2: _run(4.99)},
        "pl": {0: _run(4.98), 1: _run(5.09), 2: _run(4.96)},
    }
    options = {"primary": ["pl", "reference"], "secondary": ["pl - looped"]}
    declared = Declared.from_options(options)
    assert declared == Declared(("pl", "reference"), (("pl", "looped"),))
    found = held_out_comparisons(runs, arms, declared)
    assert [(c.a, c.b, c.role) for c in found] == [("pl", "reference", "primary"), ("pl", "looped", "secondary")]
    (second,) = [c for c in found if c.role == "secondary"]
    assert second.holm is not None and second.holm.adjusted == pytest.approx(second.d.p_value)  # a family of one
    undeclared = {(c.a, c.b) for c in held_out_comparisons(runs, arms, Declared(("pl", "reference")))}
    assert ("looped", "reference") in undeclared  # without a declaration every pair the report shows is compared
    assert Declared.from_options({}) == Declared()


def _run(val: float, seed_shift: float = 0.0, load=None, cosine=None, metrics=None) -> RunRecord:
    depth = DepthCurve(2, [], {}, load or {})
    return RunRecord(
        val_loss=val + seed_shift,
        train_loss=val + 0.2,
        final_dir="x",
        metrics=metrics or [],
        cost=[],
        eval=RunEvaluation(depth, load or {}, None, [], {}, cosine),
    )


def _arm(kind: str, **spec) -> ArmRecord:
    return ArmRecord(ArmSpec(kind, **spec), (0, 1, 2), {"num_loops": 2 if kind == "looped" else 1}, 1, 1, 1.0, 0.5, {})


def test_primary_alone_secondaries_holm_corrected_single_seed_against_the_prediction_interval():
    arms = {
        "reference": _arm("reference"),
        "looped": _arm("looped"),
        "per_layer": _arm("looped", strategy="per_layer"),
        "naive": _arm("looped", strategy="naive", seeds=(0,)),
    }
    runs = {
        "reference": {0: _run(5.00), 1: _run(5.10), 2: _run(4.95)},
        "looped": {0: _run(5.05), 1: _run(5.16), 2: _run(4.99)},
        "per_layer": {0: _run(4.98), 1: _run(5.09), 2: _run(4.96)},
        "naive": {0: _run(4.50)},
    }
    found = {(c.a, c.b): c for c in held_out_comparisons(runs, arms, Declared(("looped", "reference")))}
    assert found["looped", "reference"].role == "primary" and found["looped", "reference"].holm is None
    secondary = [c for c in found.values() if c.role == "secondary"]
    assert secondary and all(c.holm is not None and c.holm.adjusted >= c.d.p_value for c in secondary)
    assert found["naive", "reference"].role == "observation"
    words = single_seed_sentence("naive", "reference", found["naive", "reference"].d, runs)
    assert "outside the 95% prediction interval [" in words and "of reference over 3 seeds" in words
    options = {"lr": 3e-3, "strategy": "capacity", "primary": ["looped", "reference"]}
    sentences = verdict(runs, arms, None, options=options)
    assert sentences[0].startswith("Primary comparison (declared before the runs): ")
    assert "capacity balancing, T = 2" in sentences[0] and "lr 0.003" in sentences[0]
    assert not any("looping does not pay" in s for s in sentences)
    assert "per_layer balancing" in formulation("per_layer", arms, {"lr": 3e-3})


def test_a_difference_that_fails_holm_is_not_established():
    from loopmoe.compare.stats import holm
    from loopmoe.compare.verdict import judge

    d = paired_difference({0: 4.90, 1: 5.04, 2: 4.84}, {0: 5.00, 1: 5.10, 2: 4.95})  # p ~ 0.03
    failed = holm({"x": d.p_value, "y": 0.9, "z": 0.9, "w": 0.9, "v": 0.9, "u": 0.9, "t": 0.9, "s": 0.9})["x"]
    assert not failed.rejected
    finding = judge("looped", "reference", d, adjusted=failed, family=8)
    assert finding.outcome == "not_established" and "Holm correction" in finding.sentence


def test_diagnostics_from_stored_measurements():
    assert dead_experts({"core.0@0": [0.5, 0.46, 0.03, 0.01]}) == {"core.0@0": (1, 4)}  # 0.1 x 1/4 = 0.025
    steps = [{"grad_norm": g} for g in (0.5, 1.5, 2.0, 0.9)] + [{"grad_norm": 9.0, "skipped": True}]
    assert clipped_fraction(steps, 1.0) == 0.5 and clipped_fraction(steps, 0.0) is None
    a = {0: _run(0, metrics=[{"tokens": 10, "val_loss": 5.0}, {"tokens": 20, "val_loss": 4.5}])}
    b = {0: _run(0, metrics=[{"tokens": 10, "val_loss": 5.2}, {"tokens": 20, "val_loss": 4.4}])}
    assert held_out_gap(a, b) == {10: [pytest.approx(-0.2)], 20: [pytest.approx(0.1)]}


def test_downstream_table_says_when_every_arm_is_at_chance():
    at = {
        "task": "copa",
        "metric": "acc",
        "value": 0.52,
        "stderr": 0.05,
        "n": 100,
        "stderr_over": "documents",
        "seeds": 1,
    }
    off = {**at, "value": 0.75}
    assert at_chance(at) and not at_chance(off) and at_chance({**at, "task": "custom"}) is None
    lines = "\n".join(_downstream_section({"reference": [at], "looped": [dict(at, value=0.49)]}))
    assert "every arm at chance: no signal" in lines and "1 of 1 task metrics have every arm at chance" in lines
    assert "every arm at chance" not in "\n".join(_downstream_section({"reference": [at], "looped": [off]}))


def test_study_folder_accepts_new_arms_and_seeds_and_refuses_changed_runs(tmp_path, monkeypatch):
    """Train one run; add a seed and an arm: only the new runs train. Change an arm's lr: refused before anything
    trains, one line naming the fix; --fresh moves only that run aside."""
    import loopmoe.training
    from loopmoe.compare import runner

    base = dict(TINY_COMPARE, tasks=(), text="", depth_loops=(), out=tmp_path / "cmp")
    trained: list[str] = []
    real = loopmoe.training.run_training

    def spy(cfg, run_dir, *args, **kwargs):
        trained.append(str(run_dir.relative_to(tmp_path / "cmp")))
        return real(cfg, run_dir, *args, **kwargs)

    monkeypatch.setattr(loopmoe.training, "run_training", spy)
    monkeypatch.setattr(runner.torch, "set_num_threads", lambda n: None)
    runner.run_comparison(CompareOptions(**base, arms=("reference",), seeds=(0,)), log=lambda *a: None)
    assert trained == ["seed0/reference"]
    stored = json.loads((tmp_path / "cmp" / "seed0" / "reference" / "compare_run.json").read_text())
    assert stored["arm"] == "reference" and stored["run_config"]["optim"]["lr"] == base.get("lr", 3e-3)
    trained.clear()
    more = dict(
        base, arms=("reference", "ref-lr"), arm={"ref-lr": ArmSpec("reference", lr=1e-3, seeds=(0,))}, seeds=(0, 1)
    )
    results = runner.run_comparison(CompareOptions(**more), log=lambda *a: None)
    assert trained == ["seed1/reference", "seed0/ref-lr"]
    assert set(results.runs["reference"]) == {0, 1} and (tmp_path / "cmp" / "report.md").is_file()
    trained.clear()
    changed = dict(more, arm={"ref-lr": ArmSpec("reference", lr=2e-3, seeds=(0,))})
    with pytest.raises(
        ValueError, match=r"seed0/ref-lr holds a run trained with other settings.*optim.lr 0.001 -> 0.002.*--fresh"
    ):
        runner.run_comparison(CompareOptions(**changed), log=lambda *a: None)
    assert trained == []
    runner.run_comparison(CompareOptions(**changed, fresh=True), log=lambda *a: None)
    assert trained == ["seed0/ref-lr"] and (tmp_path / "cmp" / "seed0" / "ref-lr.prev-1" / "final").is_dir()


def test_a_study_of_both_strategies_gets_a_budget_table_for_each():
    opts = CompareOptions(
        strategy="capacity",
        arms=("reference", "looped", "pl", "pl-T2", "gm"),
        arm={
            "pl": ArmSpec("looped", strategy="per_layer"),
            "pl-T2": ArmSpec("looped", strategy="per_layer", lr=1e-3),
            "gm": ArmSpec("granularity_matched"),
        },
    ).validate()
    balancings = arm_balancings(resolve_arms(opts, get_preset("small")))
    assert [b.strategy for b in balancings] == ["capacity", "per_layer"]
