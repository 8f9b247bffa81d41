"""Atomic, self-verifying checkpoints holding everything an exact resume needs.

Layout of `<run>/checkpoints/step_0000100/`:
  model.pt, optim.pt      single process: plain `torch.save` of state dicts
  dcp/                    several processes: torch.distributed.checkpoint (sharded, any strategy)
  scheduler.pt            LambdaLR state
  rank_00000.pt           per-rank RNG states and data-loader position
  meta.json               `CheckpointMeta`: step, tokens seen, skipped steps, world size, resolved run
                          config, data fingerprints
  COMPLETE                JSON manifest {file: sha256}; written last, after fsync

A checkpoint is written into `step_XXXXXXX.tmp-<pid>/` and renamed only once `COMPLETE` exists, so a
crash at any moment leaves either a whole checkpoint or a `.tmp-<pid>` directory that is ignored (and
removed by the next run, which holds the run folder's lock). Nothing unverifiable is ever deleted:
resume refuses to restart over checkpoints it cannot verify (`restart=True` moves them aside into
`rejected-<time>/`), pruning keeps the last `keep_last` verified ones and leaves, with a warning, any
it cannot verify. A DCP checkpoint resumes at any layout (world size, dp x ep, DDP or FSDP2, or one process):
DCP reshards the weights and optimizer state, expert-parallel blocks included (``global_expert_views``), and
the data-loader position is converted by the loader; a single-process checkpoint resumes in one process only
(several are refused with the way out, not skipped).
Everything is loaded with `torch.load(weights_only=True)`, and DCP's pickled `.metadata` with an
allow-list unpickler (`loopmoe.training.safe_dcp`): reading a checkpoint never runs code.
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import random
import re
import shutil
import time
import warnings
from collections.abc import Mapping
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, cast

import numpy as np
import torch
import torch.distributed.checkpoint as dcp
from torch import nn
from torch.distributed.checkpoint.api import CheckpointException
from torch.distributed.checkpoint.state_dict import (
    get_model_state_dict,
    get_optimizer_state_dict,
    set_model_state_dict,
    set_optimizer_state_dict,
)

from loopmoe.atomic import publish_directory
from loopmoe.distributed.env import all_gather_object, barrier, broadcast_object, collective_stage, is_distributed
from loopmoe.distributed.expert_parallel import global_expert_views
from loopmoe.distributed.parallelize import unwrap
from loopmoe.errors import CheckpointError, RunError
from loopmoe.training.safe_dcp import safe_dcp_load

MARKER = "COMPLETE"
_STEP_DIR = re.compile(r"^step_(\d{7})$")


class CorruptCheckpointError(RuntimeError):
    """A checkpoint directory is incomplete, fails its checksums, or cannot be read."""


class UnverifiableCheckpointsError(CheckpointError, RuntimeError):
    """Checkpoints exist but none verifies: resuming would silently throw the run away."""


class UnloadableCheckpointError(CheckpointError, RuntimeError):
    """A multi-process checkpoint that verifies but that some rank cannot read: every rank refuses it."""


class WorldSizeMismatchError(ValueError):
    """The newest checkpoint was written by a different number of processes than this run has."""


class CheckpointDiskFullError(RunError, OSError):
    """The disk filled up while a checkpoint was written; the previous checkpoints are intact."""


_META_FIELDS = ("step", "tokens", "skipped_steps")  # what resuming reads from meta.json


@dataclass(frozen=True)
class CheckpointMeta:
    """A checkpoint's ``meta.json``: where the run stood, and what it was trained with.

    ``config`` is the run config the steps up to ``step`` were trained with (``RunConfig.to_dict()``),
    ``data`` the fingerprints of their data (``PreparedData.fingerprints``; None with a data factory
    that has none). On disk: one JSON object with these keys (``config`` and ``data`` left out when None).
    """

    step: int
    tokens: int
    skipped_steps: int
    world_size: int = 1
    config: dict[str, Any] | None = None
    data: dict[str, str] | None = None

    def to_json(self) -> dict[str, Any]:
        return {k: v for k, v in asdict(self).items() if v is not None}

    @classmethod
    def from_json(cls, raw: Any, where: Path) -> CheckpointMeta:
        """Read ``raw`` (the parsed ``where``); CorruptCheckpointError unless it is a checkpoint's metadata."""
        if not isinstance(raw, dict) or not all(isinstance(raw.get(k), int) for k in _META_FIELDS):
            raise CorruptCheckpointError(
                f"{where} is not a checkpoint's metadata (a JSON object with whole numbers {', '.join(_META_FIELDS)})"
            )
        config, data = raw.get("config"), raw.get("data")
        return cls(
            step=raw["step"],
            tokens=raw["tokens"],
            skipped_steps=raw["skipped_steps"],
            world_size=int(raw.get("world_size", 1)),
            config=config if isinstance(config, dict) else None,
            data=data if isinstance(data, dict) and data else None,
        )


@dataclass
class ResumeState:
    """What a checkpoint gives back besides the weights it loads in place."""

    path: Path
    meta: CheckpointMeta
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


def peek_latest_meta(root: Path) -> tuple[Path, CheckpointMeta] | None:
    """The newest checkpoint in ``root`` whose meta.json reads, and that meta, without loading,
    verifying or changing anything else: what resume checks look at before they touch data or state."""
    for _, path in reversed(list_checkpoints(root)):
        try:
            return path, _read_meta(path)
        except CorruptCheckpointError:
            continue
    return None


# ---------------------------------------------------------------- manager
class CheckpointManager:
    """Saves and restores training state under `root`; collective when a process group exists."""

    def __init__(self, root: str | Path, keep_last: int, rank: int = 0):
        self.root = Path(root)
        self.keep_last = keep_last
        self.rank = rank
        self._verified: set[Path] = set()  # sealed or verified by this process (which holds the run lock)
        self._warned: set[Path] = set()
        self._last_size = 0

    # ------------------------------------------------------------ save
    def save(
        self,
        meta: CheckpointMeta,
        model: nn.Module,
        optimizer: torch.optim.Optimizer,
        scheduler: Any,
        loader_state: Any,
    ) -> Path:
        """Write checkpoint ``meta.step`` atomically, then prune to the last `keep_last`. All ranks call it."""
        step = meta.step
        final = self.root / f"step_{step:07d}"
        tmp = Path(cast(str, broadcast_object(str(self.root / f"step_{step:07d}.tmp-{os.getpid()}"))))
        try:
            self._write(meta, tmp, final, model, optimizer, scheduler, loader_state)
        except (OSError, RuntimeError) as e:
            full = _disk_full_error(e, self.root, step, self._last_size)
            if self.rank == 0:
                shutil.rmtree(tmp, ignore_errors=True)
            if full is not None:
                raise full from e
            raise
        if self.rank == 0:
            self._prune()
        barrier()
        return final

    def _write(
        self,
        meta: CheckpointMeta,
        tmp: Path,
        final: Path,
        model: nn.Module,
        optimizer: torch.optim.Optimizer,
        scheduler: Any,
        loader_state: Any,
    ) -> None:
        step = meta.step
        if self.rank == 0:
            if tmp.exists():
                shutil.rmtree(tmp)
            tmp.mkdir(parents=True)
        barrier()
        error: OSError | RuntimeError | None = None
        try:
            if is_distributed():
                dcp.save(_dcp_state(model, optimizer)[0], checkpoint_id=str(tmp / "dcp"))
            else:
                torch.save(unwrap(model).state_dict(), tmp / "model.pt")
                torch.save(optimizer.state_dict(), tmp / "optim.pt")
            rank_file = tmp / f"rank_{self.rank:05d}.pt"
            torch.save({"rng": capture_rng(), "loader": _weights_only_safe(loader_state)}, rank_file)
            if self.rank == 0:
                torch.save(_scheduler_state(scheduler), tmp / "scheduler.pt")
                (tmp / "meta.json").write_text(json.dumps(meta.to_json(), indent=2, sort_keys=True))
        except CheckpointException as e:  # DCP's error, raised on every rank: the failing rank's own cause
            error = _dcp_cause(e)
        except (OSError, RuntimeError) as e:
            error = e
        # Every rank learns whether any rank failed (else the others would wait for it in a barrier).
        kind = 0 if error is None else 1 if _disk_full_error(error, self.root, step, self._last_size) else 2
        worst = max(cast(list[int], all_gather_object(kind)))
        if error is not None:
            raise error
        if worst == 1:
            raise CheckpointDiskFullError(errno.ENOSPC, "disk full on another rank")  # save() reports it
        if worst == 2:
            raise RuntimeError(f"writing checkpoint step {step} failed on another rank (see its error)")
        if self.rank == 0:
            self._seal(tmp, final)
            self._verified.add(final)
            self._last_size = sum(f.stat().st_size for f in _files(final))

    def _seal(self, tmp: Path, final: Path) -> None:
        # The marker lists every file's checksum and is written last; publishing fsyncs all files
        # and renames the folder into place (a corrupt checkpoint of that step is moved aside first).
        manifest = {"files": {str(f.relative_to(tmp)): _sha256(f) for f in _files(tmp)}}
        (tmp / MARKER).write_text(json.dumps(manifest, indent=1, sort_keys=True))
        if final.exists() and final not in self._verified:  # a rejected, corrupt one of that step: keep it
            try:
                verify(final)
            except CorruptCheckpointError as e:
                aside = self._reject([final])
                warnings.warn(f"moved checkpoint {final.name}, which does not verify ({e}), into {aside}", stacklevel=3)
        publish_directory(tmp, final, legacy_marker=MARKER)  # checkpoints written before the marker

    def _is_verified(self, path: Path) -> bool:
        if path in self._verified:
            return True
        try:
            verify(path)
        except CorruptCheckpointError as e:
            if path not in self._warned:
                self._warned.add(path)
                warnings.warn(
                    f"keeping checkpoint {path}, which does not verify ({e}); it is not counted in "
                    "train.keep_last and never deleted automatically: inspect it, then remove it by hand",
                    stacklevel=3,
                )
            return False
        self._verified.add(path)
        return True

    def _prune(self) -> None:
        """Keep the newest `keep_last` verified checkpoints; delete older verified ones only."""
        kept = 0
        for _, path in reversed(list_checkpoints(self.root)):
            if not self._is_verified(path):
                continue
            if kept < self.keep_last:
                kept += 1
                continue
            # Out of place first: a kill during the delete leaves `.tmp` debris (cleaned at the next start),
            # never a half-deleted checkpoint that still looks like one.
            doomed = path.with_name(f"{path.name}.tmp-{os.getpid()}")
            os.replace(path, doomed)
            shutil.rmtree(doomed, ignore_errors=True)
            self._verified.discard(path)

    def set_aside(self) -> Path | None:
        """Move every checkpoint into `rejected-<time>/` (for an explicit restart); nothing is deleted."""
        found = [path for _, path in list_checkpoints(self.root)]
        self._verified.clear()
        return self._reject(found) if found else None

    def _reject(self, paths: list[Path]) -> Path:
        dest = self.root / f"rejected-{time.strftime('%Y%m%d-%H%M%S', time.gmtime())}"
        base, n = dest.name, 0
        while dest.exists():
            n += 1
            dest = dest.with_name(f"{base}.{n}")
        dest.mkdir(parents=True)
        for path in paths:
            os.replace(path, dest / path.name)
        return dest

    # ------------------------------------------------------------ load
    def latest_valid(self) -> Path | None:
        """Newest checkpoint passing `verify`; skipped ones raise a warning. Decided on rank 0."""
        choice: str | None = None
        error: str | None = None
        with collective_stage("verifying the checkpoints"):  # rank 0 reads; an OSError there stops every rank
            if self.rank == 0:
                choice, error = self._newest_verified()
        choice, error = broadcast_object((choice, error))  # type: ignore[misc]
        if error is not None:
            raise UnverifiableCheckpointsError(error)
        return Path(choice) if choice else None

    def _newest_verified(self) -> tuple[str | None, str | None]:
        """(newest checkpoint that verifies, or None; the error to raise when none does, or None)."""
        choice: str | None = None
        error: str | None = None
        failures: list[tuple[Path, str]] = []
        for _, path in reversed(list_checkpoints(self.root)):
            try:
                verify(path)
                _read_meta(path)
            except CorruptCheckpointError as e:
                warnings.warn(f"skipping checkpoint: {e}", stacklevel=2)
                failures.append((path, str(e)))
                continue
            choice = str(path)
            self._verified.add(path)
            break
        if choice is None and failures:
            error = _none_verifies(self.root, failures)
        return choice, error

    def load_latest(self, model: nn.Module, optimizer: torch.optim.Optimizer, scheduler: Any) -> ResumeState | None:
        """Restore from the newest loadable checkpoint, falling back past unreadable ones.

        Single process: files are read (and may be rejected) before anything is applied, so a
        rejected checkpoint leaves the model untouched. Several processes: checksums are verified
        on rank 0 and all ranks load that one checkpoint.
        """
        if is_distributed():
            path = self.latest_valid()
            return None if path is None else self._load_dcp(path, model, optimizer, scheduler)
        failures: list[tuple[Path, str]] = []
        for _, path in reversed(list_checkpoints(self.root)):
            try:
                verify(path)
                if (path / "dcp").is_dir():  # written by several processes: resharded into this one
                    self._verified.add(path)
                    return self._load_dcp(path, model, optimizer, scheduler)
                meta = _read_meta(path)
                files = {name: _read(path, name) for name in ("model.pt", "optim.pt", "scheduler.pt", "rank_00000.pt")}
                loader = _apply(path, files, model, optimizer, scheduler)
            except CorruptCheckpointError as e:
                warnings.warn(f"skipping checkpoint: {e}", stacklevel=2)
                failures.append((path, str(e)))
                continue
            self._verified.add(path)
            return ResumeState(path, meta, loader)
        if failures:
            raise UnverifiableCheckpointsError(_none_verifies(self.root, failures))
        return None

    def _load_dcp(self, path: Path, model: nn.Module, optimizer: torch.optim.Optimizer, scheduler: Any) -> ResumeState:
        """Load a DCP checkpoint at this run's layout, whatever the layout that wrote it.

        At the writer's world size each rank restores its own RNG streams and loader position. At
        another one, every rank takes rank 0's loader state (the global position: loaders convert it
        to their new share, see ``TokenBatchLoader.load_state_dict``) and keeps the RNG streams it was
        seeded with (``seed + rank``, as a fresh run at this layout; training draws no random numbers).
        """
        world = torch.distributed.get_world_size() if is_distributed() else 1
        # Each rank's own files first, before any collective: a rank that cannot read its file stops
        # every rank here (with its message), instead of leaving the others waiting in DCP or DDP.
        with collective_stage(f"loading checkpoint {path.name}"):
            try:
                meta = _read_meta(path)
                if not (path / "dcp").is_dir():
                    _check_world_size(path, meta, world)
                scheduler_state = _read(path, "scheduler.pt")
                rank_file = f"rank_{self.rank:05d}.pt" if meta.world_size == world else "rank_00000.pt"
                rank_state = _read(path, rank_file)
                if not isinstance(rank_state, dict) or not {"rng", "loader"} <= rank_state.keys():
                    raise CorruptCheckpointError(f"{path / rank_file} does not hold 'rng' and 'loader'")
            except CorruptCheckpointError as e:  # it verified, yet cannot be read (resealed by hand): refused
                if not is_distributed():
                    raise  # one process falls back to the previous checkpoint (load_latest)
                raise UnloadableCheckpointError(
                    f"cannot resume from {path}: {e}. Move that checkpoint out of {path.parent} to resume from "
                    "the previous one, or pass --restart to start again (the run is moved aside, not deleted)"
                ) from e
        state, model_state, optim_state = _dcp_state(model, optimizer)
        safe_dcp_load(state, path / "dcp")  # in place, into the tensors of model_state / optim_state
        set_model_state_dict(model, model_state)
        set_optimizer_state_dict(model, optimizer, optim_state)
        scheduler.load_state_dict(scheduler_state)
        if meta.world_size == world:
            restore_rng(rank_state["rng"])
        return ResumeState(path, meta, rank_state["loader"])


def _dcp_state(model: nn.Module, optimizer: torch.optim.Optimizer) -> tuple[dict[str, Any], Any, Any]:
    """What DCP saves and loads: ``({"model": ..., "optim": ...}, model state, optimizer state)``.

    Expert-parallel blocks appear in the first as DTensor views of the global ``[E, ...]`` tensors
    (sharing storage with the last two), so the checkpoint is layout-independent."""
    inner = unwrap(model)
    model_state = get_model_state_dict(model)
    optim_state = get_optimizer_state_dict(model, optimizer)
    state = {
        "model": global_expert_views(model_state, inner),
        "optim": {**optim_state, "state": global_expert_views(optim_state["state"], inner)},
    }
    return state, model_state, optim_state


def _dcp_cause(e: CheckpointException) -> OSError | RuntimeError:
    """The first rank's exception inside DCP's collective CheckpointException (it is a BaseException)."""
    for failure in e.failures.values():
        cause = failure[0] if isinstance(failure, tuple) else failure
        if isinstance(cause, (OSError, RuntimeError)):
            return cause
    return RuntimeError(str(e))


def _check_world_size(path: Path, meta: CheckpointMeta, world: int) -> None:
    """Refuse (never skip) a single-process checkpoint (plain state dicts, not DCP) in a run of
    several processes: re-run it in one process, where it resumes."""
    written = meta.world_size
    if written == world:
        return
    how = "without torchrun (or --nproc_per_node=1)" if written == 1 else f"with --nproc_per_node={written}"
    raise WorldSizeMismatchError(
        f"{path} was written by {written} process{'es' if written != 1 else ''}, this run has {world}; "
        f"resume {how}, or start a new --out (nothing was deleted)"
    )


def _none_verifies(root: Path, failures: list[tuple[Path, str]]) -> str:
    listing = "\n".join(f"  {path.name}: {why}" for path, why in failures)
    return (
        f"{root} holds {len(failures)} checkpoint(s) and none verifies, so this run cannot resume:\n{listing}\n"
        "Nothing was deleted. To start again from step 0 anyway, re-run with --restart (run_training(restart=True)): "
        f"the checkpoints are moved aside into {root}/rejected-<time>/, not deleted; or choose a new --out."
    )


def _disk_full_error(e: BaseException, root: Path, step: int, expected: int) -> CheckpointDiskFullError | None:
    """The disk-full error to report for a failed checkpoint write, or None if it was something else.

    ENOSPC is disk full; torch's writer reports it as a RuntimeError (`basic_ios::clear: iostream
    error`), so a RuntimeError counts as disk full when the disk has less room left than the last
    checkpoint took (at least 64 MiB)."""
    try:
        free = shutil.disk_usage(root if root.exists() else root.parent).free
    except OSError:
        free = 0
    is_full = isinstance(e, OSError) and e.errno in (errno.ENOSPC, errno.EDQUOT)
    if not is_full and isinstance(e, RuntimeError):
        is_full = free < max(expected, 64 << 20)
    if not is_full:
        return None
    return CheckpointDiskFullError(
        errno.ENOSPC,
        f"disk full while writing checkpoint step {step}: {free / 2**20:.0f} MB free in {root}; "
        "free space or lower train.keep_last (the previous checkpoints are intact)",
    )


def _scheduler_state(scheduler: Any) -> dict[str, Any]:
    """LambdaLR state without the schedule's settings: the schedule comes from the run config,
    so a run resumed with a longer `max_steps` follows the new schedule."""
    state = scheduler.state_dict()
    if "lr_lambdas" in state:
        state["lr_lambdas"] = [None] * len(state["lr_lambdas"])
    return state


def _read_meta(path: Path) -> CheckpointMeta:
    """A checkpoint's meta.json, with the fields resuming reads (else CorruptCheckpointError)."""
    return CheckpointMeta.from_json(_read(path, "meta.json"), path / "meta.json")


def _apply(path: Path, files: Mapping[str, Any], model: nn.Module, optimizer: Any, scheduler: Any) -> Any:
    """Put a single-process checkpoint's states into the run; returns the data loader's state.

    The files passed their checksums, but may still not fit (edited by hand and resealed, or written
    for another model): then CorruptCheckpointError, with the model, optimizer, scheduler and RNG
    streams left as they were, so that resume can fall back to an older checkpoint."""
    module = unwrap(model)
    weights, expected = files["model.pt"], module.state_dict()
    if not isinstance(weights, Mapping) or set(weights) != set(expected):
        raise CorruptCheckpointError(f"{path / 'model.pt'} does not hold this model's weights (other names)")
    wrong = [k for k, v in expected.items() if not isinstance(weights[k], torch.Tensor) or weights[k].shape != v.shape]
    if wrong:
        raise CorruptCheckpointError(f"{path / 'model.pt'}: {', '.join(wrong[:3])} do not have this model's shapes")
    before = capture_rng(), optimizer.state_dict(), scheduler.state_dict()
    try:
        restore_rng(files["rank_00000.pt"]["rng"])
        loader = files["rank_00000.pt"]["loader"]
        optimizer.load_state_dict(files["optim.pt"])
        scheduler.load_state_dict(files["scheduler.pt"])
    except (KeyError, IndexError, TypeError, ValueError, AttributeError, RuntimeError) as e:
        restore_rng(before[0])
        optimizer.load_state_dict(before[1])
        scheduler.load_state_dict(before[2])
        raise CorruptCheckpointError(f"{path} does not fit this run: {type(e).__name__}: {e}") from e
    module.load_state_dict(weights)
    return loader


def _read(path: Path, name: str) -> Any:
    """Load one checkpoint file safely; any failure becomes CorruptCheckpointError."""
    f = path / name
    try:
        if name.endswith(".json"):
            return json.loads(f.read_text())
        return torch.load(f, map_location="cpu", weights_only=True)
    except Exception as e:
        raise CorruptCheckpointError(f"{f} cannot be loaded: {type(e).__name__}: {e}") from e
