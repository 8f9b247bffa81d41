"""Building blocks shared by every layer: RMSNorm, rotary embeddings, GQA attention.

Numerics follow Qwen3-MoE in transformers (RMSNorm in fp32, RoPE with the rotate-half
convention, QK-norm over the head dimension) so that a LoopMoE with T = 1 reproduces its logits.
Attention always goes through a fused kernel (PyTorch SDPA, or flash / flex attention when the
config asks for them): no materialised O(S^2) softmax is written here.
"""

from __future__ import annotations

import torch
from torch import nn
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

from loopmoe.config import LoopMoEConfig
from loopmoe.model.kernels.linear import linear
from loopmoe.model.kernels.rmsnorm import rms_norm


class Linear(nn.Linear):
    """``nn.Linear`` without bias whose forward is ``kernels.linear`` (same parameters and state dict)."""

    def __init__(self, in_features: int, out_features: int):
        super().__init__(in_features, out_features, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return linear(x, self.weight)


class RMSNorm(nn.Module):
    """RMSNorm computed in fp32 (``kernels.rmsnorm``). ``init_gain`` is the value the weight is initialised to."""

    def __init__(self, dim: int, eps: float = 1e-6, init_gain: float = 1.0):
        super().__init__()
        self.weight = nn.Parameter(torch.full((dim,), init_gain))
        self.eps = eps
        self.init_gain = init_gain

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return rms_norm(x, self.weight, self.eps)


class RotaryEmbedding(nn.Module):
    inv_freq: torch.Tensor  # [head_dim / 2], a buffer

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


_ROLL_MAX = 1 << 16  # elements (decoding-sized); larger tensors keep the flip: roll saves ops, not bandwidth, and was
# slower on one training-sized layout (fwd+bwd 0.72x on [8, 256, 4, 64] viewed as [8, 4, 256, 64])


def _swap_halves(x: torch.Tensor) -> torch.Tensor:
    # [..., hd] -> [..., hd] with the two halves exchanged: rotate_half(x) = _swap_halves(x) * [-1, 1].
    # Both forms move the same values: roll is one op where flip needs three (decoding pays per op).
    if x.numel() <= _ROLL_MAX:
        return x.roll(x.shape[-1] // 2, -1)
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
        self.q_norm = RMSNorm(hd, eps=config.rms_norm_eps) if config.qk_norm else None
        self.k_norm = RMSNorm(hd, eps=config.rms_norm_eps) if config.qk_norm else None

    def forward(self, x, position_embeddings, attention_mask, past_key_values=None, cache_slot: int = 0):
        # x: [B, S, d] -> [B, S, d]
        B, S, _ = x.shape
        q = self.q_proj(x).view(B, S, -1, self.head_dim)
        k = self.k_proj(x).view(B, S, -1, self.head_dim)
        v = self.v_proj(x).view(B, S, -1, self.head_dim).transpose(1, 2)
        if self.q_norm is not None and self.k_norm is not None:
            q, k = self.q_norm(q), self.k_norm(k)
        q, k = apply_rotary(q.transpose(1, 2), k.transpose(1, 2), *position_embeddings)  # [B, H(_kv), S, hd]
        if past_key_values is not None:
            k, v = past_key_values.update(k, v, cache_slot)
        impl = self.config._attn_implementation  # never "eager": the model refuses it at construction
        attend = sdpa_attention_forward if impl in (None, "sdpa") else ALL_ATTENTION_FUNCTIONS[impl]
        out, _ = attend(self, q, k, v, attention_mask, dropout=0.0, scaling=self.scaling)
        return self.o_proj(out.reshape(B, S, -1))
