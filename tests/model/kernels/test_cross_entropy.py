"""kernels.cross_entropy: the fused LM-head loss against transformers' ForCausalLMLoss on materialised logits."""

import pytest
import torch
from transformers.loss.loss_utils import ForCausalLMLoss

from loopmoe.model.kernels.cross_entropy import (
    causal_targets,
    linear_cross_entropy,
    linear_cross_entropy_reference,
    weighted_linear_cross_entropy,
)

V, D = 50, 16


def inputs(dtype=torch.float64, seed=0):
    g = torch.Generator().manual_seed(seed)
    h = torch.randn(3, 7, D, generator=g, dtype=dtype, requires_grad=True)
    w = torch.randn(V, D, generator=g, dtype=dtype, requires_grad=True)
    labels = torch.randint(0, V, (3, 7), generator=g)
    labels[0, :3] = -100
    labels[2, 4] = -100
    return h, w, labels


def grads(loss, *tensors):
    return torch.autograd.grad(loss, tensors)


@pytest.mark.parametrize("chunk_bytes", [4 * V, 4 * V * 5, 1 << 20])  # 1 row, ragged chunks of 5, one chunk
@pytest.mark.parametrize("num_items", [None, 11])
def test_matches_unfused_loss_and_gradients(chunk_bytes, num_items):
    h, w, labels = inputs()
    n = None if num_items is None else torch.tensor(num_items)
    fused = linear_cross_entropy(h, w, labels, num_items_in_batch=n, chunk_bytes=chunk_bytes)
    ref = ForCausalLMLoss(h @ w.t(), labels, V, num_items_in_batch=n)
    torch.testing.assert_close(fused, ref.float(), rtol=1e-6, atol=0)
    for a, b in zip(grads(fused, h, w), grads(ref, h, w)):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)


def test_shift_labels_and_scaled_upstream_gradient():
    h, w, labels = inputs()
    shifted = torch.nn.functional.pad(labels, (0, 1), value=-100)[:, 1:]
    fused = linear_cross_entropy(h, w, None, shift_labels=shifted)
    ref = ForCausalLMLoss(h @ w.t(), labels, V)
    torch.testing.assert_close(fused, ref.float(), rtol=1e-6, atol=0)
    for a, b in zip(grads(3.5 * fused, h, w), grads(3.5 * ref, h, w)):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)


def test_without_gradients_returns_the_loss_only():
    h, w, labels = inputs(torch.float32)
    with torch.no_grad():
        loss = linear_cross_entropy(h, w, labels, chunk_bytes=4 * V * 4)
    torch.testing.assert_close(loss, ForCausalLMLoss(h @ w.t(), labels, V).detach(), rtol=1e-5, atol=0)
    assert loss.grad_fn is None


def test_bf16_weights_accumulate_in_fp32_and_return_their_dtype():
    h, w, labels = inputs(torch.float32)
    hb, wb = h.detach().bfloat16().requires_grad_(), w.detach().bfloat16().requires_grad_()
    loss = linear_cross_entropy(hb, wb, labels, chunk_bytes=4 * V * 4)
    g_h, g_w = grads(loss, hb, wb)
    assert loss.dtype == torch.float32 and g_h.dtype == g_w.dtype == torch.bfloat16
    ref = ForCausalLMLoss(hb.float() @ wb.float().t(), labels, V)
    torch.testing.assert_close(loss, ref, rtol=2e-2, atol=0)
    for a, b in zip((g_h, g_w), grads(ref, hb, wb)):
        torch.testing.assert_close(a.float(), b.float(), rtol=5e-2, atol=5e-3)


def test_reference_is_transformers_loss():
    h, w, labels = inputs()
    torch.testing.assert_close(linear_cross_entropy_reference(h, w, labels), ForCausalLMLoss(h @ w.t(), labels, V))


@pytest.mark.parametrize("chunk_bytes", [4 * V * 5, 1 << 20])  # ragged chunks of 5 rows, one chunk
def test_weighted_rows_match_the_unfused_weighted_sum(chunk_bytes):
    """``sum_i w_i loss_i / D`` with ignored rows: the loss, the row losses, and the gradients in h, the weight
    and the row weights, against the same sum over materialised logits."""
    h, w, labels = inputs()
    targets = causal_targets(labels)
    g = torch.Generator().manual_seed(1)
    row_w = torch.rand(targets.shape[0], generator=g, dtype=torch.float64).requires_grad_()
    denominator = torch.tensor(4.0)
    fused, rows = weighted_linear_cross_entropy(h, w, targets, row_w, denominator, chunk_bytes=chunk_bytes)
    logits = (h.reshape(-1, D) @ w.t()).float()
    per_row = torch.nn.functional.cross_entropy(logits, targets, ignore_index=-100, reduction="none")
    ref = (per_row * row_w.float()).sum() / denominator
    torch.testing.assert_close(fused, ref, rtol=1e-6, atol=0)
    torch.testing.assert_close(rows, per_row.detach(), rtol=1e-6, atol=1e-7)
    for a, b in zip(grads(fused, h, w, row_w), grads(ref, h, w, row_w)):
        torch.testing.assert_close(a, b.to(a.dtype), rtol=1e-5, atol=1e-7)
