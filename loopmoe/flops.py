"""Measured forward FLOPs of a real model, to audit the analytic budget against.

torch's ``FlopCounterMode`` counts nothing for the CPU SDPA kernel
(``aten._scaled_dot_product_flash_attention_for_cpu``) or for ``aten._grouped_mm``, so an audit
that used it as is would silently miss attention scores and experts. ``count_forward_flops``
registers formulas for both first.
"""

from __future__ import annotations

import torch
from torch.utils.flop_counter import FlopCounterMode, register_flop_formula, sdpa_flop_count

_REGISTERED = False


def _register_missing_formulas() -> None:
    global _REGISTERED
    if _REGISTERED:
        return

    @register_flop_formula(torch.ops.aten._scaled_dot_product_flash_attention_for_cpu)
    def _sdpa_cpu_flop(query_shape, key_shape, value_shape, *args, out_shape=None, **kwargs) -> int:
        return sdpa_flop_count(query_shape, key_shape, value_shape)

    @register_flop_formula(torch.ops.aten._grouped_mm)
    def _grouped_mm_flop(a_shape, b_shape, *args, out_shape=None, **kwargs) -> int:
        # a: [N, K] rows of all groups, b: [G, K, M] -> every row meets one K x M matrix.
        return 2 * a_shape[0] * a_shape[1] * b_shape[-1]

    _REGISTERED = True


@torch.no_grad()
def count_forward_flops(model: torch.nn.Module, input_ids: torch.Tensor, **forward_kwargs) -> int:
    """Total forward FLOPs of ``model(input_ids)`` as counted by FlopCounterMode (with the formulas above)."""
    _register_missing_formulas()
    with FlopCounterMode(display=False) as counter:
        model(input_ids=input_ids, use_cache=False, **forward_kwargs)
    return counter.get_total_flops()
