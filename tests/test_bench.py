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


def test_the_kernel_ceiling_names_each_gemm_and_sums_only_kernels():
    """``bench.kernel_ceiling``: a GEMM's dimensions say what it computes (the vocabulary before an expert
    width equal to the LM head's chunk rows), and a profiled step's kernel time is its GEMMs and attention,
    at most the step's wall time."""
    from bench import kernel_ceiling
    from bench.loop_vs_vanilla import configs
    from loopmoe.model import LoopMoEForCausalLM
    from loopmoe.presets import get_preset

    vanilla, looped = configs(2)
    assert kernel_ceiling.gemm_dims("aten::mm", [[512, 256], [256, 8192]]) == (512, 8192, 256, 1)
    assert kernel_ceiling.gemm_dims("aten::addmm_", [[8192, 256], [8192, 512], [512, 256]]) == (8192, 256, 512, 1)
    assert kernel_ceiling.gemm_dims("aten::addmm", [[16], [2048, 256], [256, 16]]) == (2048, 16, 256, 1)
    assert kernel_ceiling.gemm_dims("aten::bmm", [[32, 256, 64], [32, 64, 256]]) == (256, 256, 64, 32)
    kind = kernel_ceiling.gemm_kind
    assert kind(vanilla, (8192, 256, vanilla.moe_intermediate_size)) == "lm_head"
    assert kind(vanilla, (241, vanilla.moe_intermediate_size, 256)) == "experts"
    assert kind(vanilla, (2048, vanilla.num_experts, 256)) == "router"
    assert kind(vanilla, (2048, 256, 256)) == "attention_proj"
    assert kind(looped, (2048, looped.iter_cond_rank, 256)) == "iteradaln"
    assert kind(looped, (256, 2 * looped.moe_intermediate_size, 300)) == "experts"

    cfg = get_preset("debug", num_loops=2, vocab_size=256, moe_intermediate_size=96)  # widths told apart
    model = LoopMoEForCausalLM(cfg).train()
    ids = torch.randint(1, 256, (2, 32))
    prof = kernel_ceiling.kernel_profile(common.fwd_bwd(model, ids), cfg)
    assert {"lm_head", "experts", "iteradaln", "attention_proj"} <= set(prof["gemms"])
    assert all(g["s"] > 0 and g["gflops_per_s"] > 0 for g in prof["gemms"].values())
    assert prof["attention_s"] > 0
    assert prof["kernel_s"] == pytest.approx(sum(g["s"] for g in prof["gemms"].values()) + prof["attention_s"])
    assert prof["kernel_s"] < prof["wall_s"]


def test_the_gpu_check_states_the_planner_prediction_or_why_there_is_none(tmp_path, monkeypatch):
    """``bench.gpu_check``'s throughput rows carry ``loopmoe plan``'s prediction of the same step: none,
    with the reason, on a machine without a CPU calibration; with one, tokens/s and its error."""
    from bench import gpu_check
    from loopmoe.planning import calibration
    from tests.planning.test_cost import _valid_calibration

    monkeypatch.setenv("LOOPMOE_CACHE_DIR", str(tmp_path))
    run = gpu_check.Run(gpu_check.parse_args(["--device", "cpu", "--quick"]))
    cfg, _, _ = gpu_check.throughput_configs(run)
    measured = {"tokens_per_s": 1000.0}
    skipped: dict = {}
    gpu_check.planner_prediction(skipped, run, cfg, "none", measured)
    assert "loopmoe plan --calibrate" in skipped["skipped"]
    calibration.save_calibration(_valid_calibration())
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # the calibration above has 1-thread figures
    rec: dict = {}
    try:
        gpu_check.planner_prediction(rec, run, cfg, "full", measured)
    finally:
        torch.set_num_threads(threads)
    assert rec["hardware"] == "cpu" and rec["layout"]["activation_checkpointing"] == "full"
    assert rec["layout"]["dtype"] == "bf16" and not rec["layout"]["update_guard"]  # every variant computes in bf16
    assert rec["tokens_per_s"] > 0 and rec["tokens_per_s_error"] == pytest.approx(rec["tokens_per_s"] / 1000 - 1)
    assert set(rec["compute_ms"]) == set(gpu_check.PLANNED_PARTS) and rec["compute_ms"]["total"] > 0
    assert rec["step_ms"] >= rec["compute_ms"]["total"] > rec["compute_ms"]["gemm"] > 0


def test_the_gpu_check_states_each_target_it_measured():
    """The summary's verdicts of issue 27's GPU targets: each from its own rows, and said when a row is missing."""
    from bench.gpu_check import compiled_targets

    vanilla = {"mfu": 0.42, "tokens_per_s": 100.0}
    both = compiled_targets(
        {"vanilla-T1/grouped_mm/compile": vanilla, "looped-T2/grouped_mm/compile": {"tokens_per_s": 94.0}}
    )
    assert "MFU 42.0% (>= 40%: met)" in both[-1] and "0.940x its tokens/s (>= 0.95x: not met)" in both[-1]
    no_peak = compiled_targets(
        {
            "vanilla-T1/grouped_mm/compile": {"tokens_per_s": 100.0},
            "looped-T2/grouped_mm/compile": {"tokens_per_s": 96.0},
        }
    )
    assert "MFU: not measured" in no_peak[-1] and "0.960x its tokens/s (>= 0.95x: met)" in no_peak[-1]
    assert (
        "LoopMoE against the Vanilla: not measured" in compiled_targets({"vanilla-T1/grouped_mm/compile": vanilla})[-1]
    )
