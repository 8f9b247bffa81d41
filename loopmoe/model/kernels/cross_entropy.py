"""Causal-LM cross-entropy fused with the LM head, computed in row chunks.

Training does not need the ``[N, V]`` logits, only the loss and its gradient. Materialising them
costs more than the LM-head matmul itself on CPU: at N = 2048, V = 8192 the logits are 64 MiB,
written by the matmul, read and written again by ``log_softmax``, its backward and the
``nll_loss`` backward (a zero-filled ``[N, V]`` buffer), each pass from main memory. Here the rows
are processed in chunks whose logits fit in the last-level cache (``chunk_bytes``); per chunk the
forward computes the logits, their log-sum-exp, the loss, and already the gradient
``softmax - onehot`` pushed through the head (``dh = p W``, ``dW += p^T h``); backward only scales
the stored gradients by the incoming scalar. Same technique as Liger-Kernel's fused linear
cross-entropy.

Semantics are transformers' ``ForCausalLMLoss``: labels are shifted inside (position t predicts
label t+1), ``ignore_index`` rows are excluded, the sum is divided by ``num_items_in_batch`` when
given and by the number of counted rows otherwise. The logits are computed in the weight's dtype
and upcast to fp32 before the softmax, as there. The loss equals the unfused one up to fp32
rounding (~1e-7 relative), not bit for bit: summation order differs; the reference is
``linear_cross_entropy_reference`` (transformers' loss on materialised logits).

``weighted_linear_cross_entropy`` is the same kernel with a weight per row, ``sum_i w_i loss_i /
denominator``, differentiable in the weights too (``d/dw_i = loss_i / denominator``), and the rows'
own losses beside it: the learned exit gate's expected loss over exit depths (``modeling.py``) weights
each iteration's readout by its exit probability in one pass over the stacked readouts.
"""

from __future__ import annotations

import torch

from loopmoe.errors import ConfigError
from loopmoe.model.kernels.autocast import autocast_operands

# fp32 logits per chunk. CPU: within the L3 of the CPUs we run on; each chunk also reads and rewrites
# the whole [V, d] weight gradient, so fewer chunks move fewer bytes (the loss's fwd+bwd at N = 2048,
# V = 8192, d = 256 on a 2-core EPYC with 32 MiB L3: 16 MiB 6-10% faster than 8 MiB, 32 and 64 MiB no
# faster than 16, which keeps half the cache footprint). GPU: the point is the memory the [N, V] logits
# would take, not a cache; small chunks there cost one launch-bound round of kernels each (an H100 step
# at V = 50k, 16k tokens ran 2.2x slower at 8 MiB chunks).
DEFAULT_CHUNK_BYTES = {"cpu": 16 << 20, "cuda": 1 << 30}


def causal_targets(
    labels: torch.Tensor | None, shift_labels: torch.Tensor | None = None, ignore_index: int = -100
) -> torch.Tensor:
    """The target of every position, flattened [B * S]: ``shift_labels`` as given, else ``labels[:, 1:]``
    padded with ``ignore_index`` (position t predicts label t + 1)."""
    if shift_labels is not None:
        return shift_labels.reshape(-1)
    if labels is None:
        raise ConfigError("linear_cross_entropy needs labels or shift_labels")
    return torch.nn.functional.pad(labels, (0, 1), value=ignore_index)[..., 1:].reshape(-1)


class _LinearCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, h, weight, targets, ignore_index, denominator, chunk_rows, row_weights=None):
        # h: [N, d], weight: [V, d], targets: [N], row_weights: [N] fp32 or None
        # -> (sum_i w_i loss_i / denominator (fp32 scalar), loss_i [N] fp32 with weights, else an empty tensor)
        needs_grad = ctx.needs_input_grad[0] or ctx.needs_input_grad[1]
        loss = torch.zeros((), dtype=torch.float32, device=h.device)
        grad_h = torch.empty_like(h) if ctx.needs_input_grad[0] else None
        grad_w = torch.zeros_like(weight, dtype=torch.float32) if ctx.needs_input_grad[1] else None
        weighted = row_weights is not None
        row_losses = torch.empty(h.shape[0] if weighted else 0, dtype=torch.float32, device=h.device)
        # One logits buffer for every chunk (the last one may be shorter), turned into log-probabilities and
        # then into the gradient in place: in fp32 the same cache-sized memory is rewritten rather than
        # fresh [n, V] tensors allocated per chunk (another dtype adds its fp32 copy and the cast back).
        logits = torch.empty(min(chunk_rows, h.shape[0]), weight.shape[0], dtype=h.dtype, device=h.device)
        for start in range(0, h.shape[0], chunk_rows):
            h_c, t_c = h[start : start + chunk_rows], targets[start : start + chunk_rows]
            n = h_c.shape[0]
            torch.mm(h_c, weight.t(), out=logits[:n])
            z = logits[:n].float()  # the buffer itself in fp32, a copy otherwise
            logp = torch.log_softmax(z, -1, out=z)  # [n, V]; each row is reduced before it is written
            valid = t_c != ignore_index
            safe_t = torch.where(valid, t_c, 0)[:, None]
            picked = torch.where(valid, logp.gather(1, safe_t).squeeze(1), 0.0)  # [n] log p(target), 0 if ignored
            if weighted:
                w_c = row_weights[start : start + chunk_rows]
                row_losses[start : start + chunk_rows] = -picked
                loss -= (picked * w_c).sum()
            else:
                loss -= picked.sum()
            if not needs_grad:
                continue
            # d(loss_sum)/d(logits) = softmax - onehot on counted rows, 0 on ignored ones (times w_i if weighted).
            p = logp.exp_()
            p.scatter_add_(1, safe_t, torch.full_like(safe_t, -1.0, dtype=p.dtype))
            p = p.to(h.dtype)
            # Ignored rows (the last position of each sequence) get no gradient and counted rows their weight:
            # a row scale, applied on the [n, d] side of both products rather than by a pass over the [n, V] p.
            keep = (valid * w_c if weighted else valid)[:, None].to(h.dtype)
            if grad_h is not None:
                torch.mm(p, weight, out=grad_h[start : start + chunk_rows]).mul_(keep)
            if grad_w is not None and p.dtype == torch.float32:
                grad_w.addmm_(p.t(), h_c * keep)
            elif grad_w is not None:  # bf16 products, still accumulated over chunks in fp32
                grad_w += p.t() @ (h_c * keep)
        ctx.weight_dtype = weight.dtype
        ctx.save_for_backward(grad_h, grad_w, denominator, row_losses)
        ctx.mark_non_differentiable(row_losses)
        return loss / denominator, row_losses

    @staticmethod
    def backward(ctx, grad_loss, _grad_rows):
        grad_h, grad_w, denominator, row_losses = ctx.saved_tensors
        scale = grad_loss / denominator
        g_h = (grad_h * scale).to(grad_h.dtype) if grad_h is not None else None
        g_w = (grad_w * scale).to(ctx.weight_dtype) if grad_w is not None else None
        g_rows = row_losses * scale if ctx.needs_input_grad[6] else None  # d(sum_i w_i loss_i)/d(w_i) = loss_i
        return g_h, g_w, None, None, None, None, g_rows


def _chunk_rows(h: torch.Tensor, vocab: int, chunk_bytes: int | None) -> int:
    """Rows per chunk whose fp32 logits take ``chunk_bytes`` (the device's default when None)."""
    if chunk_bytes is None:
        chunk_bytes = DEFAULT_CHUNK_BYTES.get(h.device.type, DEFAULT_CHUNK_BYTES["cuda"])
    return max(1, chunk_bytes // (4 * vocab))


def linear_cross_entropy(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    labels: torch.Tensor | None,
    num_items_in_batch: torch.Tensor | int | None = None,
    ignore_index: int = -100,
    shift_labels: torch.Tensor | None = None,
    chunk_bytes: int | None = None,
) -> torch.Tensor:
    """Causal-LM loss of ``hidden @ weight.T`` against ``labels`` without materialising the logits.

    hidden: [B, S, d]; weight: [V, d]; labels: [B, S] (unshifted, as for transformers' models), or
    ``shift_labels`` [B, S] already shifted (context parallelism passes those).
    """
    d, vocab = hidden.shape[-1], weight.shape[0]
    h = hidden.reshape(-1, d)
    # Autocast does not reach inside the autograd.Function; the weight gradient still accumulates in fp32.
    h, weight = autocast_operands(h, weight)
    targets = causal_targets(labels, shift_labels, ignore_index).to(h.device)
    if num_items_in_batch is None:
        denominator = (targets != ignore_index).sum().to(torch.float32)
    else:
        denominator = torch.as_tensor(num_items_in_batch, dtype=torch.float32, device=h.device)
    chunk_rows = _chunk_rows(h, vocab, chunk_bytes)
    return _LinearCrossEntropy.apply(h, weight, targets, ignore_index, denominator, chunk_rows, None)[0]


def weighted_linear_cross_entropy(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    targets: torch.Tensor,
    row_weights: torch.Tensor,
    denominator: torch.Tensor,
    ignore_index: int = -100,
    chunk_bytes: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``sum_i w_i loss_i / denominator`` of ``hidden @ weight.T`` without materialising the logits, and
    ``loss_i`` (detached, 0 on ignored rows).

    hidden: [..., d] (N rows); targets: [N] already shifted (``causal_targets``); row_weights: [N], may
    require grad; denominator: a scalar. Chunked like ``linear_cross_entropy``, with the same memory:
    one fp32 ``[V, d]`` weight gradient and one ``[N, d]`` hidden gradient, whatever N stacks.
    """
    d, vocab = hidden.shape[-1], weight.shape[0]
    h, weight = autocast_operands(hidden.reshape(-1, d), weight)
    rows = row_weights.reshape(-1).to(device=h.device, dtype=torch.float32)
    denominator = torch.as_tensor(denominator, dtype=torch.float32, device=h.device)
    chunk_rows = _chunk_rows(h, vocab, chunk_bytes)
    return _LinearCrossEntropy.apply(
        h, weight, targets.reshape(-1).to(h.device), ignore_index, denominator, chunk_rows, rows
    )


def linear_cross_entropy_reference(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    labels: torch.Tensor | None,
    num_items_in_batch: torch.Tensor | int | None = None,
    ignore_index: int = -100,
    shift_labels: torch.Tensor | None = None,
) -> torch.Tensor:
    """What ``linear_cross_entropy`` must equal: transformers' ``ForCausalLMLoss`` on ``hidden @ weight.T``."""
    from transformers.loss.loss_utils import ForCausalLMLoss

    logits = hidden @ weight.t()
    items = torch.as_tensor(num_items_in_batch) if num_items_in_batch is not None else None
    return ForCausalLMLoss(logits, labels, weight.shape[0], items, ignore_index=ignore_index, shift_labels=shift_labels)
