"""kernels.linear: the thread-split decoding matvec against F.linear."""

import pytest
import torch
import torch.nn.functional as F

from loopmoe.model.kernels.linear import linear


@pytest.mark.parametrize("rows", [1, 3, 8, 9])
@pytest.mark.parametrize("threads", [1, 2, 3])
def test_linear_equals_f_linear(rows, threads):
    torch.manual_seed(0)
    w = torch.randn(96, 40)
    x = torch.randn(rows, 1, 40)
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        with torch.inference_mode():
            out = linear(x, w)
    finally:
        torch.set_num_threads(before)
    assert out.shape == (rows, 1, 96)
    torch.testing.assert_close(out, F.linear(x, w), rtol=1e-5, atol=1e-5)  # fp32 sums in another order


def test_linear_with_autograd_is_f_linear_exactly():
    w = torch.randn(96, 40, requires_grad=True)
    x = torch.randn(1, 40)
    out = linear(x, w)
    assert torch.equal(out, F.linear(x, w))
    out.sum().backward()
    assert w.grad is not None
