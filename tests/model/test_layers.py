"""Fast paths of the building blocks against the plain formulas they replace."""

import pytest
import torch
import torch.nn.functional as F

from loopmoe.model.layers import RMSNorm, _swap_halves, apply_rotary, linear


def reference_rms_norm(x, weight, eps):  # transformers' Qwen3 RMSNorm
    x32 = x.to(torch.float32)
    return weight * (x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + eps)).to(x.dtype)


@pytest.mark.parametrize("shape", [(1, 1, 256), (2, 9, 64), (2, 3, 4, 32)])
def test_rms_norm_fp32_is_bitwise_the_reference(shape):
    torch.manual_seed(0)
    norm = RMSNorm(shape[-1], eps=1e-6)
    norm.weight.data.normal_()
    x = torch.randn(shape) * 3
    assert torch.equal(norm(x), reference_rms_norm(x, norm.weight, 1e-6))


def test_rms_norm_bf16_keeps_the_reference_rounding():
    norm = RMSNorm(64).to(torch.bfloat16)
    x = torch.randn(3, 64, dtype=torch.bfloat16)
    assert torch.equal(norm(x), reference_rms_norm(x, norm.weight, norm.eps))


def test_rotary_with_signed_sin_is_bitwise_rotate_half():
    torch.manual_seed(0)
    q, k = torch.randn(2, 4, 5, 8), torch.randn(2, 2, 5, 8)
    angles = torch.randn(2, 5, 4)
    cos, sin = torch.cat([angles, angles], -1).cos(), torch.cat([angles, angles], -1).sin()
    signed = torch.cat([-angles.sin(), angles.sin()], -1)

    def rotate_half(x):
        x1, x2 = x.chunk(2, dim=-1)
        return torch.cat((-x2, x1), dim=-1)

    rq, rk = apply_rotary(q, k, cos, signed)
    assert torch.equal(rq, q * cos[:, None] + rotate_half(q) * sin[:, None])
    assert torch.equal(rk, k * cos[:, None] + rotate_half(k) * sin[:, None])
    assert torch.equal(_swap_halves(torch.arange(4.0)), torch.tensor([2.0, 3.0, 0.0, 1.0]))


@pytest.mark.parametrize("rows", [1, 3, 8, 9])
@pytest.mark.parametrize("threads", [1, 2, 3])
def test_linear_equals_f_linear(rows, threads):
    torch.manual_seed(0)
    w = torch.randn(96, 40)
    x = torch.randn(rows, 1, 40)
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        with torch.inference_mode():
            out = linear(x, w)
    finally:
        torch.set_num_threads(before)
    assert out.shape == (rows, 1, 96)
    torch.testing.assert_close(out, F.linear(x, w), rtol=1e-5, atol=1e-5)  # fp32 sums in another order


def test_linear_with_autograd_is_f_linear_exactly():
    w = torch.randn(96, 40, requires_grad=True)
    x = torch.randn(1, 40)
    out = linear(x, w)
    assert torch.equal(out, F.linear(x, w))
    out.sum().backward()
    assert w.grad is not None


@pytest.mark.parametrize("shape", [(2, 9, 64), (2, 3, 4, 32)])
def test_rms_norm_backward_matches_autograd_through_the_formula(shape):
    torch.manual_seed(0)
    norm = RMSNorm(shape[-1], eps=1e-6).double()
    norm.weight.data.normal_()
    x = (torch.randn(shape, dtype=torch.float64) * 3).requires_grad_()
    g = torch.randn(shape, dtype=torch.float64)
    ref = torch.autograd.grad(reference_rms_norm(x, norm.weight, 1e-6), (x, norm.weight), g)
    # fp64 takes the formula path; the fp32 kernel's backward is checked in fp32 against it
    x32, w32, g32 = x.detach().float().requires_grad_(), norm.weight.detach().float().requires_grad_(), g.float()
    norm32 = RMSNorm(shape[-1], eps=1e-6)
    norm32.weight = torch.nn.Parameter(w32)
    ours = torch.autograd.grad(norm32(x32), (x32, norm32.weight), g32)
    for a, b in zip(ours, ref):
        torch.testing.assert_close(a.double(), b, rtol=1e-5, atol=1e-5)
