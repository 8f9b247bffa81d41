"""Stand-ins for the model and data contracts, so training tests depend only on the contracts.

`TinyMoELM` answers like LoopMoEForCausalLM (loss, lm_loss, aux_loss, router_stats,
on_optimizer_step / on_skipped_step, save_pretrained); `SyntheticLoader` is a deterministic, resumable,
rank-aware loader whose global batch is the same for any world size.
"""

from __future__ import annotations

import json
import os
import signal
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from loopmoe.model.moe import RouterStats
from loopmoe.model.slots import Slot
from loopmoe.training.builders import DataBundle

VOCAB = 61


@dataclass
class StandinOutput:
    """A dataclass, like HF's ModelOutput, so DDP can find the output tensors."""

    loss: torch.Tensor
    lm_loss: torch.Tensor
    aux_loss: torch.Tensor
    router_stats: list
    logits: torch.Tensor


class SoftMoEBlock(nn.Module):
    def __init__(self, d: int, experts: int):
        super().__init__()
        self.norm = nn.LayerNorm(d)
        self.router = nn.Linear(d, experts, bias=False)
        self.experts = nn.Parameter(torch.randn(experts, d, d) * d**-0.5)

    def forward(self, h: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        x = self.norm(h)
        probs = self.router(x).softmax(-1)
        mixed = torch.einsum("bse,edf,bsd->bsf", probs, self.experts, x)
        return h + torch.tanh(mixed), probs


class TinyMoELM(nn.Module):
    def __init__(self, vocab: int = VOCAB, d: int = 32, experts: int = 4, layers: int = 2):
        super().__init__()
        self.embed = nn.Embedding(vocab, d)
        self.layers = nn.ModuleList(SoftMoEBlock(d, experts) for _ in range(layers))
        self.norm = nn.LayerNorm(d)
        self.head = nn.Linear(d, vocab)
        self.nan_at_forward: set[int] = set()  # training forwards (1-based) whose loss becomes NaN
        self.train_forwards = 0
        self.bias_updates = 0
        self.discarded_counts = 0

    def forward(self, input_ids: torch.Tensor, labels: torch.Tensor | None = None) -> StandinOutput:
        h = self.embed(input_ids)
        stats, aux = [], torch.zeros((), device=h.device)
        for i, layer in enumerate(self.layers):
            h, probs = layer(h)
            load = probs.mean((0, 1))
            entropy = -(probs * probs.clamp_min(1e-9).log()).sum(-1).mean()
            slot = Slot("core", i, 1, i)
            stats.append(RouterStats(aux, aux, load.detach(), entropy.detach(), probs.argmax(-1), slot))
            aux = aux + (load * load).sum() * load.numel()
        logits = self.head(self.norm(h))
        lm = F.cross_entropy(logits[:, :-1].reshape(-1, logits.size(-1)), labels[:, 1:].reshape(-1))
        if self.training:
            self.train_forwards += 1
            if self.train_forwards in self.nan_at_forward:
                lm = lm * float("nan")
        return StandinOutput(loss=lm + 0.01 * aux, lm_loss=lm, aux_loss=aux, router_stats=stats, logits=logits)

    def on_optimizer_step(self, reduce_fn=None) -> None:
        self.bias_updates += 1

    def on_skipped_step(self) -> None:
        self.discarded_counts += 1

    def save_pretrained(self, directory: str) -> None:
        Path(directory).mkdir(parents=True, exist_ok=True)
        torch.save(self.state_dict(), Path(directory) / "pytorch_model.bin")
        (Path(directory) / "config.json").write_text(json.dumps({"model_type": "tiny-standin"}))


def _chunk(seed: int, index: int, rows: int, seq_len: int) -> torch.Tensor:
    """Rows of a learnable sequence: x[t+1] = (3 x[t] + 1) mod V, with 10% random tokens."""
    g = torch.Generator().manual_seed(seed * 1_000_003 + index)
    x = torch.empty(rows, seq_len, dtype=torch.long)
    x[:, 0] = torch.randint(0, VOCAB, (rows,), generator=g)
    for t in range(1, seq_len):
        x[:, t] = (3 * x[:, t - 1] + 1) % VOCAB
    noise = torch.rand(rows, seq_len, generator=g) < 0.1
    return torch.where(noise, torch.randint(0, VOCAB, (rows, seq_len), generator=g), x)


class SyntheticLoader:
    """Micro-batch j of rank r is global chunk j*world + r: any world size sees the same tokens per step."""

    def __init__(self, micro_batch: int, seq_len: int, rank: int, world_size: int, seed: int = 0):
        self.micro_batch, self.seq_len, self.rank, self.world_size, self.seed = (
            micro_batch,
            seq_len,
            rank,
            world_size,
            seed,
        )
        self.position = 0
        crash = os.environ.get("STANDIN_CRASH_AT_BATCH")
        self.crash_at = int(crash) if crash else None

    def __iter__(self) -> SyntheticLoader:
        return self

    def __next__(self) -> torch.Tensor:
        if self.crash_at is not None and self.position == self.crash_at:
            os.kill(os.getpid(), signal.SIGKILL)  # deterministic "power cut" for the resume test
        batch = _chunk(self.seed, self.position * self.world_size + self.rank, self.micro_batch, self.seq_len)
        self.position += 1
        return batch

    def state_dict(self) -> dict:
        return {"position": self.position, "world_size": self.world_size}

    def load_state_dict(self, state: dict) -> None:
        """Chunks read so far are ``position * world``: at another world size, continue after them."""
        consumed = state["position"] * state.get("world_size", self.world_size)
        assert consumed % self.world_size == 0, (consumed, self.world_size)
        self.position = consumed // self.world_size


def model_factory(cfg, vocab_size: int) -> TinyMoELM:
    return TinyMoELM(vocab_size)


def data_factory(cfg, rank: int, world_size: int) -> DataBundle:
    seq = cfg.data.seq_len
    loader = SyntheticLoader(cfg.train.micro_batch_size, seq, rank, world_size, seed=cfg.train.seed)

    def val_batches():
        return (_chunk(10_000 + rank, i, cfg.train.micro_batch_size, seq) for i in range(cfg.train.eval_batches))

    return DataBundle(train=loader, val_batches=val_batches, vocab_size=VOCAB)


def standin_overrides(**extra: object) -> list[str]:
    """A small fast run: overrides for load_run_config."""
    base = {
        "data.seq_len": 16,
        "train.micro_batch_size": 4,
        "train.max_steps": 20,
        "schedule.warmup_steps": 3,
        "train.eval_every": 10,
        "train.eval_batches": 2,
        "train.checkpoint_every": 10,
        "train.log_every": 5,
        "optim.lr": 1e-2,
    }
    base.update(extra)
    return [f"{k}={v}" for k, v in base.items()]
