"""kernels.rmsnorm: the fused fp32 kernel and its backward against the formula they replace."""

import pytest
import torch

from loopmoe.model.kernels.rmsnorm import rms_norm_reference
from loopmoe.model.layers import RMSNorm


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


def test_package_reference_is_transformers_formula():
    x, w = torch.randn(3, 5, 16, dtype=torch.bfloat16), torch.randn(16, dtype=torch.bfloat16)
    assert torch.equal(rms_norm_reference(x, w, 1e-6), reference_rms_norm(x, w, 1e-6))
