"""SwiGLU experts applied to token rows already sorted by expert.

Expert weights are 3-D tensors in the Qwen3-MoE layout: ``w_gate_up: [E, 2f, d]`` (gate rows
first) and ``w_down: [E, d, f]``; ``counts: [E]`` says how many consecutive rows each expert gets.
Three implementations of the same function:

- ``experts_reference``: one autograd-tracked SwiGLU per expert, concatenated; the definition.
- ``experts_grouped_mm``: one ``torch._grouped_mm`` per projection, no per-expert host loop
  (CUDA; on CPU torch 2.13 has no backward for it).
- ``experts_loop``: one matmul per non-empty expert group (CPU), with ``_LoopExperts``' backward,
  which writes each expert's weight gradient straight into the 3-D gradient tensors: autograd
  through ``unbind`` / ``chunk`` / ``split`` / ``cat`` would copy every activation and weight
  gradient once more. Empty experts are skipped (at batch-1 decoding most are).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from loopmoe.model.kernels.linear import matmul_into


def experts_reference(
    x_sorted: torch.Tensor, w_gate_up: torch.Tensor, w_down: torch.Tensor, counts: torch.Tensor
) -> torch.Tensor:
    """``[N*k, d] -> [N*k, d]``: row block e goes through expert e's SwiGLU."""
    outs = []
    for e, rows in enumerate(x_sorted.split(counts.tolist())):
        gate, up = F.linear(rows, w_gate_up[e]).chunk(2, dim=-1)
        outs.append(F.linear(F.silu(gate) * up, w_down[e]))
    return torch.cat(outs)


def experts_grouped_mm(
    x_sorted: torch.Tensor, w_gate_up: torch.Tensor, w_down: torch.Tensor, counts: torch.Tensor
) -> torch.Tensor:
    """``experts_reference`` as two grouped GEMMs over all experts at once."""
    offsets = torch.cumsum(counts, dim=0, dtype=torch.int32)
    gate_up = torch._grouped_mm(x_sorted, w_gate_up.transpose(-2, -1), offs=offsets)
    gate, up = gate_up.chunk(2, dim=-1)
    return torch._grouped_mm(F.silu(gate) * up, w_down.transpose(-2, -1), offs=offsets)


def experts_loop(
    x_sorted: torch.Tensor, w_gate_up: torch.Tensor, w_down: torch.Tensor, counts: torch.Tensor
) -> torch.Tensor:
    """``experts_reference`` with one matmul per non-empty expert group and a fused backward."""
    groups = _groups(counts.tolist())
    if torch.is_grad_enabled() and (x_sorted.requires_grad or w_gate_up.requires_grad):
        return _LoopExperts.apply(x_sorted, w_gate_up, w_down, groups)
    return _loop_forward(x_sorted, w_gate_up, w_down, groups, decoding=True)[0]


def _groups(counts: list[int]) -> list[tuple[int, int, int]]:
    """``(expert, first row, rows)`` of every expert that received rows."""
    groups, start = [], 0
    for e, n in enumerate(counts):
        if n > 0:
            groups.append((e, start, n))
        start += n
    return groups


def _loop_forward(x, w_gate_up, w_down, groups, decoding: bool = False):
    """SwiGLU of each expert group; returns (y, gate pre-activations g, up u, silu(g)).

    Gate and up projections are written into two contiguous buffers (two matmuls per expert on
    the gate and up halves of ``w_gate_up``): element-wise kernels on a strided half of one
    ``[rows, 2f]`` buffer run at half speed on CPU. The activation runs once over all groups.
    ``decoding`` (inference): groups of a few rows are bound by reading the expert's weight, and
    ``matmul_into`` splits those matvecs across threads; in training the weights are hot in cache.
    """
    f = w_down.shape[-1]
    g, u = x.new_empty(2, x.shape[0], f).unbind(0)
    y = x.new_empty(x.shape[0], w_down.shape[1])
    for e, s, n in groups:
        matmul_into(x[s : s + n], w_gate_up[e, :f], g[s : s + n], decoding)
        matmul_into(x[s : s + n], w_gate_up[e, f:], u[s : s + n], decoding)
    act = F.silu(g)
    a = act * u
    for e, s, n in groups:
        matmul_into(a[s : s + n], w_down[e], y[s : s + n], decoding)
    return y, g, u, act


class _LoopExperts(torch.autograd.Function):
    """Expert SwiGLUs over rows sorted by expert, with a fused backward.

    Backward per group, with ``a = silu(g) * u`` recomputed rather than saved: ``ga = gy W_d``,
    ``gW_d = gy^T a``, ``gu = silu(g) * ga``, ``gg = silu'(g) * ga * u``, ``gW_gu = [gg; gu]^T x``
    (written into the two halves of the expert's gradient), ``gx = gg W_g + gu W_u``. Experts that
    got no rows receive zero gradients, as through autograd.
    """

    @staticmethod
    def forward(ctx, x, w_gate_up, w_down, groups):
        y, g, u, act = _loop_forward(x, w_gate_up, w_down, groups)
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
