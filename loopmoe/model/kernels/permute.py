"""Row gathers for MoE dispatch whose backward is another gather, not a scatter-add.

Autograd differentiates ``index_select`` with an accumulating scatter (``index_add_``), which is
serial and several times slower on CPU than a second gather. When the index is a permutation
(or each source row is repeated exactly k times, in a known order) the gradient is a gather by
the inverse permutation. ``permute_rows`` and ``gather_tokens`` equal plain ``index_select``
(``gather_reference``) in values and gradients.
"""

from __future__ import annotations

import torch


def gather_reference(x: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """``x[index]`` with autograd's own backward: what both gathers below must equal."""
    return x.index_select(0, index)


def permute_rows(x: torch.Tensor, perm: torch.Tensor, inverse: torch.Tensor) -> torch.Tensor:
    """``x[perm]`` for a permutation ``perm`` whose inverse is ``inverse``."""
    return _PermuteRows.apply(x, perm, inverse)


def gather_tokens(x: torch.Tensor, token_of_row: torch.Tensor, inverse: torch.Tensor, k: int) -> torch.Tensor:
    """``x[token_of_row]``: each of the N tokens once per selected expert (N*k rows, in expert
    order), where ``token_of_row = order // k`` and ``inverse`` inverts ``order``."""
    return _GatherTokens.apply(x, token_of_row, inverse, k)


class _PermuteRows(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, perm, inverse):
        ctx.save_for_backward(inverse)
        return x.index_select(0, perm)

    @staticmethod
    def backward(ctx, grad):
        (inverse,) = ctx.saved_tensors
        return grad.index_select(0, inverse), None, None


class _GatherTokens(torch.autograd.Function):
    """Backward: every token appears exactly k times, so its gradient is the sum of its k rows,
    found through the inverse permutation: a gather and a sum instead of a scatter-add."""

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
