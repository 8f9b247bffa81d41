"""Each cost term of `loopmoe.planning` against hand-computed values on tiny configs."""

import math

import pytest
import torch

from loopmoe.budget import compute_budget
from loopmoe.planning.comm import collective_time, plan_comm, wire_bytes
from loopmoe.planning.cost import forward_flops_check, gemm_time, plan_compute, plan_step, slot_gemms
from loopmoe.planning.hardware import PROFILES, Hardware, cpu_from_calibration
from loopmoe.planning.layout import Layout
from loopmoe.planning.memory import param_split, plan_memory
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
    ours, budget = forward_flops_check(get_preset("debug", **overrides), 128)
    assert ours == budget


def test_gemm_time_and_efficiency_by_hand():
    assert gemm_time(FLAT, [(128, 64, 32, 3)], "fp32") == pytest.approx(3 * 2 * 128 * 64 * 32 / 1e12)
    curved = Hardware(**{**FLAT.as_dict(), "gemm_curve": ((10.0, 0.1), (1000.0, 0.9))})
    assert curved.gemm_efficiency(100, 100, 100) == pytest.approx(0.5)  # halfway in log(size)
    assert curved.gemm_efficiency(5, 5, 5) == pytest.approx(0.05)  # below the curve: proportional
    assert curved.gemm_efficiency(10**4, 10**4, 10**4) == pytest.approx(0.9)


def test_slot_gemms_split_experts_into_groups():
    cfg = get_preset("debug")  # E=8, k=2, f=64, d=64
    gemms = slot_gemms(cfg, tokens=1024, core=True, ep=2)
    assert (1024 * 2 * 2 // 8, 64, 64, 2 * 4) in gemms  # gate + up: 4 local experts, N k ep / E rows each
    assert (512, 64, 64, 4) in gemms  # down


def test_compute_terms_by_hand():
    cfg = get_preset("debug", num_loops=2, num_core_layers=2)
    lay = Layout(micro_batch=2, seq_len=64)
    c = plan_compute(cfg, lay, FLAT)
    N, S = 128, 64
    slots = cfg.executed_depth()
    core = slot_gemms(cfg, N, True)
    expect_gemm = 3 * slots * sum(2 * m * n * k * cnt for m, n, k, cnt in core) / 1e12
    expect_gemm += 3 * 2 * N * cfg.vocab_size * cfg.hidden_size / 1e12  # fused LM-head loss
    assert c.gemm == pytest.approx(expect_gemm)
    scores = 4 * S * S * cfg.head_dim * cfg.num_attention_heads * 2
    assert c.attention == pytest.approx(3.5 * slots * scores / 0.5e12)
    assert c.overhead == 0.0 and c.recompute == 0.0
    # Full checkpointing reruns every slot's forward once more.
    ac = plan_compute(cfg, Layout(micro_batch=2, seq_len=64, activation_checkpointing="full"), FLAT)
    fwd = slots * sum(2 * m * n * k * cnt for m, n, k, cnt in core) / 1e12
    assert ac.recompute == pytest.approx(fwd)
    assert ac.gemm - c.gemm == pytest.approx(fwd)
    # Gradient accumulation repeats the micro-batch work, not the optimizer step.
    acc = plan_compute(cfg, Layout(micro_batch=2, seq_len=64, grad_accum=3), FLAT)
    assert acc.gemm == pytest.approx(3 * c.gemm) and acc.optimizer == pytest.approx(c.optimizer)


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
    one = plan_step(get_preset("debug", num_loops=1, **shapes), Layout(), FLAT)
    two = plan_step(get_preset("debug", num_loops=2, iter_conditioning="none", **shapes), Layout(), FLAT)
    assert two.total_params == one.total_params
    assert two.memory.params == one.memory.params and two.memory.optimizer == one.memory.optimizer
    assert two.compute.attention == 2 * one.compute.attention  # per executed slot
    assert two.compute.elementwise > 1.8 * one.compute.elementwise and two.step_time > one.step_time
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
                "attention_rate": 2e9,
                "op_overhead_s": 1e-5,
            }
        },
        "gloo": {"latency_s": 1e-4, "bandwidth": 1e9},
    }
    hw = cpu_from_calibration(data, 1)
    assert hw.peak("fp32") == 4e9 and hw.gemm_efficiency(32, 32, 32) == pytest.approx(0.25)
    assert hw.attention_efficiency == 0.5 and hw.latency_s == 1e-4
    assert math.isclose(hw.gemm_efficiency(256, 256, 256), 1.0)
