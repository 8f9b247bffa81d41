"""Dropless sparse MoE feed-forward: router, SwiGLU experts, shared experts, balancing losses.

With ``expert_type = "dcca"`` (BigMac's descend-communicate-communicate-ascend layer) the experts
work at a width d_e below the model width d: a descending projection ``d -> d_e`` runs once per token
before dispatch, the experts are SwiGLUs ``d_e -> f -> d_e``, the k expert outputs are combined at
width d_e, and an ascending projection ``d_e -> d`` runs once per token after the combine. The router
(on the full-width x by default) and the shared experts (always on x) are unchanged. Everything
between the two projections (sorting, the expert kernels, the permutations, the combine) is the same
code at width d_e.

Dispatch sorts the (token, expert) assignments by expert so that each expert sees one
contiguous block of rows, runs the experts on those blocks (``kernels.experts``: one grouped GEMM
on CUDA, one matmul per expert group on CPU), permutes the rows back (``kernels.permute``) and
combines the k expert outputs of a token by a weighted sum. Expert weights are 3-D tensors in the
Qwen3-MoE layout (``gate_up_proj: [E, 2f, d]`` gate rows first, ``down_proj: [E, d, f]``).

Balancing, all per executed (layer, iteration) slot:
- switch-style auxiliary loss ``E * sum_i f_i * P_i`` (``f_i``: fraction of assignments, ``P_i``:
  mean normalised score), equal to 1 at perfect balance;
- router z-loss ``mean(logsumexp(logits)^2)``;
- auxiliary-loss-free bias balancing (DeepSeek-V3): a per-expert bias that only affects which
  experts are selected, nudged after each optimiser step towards uniform load.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from loopmoe.config import ExpertType, LoopMoEConfig, expert_width, router_width
from loopmoe.model.kernels.autocast import autocast_operands
from loopmoe.model.kernels.experts import (
    FEW_TOKENS,
    NAMESPACE,
    experts_few_tokens,
    experts_grouped_mm,
    experts_loop,
    ops,
)
from loopmoe.model.kernels.linear import linear
from loopmoe.model.kernels.permute import gather_tokens, permute_rows
from loopmoe.model.layers import Linear
from loopmoe.model.slots import Slot


@dataclass
class RouterStats:
    """What one MoE call reports: its balancing losses and its routing statistics."""

    aux_loss: torch.Tensor  # scalar, switch-style load-balancing loss of this slot
    z_loss: torch.Tensor  # scalar
    load: torch.Tensor  # [E] fraction of routed assignments per expert (detached)
    entropy: torch.Tensor  # scalar mean entropy of the normalised scores (detached)
    experts: torch.Tensor  # [N, k] selected expert ids, for routing analyses
    slot: Slot | None = None  # the executed (layer, iteration) it came from; set by the model


def _recomputing() -> bool:
    """True while autograd runs a backward pass: a forward now is activation checkpointing's
    recomputation, whose routing was already counted by the original forward."""
    return torch._C._current_graph_task_id() != -1


# The count update as an op with a side effect: ``_recomputing`` must be asked when the forward runs,
# not when ``torch.compile`` traces it (which would fold it into a constant, and a compiled layer's
# recomputation under activation checkpointing would count its tokens twice).
@torch.library.custom_op(f"{NAMESPACE}::add_expert_counts_", mutates_args=("pending",))
def _add_expert_counts_(pending: torch.Tensor, assigned: torch.Tensor) -> None:
    """``pending += assigned``, except in activation checkpointing's recomputation."""
    if not _recomputing():
        pending += assigned


@_add_expert_counts_.register_fake
def _add_expert_counts_fake(pending, assigned):
    return None


def expert_counts(expert_ids: torch.Tensor, num_experts: int) -> torch.Tensor:
    """``bincount(expert_ids, minlength=num_experts)`` (``[E]``, int64) for ids known to lie below
    ``num_experts``: a scatter-add of fixed output size, which ``torch.compile`` traces (``bincount``'s
    output size depends on the largest id)."""
    return expert_ids.new_zeros(num_experts).scatter_add_(0, expert_ids, torch.ones_like(expert_ids))


class TopKRouter(nn.Module):
    """Linear router over experts with softmax or sigmoid scores and optional selection bias."""

    expert_bias: torch.Tensor  # [E] buffers
    pending_counts: torch.Tensor

    def __init__(self, config: LoopMoEConfig):
        super().__init__()
        self.top_k = config.num_experts_per_tok
        self.num_experts = config.num_experts
        self.score = config.router_score
        self.norm_topk_prob = config.norm_topk_prob
        self.weight = nn.Parameter(torch.zeros(config.num_experts, router_width(config)))
        # Selection-only bias of aux-loss-free balancing, saved with the model; the assignment counts
        # since the last bias update are transient.
        self.register_buffer("expert_bias", torch.zeros(config.num_experts), persistent=True)
        self.register_buffer("pending_counts", torch.zeros(config.num_experts), persistent=False)
        self.track_counts = config.router_bias_update_rate > 0  # counts feed the bias updates only

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        # x: [N, d] (or [N, d_e]: a DCCA router on the descended vector) -> logits [N, E], normalised
        # scores [N, E], top-k weights [N, k], top-k ids [N, k]
        logits = linear(x, self.weight)
        if self.score == "softmax":
            scores = torch.softmax(logits, dim=-1, dtype=torch.float32)
        else:
            scores = torch.sigmoid(logits.float())
        # The learned bias always takes part in selection (a zero bias selects as plain top-k); the update
        # rate only says whether it keeps moving, so a bias frozen with rate 0 still routes as trained.
        _, topk_idx = torch.topk(scores + self.expert_bias, self.top_k, dim=-1)
        topk_w = scores.gather(-1, topk_idx)
        if self.norm_topk_prob:
            topk_w = topk_w / topk_w.sum(dim=-1, keepdim=True)
        # Probabilities over experts for the balancing loss and entropy (sigmoid scores do not sum to 1).
        probs = scores if self.score == "softmax" else scores / scores.sum(dim=-1, keepdim=True)
        return logits, probs, topk_w if topk_w.dtype == x.dtype else topk_w.to(x.dtype), topk_idx

    @torch.no_grad()
    def update_bias(self, rate: float, counts: torch.Tensor) -> None:
        """Move the selection bias towards uniform load, ``b_i += rate * sign(mean(c) - c_i)``, from
        the (all-reduced) assignment counts ``c`` since the last update; then reset the counts."""
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
    """E SwiGLU experts stored as 3-D weights, applied to rows already sorted by expert.

    The rows are ``w`` wide: the model width d, or the DCCA width d_e (``loopmoe.config.expert_width``).
    """

    def __init__(self, config: LoopMoEConfig):
        super().__init__()
        E, w, f = config.num_experts, expert_width(config), config.moe_intermediate_size
        self.num_experts = E
        self.gate_up_proj = nn.Parameter(torch.empty(E, 2 * f, w))
        self.down_proj = nn.Parameter(torch.empty(E, w, f))
        self.implementation = config.moe_implementation

    def forward(self, x_sorted: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
        # x_sorted: [N*k, w] rows grouped by expert; counts: [E] rows per expert -> [N*k, w]
        impl = self.implementation
        if impl == "auto":
            impl = "grouped_mm" if x_sorted.is_cuda else "loop"
        run = experts_grouped_mm if impl == "grouped_mm" else experts_loop
        # The experts are custom ops, which autocast does not see.
        x_sorted, w_gate_up, w_down = autocast_operands(x_sorted, self.gate_up_proj, self.down_proj)
        return run(x_sorted, w_gate_up, w_down, counts)


class SparseMoE(nn.Module):
    """Router + dropless experts (+ shared experts). Returns the output and its ``RouterStats``.

    A DCCA layer (``expert_type = "dcca"``) also holds ``descend: [d_e, d]`` and ``ascend: [d, d_e]``
    around its experts; elsewhere both are None.
    """

    def __init__(self, config: LoopMoEConfig):
        super().__init__()
        self.num_experts = config.num_experts
        self.top_k = config.num_experts_per_tok
        self.gate = TopKRouter(config)
        self.experts = Experts(config)
        f_s = config.shared_expert_intermediate_size
        self.shared_experts = SwiGLU(config.hidden_size, f_s) if f_s > 0 else None
        d, w = config.hidden_size, expert_width(config)
        projects = ExpertType(config.expert_type).projects
        self.descend = Linear(d, w) if projects else None
        self.ascend = Linear(w, d) if projects else None
        self.route_descended = router_width(config) != d
        # Expert parallelism (``loopmoe.distributed.expert_parallel``) sets this to the all_to_all
        # exchange that runs the experts, which then hold only this rank's block; None: all local.
        self.expert_parallel: Callable[[torch.Tensor, torch.Tensor, nn.Module], torch.Tensor] | None = None

    def forward(
        self, hidden: torch.Tensor, token_mask: torch.Tensor | None = None, router_stats: bool = True
    ) -> tuple[torch.Tensor, RouterStats | None]:
        # hidden: [B, S, d]; token_mask: [B, S] bool, False on padding (excluded from losses/statistics).
        # router_stats=False (generation) skips the balancing losses and statistics and returns None.
        B, S, d = hidden.shape
        x = hidden.reshape(-1, d)  # [N, d]
        x_low = self.descend(x) if self.descend is not None else x  # [N, w]: DCCA descends once per token
        logits, probs, topk_w, topk_idx = self.gate(x_low if self.route_descended else x)
        y = self._dispatch(x_low, topk_w, topk_idx)  # [N, w]: the k outputs combined at width w
        if self.ascend is not None:
            y = self.ascend(y)  # [N, d]: DCCA ascends once per token, after the combine
        if self.shared_experts is not None:
            y = y + self.shared_experts(x)
        router = self._balance(logits, probs, topk_idx, token_mask) if router_stats else None
        return y.view(B, S, d), router

    def _dispatch(self, x: torch.Tensor, topk_w: torch.Tensor, topk_idx: torch.Tensor) -> torch.Tensor:
        # x: [N, w], topk_w / topk_idx: [N, k] -> sum_j topk_w[:, j] * expert_{topk_idx[:, j]}(x): [N, w]
        N, w = x.shape
        k = self.top_k
        # A few tokens at inference: one token anywhere, up to FEW_TOKENS on CPU (on a GPU the sorted
        # path's grouped GEMM needs no host sync and one launch per projection).
        few = N == 1 or (N <= FEW_TOKENS and x.device.type == "cpu")
        if few and not torch.is_grad_enabled() and self.expert_parallel is None:
            return self._dispatch_few(x, topk_w, topk_idx)
        flat_expert = topk_idx.reshape(-1)  # [N*k], row n*k + j: token n, slot j
        order = torch.argsort(flat_expert, stable=True)  # rows grouped by expert
        inverse = torch.empty_like(order)
        inverse[order] = torch.arange(order.numel(), device=order.device)
        counts = expert_counts(flat_expert, self.num_experts)
        if self.expert_parallel is not None:  # rows travel to the ranks holding their experts and back
            x_sorted = gather_tokens(x, order // k, inverse, k)
            y = permute_rows(self.expert_parallel(x_sorted, counts, self.experts), inverse, order)
        elif torch.is_grad_enabled():
            x_sorted = gather_tokens(x, order // k, inverse, k)
            y = permute_rows(self.experts(x_sorted, counts), inverse, order)
        else:
            y = self.experts(x.index_select(0, order // k), counts).index_select(0, inverse)
        # Weighted sum over the k slots of each token (for k = 2 this equals transformers' index_add_
        # into zeros bit for bit: fp addition of two terms commutes).
        return (y.view(N, k, w) * topk_w.unsqueeze(-1)).sum(1)

    def _dispatch_few(self, x, topk_w, topk_idx):
        """Inference on a few tokens (decoding): the expert groups formed on the host, without the
        sort / counts / permutations whose fixed cost dominates at a few rows
        (``kernels.experts.experts_few_tokens``)."""
        # No ``autocast_operands``: that would cast every expert's weight; the kernel's matmuls
        # autocast the selected experts' own.
        return experts_few_tokens(x, self.experts.gate_up_proj, self.experts.down_proj, topk_w, topk_idx)

    def _balance(self, logits, probs, topk_idx, token_mask) -> RouterStats:
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
            if self.training and self.gate.track_counts:  # not in a recomputation (the op asks)
                ops.add_expert_counts_(self.gate.pending_counts, assigned)
        return RouterStats(aux_loss=aux_loss, z_loss=z_loss, load=frac.detach(), entropy=entropy, experts=topk_idx)
