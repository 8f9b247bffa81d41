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


BIG = (1024, 256)  # 1 MiB: the thread split (from 64K elements) and, on one thread, the reorientation (from 256K)


@pytest.mark.parametrize("rows", [1, 2, 5, 8])
@pytest.mark.parametrize("threads", [1, 2])
def test_decoding_path_equals_f_linear_as_a_view(rows, threads):
    torch.manual_seed(0)
    w = torch.randn(*BIG) / 16  # outputs of unit scale: rounding differences ~1e-7
    x = torch.randn(rows, 1, BIG[1])
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        with torch.inference_mode():
            out = linear(x, w)
            expected = F.linear(x, w)
    finally:
        torch.set_num_threads(before)
    assert out.shape == (rows, 1, BIG[0])
    assert out.stride()[-1] == rows  # weight @ x.T, returned transposed: the decoding path ran
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-5)
    assert torch.equal(out.view(rows, -1, 16, 64), out.reshape(rows, -1, 16, 64))  # heads split as a view


@pytest.mark.parametrize("dynamic", [False, True])  # True: a symbolic row count (a second batch size)
@pytest.mark.parametrize("rows", [1, 4])
def test_compiled_linear_has_no_graph_break(rows, dynamic):
    """``torch.get_num_threads`` cannot be traced: the thread count is read once while tracing
    (``assume_constant_result``), so the compiled graph splits the product over the threads as eager does."""
    torch._dynamo.reset()
    w, x = torch.randn(*BIG) / 16, torch.randn(rows, BIG[1])  # outputs of unit scale
    graphs = []

    def record(gm, example_inputs):
        graphs.append(gm)
        return gm.forward

    compiled = torch.compile(linear, backend=record, fullgraph=True, dynamic=dynamic)
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        with torch.inference_mode():
            torch.testing.assert_close(compiled(x, w), F.linear(x, w), rtol=1e-5, atol=1e-5)
    finally:
        torch.set_num_threads(before)
        torch._dynamo.reset()
    assert len(graphs) == 1 and "bmm" in graphs[0].code  # the split over two threads, in the graph
