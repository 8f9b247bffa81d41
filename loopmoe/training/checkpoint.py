"""Atomic, self-verifying checkpoints holding everything an exact resume needs.

Layout of `<run>/checkpoints/step_0000100/`:
  model.pt, optim.pt      single process: plain `torch.save` of state dicts
  dcp/                    several processes: torch.distributed.checkpoint (sharded, any strategy)
  scheduler.pt            LambdaLR state
  rank_00000.pt           per-rank RNG states and data-loader position
  meta.json               step, tokens seen, skipped steps, world size, resolved run config
  COMPLETE                JSON manifest {file: sha256}; written last, after fsync

A checkpoint is written into `step_XXXXXXX.tmp/` and renamed only once `COMPLETE` exists, so a
crash at any moment leaves either a whole checkpoint or a `.tmp` directory that is ignored.
Everything is loaded with `torch.load(weights_only=True)`, and DCP's pickled `.metadata` with an
allow-list unpickler (`loopmoe.training.safe_dcp`): reading a checkpoint never runs code.
"""

from __future__ import annotations

import hashlib
import json
import random
import re
import shutil
import warnings
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, cast

import numpy as np
import torch
import torch.distributed.checkpoint as dcp
from torch import nn
from torch.distributed.checkpoint.state_dict import (
    get_model_state_dict,
    get_optimizer_state_dict,
    set_model_state_dict,
    set_optimizer_state_dict,
)

from loopmoe.atomic import publish_directory
from loopmoe.distributed.env import barrier, broadcast_object, is_distributed
from loopmoe.distributed.parallelize import unwrap
from loopmoe.training.safe_dcp import safe_dcp_load

MARKER = "COMPLETE"
_STEP_DIR = re.compile(r"^step_(\d{7})$")


class CorruptCheckpointError(RuntimeError):
    """A checkpoint directory is incomplete, fails its checksums, or cannot be read."""


@dataclass
class ResumeState:
    """What a checkpoint gives back besides the weights it loads in place."""

    path: Path
    meta: dict[str, Any]
    loader_state: Any


# ---------------------------------------------------------------- RNG states
def capture_rng() -> dict[str, Any]:
    """Python, numpy, torch and CUDA generator states, in weights_only-loadable types."""
    kind, keys, pos, has_gauss, cached = cast(tuple[str, np.ndarray, int, int, float], np.random.get_state())
    state: dict[str, Any] = {
        "python": random.getstate(),
        "numpy": {
            "kind": kind,
            "keys": torch.from_numpy(keys.astype(np.int64)),
            "pos": int(pos),
            "has_gauss": int(has_gauss),
            "cached": float(cached),
        },
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng(state: Mapping[str, Any]) -> None:
    random.setstate(state["python"])
    n = state["numpy"]
    np.random.set_state((n["kind"], n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["cached"]))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _weights_only_safe(obj: Any) -> Any:
    """Turn numpy values into python/torch ones so `weights_only=True` can load them back."""
    if isinstance(obj, Mapping):
        return {k: _weights_only_safe(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(_weights_only_safe(v) for v in obj)
    if isinstance(obj, np.ndarray):
        return torch.from_numpy(obj.copy())
    if isinstance(obj, np.generic):
        return obj.item()
    return obj


# ---------------------------------------------------------------- files and manifests
def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _files(root: Path) -> list[Path]:
    return sorted(p for p in root.rglob("*") if p.is_file() and p.name != MARKER)


def verify(path: Path) -> None:
    """Raise CorruptCheckpointError unless `path` has a marker and every checksum matches."""
    marker = path / MARKER
    if not marker.is_file():
        raise CorruptCheckpointError(f"{path} has no {MARKER} marker (interrupted while writing)")
    try:
        manifest = json.loads(marker.read_text())["files"]
    except (ValueError, KeyError) as e:
        raise CorruptCheckpointError(f"{path}/{MARKER} is not a valid manifest: {e}") from e
    for rel, digest in manifest.items():
        f = path / rel
        if not f.is_file():
            raise CorruptCheckpointError(f"{path}: {rel} listed in the manifest is missing")
        if _sha256(f) != digest:
            raise CorruptCheckpointError(f"{path}: checksum mismatch for {rel}")


def list_checkpoints(root: Path) -> list[tuple[int, Path]]:
    """Finished checkpoint directories (by name) in `root`, oldest first; `.tmp` dirs excluded."""
    if not root.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in root.iterdir() if p.is_dir() and (m := _STEP_DIR.match(p.name))]
    return sorted(found)


# ---------------------------------------------------------------- manager
class CheckpointManager:
    """Saves and restores training state under `root`; collective when a process group exists."""

    def __init__(self, root: str | Path, keep_last: int, rank: int = 0):
        self.root = Path(root)
        self.keep_last = keep_last
        self.rank = rank

    # ------------------------------------------------------------ save
    def save(
        self,
        step: int,
        model: nn.Module,
        optimizer: torch.optim.Optimizer,
        scheduler: Any,
        loader_state: Any,
        meta: dict[str, Any],
    ) -> Path:
        """Write checkpoint `step` atomically, then prune to the last `keep_last`. All ranks call it."""
        final = self.root / f"step_{step:07d}"
        tmp = self.root / f"step_{step:07d}.tmp"
        if self.rank == 0:
            if tmp.exists():
                shutil.rmtree(tmp)
            tmp.mkdir(parents=True)
        barrier()
        if is_distributed():
            state = {"model": get_model_state_dict(model), "optim": get_optimizer_state_dict(model, optimizer)}
            dcp.save(state, checkpoint_id=str(tmp / "dcp"))
        else:
            torch.save(unwrap(model).state_dict(), tmp / "model.pt")
            torch.save(optimizer.state_dict(), tmp / "optim.pt")
        torch.save({"rng": capture_rng(), "loader": _weights_only_safe(loader_state)}, tmp / f"rank_{self.rank:05d}.pt")
        if self.rank == 0:
            torch.save(_scheduler_state(scheduler), tmp / "scheduler.pt")
            (tmp / "meta.json").write_text(json.dumps({**meta, "step": step}, indent=2, sort_keys=True))
        barrier()
        if self.rank == 0:
            self._seal(tmp, final)
            self._prune()
        barrier()
        return final

    def _seal(self, tmp: Path, final: Path) -> None:
        # The marker lists every file's checksum and is written last; publishing fsyncs all files
        # and renames the folder into place (replacing a rejected, corrupt checkpoint of that step).
        manifest = {"files": {str(f.relative_to(tmp)): _sha256(f) for f in _files(tmp)}}
        (tmp / MARKER).write_text(json.dumps(manifest, indent=1, sort_keys=True))
        publish_directory(tmp, final)

    def _prune(self) -> None:
        for _, path in list_checkpoints(self.root)[: -self.keep_last]:
            shutil.rmtree(path, ignore_errors=True)
        for stale in self.root.glob("step_*.tmp"):
            shutil.rmtree(stale, ignore_errors=True)

    # ------------------------------------------------------------ load
    def latest_valid(self) -> Path | None:
        """Newest checkpoint passing `verify`; skipped ones raise a warning. Decided on rank 0."""
        choice: str | None = None
        if self.rank == 0:
            for _, path in reversed(list_checkpoints(self.root)):
                try:
                    verify(path)
                    _read(path, "meta.json")
                except CorruptCheckpointError as e:
                    warnings.warn(f"skipping checkpoint: {e}", stacklevel=2)
                    continue
                choice = str(path)
                break
        choice = broadcast_object(choice)  # type: ignore[assignment]
        return Path(choice) if choice else None

    def load_latest(self, model: nn.Module, optimizer: torch.optim.Optimizer, scheduler: Any) -> ResumeState | None:
        """Restore from the newest loadable checkpoint, falling back past unreadable ones.

        Single process: files are read (and may be rejected) before anything is applied, so a
        rejected checkpoint leaves the model untouched. Several processes: checksums are verified
        on rank 0 and all ranks load that one checkpoint.
        """
        if is_distributed():
            path = self.latest_valid()
            return None if path is None else self._load_dcp(path, model, optimizer, scheduler)
        for _, path in reversed(list_checkpoints(self.root)):
            try:
                verify(path)
                files = {
                    name: _read(path, name)
                    for name in ("model.pt", "optim.pt", "scheduler.pt", "rank_00000.pt", "meta.json")
                }
            except CorruptCheckpointError as e:
                warnings.warn(f"skipping checkpoint: {e}", stacklevel=2)
                continue
            unwrap(model).load_state_dict(files["model.pt"])
            optimizer.load_state_dict(files["optim.pt"])
            scheduler.load_state_dict(files["scheduler.pt"])
            restore_rng(files["rank_00000.pt"]["rng"])
            return ResumeState(path, files["meta.json"], files["rank_00000.pt"]["loader"])
        return None

    def _load_dcp(self, path: Path, model: nn.Module, optimizer: torch.optim.Optimizer, scheduler: Any) -> ResumeState:
        meta = _read(path, "meta.json")
        world = torch.distributed.get_world_size()
        if meta.get("world_size") != world:
            raise ValueError(
                f"{path} was written by {meta.get('world_size')} processes, this run has {world}; "
                f"resume with --nproc_per_node={meta.get('world_size')} or start a new run directory"
            )
        state: dict[str, Any] = {
            "model": get_model_state_dict(model),
            "optim": get_optimizer_state_dict(model, optimizer),
        }
        safe_dcp_load(state, path / "dcp")
        set_model_state_dict(model, state["model"])
        set_optimizer_state_dict(model, optimizer, state["optim"])
        scheduler.load_state_dict(_read(path, "scheduler.pt"))
        rank_state = _read(path, f"rank_{self.rank:05d}.pt")
        restore_rng(rank_state["rng"])
        return ResumeState(path, meta, rank_state["loader"])


def _scheduler_state(scheduler: Any) -> dict[str, Any]:
    """LambdaLR state without the schedule's settings: the schedule comes from the run config,
    so a run resumed with a longer `max_steps` follows the new schedule."""
    state = scheduler.state_dict()
    if "lr_lambdas" in state:
        state["lr_lambdas"] = [None] * len(state["lr_lambdas"])
    return state


def _read(path: Path, name: str) -> Any:
    """Load one checkpoint file safely; any failure becomes CorruptCheckpointError."""
    f = path / name
    try:
        if name.endswith(".json"):
            return json.loads(f.read_text())
        return torch.load(f, map_location="cpu", weights_only=True)
    except Exception as e:
        raise CorruptCheckpointError(f"{f} cannot be loaded: {type(e).__name__}: {e}") from e
