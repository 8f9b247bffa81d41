"""Adaptive depth measured: held-out loss against the compute an exit policy executes (docs/design.md §5).

The model skips the core iterations of the tokens that exit (``loopmoe.model.adaptive``); this module
measures what that costs in loss and saves in compute, on the same data and the same axes as the
test-time depth curve (``loopmoe.evaluation.depth``):

- ``early_exit`` runs every forward of a model inside a block under one ``ExitPolicy`` (lm-eval calls
  the model itself, as ``test_time_depth`` knows for a loop count) and tallies the core iterations every
  position executed (the forward's ``exit_loops``), so perplexity, task scoring and held-out loss all
  run under the same policy with no argument threaded through lm-eval;
- ``exit_point`` is one policy's held-out loss on the batches the depth curve reads (through
  ``depth.heldout_loss``: one definition of the loss for both curves), its mean executed iterations per
  token, the forward FLOPs per token they imply (``budget.adaptive_flops_per_token``, the exit tests'
  LM head included) and that as a fraction of the trained depth's FLOPs (``budget.compute_budget``);
- ``exit_sweep`` is the loss-vs-compute curve, one point per policy.

Policies are written ``CRITERION:THRESHOLD``; a sweep is a list of them in which an item that is only a
threshold takes the criterion before it (``latent:0.1,0.03,kl:1e-3`` is three policies).
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from typing import Any

import torch

from loopmoe.budget import adaptive_flops_per_token, compute_budget
from loopmoe.config import LoopMoEConfig
from loopmoe.errors import ConfigError, DataError
from loopmoe.evaluation.depth import heldout_loss
from loopmoe.evaluation.loading import require_looped
from loopmoe.model.adaptive import ExitPolicy


def resolve_policy(model, policy: ExitPolicy) -> ExitPolicy:
    """``policy`` checked against ``model`` (a LoopMoE that loops: ConfigError naming the fix otherwise),
    with ``max_loops`` filled in."""
    require_looped(model, f"adaptive depth (exit criterion {policy.criterion!r})")
    return policy.resolved(model.config)


def parse_policy(spec: str, *, min_loops: int = 1, max_loops: int | None = None) -> ExitPolicy:
    """``CRITERION:THRESHOLD`` as a policy, checked as far as no model is needed (criterion, threshold range,
    loop bounds), so a command fails before it loads one; ConfigError naming the fix."""
    policy = ExitPolicy.parse(spec, min_loops=min_loops, max_loops=max_loops)
    # The model's own resolution, against a looped config deep enough for the bounds and with an exit gate for
    # the gate criterion (whether min_loops fits the trained T, and whether the model has the gate, is
    # checked against each model).
    probe = LoopMoEConfig(num_loops=max(2, min_loops, max_loops or 2), exit_gate=policy.criterion == "gate")
    policy.resolved(probe)
    return policy


def parse_sweep(items: Sequence[str], *, min_loops: int = 1, max_loops: int | None = None) -> list[ExitPolicy]:
    """The policies of a sweep's ``CRITERION:THRESHOLD`` items (a bare threshold takes the criterion before it),
    each checked by ``parse_policy``."""
    policies: list[ExitPolicy] = []
    criterion: str | None = None
    for item in (i.strip() for i in items):
        if not item:
            continue
        if criterion is None and ":" not in item:
            raise ConfigError(
                f"exit sweep {','.join(items)!r}: {item!r} has no criterion; start with CRITERION:THRESHOLD, "
                "e.g. latent:0.1,0.03,0.01"
            )
        spec = item if ":" in item else f"{criterion}:{item}"
        policy = parse_policy(spec, min_loops=min_loops, max_loops=max_loops)
        criterion = policy.criterion
        if policy in policies:
            raise ConfigError(f"exit sweep: {item!r} is listed twice; give each policy once")
        policies.append(policy)
    return policies


def policy_label(policy: ExitPolicy, trained_loops: int | None = None) -> str:
    """``latent:0.03``, with its loop bounds where they are not 1 and the trained T."""
    label = f"{policy.criterion}:{policy.threshold:g}"
    bounds = policy.min_loops != 1 or (policy.max_loops is not None and policy.max_loops != trained_loops)
    return f"{label} (loops {policy.min_loops}-{policy.max_loops or 'T'})" if bounds else label


@dataclass
class IterationTally:
    """Core iterations executed, summed over every position of the forwards that ran under a policy."""

    iterations: int = 0
    positions: int = 0

    def add(self, exit_loops: torch.Tensor) -> None:
        """One forward's ``exit_loops`` [B, S]."""
        self.iterations += int(exit_loops.sum())
        self.positions += exit_loops.numel()

    @property
    def mean(self) -> float:
        if self.positions == 0:
            raise DataError("no forward ran under the exit policy: there is no executed depth to report")
        return self.iterations / self.positions


@contextmanager
def early_exit(model, policy: ExitPolicy, tally: IterationTally | None = None) -> Iterator[ExitPolicy]:
    """Every forward of ``model`` inside the block runs under ``policy``; yields the policy as resolved.

    The policy is checked before the block runs (``resolve_policy``). ``tally``: filled with the iterations
    every position of every forward executed. Forward hooks, removed on exit: the callers (lm-eval's
    ``HFLM``, the perplexity and held-out loss loops) call ``model(...)`` without knowing of exits.
    """
    resolved = resolve_policy(model, policy)
    settings = {
        "exit_criterion": resolved.criterion,
        "exit_threshold": resolved.threshold,
        "min_loops": resolved.min_loops,
        "max_loops": resolved.max_loops,
    }

    def before(module, args, kwargs):
        return args, {**kwargs, **settings}

    def after(module, args, kwargs, output):
        if tally is not None and getattr(output, "exit_loops", None) is not None:
            tally.add(output.exit_loops)

    handles = [
        model.register_forward_pre_hook(before, with_kwargs=True),
        model.register_forward_hook(after, with_kwargs=True),
    ]
    try:
        yield resolved
    finally:
        for handle in handles:
            handle.remove()


@dataclass(frozen=True)
class ExitPoint:
    """One exit policy's held-out loss and the compute it executed; ``to_dict`` is its JSON, key for key."""

    criterion: str
    threshold: float
    min_loops: int
    max_loops: int  # resolved: the trained T unless given
    loss: float
    mean_loops: float  # core iterations executed per token, mean over every position run
    flops_per_token: float  # forward FLOPs per token at that mean (budget.adaptive_flops_per_token)
    flops_fraction: float  # of the trained depth's forward FLOPs per token at the same sequence length

    @property
    def policy(self) -> ExitPolicy:
        return ExitPolicy(self.criterion, self.threshold, self.min_loops, self.max_loops)

    def label(self, trained_loops: int | None = None) -> str:
        return policy_label(self.policy, trained_loops)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, raw: dict[str, Any]) -> ExitPoint:
        return cls(**raw)


def exit_point_of(config, policy: ExitPolicy, loss: float, mean_loops: float, seq_len: int) -> ExitPoint:
    """The point of a resolved ``policy`` that measured ``loss`` at ``mean_loops`` executed iterations, with its
    FLOPs per token at ``seq_len`` (the attention scores grow with it) and their fraction of the trained depth's."""
    assert policy.criterion is not None and policy.max_loops is not None, "resolve the policy first"
    flops = adaptive_flops_per_token(config, seq_len, mean_loops, policy.criterion, policy.max_loops)
    full = compute_budget(config, seq_len).flops_per_token
    return ExitPoint(
        criterion=policy.criterion,
        threshold=policy.threshold,
        min_loops=policy.min_loops,
        max_loops=policy.max_loops,
        loss=loss,
        mean_loops=mean_loops,
        flops_per_token=flops,
        flops_fraction=flops / full,
    )


@torch.no_grad()
def exit_point(model, batches: Iterable[torch.Tensor], policy: ExitPolicy, seq_len: int) -> ExitPoint:
    """Held-out loss of ``batches`` under ``policy`` (``depth.heldout_loss``: the depth curve's own loss, so a
    policy that never exits gives the trained depth's point exactly) and the compute it executed."""
    tally = IterationTally()
    with early_exit(model, policy, tally) as resolved:
        loss = heldout_loss(model, batches)
    return exit_point_of(model.config, resolved, loss, tally.mean, seq_len)


def exit_sweep(model, batches: Sequence[torch.Tensor], policies: Sequence[ExitPolicy], seq_len: int) -> list[ExitPoint]:
    """``exit_point`` of every policy on the same batches: the loss-vs-compute curve of adaptive depth.
    Every policy is checked against the model before the first is measured."""
    for policy in policies:
        resolve_policy(model, policy)
    return [exit_point(model, batches, policy, seq_len) for policy in policies]
