"""Executed slots: one per (iteration, layer) a token passes through (docs/design.md §5).

The looped model runs P prelude layers once, the C core layers T times and Q coda layers once,
so its executed depth is ``P + C*T + Q`` while it has only ``P + C + Q`` layers. Everything that
exists per *executed* layer rather than per layer (a KV-cache entry, router statistics, a
checkpointed region) is keyed by a ``Slot``.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal

Block = Literal["prelude", "core", "coda"]


@dataclass(frozen=True)
class Slot:
    block: Block
    layer: int  # index inside its block
    iteration: int | None  # the core iteration k (0-based); None for layers that run once
    cache_index: int  # KV-cache slot: position in execution order

    @property
    def layer_name(self) -> str:
        """The module that runs here, e.g. ``core.1`` (shared by every iteration)."""
        return f"{self.block}.{self.layer}"

    @property
    def name(self) -> str:
        """One name per executed slot, e.g. ``prelude.0``, ``core.1/iter2``, ``coda.0``."""
        return self.layer_name if self.iteration is None else f"{self.layer_name}/iter{self.iteration}"


def cache_index(block: Block, layer: int, iteration: int, *, prelude: int, core: int, loops: int) -> int:
    """Execution-order position: prelude ``i``, core ``P + k*C + l``, coda ``P + T*C + j``."""
    if block == "prelude":
        return layer
    if block == "core":
        return prelude + iteration * core + layer
    return prelude + loops * core + layer


def every_slot(slot: Slot) -> bool:
    """Activation-checkpointing policy ``full``: every executed slot recomputes in backward."""
    return True


def every_nth_slot(n: int) -> Callable[[Slot], bool]:
    """Activation-checkpointing policy ``selective``: every ``n``-th executed slot (1-based, in
    execution order: ``n=2`` checkpoints the 2nd, 4th, ...)."""
    return lambda slot: (slot.cache_index + 1) % n == 0
