"""Iteration conditioning of the looped core: IterAdaLN and its ablations (docs/design.md §2).

IterAdaLN, for core layer l at iteration k (0-based)::

    v_k = MLP_iter(PE(k))                         # shared by the core, width r
    u   = W_h · RMSNorm(h)                        # per layer, per token, rank r
    c   = SiLU(v_k + u)
    [β1, γ1, α1, β2, γ2, α2] = W_mod,l · c        # W_mod zero-initialised

``adaln_iter`` drops ``u`` (modulation from k only), ``adaln_token`` drops ``v_k`` (from h only);
``iter_embedding`` adds a learned per-iteration vector to h instead of modulating. Because
``PE(k)`` is a fixed function of k, IterAdaLN and ``adaln_iter`` run at any loop count.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from loopmoe.config import LoopMoEConfig
from loopmoe.model.kernels.linear import SPLIT_MAX_ROWS
from loopmoe.model.layers import RMSNorm


def sinusoidal_encoding(k: int, dim: int, device=None, dtype=torch.float32) -> torch.Tensor:
    """Transformer-style encoding of the integer k: ``[sin(k w_i), cos(k w_i)]`` -> ``[dim]``."""
    freqs = torch.exp(-math.log(10000.0) * torch.arange(0, dim, 2, device=device, dtype=torch.float32) / dim)
    angles = k * freqs
    return torch.cat([angles.sin(), angles.cos()]).to(dtype)


class IterationEncoder(nn.Module):
    """``v_k = MLP_iter(PE(k))``: one small MLP shared by all core layers."""

    def __init__(self, config: LoopMoEConfig):
        super().__init__()
        self.pe_dim = config.iter_pe_dim
        self.fc1 = nn.Linear(config.iter_pe_dim, config.iter_cond_rank)
        self.fc2 = nn.Linear(config.iter_cond_rank, config.iter_cond_rank)

    def forward(self, k: int | torch.Tensor, like: torch.Tensor) -> torch.Tensor:
        """``v_k`` [r] for an int ``k``; for a tensor of per-token iteration indices ``k`` [...] -> [..., r].

        The tensor form is what continuous depth batching (``depth_batching.py``) needs: one core
        forward carries tokens at different iterations. It evaluates the int form once per iteration
        index up to ``k.max()`` and gathers, so each token's ``v_k`` is bit for bit the one a forward
        that runs all its tokens at iteration k computes (the MLP is not re-run at another batch shape,
        whose matmul could round differently).
        """
        if isinstance(k, torch.Tensor):
            table = torch.stack([self(i, like) for i in range(int(k.max()) + 1)])  # [K, r]
            return table[k]
        pe = sinusoidal_encoding(k, self.pe_dim, device=like.device, dtype=self.fc1.weight.dtype)
        return self.fc2(F.silu(self.fc1(pe))).to(like.dtype)  # [r]


class ZeroInitLinear(nn.Linear):
    """A linear layer initialised to zero, so a modulation starts as the identity."""


_PLUS_ONE = (0.0, 1.0, 1.0, 0.0, 1.0, 1.0)  # β1, 1+γ1, 1+α1, β2, 1+γ2, 1+α2


class Modulation(nn.Module):
    """Per-layer modulation ``[β1, γ1, α1, β2, γ2, α2] = W_mod · SiLU(v_k + W_h · RMSNorm(h))``."""

    def __init__(self, config: LoopMoEConfig):
        super().__init__()
        d, r = config.hidden_size, config.iter_cond_rank
        self.use_token = config.conditioning.uses_token
        self.use_iter = config.conditioning.uses_iteration
        if self.use_token:
            self.norm = RMSNorm(d, eps=config.rms_norm_eps)
            self.w_h = nn.Linear(d, r, bias=False)
        self.w_mod = ZeroInitLinear(r, 6 * d)
        self._plus_one_cache: dict[tuple[torch.dtype, torch.device], torch.Tensor] = {}

    def forward(self, h: torch.Tensor, v_k: torch.Tensor | None) -> tuple[torch.Tensor, ...]:
        # h: [B, S, d], v_k: [r] (one iteration for all tokens) or [B, S, r] (a per-token iteration,
        # continuous depth batching) -> (β1, 1+γ1, 1+α1, β2, 1+γ2, 1+α2), each [B, S, d]
        signal: torch.Tensor | float = 0.0
        if self.use_iter:
            assert v_k is not None, "a modulation from the iteration index needs v_k"
            signal = v_k
        if self.use_token:
            signal = signal + self.w_h(self.norm(h))  # [B, S, r]
        assert isinstance(signal, torch.Tensor)  # a modulated layer uses at least one of the two
        c = F.silu(signal)
        d = self.w_mod.out_features // 6
        w, b = self.w_mod.weight, self.w_mod.bias
        # The "1 +" of the scales and gates goes into the bias instead of a [B, S, d] add.
        if not torch.is_grad_enabled() and c.numel() // c.shape[-1] <= SPLIT_MAX_ROWS:
            # Decoding: one [6d] product split into six views. Four ops instead of the 24 below, which
            # a decoding step pays per executed core layer; on a few rows strided chunks cost nothing.
            return F.linear(c, w, b + self._plus_one(b)).split(d, dim=-1)
        # Six contiguous [B, S, d] outputs from row blocks of W_mod, rather than chunks of one
        # [B, S, 6d] product: element-wise kernels on those strided chunks run at half speed on
        # CPU, and the backward of `chunk` concatenates six activation-sized gradients.
        return tuple(
            F.linear(c, w[i * d : (i + 1) * d], b[i * d : (i + 1) * d] + one) for i, one in enumerate(_PLUS_ONE)
        )

    def _plus_one(self, bias: torch.Tensor) -> torch.Tensor:
        """``[0, 1, 1, 0, 1, 1]`` repeated over each block of ``d``, [6d], made once per dtype and device
        (kept off the state dict and the buffers, so meta-device initialisation never has to fill it)."""
        key = (bias.dtype, bias.device)
        cached = self._plus_one_cache.get(key)
        if cached is None:
            cached = torch.tensor(_PLUS_ONE, dtype=bias.dtype, device=bias.device).repeat_interleave(bias.shape[0] // 6)
            if not torch.compiler.is_compiling():  # a traced graph makes it as a constant instead
                self._plus_one_cache[key] = cached
        return cached
