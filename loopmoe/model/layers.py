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


class RMSNorm(nn.Module):
    """RMSNorm computed in fp32. ``init_gain`` is the value the weight is initialised to."""

    def __init__(self, dim: int, eps: float = 1e-6, init_gain: float = 1.0):
        super().__init__()
        self.weight = nn.Parameter(torch.full((dim,), init_gain))
        self.eps = eps
        self.init_gain = init_gain

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dtype = x.dtype
        x = x.to(torch.float32)
        x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x.to(dtype)


class RotaryEmbedding(nn.Module):
    """cos/sin tables of rotary position embeddings for given position ids."""

    def __init__(self, config: LoopMoEConfig):
        super().__init__()
        dim = config.head_dim
        inv_freq = 1.0 / (config.rope_theta ** (torch.arange(0, dim, 2, dtype=torch.float) / dim))
        self.register_buffer("inv_freq", inv_freq, persistent=False)

    @torch.no_grad()
    def forward(self, x: torch.Tensor, position_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        # position_ids: [B, S] -> cos, sin: [B, S, head_dim]
        freqs = position_ids[..., None].float() * self.inv_freq.to(x.device)
        emb = torch.cat((freqs, freqs), dim=-1)
        return emb.cos().to(x.dtype), emb.sin().to(x.dtype)


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def apply_rotary(q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor):
    # q: [B, H, S, hd], k: [B, H_kv, S, hd], cos/sin: [B, S, hd]
    cos, sin = cos.unsqueeze(1), sin.unsqueeze(1)
    return q * cos + rotate_half(q) * sin, k * cos + rotate_half(k) * sin


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
        self.q_proj = nn.Linear(d, config.num_attention_heads * hd, bias=False)
        self.k_proj = nn.Linear(d, config.num_key_value_heads * hd, bias=False)
        self.v_proj = nn.Linear(d, config.num_key_value_heads * hd, bias=False)
        self.o_proj = nn.Linear(config.num_attention_heads * hd, d, bias=False)
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
