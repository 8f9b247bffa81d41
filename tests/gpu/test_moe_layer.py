"""One ``SparseMoE`` layer on the GPU: ``grouped_mm`` against the loop path, and both against the CPU.

Tolerances come from the H100 run in PERFORMANCE.md ("GPU: NVIDIA H100"): fp32 agreed to 5-9e-7
relative (bound: 1e-5), bf16 outputs and weight gradients were bit-equal and the input gradient
within 7e-3 (bound: 2e-2, about two bf16 ulps of the largest value).
"""

import pytest
import torch

from bench.gpu_cases import compare, compare_passes, make_moe, moe_inputs, moe_pass

pytestmark = pytest.mark.cuda

SEED = 0
LAYER = (1024, 64, 8, 256, 0, 4096)  # d, E, k, f, shared expert width, tokens
SHARED = (1024, 64, 8, 256, 1024, 4096)
RTOL = {"fp32": 1e-5, "bf16": 2e-2, "autocast-bf16": 2e-2, "fp16": 2e-2}


def assert_close(errors: dict, rtol: float) -> None:
    assert errors.pop("routing_equal"), "the two paths routed tokens to different experts"
    bad = {k: v for k, v in errors.items() if "max_rel" not in v or v["max_rel"] > rtol or v["nonfinite"]}
    assert not bad, f"grouped_mm and loop differ beyond {rtol:g} (max abs / max |ref|): {bad}"


@pytest.mark.parametrize(
    ("spec", "dtype_name"),
    [
        (LAYER, "bf16"),
        (LAYER, "fp32"),
        (LAYER, "autocast-bf16"),
        (SHARED, "bf16"),
        (SHARED, "fp32"),
    ],
    ids=["bf16", "fp32", "autocast-bf16", "shared-bf16", "shared-fp32"],
)
def test_grouped_mm_matches_the_loop_path(spec, dtype_name, device):
    moe, x, g, ctx = moe_inputs(spec, dtype_name, SEED, device)
    loop = moe_pass(moe, x, g, "loop", ctx)
    grouped = moe_pass(moe, x, g, "grouped_mm", ctx)
    assert_close(compare_passes(grouped, loop), RTOL[dtype_name])
    if dtype_name == "autocast-bf16":  # autocast does not see the expert custom ops: Experts casts for it
        assert grouped["expert_in_dtype"] == loop["expert_in_dtype"] == "torch.bfloat16"
    with torch.no_grad():  # the inference branch of the dispatch (no autograd Functions)
        ys = {impl: moe_pass(moe, x, g, impl, ctx, grad=False)["y"] for impl in ("loop", "grouped_mm")}
    errors = compare(ys["grouped_mm"], ys["loop"])
    assert errors["max_rel"] <= RTOL[dtype_name] and not errors["nonfinite"], errors


def test_cuda_paths_match_the_cpu_loop_path_in_fp32(device):
    spec = (256, 16, 4, 128, 0, 512)
    base = make_moe(*spec[:5], SEED)
    gen = torch.Generator().manual_seed(SEED + 2)
    x = torch.randn(2, spec[5] // 2, spec[0], generator=gen)
    g = torch.randn(2, spec[5] // 2, spec[0], generator=gen)
    cpu = moe_pass(base, x, g, "loop")
    on_device = make_moe(*spec[:5], SEED).to(device)
    for impl in ("loop", "grouped_mm"):
        p = moe_pass(on_device, x.to(device), g.to(device), impl)
        assert_close(compare_passes(p, cpu), 1e-5)


@pytest.mark.parametrize(
    ("spec", "dtype_name"),
    [((256, 64, 2, 128, 0, 8), "bf16"), ((256, 16, 2, 128, 0, 256), "fp16")],
    ids=["mostly-empty-experts", "fp16"],
)
def test_grouped_mm_edge_shapes(spec, dtype_name, device):
    """Eight tokens over 64 experts (most groups empty), and fp16."""
    moe, x, g, ctx = moe_inputs(spec, dtype_name, SEED, device)
    assert_close(
        compare_passes(moe_pass(moe, x, g, "grouped_mm", ctx), moe_pass(moe, x, g, "loop", ctx)), RTOL[dtype_name]
    )


@pytest.mark.parametrize("spec", [(256, 16, 2, 100, 0, 256), (260, 16, 2, 128, 0, 256)], ids=["f=100", "d=260"])
def test_grouped_mm_on_unaligned_widths_refuses_or_agrees(spec, device):
    """torch's grouped GEMM needs 16-byte-aligned rows (bf16 widths a multiple of 8). On the H100 it
    refused other widths; whatever a later torch does, it must not return different numbers."""
    moe, x, g, ctx = moe_inputs(spec, "bf16", SEED, device)
    loop = moe_pass(moe, x, g, "loop", ctx)
    try:
        grouped = moe_pass(moe, x, g, "grouped_mm", ctx)
    except RuntimeError as exc:
        assert "multiple of 16 bytes" in str(exc), exc
        return
    assert_close(compare_passes(grouped, loop), RTOL["bf16"])
