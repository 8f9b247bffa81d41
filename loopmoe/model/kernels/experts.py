"""SwiGLU experts applied to token rows already sorted by expert.

Expert weights are 3-D tensors in the Qwen3-MoE layout: ``w_gate_up: [E, 2f, d]`` (gate rows
first) and ``w_down: [E, d, f]``; ``counts: [E]`` says how many consecutive rows each expert gets.
Three implementations of the same function:

- ``experts_reference``: one autograd-tracked SwiGLU per expert, concatenated; the definition.
- ``experts_grouped_mm``: one ``torch._grouped_mm`` per projection, no per-expert host loop
  (CUDA; CPU runs ATen's fallback), with a backward of grouped GEMMs written out.
- ``experts_loop``: one matmul per non-empty expert group (CPU), with a fused backward which
  writes each expert's weight gradient straight into the 3-D gradient tensors: autograd through
  ``unbind`` / ``chunk`` / ``split`` / ``cat`` would copy every activation and weight gradient
  once more. Empty experts are skipped (at batch-1 decoding most are).

Both fast paths are custom ops (``loopmoe::experts_loop``, ``loopmoe::experts_grouped_mm``), each
with a fake kernel (output ``[N*k, d]``, the input's dtype and device) and a backward that is a
custom op too. ``torch.compile`` then sees the experts as one opaque node of known output shape:
the loop path reads the group sizes on the host (``counts.tolist()``) and loops in Python, which
dynamo cannot trace, and ``torch._grouped_mm``'s own meta kernel accepts bf16 alone. Eager mode
runs the same ops. A forward op also returns, as outputs without gradient, the activations its
backward reuses (a custom op saves only its inputs and outputs); the wrappers return ``y`` alone.
``experts_few_tokens`` (the decoding path of the MoE, up to ``FEW_TOKENS`` tokens) is an op only under
``torch.compile``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch.utils.flop_counter import register_flop_formula

from loopmoe.model.kernels.linear import linear, matmul_into
from loopmoe.model.kernels.namespace import op_namespace

NAMESPACE = op_namespace(__name__)  # "loopmoe" here; a copy's own in remote code
ops = getattr(torch.ops, NAMESPACE)


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
    """``experts_reference`` as two grouped GEMMs over all experts at once (op ``loopmoe::experts_grouped_mm``)."""
    return ops.experts_grouped_mm(x_sorted, w_gate_up, w_down, counts)[0]


def experts_loop(
    x_sorted: torch.Tensor, w_gate_up: torch.Tensor, w_down: torch.Tensor, counts: torch.Tensor
) -> torch.Tensor:
    """``experts_reference`` with one matmul per non-empty expert group and a fused backward (op
    ``loopmoe::experts_loop``). ``decoding`` (the thread-split matvecs of ``linear``) is decided
    here, where the caller's grad mode is visible: inside an op that records autograd it is off."""
    return ops.experts_loop(x_sorted, w_gate_up, w_down, counts, not torch.is_grad_enabled())[0]


def _register_autograd(forward_op, backward_op) -> None:
    """``backward_op(gy, x, w_gate_up, w_down, counts, *saved, needs x / w_gate_up / w_down)`` as the
    gradient of ``forward_op(x, w_gate_up, w_down, counts, ...) -> (y, *saved)``."""

    def setup_context(ctx, inputs, output):
        x, w_gate_up, w_down, counts = inputs[:4]
        saved = output[1:]
        ctx.mark_non_differentiable(*saved)
        ctx.save_for_backward(x, w_gate_up, w_down, counts, *saved)
        # The saved outputs never get a gradient: without this autograd would zero-fill one for each
        # ([2, rows, f] and [rows, f], 9 ms a training step of the bench model on a CPU) for nothing.
        ctx.set_materialize_grads(False)

    def backward(ctx, gy, *_):  # y is the one differentiable output, so gy is defined
        needs = ctx.needs_input_grad[:3]
        grads = backward_op(gy, *ctx.saved_tensors, *needs)
        return *(g if need else None for g, need in zip(grads, needs)), *(None for _ in ctx.needs_input_grad[3:])

    forward_op.register_autograd(backward, setup_context=setup_context)


def _grads_fake(x, w_gate_up, w_down, need_x, need_gate_up, need_down):
    """What a backward op returns: the gradient of each input, empty where it is not needed."""

    def grad(t: torch.Tensor, needed: bool) -> torch.Tensor:
        return t.new_empty(t.shape) if needed else t.new_empty(0)

    return grad(x, need_x), grad(w_gate_up, need_gate_up), grad(w_down, need_down)


# --- grouped GEMMs -------------------------------------------------------------------------------


@torch.library.custom_op(f"{NAMESPACE}::experts_grouped_mm", mutates_args=())
def _experts_grouped_mm_op(
    x: torch.Tensor, w_gate_up: torch.Tensor, w_down: torch.Tensor, counts: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    # x: [M, d] rows sorted by expert, counts: [E] -> y: [M, d], gate_up: [M, 2f], act = silu(gate): [M, f]
    offsets = torch.cumsum(counts, dim=0, dtype=torch.int32)
    gate_up = torch._grouped_mm(x, w_gate_up.transpose(-2, -1), offs=offsets)
    gate, up = gate_up.chunk(2, dim=-1)
    act = F.silu(gate)
    return torch._grouped_mm(act * up, w_down.transpose(-2, -1), offs=offsets), gate_up, act


@_experts_grouped_mm_op.register_fake
def _experts_grouped_mm_fake(x, w_gate_up, w_down, counts):
    rows, f = x.shape[0], w_down.shape[-1]
    return x.new_empty(rows, w_down.shape[1]), x.new_empty(rows, 2 * f), x.new_empty(rows, f)


@torch.library.custom_op(f"{NAMESPACE}::experts_grouped_mm_backward", mutates_args=())
def _experts_grouped_mm_backward_op(
    gy: torch.Tensor,
    x: torch.Tensor,
    w_gate_up: torch.Tensor,
    w_down: torch.Tensor,
    counts: torch.Tensor,
    gate_up: torch.Tensor,
    act: torch.Tensor,
    need_x: bool,
    need_gate_up: bool,
    need_down: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The products autograd forms through ``torch._grouped_mm`` (``_grouped_mm_mat1_backward``:
    ``g mat2^T``; ``_grouped_mm_mat2_backward``: ``mat1^T g`` per group, a grouped GEMM over the
    rows), ``chunk``, ``mul`` and ``silu``, with ``silu(g) * u`` recomputed rather than saved. A
    gradient that is not needed comes back empty."""
    offsets = torch.cumsum(counts, dim=0, dtype=torch.int32)
    gate, up = gate_up.chunk(2, dim=-1)
    gy = gy.contiguous()  # the grouped GEMMs take no broadcast (stride-0) operand
    ga = torch._grouped_mm(gy, w_down, offs=offsets)  # [M, f]
    g_down = torch._grouped_mm(gy.t(), act * up, offs=offsets) if need_down else w_down.new_empty(0)
    g_gu = torch.cat([torch.ops.aten.silu_backward(ga * up, gate), ga * act], dim=-1)  # [M, 2f]
    g_x = torch._grouped_mm(g_gu, w_gate_up, offs=offsets) if need_x else x.new_empty(0)
    g_gate_up = torch._grouped_mm(g_gu.t(), x, offs=offsets) if need_gate_up else w_gate_up.new_empty(0)
    return g_x, g_gate_up, g_down


@_experts_grouped_mm_backward_op.register_fake
def _experts_grouped_mm_backward_fake(gy, x, w_gate_up, w_down, counts, gate_up, act, need_x, need_gate_up, need_down):
    return _grads_fake(x, w_gate_up, w_down, need_x, need_gate_up, need_down)


_register_autograd(_experts_grouped_mm_op, _experts_grouped_mm_backward_op)


# --- one matmul per expert group -----------------------------------------------------------------


def _groups(counts: list[int]) -> list[tuple[int, int, int]]:
    """``(expert, first row, rows)`` of every expert that received rows."""
    groups, start = [], 0
    for e, n in enumerate(counts):
        if n > 0:
            groups.append((e, start, n))
        start += n
    return groups


def _loop_forward(x, w_gate_up, w_down, groups, decoding: bool = False):
    """SwiGLU of each expert group; returns (y, gate and up pre-activations ``gu = [g; u]``, silu(g)).

    Gate and up projections are written into two contiguous halves of one ``[2, rows, f]`` buffer
    (two matmuls per expert on the gate and up halves of ``w_gate_up``): element-wise kernels on a
    strided half of one ``[rows, 2f]`` buffer run at half speed on CPU. The activation runs once
    over all groups. ``decoding`` (inference): groups of a few rows are bound by reading the
    expert's weight, and ``matmul_into`` splits those matvecs across threads; in training the
    weights are hot in cache.
    """
    f = w_down.shape[-1]
    gu = x.new_empty(2, x.shape[0], f)
    g, u = gu.unbind(0)
    y = x.new_empty(x.shape[0], w_down.shape[1])
    for e, s, n in groups:
        matmul_into(x[s : s + n], w_gate_up[e, :f], g[s : s + n], decoding)
        matmul_into(x[s : s + n], w_gate_up[e, f:], u[s : s + n], decoding)
    act = F.silu(g)
    a = act * u
    for e, s, n in groups:
        matmul_into(a[s : s + n], w_down[e], y[s : s + n], decoding)
    return y, gu, act


@torch.library.custom_op(f"{NAMESPACE}::experts_loop", mutates_args=())
def _experts_loop_op(
    x: torch.Tensor, w_gate_up: torch.Tensor, w_down: torch.Tensor, counts: torch.Tensor, decoding: bool
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    # x: [M, d] rows sorted by expert, counts: [E] -> y: [M, d], gu = [g; u]: [2, M, f], act = silu(g): [M, f]
    return _loop_forward(x, w_gate_up, w_down, _groups(counts.tolist()), decoding)


@_experts_loop_op.register_fake
def _experts_loop_fake(x, w_gate_up, w_down, counts, decoding):
    rows, f = x.shape[0], w_down.shape[-1]
    return x.new_empty(rows, w_down.shape[1]), x.new_empty(2, rows, f), x.new_empty(rows, f)


@torch.library.custom_op(f"{NAMESPACE}::experts_loop_backward", mutates_args=())
def _experts_loop_backward_op(
    gy: torch.Tensor,
    x: torch.Tensor,
    w_gate_up: torch.Tensor,
    w_down: torch.Tensor,
    counts: torch.Tensor,
    gu: torch.Tensor,
    act: torch.Tensor,
    need_x: bool,
    need_gate_up: bool,
    need_down: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The fused backward of ``loopmoe::experts_loop``; a gradient that is not needed comes back empty.

    Per group, with ``a = silu(g) * u`` recomputed rather than saved: ``ga = gy W_d``,
    ``gW_d = gy^T a``, ``gu = silu(g) * ga``, ``gg = silu'(g) * ga * u``, ``gW_gu = [gg; gu]^T x``
    (written into the two halves of the expert's gradient), ``gx = gg W_g + gu W_u``. Experts that
    got no rows receive zero gradients, as through autograd.
    """
    groups, f = _groups(counts.tolist()), w_down.shape[-1]
    g, u = gu.unbind(0)
    gy = gy.contiguous()
    ga = gy.new_empty(gy.shape[0], f)
    a = act * u if need_down else None
    g_down = _zeros_outside(w_down, groups) if need_down else w_down.new_empty(0)
    for e, s, n in groups:
        torch.mm(gy[s : s + n], w_down[e], out=ga[s : s + n])
        if a is not None:
            torch.mm(gy[s : s + n].t(), a[s : s + n], out=g_down[e])
    g_up = ga * act
    g_gate = torch.ops.aten.silu_backward(ga.mul_(u), g)
    g_x = x.new_empty(x.shape) if need_x else x.new_empty(0)
    g_gate_up = _zeros_outside(w_gate_up, groups) if need_gate_up else w_gate_up.new_empty(0)
    for e, s, n in groups:
        if need_gate_up:
            torch.mm(g_gate[s : s + n].t(), x[s : s + n], out=g_gate_up[e, :f])
            torch.mm(g_up[s : s + n].t(), x[s : s + n], out=g_gate_up[e, f:])
        if need_x:
            torch.mm(g_gate[s : s + n], w_gate_up[e, :f], out=g_x[s : s + n])
            g_x[s : s + n].addmm_(g_up[s : s + n], w_gate_up[e, f:])
    return g_x, g_gate_up, g_down


@_experts_loop_backward_op.register_fake
def _experts_loop_backward_fake(gy, x, w_gate_up, w_down, counts, gu, act, need_x, need_gate_up, need_down):
    return _grads_fake(x, w_gate_up, w_down, need_x, need_gate_up, need_down)


_register_autograd(_experts_loop_op, _experts_loop_backward_op)


def _zeros_outside(weight: torch.Tensor, groups) -> torch.Tensor:
    """An uninitialised gradient for a 3-D expert weight, zeroed only on experts without rows."""
    grad = torch.empty_like(weight)
    hit = {e for e, _, _ in groups}
    for e in range(weight.shape[0]):
        if e not in hit:
            grad[e].zero_()
    return grad


# --- decoding: a few tokens --------------------------------------------------------------------

FEW_TOKENS = 8  # up to batch-8 decoding: each expert's weight is read once for a handful of rows


def experts_few_tokens(
    x: torch.Tensor, w_gate_up: torch.Tensor, w_down: torch.Tensor, topk_w: torch.Tensor, topk_idx: torch.Tensor
) -> torch.Tensor:
    """Inference on a few tokens: ``y[n] = sum_j topk_w[n, j] * expert_{topk_idx[n, j]}(x[n])``, ``[N, w] -> [N, w]``.

    Decoding (``N <= FEW_TOKENS``) is bound by reading the selected experts' weights and by the
    number of ops around them, not by FLOPs. The sorted path (``experts_loop``) spends about 14 ops
    on the sort, counts and permutations and about 5 per expert group and projection (slices of the
    weight half and of the shared buffers, a matmul, a copy into them); here the expert ids and the
    routing weights are read on the host once and the groups are formed in Python:
    - one token: per selected expert ``linear`` (gate and up in one matvec), SiLU x up, ``linear``,
      scaled by its weight and summed;
    - N tokens: the rows gathered in expert order by one ``index_select``, one ``linear`` per
      expert and projection on its block, the blocks joined by ``cat``, and the weighted rows added
      into their tokens by one ``index_add_``.
    The same SwiGLU as ``experts_reference``, equal to it up to fp rounding (gate and up come from
    one matmul here, two halves in ``experts_loop``); for k = 2 the combine is bit for bit the
    sorted path's (two products summed in either order). No autograd: callers use it with
    gradients off. Under ``torch.compile`` it runs as the custom op ``loopmoe::experts_few_tokens``
    (the expert ids are read on the host); eager mode calls it directly, saving the op dispatch.
    """
    if torch.compiler.is_compiling():
        return ops.experts_few_tokens(x, w_gate_up, w_down, topk_w, topk_idx)
    return _few_tokens(x, w_gate_up, w_down, topk_w, topk_idx)


def _few_tokens(x, w_gate_up, w_down, topk_w, topk_idx):
    f = w_down.shape[-1]
    experts, weights = topk_idx.tolist(), topk_w.tolist()  # [N][k] ints and floats (exactly topk_w's values)
    if len(experts) == 1:
        y = None
        for e, weight in zip(experts[0], weights[0]):
            gate, up = linear(x, w_gate_up[e]).split(f, dim=-1)
            term = linear(F.silu(gate) * up, w_down[e]) * weight  # [1, w]
            y = term if y is None else y + term
        return y
    # (expert, token, weight) of every assignment, by expert and then token: each expert's rows are one block.
    rows = sorted((e, n, wt) for n, (es, ws) in enumerate(zip(experts, weights)) for e, wt in zip(es, ws))
    token = [n for _, n, _ in rows]
    blocks = []  # (expert, first row, rows)
    for i, (e, _, _) in enumerate(rows):
        if blocks and blocks[-1][0] == e:
            blocks[-1][2] += 1
        else:
            blocks.append([e, i, 1])
    token_of_row = torch.tensor(token, device=x.device)  # [M]
    x_sorted = x.index_select(0, token_of_row)  # [M, w]
    gate, up = torch.cat([linear(x_sorted[s : s + n], w_gate_up[e]) for e, s, n in blocks]).split(f, dim=-1)
    a = F.silu(gate) * up  # [M, f]
    y_sorted = torch.cat([linear(a[s : s + n], w_down[e]) for e, s, n in blocks])  # [M, w]
    weight = torch.tensor([wt for _, _, wt in rows], dtype=y_sorted.dtype, device=x.device)
    return y_sorted.new_zeros(x.shape[0], y_sorted.shape[1]).index_add_(0, token_of_row, y_sorted * weight[:, None])


@torch.library.custom_op(f"{NAMESPACE}::experts_few_tokens", mutates_args=())
def _experts_few_tokens_op(
    x: torch.Tensor, w_gate_up: torch.Tensor, w_down: torch.Tensor, topk_w: torch.Tensor, topk_idx: torch.Tensor
) -> torch.Tensor:
    return _few_tokens(x, w_gate_up, w_down, topk_w, topk_idx)


@_experts_few_tokens_op.register_fake
def _experts_few_tokens_fake(x, w_gate_up, w_down, topk_w, topk_idx):
    return x.new_empty(x.shape[0], w_down.shape[1])


# --- FLOPs ---------------------------------------------------------------------------------------
# ``FlopCounterMode`` does not look inside a custom op: each op states its matmul FLOPs (the
# SwiGLU's three projections, ``2 * rows * d * f`` each; backward twice that for the gradients it
# computes). Gradients that are not needed are neither computed nor counted.


@register_flop_formula([ops.experts_loop, ops.experts_grouped_mm])
def _experts_flop(x_shape, w_gate_up_shape, w_down_shape, *args, out_shape=None, **kwargs) -> int:
    rows, d = x_shape
    return 6 * rows * d * w_down_shape[-1]


@register_flop_formula([ops.experts_loop_backward, ops.experts_grouped_mm_backward])
def _experts_backward_flop(
    gy_shape,
    x_shape,
    w_gate_up_shape,
    w_down_shape,
    counts_shape,
    saved_shape,
    act_shape,
    need_x,
    need_gate_up,
    need_down,
    out_shape=None,
) -> int:
    rows, d = x_shape
    per_projection = 2 * rows * d * w_down_shape[-1]
    # ga (always), then d w_down; d x and d w_gate_up each cover the two input projections
    return per_projection * (1 + need_down + 2 * need_x + 2 * need_gate_up)


@register_flop_formula(ops.experts_few_tokens)
def _experts_few_tokens_flop(
    x_shape, w_gate_up_shape, w_down_shape, topk_w_shape, topk_idx_shape, out_shape=None
) -> int:
    rows, d = x_shape
    return 6 * rows * topk_idx_shape[-1] * d * w_down_shape[-1]
