"""A parallel layout: how one training step is spread over devices, and its settings that cost.

``Layout.from_run_config`` reads it from the trainer's ``RunConfig`` (the same TOML file and
overrides as ``loopmoe train``), so a plan describes exactly the run the trainer would do.
"""

from __future__ import annotations

import os
from dataclasses import asdict, dataclass
from typing import Literal

from loopmoe.distributed.config import ActivationCheckpointing, DistStrategy
from loopmoe.errors import ConfigError
from loopmoe.training.config import RunConfig


@dataclass(frozen=True)
class Layout:
    devices: int = 1  # world size (processes / accelerators)
    strategy: DistStrategy = DistStrategy.DDP  # data parallelism across devices (ignored with one device)
    ep: int = 1  # expert-parallel degree: experts sharded over groups of `ep` devices
    micro_batch: int = 8  # sequences per micro-batch per device
    seq_len: int = 128
    grad_accum: int = 1
    activation_checkpointing: ActivationCheckpointing = ActivationCheckpointing.NONE
    ac_every: int = 2
    dtype: Literal["fp32", "bf16"] = "fp32"  # compute dtype (bf16: autocast, fp32 master weights)
    reshard_after_forward: bool = True  # FSDP2: free gathered weights after each forward use
    update_guard: bool = True  # the trainer's roll-back copy of parameters and optimizer state
    threads: int = 1  # CPU intra-op threads per process (the calibration's thread count)

    def __post_init__(self) -> None:
        for name in ("devices", "ep", "micro_batch", "seq_len", "grad_accum", "ac_every", "threads"):
            if getattr(self, name) < 1:
                raise ConfigError(f"layout: {name} must be >= 1, got {getattr(self, name)}")
        if self.devices % self.ep:
            raise ConfigError(
                f"layout: the expert-parallel degree ({self.ep}) must divide the devices ({self.devices})"
            )

    @property
    def tokens_per_micro_batch(self) -> int:
        return self.micro_batch * self.seq_len

    @property
    def tokens_per_step(self) -> int:
        """Tokens of one optimizer step over all devices."""
        return self.tokens_per_micro_batch * self.grad_accum * self.devices

    @property
    def sharded(self) -> bool:
        return self.strategy == "fsdp2" and self.devices > 1

    def as_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_run_config(cls, cfg: RunConfig, devices: int = 1, device_type: str = "cpu") -> Layout:
        """The layout of ``loopmoe train`` with this config on ``devices`` processes (torchrun's world size).

        On a CPU each of the ``devices`` processes gets ``cores / devices`` intra-op threads (what
        ``torchrun`` with ``OMP_NUM_THREADS`` unset would be told to use); ``precision = "auto"`` is fp32
        on a CPU and bf16 on an accelerator, as in the trainer.
        """
        t = cfg.train
        # precision "auto" is fp32 on a CPU and bf16 on an accelerator, as in the trainer
        bf16 = t.precision == "bf16" or (t.precision == "auto" and device_type != "cpu")
        precision: Literal["fp32", "bf16"] = "bf16" if bf16 else "fp32"
        dist = cfg.dist
        return cls(
            devices=devices,
            strategy=dist.strategy,
            ep=getattr(dist, "ep", 1),  # expert parallelism, where the trainer has it (dist.ep)
            micro_batch=t.micro_batch_size,
            seq_len=cfg.data.seq_len,
            grad_accum=cfg.grad_accum_for(devices),
            activation_checkpointing=t.activation_checkpointing,
            ac_every=t.ac_every,
            dtype=precision,
            reshard_after_forward=dist.reshard_after_forward,
            update_guard=t.update_guard,
            threads=max(1, (os.cpu_count() or 1) // devices) if device_type == "cpu" else 1,
        )
