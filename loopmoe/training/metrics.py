"""Where training numbers go: `metrics.jsonl` (every step), TensorBoard and a progress bar.

Only rank 0 writes. The JSONL file is the record runs are compared by (resume exactness,
parity tests, plots); TensorBoard is for looking at a run while it trains.
"""

from __future__ import annotations

import json
import sys
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch.utils.tensorboard import SummaryWriter
from tqdm import tqdm

from loopmoe.atomic import atomic_write_text

if TYPE_CHECKING:
    from loopmoe.model.moe import RouterStats

METRICS_FILE = "metrics.jsonl"


def _parse_records(path: Path) -> list[tuple[str, dict[str, Any]]]:
    """(line, record) for every record of a metrics.jsonl.

    A torn last line (the process was killed mid-append) is dropped with a warning; any other
    line that is not a JSON object with a ``step`` raises ValueError naming the file and line.
    """
    lines = path.read_text().splitlines()
    last = max((i for i, line in enumerate(lines) if line.strip()), default=-1)
    out: list[tuple[str, dict[str, Any]]] = []
    for i, line in enumerate(lines):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
            if not isinstance(record, dict) or not isinstance(record.get("step"), int):
                raise ValueError("not a step record (a JSON object with an integer 'step')")
        except ValueError as e:
            if i == last:
                warnings.warn(
                    f"{path}:{i + 1}: dropping a torn last line (the run was interrupted mid-write): {e}",
                    stacklevel=3,
                )
                break
            raise ValueError(
                f"{path}:{i + 1}: not a metrics record ({e}); fix or remove that line (records are one JSON "
                f"object per line)"
            ) from e
        out.append((line, record))
    return out


def read_metrics(run_dir: str | Path) -> list[dict[str, Any]]:
    """All records of a run's metrics.jsonl, in order (a torn last line is dropped with a warning)."""
    path = Path(run_dir) / METRICS_FILE
    return [record for _, record in _parse_records(path)] if path.exists() else []


def _truncate_after(path: Path, step: int) -> None:
    """Drop records past `step` (and a torn last line): a resumed run re-does those steps and logs them again."""
    if not path.exists():
        return
    kept = [line for line, record in _parse_records(path) if record["step"] <= step]
    atomic_write_text(path, "".join(line + "\n" for line in kept))


def summarize_router_stats(stats_per_micro: Sequence[Sequence[RouterStats]]) -> dict[str, dict[str, torch.Tensor]]:
    """Average router load and entropy over micro-batches, keyed by the slot's name.

    Key is e.g. `core.0/iter1` for a looped core layer, `prelude.0` for a layer run once.
    """
    acc: dict[str, dict[str, list[torch.Tensor]]] = {}
    for stats in stats_per_micro:
        for s in stats:
            assert s.slot is not None, "router statistics come from the model, which names their slot"
            slot = acc.setdefault(s.slot.name, {"load": [], "entropy": []})
            slot["load"].append(s.load.detach().float().cpu())
            slot["entropy"].append(torch.as_tensor(s.entropy).detach().float().cpu())
    return {k: {n: torch.stack(v).mean(0) for n, v in d.items()} for k, d in acc.items()}


class MetricsLogger:
    """Writes step records; a no-op on ranks other than 0."""

    def __init__(self, run_dir: str | Path, enabled: bool, max_steps: int, start_step: int = 0):
        self.enabled = enabled
        self.path = Path(run_dir) / METRICS_FILE
        self.writer: SummaryWriter | None = None
        self.bar: tqdm | None = None
        if not enabled:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        _truncate_after(self.path, start_step)
        self.writer = SummaryWriter(
            str(Path(run_dir) / "tensorboard"), purge_step=start_step + 1 if start_step else None
        )
        interactive = sys.stderr.isatty()
        self.bar = tqdm(total=max_steps, initial=start_step, unit="step", dynamic_ncols=True, disable=not interactive)
        # Logs and CI have no live bar: a plain line every 5% of the run shows it is alive instead.
        self.max_steps = max_steps
        self.plain_every = None if interactive else max(1, max_steps // 20)

    def log_step(self, record: dict[str, Any], router: dict[str, dict[str, torch.Tensor]] | None = None) -> None:
        """Append one record to metrics.jsonl; TensorBoard scalars; advance the bar."""
        if not self.enabled:
            return
        with self.path.open("a") as fh:
            fh.write(json.dumps(record) + "\n")
        step = record["step"]
        assert self.writer is not None and self.bar is not None
        for key in ("loss", "lm_loss", "aux_loss", "lr", "grad_norm", "tokens_per_s"):
            value = record.get(key)
            if value is not None:
                self.writer.add_scalar(f"train/{key}", value, step)
        if record.get("val_loss") is not None:
            self.writer.add_scalar("val/loss", record["val_loss"], step)
        for key, stats in (router or {}).items():
            self.writer.add_scalar(f"router/{key}/entropy", stats["entropy"].item(), step)
            load = stats["load"]
            self.writer.add_scalar(f"router/{key}/max_load_x_experts", (load.max() * load.numel()).item(), step)
            for e, value in enumerate(load.tolist()):
                self.writer.add_scalar(f"router/{key}/load/expert_{e:03d}", value, step)
        self.bar.set_postfix(loss=f"{record['loss']:.4f}", tok_s=f"{record['tokens_per_s']:.0f}", refresh=False)
        self.bar.update(1)
        if self.plain_every and (step % self.plain_every == 0 or step == self.max_steps):
            val = f" val_loss {record['val_loss']:.4f}" if record.get("val_loss") is not None else ""
            print(
                f"step {step}/{self.max_steps} loss {record['loss']:.4f}{val} {record['tokens_per_s']:.0f} tok/s",
                file=sys.stderr,
                flush=True,
            )

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
        if self.bar is not None:
            self.bar.close()
