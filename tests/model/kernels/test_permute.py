"""kernels.permute: gathers with an inverse-gather backward against index_select through autograd."""

import torch

from loopmoe.model.kernels.permute import gather_reference, gather_tokens, permute_rows


def test_permute_rows_equals_index_select_with_gradients():
    x = torch.randn(7, 4, dtype=torch.float64, requires_grad=True)
    perm = torch.randperm(7)
    inverse = torch.empty_like(perm)
    inverse[perm] = torch.arange(7)
    g = torch.randn(7, 4, dtype=torch.float64)
    ours = permute_rows(x, perm, inverse)
    ref = gather_reference(x, perm)
    assert torch.equal(ours, ref)
    torch.testing.assert_close(torch.autograd.grad(ours, x, g)[0], torch.autograd.grad(ref, x, g)[0])


def test_gather_tokens_sums_each_tokens_k_rows_in_backward():
    n, k = 6, 3
    x = torch.randn(n, 4, dtype=torch.float64, requires_grad=True)
    experts = torch.randint(0, 4, (n * k,))  # row n*k + j: token n, slot j
    order = torch.argsort(experts, stable=True)
    inverse = torch.empty_like(order)
    inverse[order] = torch.arange(order.numel())
    g = torch.randn(n * k, 4, dtype=torch.float64)
    ours = gather_tokens(x, order // k, inverse, k)
    ref = gather_reference(x, order // k)
    assert torch.equal(ours, ref)
    torch.testing.assert_close(torch.autograd.grad(ours, x, g)[0], torch.autograd.grad(ref, x, g)[0])
