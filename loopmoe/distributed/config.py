"""``[dist]``: how the processes torchrun starts share the work (DDP or FSDP2, expert parallelism).

Activation checkpointing, ``ac_every`` and ``compile`` stay keys of ``[train]``
(``train.activation_checkpointing=selective``): they are what users write today, and moving them
would rename them. ``parallelize`` takes them as arguments beside this section.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import StrEnum

from loopmoe.errors import ConfigError
from loopmoe.options import option


class DistStrategy(StrEnum):
    """Data parallelism across processes: replicated (DDP) or sharded (FSDP2)."""

    DDP = "ddp"
    FSDP2 = "fsdp2"


class ActivationCheckpointing(StrEnum):
    """Which executed slots recompute their activations in backward (``train.activation_checkpointing``)."""

    NONE = "none"
    FULL = "full"  # every executed (iteration, layer) slot
    SELECTIVE = "selective"  # every ``ac_every``-th executed slot


@dataclass
class DistSection:
    """How the processes torchrun starts share the work: ``W = dp x ep`` ranks, every rank reading its
    own data; experts split over ``ep`` ranks (all_to_all dispatch), everything else data-parallel."""

    strategy: DistStrategy = option(DistStrategy.DDP, help="DDP (replicated) or FSDP2 (sharded) under torchrun")
    reshard_after_forward: bool = option(
        True,
        help="FSDP2: free a looped core layer's gathered weights after each of its T forward uses (gathered 2T "
        "times per micro-batch); false keeps them from the first use to the end of backward (gathered once, "
        "the core's full weights in memory). `loopmoe plan` predicts both",
    )
    ep: int = option(1, help="expert-parallel degree: each group of ep processes splits the experts (divides them)")

    def validate(self, world_size: int, *, compile: bool = False) -> DistSection:
        """Check the layout against the world size (and ``train.compile``); ValueError naming the fix."""
        if self.ep < 1 or world_size % self.ep:
            raise ConfigError(
                f"dist.ep = {self.ep} does not divide the {world_size} process(es): launch a multiple of "
                f"{max(self.ep, 1)} processes (torchrun --nproc_per_node) or set dist.ep to a divisor of {world_size}"
            )
        if self.ep > 1 and compile:
            raise ConfigError(
                "train.compile does not support dist.ep > 1 yet (the all_to_all dispatch is not traced); "
                "set train.compile=false or dist.ep=1"
            )
        return self
