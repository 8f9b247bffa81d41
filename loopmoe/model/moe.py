"""Dropless sparse MoE feed-forward: router, SwiGLU experts, shared experts, balancing losses.

Dispatch sorts the (token, expert) assignments by expert so that each expert sees one
contiguous block of rows, then runs either one matmul per expert group (``loop``: CPU, where
``torch._grouped_mm`` has no backward) or one grouped GEMM over all groups (``grouped_mm``: CUDA,
no host synchronisation). Expert weights are 3-D tensors in the Qwen3-MoE layout
(``gate_up_proj: [E, 2f, d]`` gate rows first, ``down_proj: [E, d, f]``); the loop path has a
hand-written backward (``_LoopExperts``) that writes each expert's gradient straight into one 3-D
gradient tensor. Tokens are permuted into expert order and back with gathers whose backward is the
inverse gather (no scatter-add), and the k expert outputs of a token are combined by a weighted sum.

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
from loopmoe.model.layers import SPLIT_MAX_ROWS, Linear, linear


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
        logits = linear(x, self.weight)
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
        self.gate_proj = Linear(hidden_size, intermediate_size)
        self.up_proj = Linear(hidden_size, intermediate_size)
        self.down_proj = Linear(intermediate_size, hidden_size)

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
        # CPU: one matmul per non-empty expert group. Empty experts are skipped (at batch-1 decoding
        # most are), and the backward is hand-written (``_LoopExperts``) so that weight gradients
        # are written straight into the 3-D gradient tensors: autograd through ``unbind`` / ``chunk`` /
        # ``split`` / ``cat`` would copy every activation and weight gradient once more.
        groups = _groups(counts.tolist())
        if torch.is_grad_enabled() and (x_sorted.requires_grad or self.gate_up_proj.requires_grad):
            return _LoopExperts.apply(x_sorted, self.gate_up_proj, self.down_proj, groups)
        return _loop_experts_forward(x_sorted, self.gate_up_proj, self.down_proj, groups, decoding=True)[0]


def _groups(counts: list[int]) -> list[tuple[int, int, int]]:
    """``(expert, first row, rows)`` of every expert that received rows."""
    groups, start = [], 0
    for e, n in enumerate(counts):
        if n > 0:
            groups.append((e, start, n))
        start += n
    return groups


def _loop_experts_forward(x, w_gate_up, w_down, groups, decoding: bool = False):
    """SwiGLU of each expert group; returns (y, gate pre-activations g, up u, silu(g)).

    Gate and up projections are written into two contiguous buffers (two matmuls per expert on
    the gate and up halves of ``gate_up_proj``): element-wise kernels on a strided half of one
    ``[rows, 2f]`` buffer run at half speed on CPU. The activation runs once over all groups.
    ``decoding`` (inference): groups of a few rows are bound by reading the expert's weight, and
    ``linear`` splits those matvecs across threads; in training the weights are hot in cache.
    """
    f = w_down.shape[-1]
    g, u = x.new_empty(2, x.shape[0], f).unbind(0)
    y = x.new_empty(x.shape[0], w_down.shape[1])
    for e, s, n in groups:
        _matmul_into(x[s : s + n], w_gate_up[e, :f], g[s : s + n], decoding)
        _matmul_into(x[s : s + n], w_gate_up[e, f:], u[s : s + n], decoding)
    act = F.silu(g)
    a = act * u
    for e, s, n in groups:
        _matmul_into(a[s : s + n], w_down[e], y[s : s + n], decoding)
    return y, g, u, act


def _matmul_into(x, weight, out, decoding: bool):
    """``out = x @ weight.T``."""
    if decoding and x.shape[0] <= SPLIT_MAX_ROWS:
        out.copy_(linear(x, weight))
    else:
        torch.mm(x, weight.t(), out=out)


class _LoopExperts(torch.autograd.Function):
    """Expert SwiGLUs over rows sorted by expert, with a fused backward.

    Backward per group, with ``a = silu(g) * u`` recomputed rather than saved: ``ga = gy W_d``,
    ``gW_d = gy^T a``, ``gu = silu(g) * ga``, ``gg = silu'(g) * ga * u``, ``gW_gu = [gg; gu]^T x``
    (written into the two halves of the expert's gradient), ``gx = gg W_g + gu W_u``. Experts that
    got no rows receive zero gradients, as through autograd.
    """

    @staticmethod
    def forward(ctx, x, w_gate_up, w_down, groups):
        y, g, u, act = _loop_experts_forward(x, w_gate_up, w_down, groups)
        ctx.groups = groups
        ctx.save_for_backward(x, w_gate_up, w_down, g, u, act)
        return y

    @staticmethod
    def backward(ctx, gy):
        x, w_gate_up, w_down, g, u, act = ctx.saved_tensors
        groups, f = ctx.groups, w_down.shape[-1]
        gy = gy.contiguous()
        need_x, need_gu, need_d = ctx.needs_input_grad[:3]
        ga = gy.new_empty(gy.shape[0], f)
        a = act * u if need_d else None
        g_down = _zeros_outside(w_down, groups) if need_d else None
        for e, s, n in groups:
            torch.mm(gy[s : s + n], w_down[e], out=ga[s : s + n])
            if need_d:
                torch.mm(gy[s : s + n].t(), a[s : s + n], out=g_down[e])
        g_up = ga * act
        g_gate = torch.ops.aten.silu_backward(ga.mul_(u), g)
        g_x = x.new_empty(x.shape) if need_x else None
        g_gate_up = _zeros_outside(w_gate_up, groups) if need_gu else None
        for e, s, n in groups:
            if need_gu:
                torch.mm(g_gate[s : s + n].t(), x[s : s + n], out=g_gate_up[e, :f])
                torch.mm(g_up[s : s + n].t(), x[s : s + n], out=g_gate_up[e, f:])
            if need_x:
                torch.mm(g_gate[s : s + n], w_gate_up[e, :f], out=g_x[s : s + n])
                g_x[s : s + n].addmm_(g_up[s : s + n], w_gate_up[e, f:])
        return g_x, g_gate_up, g_down, None


def _zeros_outside(weight: torch.Tensor, groups) -> torch.Tensor:
    """An uninitialised gradient for a 3-D expert weight, zeroed only on experts without rows."""
    grad = torch.empty_like(weight)
    hit = {e for e, _, _ in groups}
    for e in range(weight.shape[0]):
        if e not in hit:
            grad[e].zero_()
    return grad


class _PermuteRows(torch.autograd.Function):
    """``x[perm]`` for a permutation ``perm``; its gradient is the gather by the inverse permutation.

    Autograd would differentiate the gather with an accumulating scatter (``index_put_`` /
    ``index_add_``), which is serial and several times slower on CPU than a second gather.
    """

    @staticmethod
    def forward(ctx, x, perm, inverse):
        ctx.save_for_backward(inverse)
        return x.index_select(0, perm)

    @staticmethod
    def backward(ctx, grad):
        (inverse,) = ctx.saved_tensors
        return grad.index_select(0, inverse), None, None


class _GatherTokens(torch.autograd.Function):
    """Rows ``x[order // k]`` (each token once per selected expert, in expert order).

    Backward: every token appears exactly k times, so its gradient is the sum of its k rows,
    found through the inverse permutation: a gather and a sum instead of a scatter-add.
    """

    @staticmethod
    def forward(ctx, x, token_of_row, inverse, k):
        ctx.save_for_backward(inverse)
        ctx.k = k
        return x.index_select(0, token_of_row)

    @staticmethod
    def backward(ctx, grad):
        (inverse,) = ctx.saved_tensors
        rows = grad.index_select(0, inverse)  # [N*k, d] back in (token, slot) order
        return rows.view(-1, ctx.k, rows.shape[-1]).sum(1), None, None, None


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

    def forward(
        self, hidden: torch.Tensor, token_mask: torch.Tensor | None = None, router_stats: bool = True
    ) -> tuple[torch.Tensor, RouterOutput | None]:
        # hidden: [B, S, d]; token_mask: [B, S] bool, False on padding (excluded from losses/statistics).
        # router_stats=False (generation) skips the balancing losses and statistics and returns None.
        B, S, d = hidden.shape
        x = hidden.reshape(-1, d)  # [N, d]
        logits, probs, topk_w, topk_idx = self.gate(x)
        y = self._dispatch(x, topk_w, topk_idx)
        if self.shared_experts is not None:
            y = y + self.shared_experts(x)
        router = self._balance(logits, probs, topk_idx, token_mask) if router_stats else None
        return y.view(B, S, d), router

    def _dispatch(self, x: torch.Tensor, topk_w: torch.Tensor, topk_idx: torch.Tensor) -> torch.Tensor:
        # x: [N, d], topk_w / topk_idx: [N, k] -> sum_j topk_w[:, j] * expert_{topk_idx[:, j]}(x): [N, d]
        N, d = x.shape
        k = self.top_k
        if N == 1 and not torch.is_grad_enabled():
            return self._dispatch_one(x, topk_w, topk_idx)
        flat_expert = topk_idx.reshape(-1)  # [N*k], row n*k + j: token n, slot j
        order = torch.argsort(flat_expert, stable=True)  # rows grouped by expert
        inverse = torch.empty_like(order)
        inverse[order] = torch.arange(order.numel(), device=order.device)
        counts = torch.bincount(flat_expert, minlength=self.num_experts)
        if torch.is_grad_enabled():
            x_sorted = _GatherTokens.apply(x, order // k, inverse, k)
            y = _PermuteRows.apply(self.experts(x_sorted, counts), inverse, order)
        else:
            y = self.experts(x.index_select(0, order // k), counts).index_select(0, inverse)
        # Weighted sum over the k slots of each token (for k = 2 this equals transformers' index_add_
        # into zeros bit for bit: fp addition of two terms commutes).
        return (y.view(N, k, d) * topk_w.unsqueeze(-1)).sum(1)

    def _dispatch_one(self, x, topk_w, topk_idx):
        """Inference on a single token (batch-1 decoding): one expert call per selected expert,
        without the sort / bincount / permutations whose fixed cost dominates at one row. The same
        SwiGLU as the sorted path, equal to it up to fp rounding (one gate_up matvec here, two
        halves there)."""
        experts, f = self.experts, self.experts.down_proj.shape[-1]
        y = None
        for j, e in enumerate(topk_idx[0].tolist()):
            gate, up = linear(x, experts.gate_up_proj[e]).split(f, dim=-1)
            term = linear(F.silu(gate) * up, experts.down_proj[e]) * topk_w[:, j : j + 1]
            y = term if y is None else y + term
        return y

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
        return RouterOutput(aux_loss=aux_loss, z_loss=z_loss, load=frac.detach(), entropy=entropy, topk_idx=topk_idx)
