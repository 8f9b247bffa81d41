"""Building blocks: rotary embeddings (the kernels under them are tested in tests/model/kernels/)."""

import torch

from loopmoe.model.layers import _swap_halves, apply_rotary


def test_rotary_with_signed_sin_is_bitwise_rotate_half():
    torch.manual_seed(0)
    q, k = torch.randn(2, 4, 5, 8), torch.randn(2, 2, 5, 8)
    angles = torch.randn(2, 5, 4)
    cos, sin = torch.cat([angles, angles], -1).cos(), torch.cat([angles, angles], -1).sin()
    signed = torch.cat([-angles.sin(), angles.sin()], -1)

    def rotate_half(x):
        x1, x2 = x.chunk(2, dim=-1)
        return torch.cat((-x2, x1), dim=-1)

    rq, rk = apply_rotary(q, k, cos, signed)
    assert torch.equal(rq, q * cos[:, None] + rotate_half(q) * sin[:, None])
    assert torch.equal(rk, k * cos[:, None] + rotate_half(k) * sin[:, None])
    assert torch.equal(_swap_halves(torch.arange(4.0)), torch.tensor([2.0, 3.0, 0.0, 1.0]))
