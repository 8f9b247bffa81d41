"""RMSNorm: the formula, and the fused fp32 kernel with a hand-written backward that equals it.

``y = w * x * rstd`` with ``rstd = rsqrt(mean(x^2) + eps)``, computed in fp32 (Qwen3-MoE's
numerics). In fp32 ATen's fused kernel is bit-identical to ``rms_norm_reference``; its autograd
backward takes ~12 element-wise passes, the one below 6.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def rms_norm_reference(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """The definition, in fp32, cast back to the input dtype before the gain (as transformers does)."""
    dtype = x.dtype
    x = x.to(torch.float32)
    x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps)
    return weight * x.to(dtype)


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """``rms_norm_reference``, through the fused kernel when input and weight are fp32."""
    if x.dtype == torch.float32 and weight.dtype == torch.float32:
        if torch.is_grad_enabled() and (x.requires_grad or weight.requires_grad):
            return _RMSNormFp32.apply(x, weight, eps)
        return F.rms_norm(x, weight.shape, weight, eps)
    return rms_norm_reference(x, weight, eps)


class _RMSNormFp32(torch.autograd.Function):
    """``w * x * rstd``; backward, with ``x̂ = x * rstd``:
    ``gx = rstd * (g w - x̂ * mean(g w x̂))``, ``gw = sum_rows(g x̂)``."""

    @staticmethod
    def forward(ctx, x, weight, eps):
        y, rstd = torch.ops.aten._fused_rms_norm(x, [x.shape[-1]], weight, eps)  # rstd: [..., 1]
        ctx.save_for_backward(x, weight, rstd)
        return y

    @staticmethod
    def backward(ctx, g):
        x, weight, rstd = ctx.saved_tensors
        x_hat = x * rstd
        g_x = g_w = None
        if ctx.needs_input_grad[0]:
            gw = g * weight
            mean_dot = torch.linalg.vecdot(gw, x_hat).unsqueeze(-1).div_(x.shape[-1])
            g_x = torch.addcmul(gw, x_hat, mean_dot, value=-1).mul_(rstd)
        if ctx.needs_input_grad[1]:
            g_w = (g * x_hat).reshape(-1, x.shape[-1]).sum(0)
        return g_x, g_w, None
