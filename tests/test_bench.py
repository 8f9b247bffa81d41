"""The checks the benchmarks run before timing (``loopmoe.testing.hf_parity``), and how they turn
timings into ratios."""

import pytest
import torch

from bench import common
from loopmoe.testing import hf_parity

TINY = dict(
    hf_parity.QWEN_CONFIG,
    vocab_size=128,
    hidden_size=32,
    num_hidden_layers=2,
    num_attention_heads=2,
    num_key_value_heads=2,
    head_dim=16,
    intermediate_size=64,
    moe_intermediate_size=24,
    num_experts=4,
)


@pytest.fixture(scope="module")
def models():
    ref = hf_parity.qwen_model("grouped_mm", config=TINY)
    return hf_parity.ours_from_qwen(ref), ref


def test_converted_model_passes_the_logit_and_training_checks(models):
    ours, ref = models
    assert hf_parity.check_logits(ours, ref, vocab=TINY["vocab_size"]) < 1e-5
    ids = torch.randint(2, TINY["vocab_size"], (2, 16), generator=torch.Generator().manual_seed(0))
    diffs = hf_parity.check_training(ours.train(), ref.train(), ids)
    assert set(diffs) == {"loss", "lm_head_grad", "embedding_grad"} and max(diffs.values()) < 1e-5


def test_training_check_catches_a_wrong_model(models):
    ours, ref = models
    ids = torch.randint(2, TINY["vocab_size"], (2, 16), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ours.lm_head.weight[5] += 0.5
    try:
        with pytest.raises(AssertionError, match="differ from transformers"):
            hf_parity.check_training(ours.train(), ref.train(), ids)
    finally:
        with torch.no_grad():
            ours.lm_head.weight[5] -= 0.5


def test_speedup_pairs_runs_of_the_same_round():
    # Round 1 ran slowly for both (the machine drifted): paired ratios stay 2.0, the ratio of medians would not.
    stats = {
        "ours": {"median": 2.0, "rounds": {0: 1.0, 1: 3.0, 2: 2.0}},
        "ref": {"median": 5.0, "rounds": {0: 2.0, 1: 6.0, 3: 9.0}},
    }
    s = common.speedup(stats, "ours", "ref")
    assert s == {"median": 2.0, "min": 2.0, "max": 2.0, "pairs": 2}
    assert common.speedup({"a": {"median": 2.0}, "b": {"median": 3.0}}, "a", "b")["median"] == 1.5


def test_mfu_uses_a_saved_peak_only_from_this_machine(tmp_path, monkeypatch):
    """The results folder is committed: a peak another machine saved there must not become this one's."""
    import json

    from bench import peak_flops

    monkeypatch.setattr(common, "RESULTS", tmp_path)
    monkeypatch.setattr(peak_flops, "measure", lambda quick: {"peak_gflops": 7.0})
    saved = {"machine": {**common.machine(), "isa": "another ISA"}, "peak_gflops": 155.4}
    (tmp_path / "peak_flops.json").write_text(json.dumps(saved))
    assert peak_flops.peak_gflops() == 7.0  # measured here
    (tmp_path / "peak_flops.json").write_text(json.dumps({**saved, "machine": common.machine()}))
    assert peak_flops.peak_gflops() == 155.4


def test_the_adaptive_depth_bench_runs_every_path(capsys):
    """``bench.adaptive_depth --smoke``: a two-step looped model through the sweep (fixed depth beside every
    criterion), the batch-1 timings against executed iterations and both batched decoders; writes nothing."""
    from bench import adaptive_depth

    adaptive_depth.main(["--smoke"])
    out = capsys.readouterr().out
    assert "held-out tokens: validation split" in out  # the run's own validation documents
    assert "fixed depth        1" in out and "timed policy" in out
    for case in ("T1:", "adaptive:", "full:", "engine_exit", "lockstep_full"):
        assert case in out


def test_plan_vs_measured_builds_every_configuration_and_refuses_an_unknown_one():
    """Every configuration the planner bench trains is a valid run config, the compare arms as compare builds
    them; a misspelt ``--only`` fails before the calibration."""
    from bench import plan_vs_measured
    from loopmoe.errors import ConfigError
    from loopmoe.training import build_model_config, config_from_dict
    from loopmoe.training.builders import planned_vocab_size

    cases = plan_vs_measured.configs()
    assert {"vanilla", "debug_T2", "small_loop", "compare_reference", "compare_looped"} <= set(cases)
    loops = {}
    for name, case in cases.items():
        cfg = config_from_dict(case.raw).validate(case.processes)
        loops[name] = build_model_config(cfg, planned_vocab_size(cfg)[0]).num_loops
    assert loops["vanilla"] == 1 and loops["debug_T2"] == 2
    assert loops["compare_reference"] == 1 and loops["compare_looped"] == 2
    with pytest.raises(ConfigError, match="--only: no configuration nope"):
        plan_vs_measured.run(quick=True, steps=1, only=["nope"])
    with pytest.raises(ConfigError, match="--profile: T2_ddp2 is not a single-process configuration"):
        plan_vs_measured.profile_configs(["vanilla", "T2_ddp2"], steps=1)


def test_the_loop_bench_widens_the_reference_keeping_head_size_and_depth():
    from bench.loop_vs_vanilla import WIDTHS, configs, widened

    reference = configs(2)[0]
    for width, _ in WIDTHS:
        wide = widened(reference, width)
        assert wide.hidden_size == width and wide.num_attention_heads * wide.head_dim == width
        assert (wide.head_dim, wide.num_core_layers, wide.num_experts) == (
            reference.head_dim,
            reference.num_core_layers,
            reference.num_experts,
        )
        assert wide.moe_intermediate_size * reference.hidden_size == reference.moe_intermediate_size * width
