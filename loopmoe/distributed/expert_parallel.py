"""Expert parallelism: each rank of an ``ep`` group holds ``E / ep`` experts; token rows travel to
them by ``all_to_all`` and back (DeepSeek / Pangu Ultra MoE recipe, torchtitan's design).

Layout. ``W = dp x ep`` ranks form a 2-D mesh ``("dp", "ep")`` (``rank = dp_index * ep + ep_index``,
the ep ranks of a group adjacent). Every rank reads its own data, so the data-parallel degree of
the batch is ``W``; the ``ep`` ranks of one group pool their tokens for the experts. Expert ``e``
lives on ep rank ``e // (E / ep)`` (contiguous blocks, as in the checkpoint's ``[E, ...]`` tensors).
Everything but the experts (attention, router, shared experts, embeddings) is data-parallel over
all ``W`` ranks; the experts are data-parallel over ``dp`` only (the ranks holding the same block).

Dispatch, per executed (iteration, layer) slot, dropless (no capacity factor, no dropped token):

1. the MoE sorts its ``N*k`` (token, expert) rows by global expert, so the rows for ep rank ``j``
   form one contiguous block (``counts: [E]`` rows per expert);
2. ``all_to_all_single`` on ``counts.view(ep, E/ep)``: each rank learns how many rows every
   source sends to each of its local experts (``recv: [ep, E/ep]``);
3. ``all_to_all_single`` on the rows with those split sizes (row width anything: the exchange
   moves ``[rows, *]`` tensors, whatever the MoE hands it);
4. the received rows, ordered (source, local expert), are regrouped by local expert, the local
   experts run, the rows are put back in (source, local expert) order;
5. the reverse ``all_to_all_single`` returns each row to its token's rank.

Steps 3 and 5 are differentiable: the backward of an all_to_all is the all_to_all with the split
sizes swapped, so gradients flow back to the rank that sent each row.

Communication volume per MoE slot and rank (forward), with ``N`` local tokens, top-``k``, row width
``w`` elements of ``b`` bytes, uniform routing: each exchange sends ``N*k*(ep-1)/ep`` rows off-rank,
so ``2 * N*k*w*b*(ep-1)/ep`` bytes (dispatch + combine) plus ``8*E*(ep-1)/ep`` bytes of counts; the
backward moves the same rows again (per token: ``loopmoe.budget.all_to_all_bytes_per_token``;
``docs/design.md`` §9 has the per-step formula; ``bytes_sent`` counts what was really sent, which
``bench/expert_parallel.py`` prints beside it).

Gradients. The gradient of a local expert already sums the contributions of the tokens of all
``ep`` ranks of the group; the remaining sum is over ``dp`` (the replicas of the block), and the
divisor is ``W``, as for every other parameter whose gradient DDP / FSDP2 averages over ``W`` ranks.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any, cast

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.tensor import DTensor, Replicate, Shard
from torch.distributed.tensor.placement_types import Placement

from loopmoe.errors import ConfigError
from loopmoe.model.kernels.permute import permute_rows
from loopmoe.model.moe import SparseMoE


class _AllToAll(torch.autograd.Function):
    """Rows ``[sum(in_splits), *] -> [sum(out_splits), *]``; backward: the same exchange reversed."""

    @staticmethod
    def forward(ctx, x, out_splits, in_splits, exchange):
        ctx.splits, ctx.exchange = (out_splits, in_splits), exchange
        return exchange.rows(x, out_splits, in_splits)

    @staticmethod
    def backward(ctx, grad):
        out_splits, in_splits = ctx.splits
        return ctx.exchange.rows(grad, in_splits, out_splits), None, None, None


def _source_to_expert_order(recv: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Permutation regrouping received rows from (source, local expert) to (local expert, source)
    order, and its inverse. ``recv: [ep, E_local]`` rows from each source to each local expert."""
    ep, local = recv.shape
    block = torch.arange(ep * local, device=recv.device)
    key = ((block % local) * ep + block // local).repeat_interleave(recv.reshape(-1))
    order = torch.argsort(key, stable=True)
    inverse = torch.empty_like(order)
    inverse[order] = torch.arange(order.numel(), device=order.device)
    return order, inverse


@dataclass(eq=False)
class ExpertParallel:
    """The exchange a ``SparseMoE`` runs instead of calling its experts directly (a plain attribute
    set by ``apply_expert_parallel``; the MoE's code does not change)."""

    mesh: DeviceMesh  # the 2-D ("dp", "ep") mesh
    num_experts: int  # global E

    def __post_init__(self) -> None:
        self.group = self.mesh["ep"].get_group()
        dp = self.mesh["dp"].size()
        self.grad_group = self.mesh["dp"].get_group() if dp > 1 else None  # the replicas of this block
        self.ep = self.mesh["ep"].size()
        self.world_size = dp * self.ep  # the divisor of expert gradients
        self.rank = self.mesh["ep"].get_local_rank()
        self.num_local = self.num_experts // self.ep
        self.bytes_sent = 0  # bytes this rank sent to other ranks (rows and counts, forward and backward)

    def __call__(self, x_sorted: torch.Tensor, counts: torch.Tensor, experts: nn.Module) -> torch.Tensor:
        # x_sorted: [M, *] rows grouped by global expert; counts: [E] rows per expert -> [M, *]
        send = counts.view(self.ep, self.num_local)
        recv = torch.empty_like(send)
        dist.all_to_all_single(recv, send.contiguous(), group=self.group)  # recv[src, e]: rows src -> local e
        self.bytes_sent += (send.numel() - self.num_local) * send.element_size()
        send_splits, recv_splits = send.sum(1).tolist(), recv.sum(1).tolist()
        x_recv = self.all_to_all(x_sorted, recv_splits, send_splits)  # [R, *] in (source, expert) order
        order, inverse = _source_to_expert_order(recv)
        y = experts(permute_rows(x_recv, order, inverse), recv.sum(0))  # local experts on (expert, source)
        return self.all_to_all(permute_rows(y, inverse, order), send_splits, recv_splits)

    def all_to_all(self, x: torch.Tensor, out_splits: list[int], in_splits: list[int]) -> torch.Tensor:
        """Send ``x``'s row block ``j`` (``in_splits[j]`` rows) to ep rank ``j``, receive ``out_splits[j]``
        rows from each; differentiable. Rows may have any shape after the first dimension."""
        return _AllToAll.apply(x, out_splits, in_splits, self)

    def rows(self, x: torch.Tensor, out_splits: list[int], in_splits: list[int]) -> torch.Tensor:
        """The exchange itself (no autograd), counted in ``bytes_sent``."""
        out = x.new_empty((sum(out_splits), *x.shape[1:]))
        dist.all_to_all_single(out, x.contiguous(), out_splits, in_splits, group=self.group)
        self.bytes_sent += (sum(in_splits) - in_splits[self.rank]) * x[:1].numel() * x.element_size()
        return out


def moe_layers(model: nn.Module) -> Iterator[SparseMoE]:
    """The modules that route tokens to experts."""
    for m in model.modules():
        if isinstance(m, SparseMoE):
            yield m


def expert_parallel_of(model: nn.Module) -> ExpertParallel | None:
    """The model's ``ExpertParallel`` (one shared by all its MoE layers), or None without EP."""
    return next(
        (ep for m in moe_layers(model) if isinstance(ep := m.expert_parallel, ExpertParallel)),
        None,
    )


def expert_parameters(model: nn.Module) -> list[tuple[str, nn.Parameter]]:
    """``(name, parameter)`` of every expert weight held as an ep-local block (empty without EP)."""
    if expert_parallel_of(model) is None:
        return []
    ids = {id(p) for m in moe_layers(model) for p in m.experts.parameters()}
    return [(n, p) for n, p in model.named_parameters() if id(p) in ids]


def check_expert_parallel(num_experts: int, ep: int) -> None:
    """Raise ValueError naming the fix unless ``ep`` divides the expert count."""
    if num_experts % ep:
        divisors = [d for d in range(1, num_experts + 1) if num_experts % d == 0]
        raise ConfigError(
            f"dist.ep = {ep} does not divide the model's {num_experts} experts: set dist.ep to a divisor of "
            f"{num_experts} ({', '.join(map(str, divisors[:8]))}{', ...' if len(divisors) > 8 else ''}), or pick a "
            f"model whose num_experts is a multiple of {ep} (`loopmoe budget --expert-multiple {ep}`)"
        )


def apply_expert_parallel(model: nn.Module, mesh: DeviceMesh) -> nn.Module:
    """Keep this rank's ``E / ep`` experts of every MoE layer and route tokens to the others by all_to_all.

    ``mesh`` is the 2-D ``("dp", "ep")`` mesh of ``build_mesh``. Expert weights ``[E, ...]`` become
    their ep-local block ``[E/ep, ...]`` (new parameters: apply before building the optimizer).
    Raises ValueError when ``ep`` does not divide a layer's expert count. Apply before DDP / FSDP2.
    """
    ep, rank = mesh["ep"].size(), mesh["ep"].get_local_rank()
    layers = list(moe_layers(model))
    if not layers:
        raise ConfigError(f"{type(model).__name__} has no MoE layers to parallelise over experts (dist.ep = {ep})")
    shared: ExpertParallel | None = None
    for moe in layers:
        E = moe.experts.gate_up_proj.shape[0]
        check_expert_parallel(E, ep)
        if shared is None:
            shared = ExpertParallel(mesh, E)
        local = E // ep
        for name, p in list(moe.experts.named_parameters(recurse=False)):
            block = p.detach()[rank * local : (rank + 1) * local].clone()
            setattr(moe.experts, name, nn.Parameter(block, requires_grad=p.requires_grad))
        moe.experts.num_experts = local
        moe.expert_parallel = shared
    return model


@torch.no_grad()
def reduce_expert_grads(model: nn.Module, averaged_over_dp: bool = False) -> None:
    """Finish the expert gradients: sum over the dp replicas of the block, divide by ``W``.

    Under DDP (the default) one all-reduce of the flattened gradients (experts that got no row
    contribute zeros), in parameter order, which every rank shares. Under FSDP2
    (``averaged_over_dp``) its reduce-scatter already averaged over dp; what is left is ``1 / ep``
    (a divide factor of ``W`` inside FSDP2 would need PREMUL_SUM, which gloo lacks).
    """
    ep = expert_parallel_of(model)
    params = [p for _, p in expert_parameters(model)]
    if ep is None or not params:
        return
    if averaged_over_dp:
        for p in params:
            if p.grad is not None:
                p.grad.div_(ep.ep)
        return
    grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]
    flat = torch.cat([g.reshape(-1) for g in grads])
    if ep.grad_group is not None:
        dist.all_reduce(flat, group=ep.grad_group)
    flat /= ep.world_size
    for p, g in zip(params, flat.split([g.numel() for g in grads])):
        p.grad = g.view_as(p).clone()


def _squared_norm(grads: list[torch.Tensor]) -> torch.Tensor:
    """Sum of squared entries of ``grads`` (DTensors: over their whole mesh), fp32 scalar."""
    total = torch.zeros((), dtype=torch.float32, device=grads[0].device if grads else None)
    for g in grads:
        sq = g.float().square().sum()
        total = total + (sq.full_tensor() if isinstance(sq, DTensor) else sq)
    return total


def clip_expert_parallel_grad_norm_(model: nn.Module, max_norm: float) -> torch.Tensor:
    """``clip_grad_norm_`` over a model whose expert weights are ep-local blocks: the global norm
    counts every expert once (their squares are summed over the ep group) and every other parameter
    once (replicated under DDP, sharded DTensors under FSDP2). Returns the total norm."""
    ep = expert_parallel_of(model)
    assert ep is not None
    expert_ids = {id(p) for _, p in expert_parameters(model)}
    params = [p for p in model.parameters() if p.grad is not None]
    grads = [(id(p) in expert_ids, cast(torch.Tensor, p.grad)) for p in params]
    experts = _squared_norm([g for is_expert, g in grads if is_expert])
    dist.all_reduce(experts, group=ep.group)
    rest = _squared_norm([g for is_expert, g in grads if not is_expert])
    norm = (experts + rest).sqrt()
    coef = max_norm / (norm.item() + 1e-6)  # as clip_grad_norm_; a float, since the grads live on several meshes
    if coef < 1.0:
        for _, g in grads:
            g.mul_(coef)
    return norm


# --- checkpoints ---------------------------------------------------------------------------------
# DCP reshards DTensors. An ep-local block is presented to it as a view of the global ``[E, ...]``
# tensor: a DTensor on the 2-D mesh, Shard(0) over "ep" and Replicate (DDP) or FSDP2's own Shard(1)
# over "dp". Replicas are written once; a load at any other layout reads the chunks it needs.


def global_expert_views(state: Any, model: nn.Module) -> Any:
    """``state`` (a model state dict, or an optimizer state dict's per-parameter entries) with every
    ep-local expert tensor replaced by a DTensor view of the global tensor sharing its storage."""
    names = {n for n, _ in expert_parameters(model)}
    ep = expert_parallel_of(model)
    if ep is None:
        return state

    def view(t: Any) -> Any:
        if not torch.is_tensor(t) or t.dim() == 0:
            return t
        placements: list[Placement]
        if isinstance(t, DTensor):  # FSDP2's shard over dp, Shard(1) (see apply_fsdp2)
            local, placements = t.to_local(), [Shard(1), Shard(0)]
            block_shape = t.shape
        else:
            local, placements, block_shape = t, [Replicate(), Shard(0)], t.shape
        shape = torch.Size((block_shape[0] * ep.ep, *block_shape[1:]))
        return DTensor.from_local(
            local.detach(), ep.mesh, placements, shape=shape, stride=torch.empty(shape, device="meta").stride()
        )

    out = {}
    for key, value in state.items():
        name = key.removeprefix("_orig_mod.")
        if name in names:
            out[key] = {k: view(v) for k, v in value.items()} if isinstance(value, dict) else view(value)
        else:
            out[key] = value
    return out


def gather_full_experts(state: dict[str, Any], model: nn.Module) -> dict[str, Any]:
    """A full (unsharded over dp) model state dict with each ep-local expert block all-gathered over
    the ep group into the global ``[E, ...]`` tensor (a collective: every rank calls it)."""
    ep = expert_parallel_of(model)
    if ep is None:
        return state
    for name, _ in expert_parameters(model):
        block = state[name].contiguous()
        parts = [torch.empty_like(block) for _ in range(ep.ep)]
        dist.all_gather(parts, block, group=ep.group)
        state[name] = torch.cat(parts)
    return state
