"""Dropless sparse MoE feed-forward: router, SwiGLU experts, shared experts, balancing losses.

Dispatch sorts the (token, expert) assignments by expert so that each expert sees one
contiguous block of rows, then runs either one matmul per expert group (``loop``: CPU, where
``torch._grouped_mm`` has no backward) or one grouped GEMM over all groups (``grouped_mm``: CUDA,
no host synchronisation). Expert weights are 3-D tensors in the Qwen3-MoE layout
(``gate_up_proj: [E, 2f, d]`` gate rows first, ``down_proj: [E, d, f]``); the loop path reads
them through ``unbind`` so the backward writes one gradient tensor, not one per expert.

Balancing, all per executed (layer, iteration) slot:
- switch-style auxiliary loss ``E * sum_i f_i * P_i`` (``f_i``: fraction of assignments, ``P_i``:
  mean normalised score), equal to 1 at perfect balance;
- router z-loss ``mean(logsumexp(logits)^2)``;
- auxiliary-loss-free bias balancing (DeepSeek-V3): a per-expert bias that only affects which
  experts are selected, nudged after each optimiser step towards uniform load.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from loopmoe.config import LoopMoEConfig


@dataclass
class RouterOutput:
    """What one MoE call reports back to the model for losses and statistics."""

    aux_loss: torch.Tensor  # scalar, switch-style load-balancing loss of this slot
    z_loss: torch.Tensor  # scalar
    load: torch.Tensor  # [E] fraction of routed assignments per expert (detached)
    entropy: torch.Tensor  # scalar mean entropy of the normalised scores (detached)
    topk_idx: torch.Tensor  # [N, k] selected experts, for routing analyses


class TopKRouter(nn.Module):
    """Linear router over experts with softmax or sigmoid scores and optional selection bias."""

    def __init__(self, config: LoopMoEConfig):
        super().__init__()
        self.top_k = config.num_experts_per_tok
        self.num_experts = config.num_experts
        self.score = config.router_score
        self.norm_topk_prob = config.norm_topk_prob
        self.weight = nn.Parameter(torch.zeros(config.num_experts, config.hidden_size))
        # Selection-only bias of aux-loss-free balancing, saved with the model; the assignment counts
        # since the last bias update are transient.
        self.register_buffer("expert_bias", torch.zeros(config.num_experts), persistent=True)
        self.register_buffer("pending_counts", torch.zeros(config.num_experts), persistent=False)
        self.track_counts = config.router_bias_update_rate > 0

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        # x: [N, d] -> logits [N, E], normalised scores [N, E], top-k weights [N, k], top-k ids [N, k]
        logits = F.linear(x, self.weight)
        if self.score == "softmax":
            scores = torch.softmax(logits, dim=-1, dtype=torch.float32)
        else:
            scores = torch.sigmoid(logits.float())
        if self.track_counts:
            _, topk_idx = torch.topk(scores + self.expert_bias, self.top_k, dim=-1)
            topk_w = scores.gather(-1, topk_idx)
        else:
            topk_w, topk_idx = torch.topk(scores, self.top_k, dim=-1)
        if self.norm_topk_prob:
            topk_w = topk_w / topk_w.sum(dim=-1, keepdim=True)
        # Probabilities over experts for the balancing loss and entropy (sigmoid scores do not sum to 1).
        probs = scores if self.score == "softmax" else scores / scores.sum(dim=-1, keepdim=True)
        return logits, probs, topk_w.to(x.dtype), topk_idx

    @torch.no_grad()
    def update_bias(self, rate: float, reduce_fn=None) -> None:
        """Move the selection bias towards uniform load: ``b_i += rate * sign(mean(c) - c_i)``."""
        counts = self.pending_counts.clone()
        if reduce_fn is not None:
            reduce_fn(counts)
        if counts.sum() > 0:
            self.expert_bias += rate * torch.sign(counts.mean() - counts)
        self.pending_counts.zero_()


class SwiGLU(nn.Module):
    """Dense SwiGLU MLP, used for the shared experts."""

    def __init__(self, hidden_size: int, intermediate_size: int):
        super().__init__()
        self.gate_proj = nn.Linear(hidden_size, intermediate_size, bias=False)
        self.up_proj = nn.Linear(hidden_size, intermediate_size, bias=False)
        self.down_proj = nn.Linear(intermediate_size, hidden_size, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class Experts(nn.Module):
    """E SwiGLU experts stored as 3-D weights, applied to rows already sorted by expert."""

    def __init__(self, config: LoopMoEConfig):
        super().__init__()
        E, d, f = config.num_experts, config.hidden_size, config.moe_intermediate_size
        self.num_experts = E
        self.gate_up_proj = nn.Parameter(torch.empty(E, 2 * f, d))
        self.down_proj = nn.Parameter(torch.empty(E, d, f))
        self.implementation = config.moe_implementation

    def forward(self, x_sorted: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
        # x_sorted: [N*k, d] rows grouped by expert; counts: [E] rows per expert -> [N*k, d]
        impl = self.implementation
        if impl == "auto":
            impl = "grouped_mm" if x_sorted.is_cuda else "loop"
        if impl == "grouped_mm":
            offsets = torch.cumsum(counts, dim=0, dtype=torch.int32)
            gate_up = torch._grouped_mm(x_sorted, self.gate_up_proj.transpose(-2, -1), offs=offsets)
            gate, up = gate_up.chunk(2, dim=-1)
            return torch._grouped_mm(F.silu(gate) * up, self.down_proj.transpose(-2, -1), offs=offsets)
        outputs = []
        for rows, w_gate_up, w_down in zip(
            x_sorted.split(counts.tolist()), self.gate_up_proj.unbind(0), self.down_proj.unbind(0)
        ):
            gate, up = F.linear(rows, w_gate_up).chunk(2, dim=-1)
            outputs.append(F.linear(F.silu(gate) * up, w_down))
        return torch.cat(outputs)


class SparseMoE(nn.Module):
    """Router + dropless experts (+ shared experts). Returns the output and a RouterOutput."""

    def __init__(self, config: LoopMoEConfig):
        super().__init__()
        self.num_experts = config.num_experts
        self.top_k = config.num_experts_per_tok
        self.gate = TopKRouter(config)
        self.experts = Experts(config)
        f_s = config.shared_expert_intermediate_size
        self.shared_experts = SwiGLU(config.hidden_size, f_s) if f_s > 0 else None

    def forward(self, hidden: torch.Tensor, token_mask: torch.Tensor | None = None) -> tuple[torch.Tensor, RouterOutput]:
        # hidden: [B, S, d]; token_mask: [B, S] bool, False on padding (excluded from losses/statistics)
        B, S, d = hidden.shape
        x = hidden.reshape(-1, d)  # [N, d]
        logits, probs, topk_w, topk_idx = self.gate(x)

        flat_expert = topk_idx.reshape(-1)  # [N*k]
        order = torch.argsort(flat_expert, stable=True)
        token_of_row = order // self.top_k  # [N*k] source token of each sorted row
        counts = torch.bincount(flat_expert, minlength=self.num_experts)
        y_sorted = self.experts(x[token_of_row], counts)  # [N*k, d]
        y_sorted = y_sorted * topk_w.reshape(-1)[order].unsqueeze(-1)
        out = torch.zeros_like(x).index_add_(0, token_of_row, y_sorted)
        if self.shared_experts is not None:
            out = out + self.shared_experts(x)

        router = self._balance(logits, probs, topk_idx, token_mask)
        return out.view(B, S, d), router

    def _balance(self, logits, probs, topk_idx, token_mask) -> RouterOutput:
        E = self.num_experts
        if token_mask is None:
            weight = torch.ones(probs.shape[0], device=probs.device, dtype=torch.float32)
        else:
            weight = token_mask.reshape(-1).to(torch.float32)
        n = weight.sum().clamp_min(1.0)
        assigned = torch.zeros(E, device=probs.device, dtype=torch.float32).scatter_add_(
            0, topk_idx.reshape(-1), weight.repeat_interleave(self.top_k)
        )
        frac = assigned / (n * self.top_k)  # [E], sums to 1 over experts
        mean_prob = (probs * weight[:, None]).sum(0) / n  # [E]
        aux_loss = E * torch.sum(frac * mean_prob)
        z_loss = (torch.logsumexp(logits.float(), dim=-1).square() * weight).sum() / n
        with torch.no_grad():
            entropy = -(probs * probs.clamp_min(1e-20).log()).sum(-1)
            entropy = (entropy * weight).sum() / n
            if self.training and self.gate.track_counts:
                self.gate.pending_counts += assigned
        return RouterOutput(aux_loss=aux_loss, z_loss=z_loss, load=frac.detach(), entropy=entropy,
                            topk_idx=topk_idx)
