"""One MoE layer under expert parallelism equals the same layer in one process (run under torchrun).

usage: torchrun --nproc_per_node=W -m tests.distributed.ep_layer_check EP ROUTING [EXPERT_TYPE]
ROUTING is ``spread`` (the router's own choices) or ``one_expert`` (a selection bias sends every
token to experts 0 and 1, so the ranks holding the others receive zero rows). Every rank builds the
full layer from the same seed and the global batch; it runs its own slice of the batch through the
expert-parallel copy and checks its output, its input gradient and its experts' weight gradients
(summed over the ranks, as the trainer's reduction does) against the single-process layer, and
the gradients of every replicated parameter (the router; DCCA's descending and ascending
projections, which run before and after the exchange) summed over all ranks. EXPERT_TYPE is
``swiglu`` (default) or ``dcca`` (the exchange carries rows of the DCCA width, 4 here, not d = 16).
"""

import sys

import torch
import torch.distributed as dist

from loopmoe.config import LoopMoEConfig
from loopmoe.distributed import build_mesh, init_distributed
from loopmoe.distributed.expert_parallel import apply_expert_parallel
from loopmoe.model.moe import SparseMoE


def assert_sum_close(actual: torch.Tensor, expected: torch.Tensor, summed: int) -> None:
    """``actual`` and ``expected`` are the same fp32 sums of ``summed`` terms, accumulated in another order
    (per-rank partial sums and an all-reduce against one matmul; the kernels' blocking differs between
    CPUs, e.g. AVX-512 against AVX2). Reordering changes such a sum by at most about
    ``summed * u * sum(|term|)`` (u = 2**-24, fp32's unit roundoff). Every term is bounded by the
    gradient's own scale (its largest element), so the tolerance is that bound relative to the scale,
    with a factor 4 for the two roundings of each product-and-add: not a number tuned to one machine."""
    scale = expected.abs().max().item()
    torch.testing.assert_close(actual, expected, rtol=0, atol=4 * summed * 2**-24 * max(scale, 1.0))


def main(ep: int, routing: str, expert_type: str = "swiglu") -> None:
    info = init_distributed()
    torch.manual_seed(0)
    cfg = LoopMoEConfig(
        hidden_size=16, num_experts=4, num_experts_per_tok=2, moe_intermediate_size=8, expert_type=expert_type
    )
    reference = SparseMoE(cfg)
    for p in reference.parameters():
        torch.nn.init.normal_(p, std=0.5)
    if routing == "one_expert":
        reference.gate.expert_bias.copy_(torch.tensor([100.0, 50.0, 0.0, 0.0]))
    x = torch.randn(info.world_size * 2, 5, 16)  # global batch, [B, S, d]
    x_ref = x.clone().requires_grad_()
    y_ref, _ = reference(x_ref)
    y_ref.square().sum().backward()

    layer = SparseMoE(cfg)
    layer.load_state_dict(reference.state_dict())
    apply_expert_parallel(layer, build_mesh(info.world_size, "cpu", ep))
    mine = slice(info.rank * 2, (info.rank + 1) * 2)
    x_mine = x[mine].clone().requires_grad_()
    y, _ = layer(x_mine)
    y.square().sum().backward()
    torch.testing.assert_close(y, y_ref[mine], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(x_mine.grad, x_ref.grad[mine], rtol=1e-5, atol=1e-6)

    local = cfg.num_experts // ep
    block = slice(layer.expert_parallel.rank * local, (layer.expert_parallel.rank + 1) * local)  # global ids
    exchange = layer.expert_parallel
    for name in ("gate_up_proj", "down_proj"):
        grad = getattr(layer.experts, name).grad.clone()  # from the tokens of this rank's ep group
        if exchange.grad_group is not None:
            dist.all_reduce(grad, group=exchange.grad_group)  # plus the other groups' (the dp replicas)
        # a weight gradient sums over the global batch's tokens and, inside, over the hidden size
        assert_sum_close(grad, getattr(reference.experts, name).grad[block], summed=x.shape[0] * x.shape[1] * 16)
    replicated = {n: p for n, p in layer.named_parameters() if not n.startswith("experts.")}
    assert (layer.descend is not None) == (expert_type == "dcca")
    for name, p in replicated.items():  # each rank's gradient is from its own tokens: sum over all ranks
        grad = p.grad.clone()
        dist.all_reduce(grad)
        assert_sum_close(grad, reference.get_parameter(name).grad, summed=x.shape[0] * x.shape[1] * 16)
    if routing == "one_expert" and exchange.rank > 0:  # experts 0 and 1 live on ep rank 0
        assert layer.experts.gate_up_proj.grad.abs().sum() == 0  # this rank received no rows
    dist.destroy_process_group()


if __name__ == "__main__":
    main(int(sys.argv[1]), *sys.argv[2:])
