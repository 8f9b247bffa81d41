"""Where training numbers go: one ``MetricsLogger`` writing to sinks.

Only rank 0 writes. Every step is appended to ``metrics.jsonl`` (with its wall-clock ``time`` and
the run's ``elapsed_s``), the record runs are compared by (resume exactness, parity tests,
plots). The same step scalars, and every ``train.log_every`` steps the router statistics (per
executed (layer, iteration): a histogram of the expert loads and three summary scalars), go to
each ``Sink``: TensorBoard always, Weights & Biases with ``train.wandb = true``. The console gets
one line every ``train.log_every`` steps (step, loss, lr, grad norm, tokens/s, MFU, ETA; see
``loopmoe.training.throughput``), and a progress bar when stderr is a terminal.
"""

from __future__ import annotations

import contextlib
import errno
import json
import secrets
import shutil
import sys
import threading
import time
import warnings
from collections.abc import Iterator, Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

import torch
from tqdm import tqdm

from loopmoe.atomic import atomic_write_text
from loopmoe.errors import ConfigError, DataError, RunError
from loopmoe.text import human
from loopmoe.training.banner import clock
from loopmoe.training.throughput import Throughput, format_duration

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
            raise DataError(
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


def router_summaries(
    router: dict[str, dict[str, torch.Tensor]],
) -> tuple[dict[str, float], dict[str, torch.Tensor]]:
    """Scalars and histograms of ``summarize_router_stats``' output, per slot (an executed (layer, iteration)):

    - ``router/SLOT/load``: histogram of the E expert loads (fractions of the routed assignments);
    - ``router/SLOT/max_load``: the largest load as a multiple of the balanced share 1/E (1 = balanced);
    - ``router/SLOT/entropy``: mean entropy of the routing scores;
    - ``router/SLOT/dead_experts``: experts that received no token in the step.
    """
    scalars: dict[str, float] = {}
    histograms: dict[str, torch.Tensor] = {}
    for slot, stats in router.items():
        load = stats["load"]
        histograms[f"router/{slot}/load"] = load
        scalars[f"router/{slot}/max_load"] = (load.max() * load.numel()).item()
        scalars[f"router/{slot}/entropy"] = stats["entropy"].item()
        scalars[f"router/{slot}/dead_experts"] = float((load == 0).sum().item())
    return scalars, histograms


class Sink(Protocol):
    """A destination of the step scalars and histograms (TensorBoard, Weights & Biases)."""

    def log(self, step: int, scalars: dict[str, float], histograms: dict[str, torch.Tensor]) -> None: ...

    def close(self) -> None: ...


def flat_config(config: dict[str, Any]) -> dict[str, Any]:
    """``{"optim": {"lr": 3e-4}} -> {"optim.lr": 3e-4}``; values that are not numbers, booleans or
    strings become their JSON text (hyper-parameter tables take scalars only)."""
    out: dict[str, Any] = {}
    for section, table in config.items():
        for key, value in table.items() if isinstance(table, dict) else [("", table)]:
            name = f"{section}.{key}" if key else section
            out[name] = value if isinstance(value, (int, float, str, bool)) else json.dumps(value, default=str)
    return out


class LogDiskFullError(RunError, OSError):
    """The disk filled up while the run's logs (metrics.jsonl, TensorBoard) were written."""


def _disk_full(e: BaseException, run_dir: Path) -> LogDiskFullError | None:
    if not (isinstance(e, OSError) and e.errno in (errno.ENOSPC, errno.EDQUOT)):
        return None
    try:
        free = shutil.disk_usage(run_dir).free
    except OSError:
        free = 0
    return LogDiskFullError(
        errno.ENOSPC,
        f"disk full while writing the run's logs (metrics.jsonl, tensorboard/): {free / 2**20:.0f} MB free in "
        f"{run_dir}; free space and re-run the same command (it resumes from the last checkpoint, which is intact)",
    )


def _quiet_writer_thread_errors() -> None:
    """TensorBoard writes its events in a thread, which prints its own traceback when a write fails
    before storing the error for the next write in the main thread to raise. Keep that thread's OSError
    (a full disk) off the terminal: the main thread reports it, once, as one line."""
    from tensorboard.summary.writer.event_file_writer import _AsyncWriterThread

    previous = threading.excepthook
    if getattr(previous, "_loopmoe_quiet", False):
        return

    def hook(args: threading.ExceptHookArgs) -> None:
        if isinstance(args.thread, _AsyncWriterThread) and isinstance(args.exc_value, OSError):
            return
        previous(args)

    hook._loopmoe_quiet = True  # type: ignore[attr-defined]
    threading.excepthook = hook


class TensorBoardSink:
    """``OUT/tensorboard``: scalars, histograms, and the run config as text and as hparams."""

    def __init__(self, run_dir: Path, start_step: int, config: dict[str, Any] | None):
        from torch.utils.tensorboard import SummaryWriter

        folder = run_dir / "tensorboard"
        if folder.exists() and not folder.is_dir():
            raise ConfigError(
                f"{folder} is a file, not a folder: the run writes its TensorBoard logs there. Move or remove "
                f"that file (or train into another --out)"
            )
        _quiet_writer_thread_errors()
        self.writer = SummaryWriter(str(run_dir / "tensorboard"), purge_step=start_step + 1 if start_step else None)
        if config is not None:
            self.writer.add_text(
                "config", "```json\n" + json.dumps(config, indent=2, default=str) + "\n```", start_step
            )
            self._add_hparams(flat_config(config))

    def _add_hparams(self, hparams: dict[str, Any]) -> None:
        # In this run's own event file (SummaryWriter.add_hparams would open a sub-run): the HParams
        # tab then lists the config beside the run's train/loss and val/loss curves.
        from torch.utils.tensorboard.summary import hparams as hparams_summary

        file_writer = self.writer._get_file_writer()
        for summary in hparams_summary(hparams, {"train/loss": None, "val/loss": None}):
            file_writer.add_summary(summary)

    def log(self, step: int, scalars: dict[str, float], histograms: dict[str, torch.Tensor]) -> None:
        for tag, value in scalars.items():
            self.writer.add_scalar(tag, value, step)
        for tag, values in histograms.items():
            self.writer.add_histogram(tag, values, step)

    def close(self) -> None:
        self.writer.close()


WANDB_ID_FILE = "wandb_run_id"  # in the run folder: a resumed run continues the same W&B run


class WandbSink:
    """Weights & Biases (``train.wandb = true``; ``pip install 'loopmoe[wandb]'``).

    The W&B run lives in ``OUT/wandb`` and keeps its id in ``OUT/wandb_run_id``, so re-running the
    command resumes it. ``WANDB_MODE=offline`` logs without a network (``wandb sync`` uploads later).
    """

    def __init__(self, run_dir: Path, project: str, config: dict[str, Any] | None):
        try:
            import wandb
        except ImportError:
            raise ConfigError(
                "train.wandb = true needs the wandb package: pip install 'loopmoe[wandb]' (or set train.wandb = false)"
            ) from None
        self.wandb = wandb
        id_file = run_dir / WANDB_ID_FILE
        run_id = id_file.read_text().strip() if id_file.exists() else secrets.token_hex(4)  # W&B ids: [a-z0-9]
        atomic_write_text(id_file, run_id + "\n")
        self.run = wandb.init(
            project=project,
            name=run_dir.resolve().name,
            id=run_id,
            resume="allow",
            dir=str(run_dir),
            config=config,
        )

    def log(self, step: int, scalars: dict[str, float], histograms: dict[str, torch.Tensor]) -> None:
        data: dict[str, Any] = dict(scalars)
        data.update({tag: self.wandb.Histogram(values.tolist()) for tag, values in histograms.items()})
        self.run.log(data, step=step)

    def close(self) -> None:
        self.run.finish()


# Step-record keys logged as scalars (under train/), and where the held-out loss goes.
_STEP_SCALARS = ("loss", "lm_loss", "aux_loss", "exit_depth", "lr", "grad_norm", "tokens_per_s", "mfu")


class MetricsLogger:
    """Writes step records to metrics.jsonl and the sinks, and reports progress; a no-op on ranks other than 0.

    ``config`` (the run config as a dict) goes to the sinks once; ``flops_per_token`` (model FLOPs of a
    trained token) and ``peak_flops`` (of one process's accelerator) give MFU; ``wandb_project`` turns
    the W&B sink on.
    """

    def __init__(
        self,
        run_dir: str | Path,
        enabled: bool,
        max_steps: int,
        start_step: int = 0,
        *,
        log_every: int = 10,
        config: dict[str, Any] | None = None,
        tokens: int = 0,
        flops_per_token: float | None = None,
        peak_flops: float | None = None,
        world_size: int = 1,
        wandb_project: str | None = None,
    ):
        self.enabled = enabled
        self.path = Path(run_dir) / METRICS_FILE
        self.sinks: list[Sink] = []
        self.bar: tqdm | None = None
        if not enabled:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        _truncate_after(self.path, start_step)
        history = read_metrics(run_dir)
        # Seconds of training before this process (a resumed run goes on counting; the downtime is not counted).
        self.elapsed_before = float(history[-1].get("elapsed_s", 0.0)) if history else 0.0
        self.t_start = time.perf_counter()
        self.sinks.append(TensorBoardSink(Path(run_dir), start_step, config))
        if wandb_project is not None:
            self.sinks.append(WandbSink(Path(run_dir), wandb_project, config))
        self.max_steps, self.log_every = max_steps, log_every
        self.throughput = Throughput(start_step, max_steps, tokens, flops_per_token, peak_flops, world_size)
        self.bar = tqdm(
            total=max_steps, initial=start_step, unit="step", dynamic_ncols=True, disable=not sys.stderr.isatty()
        )

    def log_step(self, record: dict[str, Any], router: dict[str, dict[str, torch.Tensor]] | None = None) -> None:
        """Append one record (with ``time``, ``elapsed_s`` and, when known, ``mfu``) to metrics.jsonl, send its
        scalars and the router statistics to the sinks, and report progress."""
        if not self.enabled:
            return
        assert self.bar is not None
        step = record["step"]
        line = dict(record)
        line["time"] = datetime.now(UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")
        line["elapsed_s"] = round(self.elapsed_before + time.perf_counter() - self.t_start, 3)
        if (mfu := self.throughput.mfu(record.get("tokens_per_s") or 0.0)) is not None:
            line["mfu"] = mfu
        with self._disk_full_is_one_line(), self.path.open("a") as fh:
            fh.write(json.dumps(line) + "\n")
        scalars = {f"train/{k}": line[k] for k in _STEP_SCALARS if line.get(k) is not None}
        if line.get("val_loss") is not None:
            scalars["val/loss"] = line["val_loss"]
        histograms: dict[str, torch.Tensor] = {}
        if router:
            router_scalars, histograms = router_summaries(router)
            scalars.update(router_scalars)
        with self._disk_full_is_one_line():
            for sink in self.sinks:
                sink.log(step, scalars, histograms)
        self.bar.set_postfix(loss=f"{record['loss']:.4f}", refresh=False)
        self.bar.update(1)
        if step % self.log_every == 0 or step == self.max_steps or line.get("val_loss") is not None:
            self.bar.write(self.console_line(line, self.throughput.report(step, record["tokens"])), file=sys.stderr)

    def console_line(self, line: dict[str, Any], rates: dict[str, float | None]) -> str:
        """``14:02:31 step 20/100 | loss 4.1234 | lr 3.00e-04 | grad_norm 0.812 | 51.2K tok/s | MFU 38.1% | ETA 1:05``
        (tokens/s and MFU over the steps since the previous line; `| val_loss X` on evaluation steps)."""
        parts = [
            f"{clock()} step {line['step']}/{self.max_steps}",
            f"loss {line['loss']:.4f}",
            f"lr {line['lr']:.2e}",
            f"grad_norm {line['grad_norm']:.3f}",
            *([f"exit_depth {line['exit_depth']:.2f}"] if line.get("exit_depth") is not None else []),
            f"{human(rates['tokens_per_s'] or 0.0)} tok/s",
        ]
        if rates["mfu"] is not None:
            parts.append(f"MFU {100 * rates['mfu']:.1f}%")
        parts.append(f"ETA {format_duration(rates['eta_s'] or 0.0)}")
        if line.get("val_loss") is not None:
            parts.append(f"val_loss {line['val_loss']:.4f}")
        if line.get("skipped"):
            parts.append("SKIPPED (non-finite)")
        return " | ".join(parts)

    @contextlib.contextmanager
    def _disk_full_is_one_line(self) -> Iterator[None]:
        try:
            yield
        except OSError as e:
            if (full := _disk_full(e, self.path.parent)) is not None:
                raise full from e
            raise

    def close(self) -> None:
        sinks, self.sinks = self.sinks, []  # closed once, even if closing fails (a full disk)
        if self.bar is not None:
            self.bar.close()
        with self._disk_full_is_one_line():
            for sink in sinks:
                sink.close()
