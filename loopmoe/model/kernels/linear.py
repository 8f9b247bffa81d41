"""``x @ W.T`` without bias, faster for the few rows of decoding on CPU.

Decoding multiplies one row (or a few) by each weight: a product bound by reading the weight from
memory. Two changes make BLAS read it faster, both computing ``W x^T`` (``[out, rows]``) and
returning its transposed view:
- **Threads.** BLAS runs a matrix-vector product on one thread (~7 GB/s here). Splitting the
  weight's rows into one block per thread and multiplying them as a batch runs the blocks in
  parallel (2.5x the bandwidth on 2 cores); at 5-8 rows only for weights of 1 MiB and more.
- **Orientation** (one thread, 2-8 rows). ``F.linear`` asks BLAS for ``x W^T``; ``W x^T`` reads the
  same weight through another kernel. Measured with weights out of cache (AMD EPYC, MKL, paired):
  1.3-2.3x faster at 2-4 rows for the model's projection, expert and LM-head shapes, 1.4x at 8 rows
  for 1 MiB weights and more but 0.88-0.95x for 256 x 512 and 256 x 256 (kept on ``F.linear``),
  equal at one row (kept on ``F.linear``: fewer calls).
Each output is the same length-``in`` dot product, summed in the kernel's own order: equal to
``linear_reference`` (``F.linear``) up to fp rounding. The result is a transposed view
(``[..., out]`` with unit stride along the rows); ``view`` and ``reshape`` of its leading
dimensions, ``cat`` and element-wise ops take it as it is. ``python -m bench.decode_vs_hf`` prints
these kernels against ``F.linear`` on a new machine.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

SPLIT_MAX_ROWS = 8  # batch-8 decoding is still bound by reading the weights
_SPLIT_MIN_WEIGHT = 1 << 16  # below (a router: E x d) the weight sits in cache and the split costs more
# One thread: the reoriented product measured 1.3-2.3x faster than F.linear at 2-4 rows for every
# weight of 64K elements and more; at 5-8 rows only from 1 MiB (1.4x), as 256 x 512 lost (0.88x).
_ORIENT_FEW_ROWS, _ORIENT_MIN_FEW, _ORIENT_MIN_MANY = 4, 1 << 16, 1 << 18  # elements, up to 4 rows and above


@torch.compiler.assume_constant_result
def _num_threads() -> int:
    """torch's intra-op threads; under ``torch.compile`` read once while tracing and kept as a constant
    (``torch.get_num_threads`` itself would break the graph), so compiled decoding splits its matvecs
    over the threads as eager decoding does: BLAS runs a matrix-vector product on one thread either way."""
    return torch.get_num_threads()


def linear_reference(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """``x @ weight.T``: what ``linear`` must equal."""
    return F.linear(x, weight)


def linear(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """``x @ weight.T``; at inference on CPU, for at most ``SPLIT_MAX_ROWS`` rows, computed as
    ``weight @ x.T``: split over threads, or (one thread, several rows) reoriented."""
    # The checks cost a few microseconds per call, paid by every decoding matmul: cheapest first.
    if torch.is_grad_enabled() or not x.is_cpu:
        return F.linear(x, weight)
    size = x.shape[-1]
    rows, out_features = x.numel() // size, weight.shape[0]
    elements = out_features * size
    if rows > SPLIT_MAX_ROWS or elements < _SPLIT_MIN_WEIGHT or not weight.is_contiguous():
        return F.linear(x, weight)
    blocks = _num_threads()
    # 5-8 rows split only large weights, as they reorient: 256 x 512 at 8 rows ran 0.70x F.linear split in two
    # (2 threads, AMD EPYC Zen 4, AVX-512), while 1024 x 256 and the LM head gained 1.2x and 1.4x.
    split = blocks > 1 and out_features % blocks == 0 and (rows <= _ORIENT_FEW_ROWS or elements >= _ORIENT_MIN_MANY)
    if not split and (rows == 1 or elements < (_ORIENT_MIN_FEW if rows <= _ORIENT_FEW_ROWS else _ORIENT_MIN_MANY)):
        return F.linear(x, weight)
    # [in, rows] with unit stride along `in`, as a transposed view of the [rows, in] input: BLAS takes it
    # as a transposed operand (a [in, 1] operand with unit stride along the last dimension sends bmm to a
    # 3x slower kernel).
    x_t = x.reshape(rows, size).t()
    if split:
        blocked = weight.view(blocks, out_features // blocks, size)  # [blocks, out/blocks, in]
        out = torch.bmm(blocked, x_t.expand(blocks, -1, -1)).view(out_features, rows)
    else:
        out = torch.mm(weight, x_t)  # [out, rows]
    return out.t().view(*x.shape[:-1], out_features)


def matmul_into(x: torch.Tensor, weight: torch.Tensor, out: torch.Tensor, decoding: bool) -> None:
    """``out = x @ weight.T``, written into ``out``; through ``linear`` when ``decoding``."""
    if decoding and x.shape[0] <= SPLIT_MAX_ROWS:
        out.copy_(linear(x, weight))
    else:
        torch.mm(x, weight.t(), out=out)
