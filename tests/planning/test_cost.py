"""Each cost term of `loopmoe.planning` against hand-computed values on tiny configs."""

import math
import re

import pytest
import torch

from loopmoe.budget import compute_budget
from loopmoe.planning.comm import collective_time, plan_comm, wire_bytes
from loopmoe.planning.cost import forward_flops_check, plan_compute, plan_step
from loopmoe.planning.hardware import PROFILES, Hardware, cpu_from_calibration
from loopmoe.planning.kernel_timing import attention_seconds, gemm_seconds, measured_gemm_seconds
from loopmoe.planning.layout import Layout
from loopmoe.planning.memory import param_split, plan_memory
from loopmoe.planning.trace import expert_kernel, step_tally
from loopmoe.presets import get_preset

FLAT = Hardware(
    name="flat",
    description="test device: every GEMM at peak",
    matmul_flops={"fp32": 1e12, "bf16": 2e12},
    memory_bandwidth=1e11,
    memory_bytes=1e10,
    gemm_curve=((1.0, 1.0), (1e6, 1.0)),
    attention_efficiency=0.5,
    op_overhead_s=0.0,
    intra_node_bandwidth=1e9,
    inter_node_bandwidth=1e8,
    latency_s=1e-5,
    devices_per_node=4,
    allocator_overhead=0.0,
    comm_overlap=0.0,
    device_type="cpu",
)


@pytest.mark.parametrize(
    "overrides",
    [
        {},
        {"num_loops": 2},
        {"num_loops": 3, "num_prelude_layers": 1, "num_coda_layers": 1, "shared_expert_intermediate_size": 32},
        {"num_loops": 2, "input_injection": "concat", "iter_conditioning": "adaln_token"},
        {"num_loops": 2, "expert_type": "dcca", "dcca_dim": 16, "dcca_router_input": "descended"},
    ],
)
def test_gemm_shapes_cover_the_budget_flops(overrides):
    # The traced matmuls (+ the expert kernel's) are the budget's FLOPs; the budget leaves out only the
    # iteration signal's matmuls, which run once per sequence, not per token (< 1e-4 here).
    ours, budget = forward_flops_check(get_preset("debug", **overrides), 128)
    assert ours == pytest.approx(budget, rel=1e-4)


def test_gemm_and_attention_time_by_hand():
    assert gemm_seconds(FLAT, 128, 64, 32, "fp32") == pytest.approx(2 * 128 * 64 * 32 / 1e12)
    assert attention_seconds(FLAT, (2, 4, 64, 16), True, "bf16") == pytest.approx(2.5 * 4 * 2 * 4 * 64 * 64 * 16 / 1e12)
    curved = Hardware(**{**FLAT.as_dict(), "gemm_curve": ((10.0, 0.1), (1000.0, 0.9))})
    assert curved.gemm_efficiency(100, 100, 100) == pytest.approx(0.5)  # halfway in log(size)
    assert curved.gemm_efficiency(5, 5, 5) == pytest.approx(0.05)  # below the curve: proportional
    assert curved.gemm_efficiency(10**4, 10**4, 10**4) == pytest.approx(0.9)


def test_expert_kernel_groups_rows_and_backward_shapes():
    cfg = get_preset("debug")  # E=8, k=2, f=64, d=64: gate/up and down shapes coincide (f == w)
    fwd, bwd = (expert_kernel(cfg, tokens=1024, ep=2).forward, expert_kernel(cfg, tokens=1024, ep=2).backward)
    rows = 1024 * 2 * 2 // 8  # N k ep / E rows in each of the E / ep = 4 local groups
    assert fwd.gemms == {(rows, 64, 64): 3 * 4}  # gate, up, down
    assert fwd.gemm_flops() == 2 * 1024 * 2 * 3 * 64 * 64  # all N k rows on this device, 3 matmuls each
    assert bwd.gemm_flops() == 2 * fwd.gemm_flops()  # input and weight gradients
    assert (64, 64, rows) in bwd.gemms  # weight gradients reduce over the rows
    dcca = expert_kernel(get_preset("debug", expert_type="dcca", dcca_dim=16), tokens=1024).forward
    assert dcca.gemms == {(256, 64, 16): 2 * 8, (256, 16, 64): 8}  # rows at the DCCA width


def test_trace_sees_the_matmuls_real_execution_runs():
    """The fake-tensor trace records the same matmul shapes as running the model on real tensors."""
    from torch.utils._python_dispatch import TorchDispatchMode

    from loopmoe.model import LoopMoEForCausalLM

    cfg = get_preset("debug", num_loops=2, num_core_layers=1, iter_conditioning="iteradaln")
    seen: dict[tuple, int] = {}

    class Shapes(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            if func.overloadpacket.__name__ in ("mm", "addmm", "addmm_", "bmm") and func.namespace == "aten":
                a, b = args[-2], args[-1]
                key = (a.shape[-2], b.shape[-1], a.shape[-1])
                seen[key] = seen.get(key, 0) + (a.shape[0] if a.dim() == 3 else 1)
            return func(*args, **(kwargs or {}))

    torch.manual_seed(0)
    model = LoopMoEForCausalLM(cfg).train()
    ids = torch.randint(0, cfg.vocab_size, (2, 32))
    with Shapes():
        model(input_ids=ids, labels=ids).loss.backward()
    t = step_tally(cfg, 2, 32)
    traced = t.base + t.core_slot + t.core_slot + t.iteration
    # The mode does not see inside the expert kernel's custom op (its matmuls are `expert_kernel`'s):
    # every other matmul of the real run is in the trace, and nothing more.
    assert seen == dict(traced.forward.gemms + traced.backward.gemms)


def test_compute_terms_by_hand():
    cfg = get_preset("debug", num_loops=2, num_core_layers=2)  # iteradaln: a rank-r token modulation
    lay = Layout(micro_batch=2, seq_len=64)
    c = plan_compute(cfg, lay, FLAT)
    N, S = 128, 64
    d, H, Hkv, hd, E, k, f, r = 64, 4, 2, 16, 8, 2, 64, cfg.iter_cond_rank
    assert (cfg.hidden_size, cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim) == (d, H, Hkv, hd)
    slot = 2 * N * (d * H * hd + 2 * d * Hkv * hd + H * hd * d + d * E + k * 3 * d * f + d * r + r * 6 * d)
    slots = cfg.executed_depth()
    head = 3 * 2 * N * cfg.vocab_size * d  # the fused LM-head loss: logits and both gradients, in forward
    assert c.gemm == pytest.approx((3 * slots * slot + head) / 1e12, rel=1e-3)  # backward = 2x forward
    scores = 4 * S * S * hd * H * 2
    assert c.attention == pytest.approx(3.5 * slots * scores / 0.5e12)
    assert c.overhead == 0.0 and c.recompute == 0.0 and c.elementwise > 0
    # Full checkpointing reruns every slot's forward once more.
    ac = plan_compute(cfg, Layout(micro_batch=2, seq_len=64, activation_checkpointing="full"), FLAT)
    assert ac.gemm - c.gemm == pytest.approx(slots * slot / 1e12, rel=1e-3)
    assert ac.attention - c.attention == pytest.approx(slots * scores / 0.5e12)
    assert ac.recompute == pytest.approx(ac.total - c.total)  # the rerun is all that differs
    # Gradient accumulation repeats the micro-batch work, not the optimizer step.
    acc = plan_compute(cfg, Layout(micro_batch=2, seq_len=64, grad_accum=3), FLAT)
    assert acc.gemm == pytest.approx(3 * c.gemm) and acc.optimizer == pytest.approx(c.optimizer)
    # Framework ops: every traced op at the hardware's fixed cost.
    slow = plan_compute(cfg, lay, Hardware(**{**FLAT.as_dict(), "op_overhead_s": 1e-5}))
    assert 1000 < slow.overhead / 1e-5 < 10000


def test_cpu_gemms_are_measured_per_shape():
    assert measured_gemm_seconds(64, 32, 16, 1) > 0
    assert measured_gemm_seconds.cache_info().currsize >= 1  # timed once per process


def test_collectives_by_hand():
    assert wire_bytes("all_reduce", 1000, 4) == 1500
    assert wire_bytes("all_gather", 1000, 4) == 750
    assert wire_bytes("all_to_all", 1000, 1) == 0
    # inside a node (4 devices): 2(n-1) steps of α and 1500 bytes at 1 GB/s
    assert collective_time(FLAT, "all_reduce", 1000, 4) == pytest.approx(6e-5 + 1500 / 1e9)
    # 8 devices cross nodes: the inter-node link is the bottleneck
    assert collective_time(FLAT, "all_gather", 8000, 8) == pytest.approx(7e-5 + 7000 / 1e8)


def test_ddp_reduces_every_gradient_once_per_step():
    cfg = get_preset("debug")
    lay = Layout(devices=2, strategy="ddp", grad_accum=4)
    comm = plan_comm(cfg, lay, FLAT)
    grad_bytes = 4 * compute_budget(cfg, lay.seq_len).total_params
    assert comm.collectives["all_reduce"] == 1 + 3  # one bucket + the loss, the guard's verdict, ...
    assert comm.gradient_reduce == pytest.approx(collective_time(FLAT, "all_reduce", grad_bytes, 2))
    assert comm.weight_gather == 0 and comm.expert_all_to_all == 0


@pytest.mark.parametrize("loops", [1, 2, 4])
def test_fsdp2_gathers_the_core_per_use_or_once(loops):
    cfg = get_preset("debug", num_loops=loops, num_core_layers=4 // loops)
    C = cfg.num_core_layers
    per_use = plan_comm(cfg, Layout(devices=2, strategy="fsdp2", reshard_after_forward=True), FLAT)
    once = plan_comm(cfg, Layout(devices=2, strategy="fsdp2", reshard_after_forward=False), FLAT)
    assert per_use.collectives["all_gather"] == 2 * loops * C + 1  # T forward + T backward uses, + the root
    assert once.collectives["all_gather"] == loops * C + 1  # once in forward, T - 1 more in backward
    assert per_use.collectives["reduce_scatter"] == once.collectives["reduce_scatter"] == C + 1
    assert once.weight_gather < per_use.weight_gather
    # FSDP2's own work (hooks, copy-in / copy-out) per gather and reduce-scatter, exposed.
    hooked = plan_comm(
        cfg, Layout(devices=2, strategy="fsdp2"), Hardware(**{**FLAT.as_dict(), "fsdp2_call_overhead_s": 1e-3})
    )
    calls = per_use.collectives["all_gather"] + per_use.collectives["reduce_scatter"]
    assert hooked.fsdp2_framework == pytest.approx(calls * 1e-3) and per_use.fsdp2_framework == 0.0
    assert hooked.total - per_use.total == pytest.approx(calls * 1e-3)
    # ... and keeping the core gathered costs its full weights in memory.
    mem_per_use = plan_memory(cfg, Layout(devices=2, strategy="fsdp2"), FLAT)
    mem_once = plan_memory(cfg, Layout(devices=2, strategy="fsdp2", reshard_after_forward=False), FLAT)
    assert mem_once.comm_buffers > mem_per_use.comm_buffers


def test_expert_all_to_all_per_executed_slot():
    cfg = get_preset("debug", num_loops=2, num_core_layers=2)
    lay = Layout(devices=4, ep=4, micro_batch=2, seq_len=64)
    comm = plan_comm(cfg, lay, FLAT)
    assert comm.collectives["all_to_all"] == 4 * cfg.executed_depth()  # dispatch + combine, fwd + bwd
    one = collective_time(FLAT, "all_to_all", 128 * 2 * 64 * 4, 4)
    assert comm.expert_all_to_all == pytest.approx(4 * cfg.executed_depth() * one)
    dcca = plan_comm(get_preset("debug", num_loops=2, num_core_layers=2, expert_type="dcca", dcca_dim=16), lay, FLAT)
    rows = collective_time(FLAT, "all_to_all", 128 * 2 * 16 * 4, 4)  # DCCA rows cross at width 16, not 64
    assert dcca.expert_all_to_all == pytest.approx(4 * cfg.executed_depth() * rows)
    ac = plan_comm(cfg, Layout(devices=4, ep=4, micro_batch=2, seq_len=64, activation_checkpointing="full"), FLAT)
    assert ac.collectives["all_to_all"] == 6 * cfg.executed_depth()  # the recomputation dispatches again


def test_memory_static_terms_by_hand():
    cfg = get_preset("debug", num_loops=2, num_core_layers=2)
    total = compute_budget(cfg, 128).total_params
    one = plan_memory(cfg, Layout(), FLAT)
    assert (one.params, one.grads, one.optimizer, one.update_guard) == (4 * total, 4 * total, 8 * total, 12 * total)
    two = plan_memory(cfg, Layout(devices=2, strategy="fsdp2"), FLAT)
    assert two.params == pytest.approx(2 * total) and two.optimizer == pytest.approx(4 * total)
    ep = plan_memory(cfg, Layout(devices=2, ep=2), FLAT)
    split = param_split(cfg, 128)
    assert ep.params == pytest.approx(4 * (split.total - split.experts / 2))
    full = plan_memory(cfg, Layout(activation_checkpointing="full"), FLAT)
    N, d = 8 * 128, cfg.hidden_size
    fixed = 4 * cfg.vocab_size * d + 2 * N * d * 4 + 2 * 128 * cfg.head_dim * 4
    assert full.activations == pytest.approx(cfg.executed_depth() * N * d * 4 + fixed)
    assert full.activations < one.activations


@pytest.mark.parametrize(
    "overrides",
    [
        {"iter_conditioning": "none"},
        {"num_loops": 2, "iter_conditioning": "iteradaln"},
        {"shared_expert_intermediate_size": 32},
        {"norm_scheme": "sandwich", "qk_norm": False},
        {"num_experts": 16, "num_experts_per_tok": 4, "moe_intermediate_size": 24, "num_key_value_heads": 1},
        {"expert_type": "dcca", "dcca_dim": 16},
        {"expert_type": "dcca", "dcca_dim": 8, "dcca_router_input": "descended"},
    ],
)
def test_activation_formula_matches_what_autograd_saves(overrides):
    from loopmoe.model import LoopMoEForCausalLM

    cfg = get_preset("debug", num_core_layers=2, **overrides)
    torch.manual_seed(0)
    model = LoopMoEForCausalLM(cfg).train()
    B, S = 2, 32
    ids = torch.randint(0, cfg.vocab_size, (B, S))
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    saved: dict[int, int] = {}

    def pack(t):
        st = t.untyped_storage()
        if st.data_ptr() not in params:
            saved[st.data_ptr()] = st.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        model(input_ids=ids, labels=ids)
    mem = plan_memory(cfg, Layout(micro_batch=B, seq_len=S), FLAT)
    assert mem.activations == pytest.approx(sum(saved.values()), rel=0.02)


def test_looping_costs_time_not_parameters():
    shapes = {"num_core_layers": 2}
    cfg = get_preset("debug", num_loops=1, **shapes)
    one = plan_step(cfg, Layout(), FLAT)
    two = plan_step(get_preset("debug", num_loops=2, iter_conditioning="none", **shapes), Layout(), FLAT)
    assert two.total_params == one.total_params
    assert two.memory.params == one.memory.params and two.memory.optimizer == one.memory.optimizer
    assert two.compute.attention == 2 * one.compute.attention  # per executed slot
    head = 3 * 2 * 1024 * cfg.vocab_size * cfg.hidden_size / 1e12  # the fused loss, once per step
    assert two.compute.gemm - one.compute.gemm == pytest.approx(one.compute.gemm - head)  # twice the slots
    assert two.compute.elementwise > one.compute.elementwise and two.step_time > one.step_time
    assert two.memory.activations > one.memory.activations
    mfu = 3 * one.flops_per_token * one.tokens_per_s / 1e12
    assert one.mfu == pytest.approx(mfu)


def test_accelerator_profiles_and_cpu_calibration():
    for hw in PROFILES.values():
        assert hw.peak("bf16") > 1e14 and hw.memory_bytes > 3e10 and hw.sources
    data = {
        "cpu": "test",
        "cores": 2,
        "memory_bytes": 8e9,
        "when": "now",
        "threads": {
            "1": {
                "gemm": [[32.0, 1e9], [256.0, 4e9]],
                "memory_bandwidth": 5e9,
                "elementwise_bandwidth": 2e9,
                "attention_rate": 2e9,
                "op_overhead_s": 1e-5,
            }
        },
        "gloo": {"latency_s": 1e-4, "bandwidth": 1e9},
    }
    hw = cpu_from_calibration(data, 1)
    assert hw.peak("fp32") == 4e9 and hw.gemm_efficiency(32, 32, 32) == pytest.approx(0.25)
    assert hw.attention_efficiency == 0.5 and hw.latency_s == 1e-4
    assert hw.elementwise_rate == 2e9 and PROFILES["h100"].elementwise_rate == PROFILES["h100"].memory_bandwidth
    assert math.isclose(hw.gemm_efficiency(256, 256, 256), 1.0)


def test_the_step_fit_recovers_known_costs_and_stays_non_negative():
    from loopmoe.planning.calibration import _fit_nonnegative

    # steps of (bytes, ops) made at 20 GB/s and 5 us per op, as fractions of their own time
    steps = [(2e6, 1500), (3e8, 3000), (5e8, 1500)]
    times = [b / 2e10 + o * 5e-6 for b, o in steps]
    x, y = _fit_nonnegative([(b / t, o / t) for (b, o), t in zip(steps, times)], [1.0] * 3)
    assert x == pytest.approx(1 / 2e10) and y == pytest.approx(5e-6)
    # a residual only ops explain (the bytes would need a negative rate): all of it goes to the ops
    x, y = _fit_nonnegative([(1.0, 1.0), (2.0, 1.0)], [1.0, 0.5])
    assert x == 0.0 and y > 0


def test_a_fit_that_cannot_describe_the_steps_is_refused():
    from loopmoe.planning.calibration import check_step_fit

    rows = [{"step_s": 1.0, "fitted_s": 1.05}, {"step_s": 2.0, "fitted_s": 1.9}]
    check_step_fit(rows, 1e-10, 5e-6)  # within tolerance
    with pytest.raises(ValueError, match="run `loopmoe plan --calibrate` again"):
        check_step_fit(rows, 0.0, 5e-6)  # every step's time put on the ops alone
    with pytest.raises(ValueError, match="worst step off by 80%"):
        check_step_fit([*rows, {"step_s": 1.0, "fitted_s": 1.8}], 1e-10, 5e-6)


@pytest.mark.slow
def test_the_step_fit_reproduces_the_steps_it_was_fitted_on():
    """The fit on real steps (``fit_step_costs``): the fitted parts add up to each timed step."""
    from loopmoe.planning.calibration import GEMM_SIZES, fit_step_costs

    per = {"gemm": [[n, 5e10] for n in GEMM_SIZES], "memory_bandwidth": 3e10, "attention_rate": 5e10}
    fit = fit_step_costs({**per, "transcendental_s": 2e-10}, threads=1, reps=1)
    assert fit["elementwise_bandwidth"] > 0 and fit["op_overhead_s"] > 0
    for row in fit["step_fit"]:  # three steps, two numbers: close, not exact
        assert row["fitted_s"] == pytest.approx(row["step_s"], rel=0.5), row


def test_a_missing_or_outdated_cpu_calibration_says_which(tmp_path, monkeypatch):
    import json

    from loopmoe.planning.calibration import CALIBRATION_VERSION, cache_path, cpu_profile

    monkeypatch.setenv("LOOPMOE_CACHE_DIR", str(tmp_path))
    with pytest.raises(ValueError, match="no CPU calibration in .*loopmoe plan --calibrate"):
        cpu_profile(1, calibrate=False)
    cache_path().write_text(json.dumps({"version": CALIBRATION_VERSION - 1, "threads": {"1": {}}}))
    with pytest.raises(
        ValueError, match=f"outdated \\(version {CALIBRATION_VERSION - 1}, now {CALIBRATION_VERSION}\\)"
    ):
        cpu_profile(1, calibrate=False)
    cache_path().write_text(json.dumps({"version": CALIBRATION_VERSION, "threads": {"2": {}}}))
    with pytest.raises(ValueError, match="has no entry for 1 threads"):
        cpu_profile(1, calibrate=False)
    for torn in ('{"version": ', "[]", '{"version": 3}'):  # cut short, or not a calibration at all
        cache_path().write_text(torn)
        with pytest.raises(ValueError, match="is unreadable: run `loopmoe plan --calibrate`"):
            cpu_profile(1, calibrate=False)


def test_the_trace_takes_the_loss_chunks_of_the_planned_device():
    # Fake tensors live on the CPU, but a GPU plan must see the GPU's loss: one chunk of rows where a CPU
    # takes cache-sized ones (16 MiB of fp32 logits: 128 rows at V = 32768, so 4 chunks of 512 tokens).
    cfg = get_preset("debug", vocab_size=32768)
    cpu, gpu = (step_tally(cfg, 2, 256, device).base for device in ("cpu", "cuda"))
    assert gpu.forward.ops < cpu.forward.ops
    assert gpu.forward.gemms != cpu.forward.gemms  # the head's GEMMs: [512, V] at once, not [128, V] x 4
    assert max(m for m, n, k in gpu.forward.gemms if n == cfg.vocab_size) == 512


def _valid_calibration():
    from loopmoe.planning.calibration import CALIBRATION_VERSION, machine

    return {
        "version": CALIBRATION_VERSION,
        **machine(),
        "when": "2026-12-06",
        "memory_bytes": 24e9,
        "threads": {
            "1": {
                "gemm": [[16, 1e9], [256, 4e9]],
                "memory_bandwidth": 1e10,
                "elementwise_bandwidth": 5e9,
                "attention_rate": 2e9,
                "op_overhead_s": 5e-6,
                "transcendental_s": 1e-9,
            }
        },
        "gloo": {"bandwidth": 1e9, "latency_s": 1e-4},
    }


@pytest.mark.parametrize(
    ("edit", "named"),
    [
        (lambda d: d["threads"]["1"].update(memory_bandwidth=float("nan")), "memory_bandwidth = nan"),
        (lambda d: d["threads"]["1"].update(op_overhead_s=-1e-6), "op_overhead_s = -1e-06"),
        (lambda d: d["threads"]["1"].update(gemm=[]), "gemm is not a non-empty list"),
        (lambda d: d["threads"]["1"].update(gemm=[[16, 0]]), "gemm holds [16, 0]"),
        (lambda d: d["threads"]["1"].update(attention_rate="fast"), "attention_rate = 'fast'"),
        (lambda d: d["threads"]["1"].pop("memory_bandwidth"), "memory_bandwidth = None"),
        (lambda d: d["threads"]["1"].update(elementwise_bandwidth=0.0), "elementwise_bandwidth = 0.0"),
        (lambda d: d.update(memory_bytes=0), "memory_bytes = 0"),
        (lambda d: d["gloo"].update(latency_s=float("inf")), "gloo.latency_s = inf"),
    ],
)
def test_a_calibration_with_invalid_values_is_named_not_used(tmp_path, monkeypatch, edit, named):
    import json

    from loopmoe.planning.calibration import cache_path, cpu_profile

    monkeypatch.setenv("LOOPMOE_CACHE_DIR", str(tmp_path))
    data = _valid_calibration()
    cache_path().write_text(json.dumps(data))
    assert cpu_profile(1, calibrate=False).memory_bandwidth == 1e10  # the valid one is used
    edit(data)
    cache_path().write_text(json.dumps(data))
    with pytest.raises(ValueError, match=f"invalid value \\((threads\\.1\\.)?{re.escape(named)}"):
        cpu_profile(1, calibrate=False)


def test_a_folder_at_the_calibration_path_is_refused_before_calibrating(tmp_path, monkeypatch):
    from loopmoe.planning import calibration

    monkeypatch.setenv("LOOPMOE_CACHE_DIR", str(tmp_path))
    calibration.cache_path().mkdir(parents=True)
    monkeypatch.setattr(calibration, "calibrate_cpu", lambda *a, **k: pytest.fail("calibrated before the check"))
    with pytest.raises(ValueError, match="is not a file: remove it, or set LOOPMOE_CACHE_DIR"):
        calibration.cpu_profile(1, calibrate=True)


@pytest.mark.parametrize(
    ("value", "message"),
    [
        ("nan", "--total-params nan: must be a positive finite number"),
        ("inf", "--total-params inf: must be a positive finite number"),
        ("1e8", "--search covers about"),
    ],
)
def test_search_refuses_parameter_counts_it_cannot_build(value, message, capsys):
    from loopmoe.cli.main import main

    assert main(["plan", "--search", "--hardware", "h100", "--total-params", value]) == 2
    err = capsys.readouterr().err
    assert message in err and "use more devices" not in err and "Traceback" not in err


@pytest.mark.parametrize(
    ("edit", "named"),
    [
        (lambda d: d.update(threads="12"), "has no entry for 1 threads"),  # P03: "1" in "12" passed the old check
        (lambda d: d["threads"].update({"1": "fast"}), "threads.1 is not a table"),  # P09
        (lambda d: d["threads"].update({"1": {}}), "threads.1.gemm is not a non-empty list"),  # P08
        (lambda d: d["threads"]["1"].update(gemm=[[16, float("nan")]]), "gemm holds [16, nan]"),  # P07
        (lambda d: d["threads"]["1"].update(attention_rate=0), "attention_rate = 0"),  # P06
    ],
)
def test_a_hand_edited_calibration_is_measured_again_never_used(tmp_path, monkeypatch, edit, named):
    """With calibration allowed, an unusable cache is measured again (and replaced); without, named."""
    import json

    from loopmoe.planning import calibration

    monkeypatch.setenv("LOOPMOE_CACHE_DIR", str(tmp_path))
    data = _valid_calibration()
    edit(data)
    calibration.cache_path().write_text(json.dumps(data))
    with pytest.raises(ValueError, match=re.escape(named)):
        calibration.cpu_profile(1, calibrate=False)
    fresh = _valid_calibration()
    monkeypatch.setattr(calibration, "calibrate_cpu", lambda *a, **k: fresh)
    assert calibration.cpu_profile(1, calibrate=True).memory_bandwidth == 1e10


@pytest.mark.parametrize("key", ["isa", "cpu", "cores", "torch"])
def test_a_calibration_of_another_machine_is_never_used(tmp_path, monkeypatch, key):
    """Same host name, another machine (or torch): its rates would carry one machine's answer to another."""
    import json

    from loopmoe.planning import calibration

    monkeypatch.setenv("LOOPMOE_CACHE_DIR", str(tmp_path))
    here = calibration.machine()[key]
    other = here + 1 if isinstance(here, int) else ("AVX512" if here != "AVX512" else "AVX2")
    data = {**_valid_calibration(), key: other}
    calibration.cache_path().write_text(json.dumps(data))
    with pytest.raises(ValueError, match=f"measured on another machine or torch \\({key} {other!r} -> "):
        calibration.cpu_profile(1, calibrate=False)
    fresh = _valid_calibration()
    monkeypatch.setattr(calibration, "calibrate_cpu", lambda *a, **k: fresh)
    assert calibration.cpu_profile(1, calibrate=True).memory_bandwidth == 1e10
    assert json.loads(calibration.cache_path().read_text())[key] == fresh[key]  # replaced by this machine's
