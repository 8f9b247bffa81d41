"""``x @ W.T`` without bias, faster for the few rows of decoding on CPU.

Decoding multiplies one row (or a few) by each weight: a matrix-vector product bound by reading
the weight from memory, which BLAS runs on one thread (~7 GB/s here). Splitting the weight's
rows into one block per thread and multiplying them as a batch runs the blocks in parallel
(2.5x the bandwidth on 2 cores). Each output is the same length-``in`` dot product, summed in the
kernel's own order: equal to ``linear_reference`` (``F.linear``) up to fp rounding.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

SPLIT_MAX_ROWS = 8  # batch-8 decoding is still bound by reading the weights
_SPLIT_MIN_WEIGHT = 1 << 16  # below (a router: E x d) the weight sits in cache and the split costs more


def linear_reference(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """``x @ weight.T``: what ``linear`` must equal."""
    return F.linear(x, weight)


def linear(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """``x @ weight.T``; a thread-split matvec for at most ``SPLIT_MAX_ROWS`` rows at inference on CPU."""
    rows, out_features = x.numel() // x.shape[-1], weight.shape[0]
    if (
        rows <= SPLIT_MAX_ROWS
        and weight.numel() >= _SPLIT_MIN_WEIGHT
        and x.device.type == "cpu"
        and not torch.is_grad_enabled()
    ):
        blocks = torch.get_num_threads()
        if blocks > 1 and out_features % blocks == 0 and weight.is_contiguous():
            blocked = weight.view(blocks, out_features // blocks, -1)  # [blocks, out/blocks, in]
            # [blocks, in, rows] with unit stride along rows: BLAS takes it as a transposed operand
            # (a [blocks, in, 1] view with unit stride along `in` sends bmm to a 3x slower kernel).
            out = torch.bmm(blocked, x.reshape(rows, -1).t().expand(blocks, -1, -1))  # [blocks, out/blocks, rows]
            if rows == 1:
                return out.view(*x.shape[:-1], out_features)
            return out.permute(2, 0, 1).reshape(*x.shape[:-1], out_features)
    return F.linear(x, weight)


def matmul_into(x: torch.Tensor, weight: torch.Tensor, out: torch.Tensor, decoding: bool) -> None:
    """``out = x @ weight.T``, written into ``out``; split like ``linear`` when ``decoding``."""
    if decoding and x.shape[0] <= SPLIT_MAX_ROWS:
        out.copy_(linear(x, weight))
    else:
        torch.mm(x, weight.t(), out=out)
