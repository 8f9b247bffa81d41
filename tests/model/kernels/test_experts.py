"""kernels.experts: the CPU loop path and the grouped_mm path against the per-expert reference.

Both run as custom ops; ``tests/model/test_compile.py`` checks them with ``torch.library.opcheck``
and under ``torch.compile``.
"""

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from loopmoe.model.kernels.experts import experts_grouped_mm, experts_loop, experts_reference

E, D, F_ = 5, 12, 8


def weights(dtype=torch.float64, seed=0):
    g = torch.Generator().manual_seed(seed)
    w_gate_up = (torch.randn(E, 2 * F_, D, generator=g, dtype=dtype) * 0.3).requires_grad_()
    w_down = (torch.randn(E, D, F_, generator=g, dtype=dtype) * 0.3).requires_grad_()
    return w_gate_up, w_down


# Expert 1 and 4 get no rows: their gradients must be zero, as through autograd.
COUNTS = torch.tensor([3, 0, 5, 1, 0])


def test_loop_forward_and_backward_equal_the_reference():
    w_gate_up, w_down = weights()
    x = torch.randn(int(COUNTS.sum()), D, dtype=torch.float64, requires_grad=True)
    g = torch.randn(x.shape, dtype=torch.float64)
    ours = experts_loop(x, w_gate_up, w_down, COUNTS)
    ours_grads = torch.autograd.grad(ours, (x, w_gate_up, w_down), g)
    ref = experts_reference(x, w_gate_up, w_down, COUNTS)
    ref_grads = torch.autograd.grad(ref, (x, w_gate_up, w_down), g)
    torch.testing.assert_close(ours, ref, rtol=1e-12, atol=1e-12)
    for name, a, b in zip(("x", "gate_up", "down"), ours_grads, ref_grads):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12, msg=f"gradient of {name}")
    assert torch.all(ours_grads[1][[1, 4]] == 0) and torch.all(ours_grads[2][[1, 4]] == 0)


def test_loop_inference_path_equals_the_reference():
    w_gate_up, w_down = (w.detach().float() for w in weights())
    x = torch.randn(int(COUNTS.sum()), D)
    with torch.inference_mode():
        torch.testing.assert_close(
            experts_loop(x, w_gate_up, w_down, COUNTS), experts_reference(x, w_gate_up, w_down, COUNTS)
        )


def test_grouped_mm_forward_equals_the_reference():
    w_gate_up, w_down = (w.detach().float() for w in weights())
    x = torch.randn(int(COUNTS.sum()), D)
    try:
        out = experts_grouped_mm(x, w_gate_up, w_down, COUNTS)
    except RuntimeError as err:  # a torch build without a CPU grouped GEMM
        pytest.skip(f"torch._grouped_mm unavailable on CPU: {err}")
    torch.testing.assert_close(out, experts_reference(x, w_gate_up, w_down, COUNTS), rtol=1e-5, atol=1e-5)


def test_grouped_mm_gradients_equal_the_reference():
    # fp32: the CPU fallback of torch._grouped_mm takes fp32, bf16 and fp16 only.
    w_gate_up, w_down = (w.detach().float().requires_grad_() for w in weights())
    x = torch.randn(int(COUNTS.sum()), D, requires_grad=True)
    g = torch.randn(x.shape)
    try:
        ours = experts_grouped_mm(x, w_gate_up, w_down, COUNTS)
    except RuntimeError as err:  # a torch build without a CPU grouped GEMM
        pytest.skip(f"torch._grouped_mm unavailable on CPU: {err}")
    ours_grads = torch.autograd.grad(ours, (x, w_gate_up, w_down), g)
    ref_grads = torch.autograd.grad(experts_reference(x, w_gate_up, w_down, COUNTS), (x, w_gate_up, w_down), g)
    for name, a, b in zip(("x", "gate_up", "down"), ours_grads, ref_grads):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6, msg=f"gradient of {name}")
    assert torch.all(ours_grads[1][[1, 4]] == 0) and torch.all(ours_grads[2][[1, 4]] == 0)


@pytest.mark.parametrize("frozen", [False, True])
def test_flop_counter_sees_inside_the_ops(frozen):
    """FlopCounterMode does not look inside custom ops: they state their FLOPs (the three projections,
    ``2 M d f`` each; backward ``2 M d f`` for the down input and each gradient's projections)."""
    w_gate_up, w_down = (w.detach().float().requires_grad_(not frozen) for w in weights())
    x = torch.randn(int(COUNTS.sum()), D, requires_grad=True)
    with FlopCounterMode(display=False) as counter:
        y = experts_loop(x, w_gate_up, w_down, COUNTS)
    projection = 2 * x.shape[0] * D * F_
    assert counter.get_total_flops() == 3 * projection
    with FlopCounterMode(display=False) as counter:
        y.sum().backward()
    assert counter.get_total_flops() == (3 if frozen else 6) * projection
