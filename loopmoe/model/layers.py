"""Building blocks shared by every layer: RMSNorm, rotary embeddings, GQA attention.

Numerics follow Qwen3-MoE in transformers (RMSNorm in fp32, RoPE with the rotate-half
convention, QK-norm over the head dimension) so that a LoopMoE with T = 1 reproduces its logits.
Attention always goes through a fused kernel (PyTorch SDPA, or flash / flex attention when the
config asks for them): no materialised O(S^2) softmax is written here.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

from loopmoe.config import LoopMoEConfig


def linear(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """``x @ weight.T`` (``F.linear`` without bias), faster for a few rows at inference on CPU.

    Decoding multiplies one row (or a few) by each weight: a matrix-vector product bound by
    reading the weight from memory, which BLAS runs on one thread (~7 GB/s here). Splitting the
    weight's rows into one block per thread and multiplying them as a batch runs the blocks in
    parallel (2.5x the bandwidth on 2 cores). Each output is the same length-``in`` dot product,
    summed in the kernel's own order: equal to ``F.linear`` up to fp rounding.
    """
    rows, out_features = x.numel() // x.shape[-1], weight.shape[0]
    if (
        rows <= SPLIT_MAX_ROWS
        and weight.numel() >= _SPLIT_MIN_WEIGHT
        and x.device.type == "cpu"
        and not torch.is_grad_enabled()
    ):
        blocks = torch.get_num_threads()
        if blocks > 1 and out_features % blocks == 0 and weight.is_contiguous():
            blocked = weight.view(blocks, out_features // blocks, -1)  # [blocks, out/blocks, in]
            # [blocks, in, rows] with unit stride along rows: BLAS takes it as a transposed operand
            # (a [blocks, in, 1] view with unit stride along `in` sends bmm to a 3x slower kernel).
            out = torch.bmm(blocked, x.reshape(rows, -1).t().expand(blocks, -1, -1))  # [blocks, out/blocks, rows]
            if rows == 1:
                return out.view(*x.shape[:-1], out_features)
            return out.permute(2, 0, 1).reshape(*x.shape[:-1], out_features)
    return F.linear(x, weight)


SPLIT_MAX_ROWS = 8  # batch-8 decoding is still bound by reading the weights
_SPLIT_MIN_WEIGHT = 1 << 16  # below (a router: E x d) the weight sits in cache and the split costs more


class Linear(nn.Linear):
    """``nn.Linear`` without bias whose forward is ``linear`` above (same parameters and state dict)."""

    def __init__(self, in_features: int, out_features: int):
        super().__init__(in_features, out_features, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return linear(x, self.weight)


class RMSNorm(nn.Module):
    """RMSNorm computed in fp32. ``init_gain`` is the value the weight is initialised to."""

    def __init__(self, dim: int, eps: float = 1e-6, init_gain: float = 1.0):
        super().__init__()
        self.weight = nn.Parameter(torch.full((dim,), init_gain))
        self.eps = eps
        self.init_gain = init_gain

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dtype == torch.float32 and self.weight.dtype == torch.float32:
            # The fused kernel, bit-identical to the formula below in fp32 (tests/model/test_layers.py),
            # with a backward of 6 element-wise passes instead of autograd's ~12.
            if torch.is_grad_enabled() and (x.requires_grad or self.weight.requires_grad):
                return _RMSNormFp32.apply(x, self.weight, self.eps)
            return F.rms_norm(x, self.weight.shape, self.weight, self.eps)
        dtype = x.dtype
        x = x.to(torch.float32)
        x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x.to(dtype)


class _RMSNormFp32(torch.autograd.Function):
    """``w * x * rstd`` with ``rstd = rsqrt(mean(x^2) + eps)``; backward, with ``x̂ = x * rstd``:
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


class RotaryEmbedding(nn.Module):
    """cos/sin tables of rotary position embeddings for given position ids.

    The sin table carries the sign of the rotate-half convention (``-sin`` on the first half), so
    that ``apply_rotary`` rotates with one ``flip`` instead of ``chunk`` + ``neg`` + ``cat``; the
    products are the same (the sign moves from one factor to the other), so are the numbers.
    """

    def __init__(self, config: LoopMoEConfig):
        super().__init__()
        dim = config.head_dim
        inv_freq = 1.0 / (config.rope_theta ** (torch.arange(0, dim, 2, dtype=torch.float) / dim))
        self.register_buffer("inv_freq", inv_freq, persistent=False)

    @torch.no_grad()
    def forward(self, x: torch.Tensor, position_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        # position_ids: [B, S] -> cos, signed sin: [B, S, head_dim]
        freqs = position_ids[..., None].float() * self.inv_freq.to(x.device)
        emb = torch.cat((freqs, freqs), dim=-1)
        sin = emb.sin()
        sin[..., : freqs.shape[-1]].neg_()
        return emb.cos().to(x.dtype), sin.to(x.dtype)


def _swap_halves(x: torch.Tensor) -> torch.Tensor:
    # [..., hd] -> [..., hd] with the two halves exchanged: rotate_half(x) = _swap_halves(x) * [-1, 1]
    return x.unflatten(-1, (2, -1)).flip(-2).flatten(-2)


def apply_rotary(q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor):
    # q: [B, H, S, hd], k: [B, H_kv, S, hd], cos / signed sin: [B, S, hd]
    cos, sin = cos.unsqueeze(1), sin.unsqueeze(1)
    return q * cos + _swap_halves(q) * sin, k * cos + _swap_halves(k) * sin


class Attention(nn.Module):
    """Grouped-query attention with optional QK-norm; the KV-cache slot is chosen per call."""

    is_causal = True

    def __init__(self, config: LoopMoEConfig):
        super().__init__()
        self.config = config
        d, hd = config.hidden_size, config.head_dim
        self.head_dim = hd
        self.num_key_value_groups = config.num_attention_heads // config.num_key_value_heads
        self.scaling = hd**-0.5
        self.layer_idx = None  # read by some attention kernels; the cache slot is passed to forward
        self.q_proj = Linear(d, config.num_attention_heads * hd)
        self.k_proj = Linear(d, config.num_key_value_heads * hd)
        self.v_proj = Linear(d, config.num_key_value_heads * hd)
        self.o_proj = Linear(config.num_attention_heads * hd, d)
        if config.qk_norm:
            self.q_norm = RMSNorm(hd, eps=config.rms_norm_eps)
            self.k_norm = RMSNorm(hd, eps=config.rms_norm_eps)
        else:
            self.q_norm = self.k_norm = None

    def forward(self, x, position_embeddings, attention_mask, past_key_values=None, cache_slot: int = 0):
        # x: [B, S, d] -> [B, S, d]
        B, S, _ = x.shape
        q = self.q_proj(x).view(B, S, -1, self.head_dim)
        k = self.k_proj(x).view(B, S, -1, self.head_dim)
        v = self.v_proj(x).view(B, S, -1, self.head_dim).transpose(1, 2)
        if self.q_norm is not None:
            q, k = self.q_norm(q), self.k_norm(k)
        q, k = apply_rotary(q.transpose(1, 2), k.transpose(1, 2), *position_embeddings)  # [B, H(_kv), S, hd]
        if past_key_values is not None:
            k, v = past_key_values.update(k, v, cache_slot)
        impl = self.config._attn_implementation
        # "eager" is served by SDPA too: same math, without materialising the S x S scores in Python.
        attend = sdpa_attention_forward if impl in (None, "eager", "sdpa") else ALL_ATTENTION_FUNCTIONS[impl]
        out, _ = attend(self, q, k, v, attention_mask, dropout=0.0, scaling=self.scaling)
        return self.o_proj(out.reshape(B, S, -1))
