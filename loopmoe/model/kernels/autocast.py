"""Autocast for code autocast cannot see.

``torch.autocast`` casts the operands of the matmuls it intercepts. It does not reach inside a
custom op (the experts) or an ``autograd.Function`` (the fused loss, whose in-place ``addmm_``
would stay in fp32), so those cast their own operands with ``autocast_operands``, as autocast
would cast a linear layer's: mixed precision otherwise runs them in fp32 (measured on an H100:
a 1.8x slower step for the experts alone).
"""

from __future__ import annotations

import torch


def autocast_operands(*tensors: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """``tensors`` in the autocast dtype when autocast is on for their device; unchanged otherwise."""
    device = tensors[0].device.type
    if not torch.is_autocast_enabled(device):
        return tensors
    dtype = torch.get_autocast_dtype(device)
    return tuple(t.to(dtype) for t in tensors)
