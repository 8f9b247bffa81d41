"""Atomic, durable writes: a file or a folder is either wholly there or not there at all.

Everything loopmoe writes that a later run reads back (checkpoints, shards, tokenizers, metrics,
run configs, reports) goes through here, so every writer has the same guarantee: the content is
written under a temporary name private to this process, flushed to disk (``fsync``), renamed into
place in one ``os.replace`` and the rename itself made durable (``fsync`` of the parent folder).
A crash at any moment leaves the old version or the new one, never a torn one; a stale
temporary (``.NAME.loopmoe-tmp-PID-*`` / ``.NAME.loopmoe-staging-PID-*``) is all an interrupted write
can leave behind, and ``clean_stale_temporaries`` removes those whose writer is gone.

**What loopmoe may delete: only what it created, recognised by a mark it wrote, never by a name
that merely looks like one of its own.** Temporaries carry the ``loopmoe-`` tag in their names
(a user's ``.bashrc.old-2020`` or ``.draft.tmp-final`` is never matched), and every folder a
command publishes as its output (an export, a conversion, a tokenizer, a shard cache) holds the
file ``OUTPUT_MARKER``. ``publish_directory`` replaces an existing destination only if it holds
that marker; a folder of the user's is refused, or with ``overwrite`` moved aside to
``NAME.previous-TIMESTAMP`` (kept, never deleted); a regular file in the way is refused.
``check_no_overlap`` refuses an output that is an input or lies inside one (or the other way round).
"""

from __future__ import annotations

import io
import os
import re
import shutil
import tempfile
import time
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from loopmoe.errors import ConfigError


def fsync_file(path: Path) -> None:
    with Path(path).open("rb") as fh:
        os.fsync(fh.fileno())


def fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def atomic_write_text(path: str | Path, text: str) -> None:
    """Replace ``path`` with ``text`` (UTF-8) atomically and durably."""
    atomic_write_bytes(path, text.encode())


def save_figure(fig, path: str | Path, dpi: int = 120) -> None:
    """Write a matplotlib figure as a PNG, atomically and durably."""
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=dpi)
    atomic_write_bytes(path, buffer.getvalue())


def atomic_write_bytes(path: str | Path, data: bytes) -> None:
    """Replace ``path`` with ``data`` atomically and durably."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.loopmoe-tmp-{os.getpid()}-", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    fsync_dir(path.parent)


OUTPUT_MARKER = ".loopmoe-output"  # in every folder loopmoe publishes: the proof that it may replace it


def is_loopmoe_output(folder: Path, legacy_marker: str | None = None) -> bool:
    """``folder`` was published by loopmoe, so loopmoe may replace it: it holds ``OUTPUT_MARKER``, or
    ``legacy_marker``, a file only loopmoe writes there that folders published before the marker hold."""
    folder = Path(folder)
    return (folder / OUTPUT_MARKER).is_file() or (legacy_marker is not None and (folder / legacy_marker).is_file())


def move_aside(path: Path) -> Path:
    """Rename ``path`` (a file or folder) to the first free ``NAME.prev-N`` beside it and return that:
    how loopmoe replaces something it must not delete (an old comparison, a stale run or ledger entry)."""
    n = 1
    while (aside := path.with_name(f"{path.name}.prev-{n}")).exists():
        n += 1
    path.rename(aside)
    return aside


def check_no_overlap(output: Path, inputs: dict[str, Path], flag: str = "OUT") -> None:
    """Refuse an output folder that is one of ``inputs`` (name -> path) or lies inside one, or contains one."""
    out = Path(output).resolve()
    for name, path in inputs.items():
        src = Path(path).resolve()
        if out == src or src in out.parents or out in src.parents:
            relation = "is" if out == src else ("lies inside" if src in out.parents else "contains")
            raise ConfigError(
                f"the output {output} {relation} the {name} {path}: writing it would replace what is being read; "
                f"choose another {flag}"
            )


def _check_destination(destination: Path, overwrite: bool, legacy_marker: str | None = None) -> Path | None:
    """Where an existing ``destination`` goes before the swap: a temporary to delete (it is ours), a
    ``.previous`` folder to keep (the user's, with ``overwrite``), or None (nothing there, or empty)."""
    if destination.is_symlink() or (destination.exists() and not destination.is_dir()):
        raise ConfigError(f"{destination} exists and is not a folder: choose another output path")
    if not destination.exists():
        return None
    if is_loopmoe_output(destination, legacy_marker):
        return destination.with_name(f".{destination.name}.loopmoe-old-{os.getpid()}")
    if not any(destination.iterdir()):
        destination.rmdir()  # an empty folder holds nothing to lose
        return None
    if not overwrite:
        raise ConfigError(
            f"{destination} is a folder loopmoe did not write, and it is not empty: choose another output "
            "folder, or pass --overwrite to move its contents aside (to NAME.previous-TIMESTAMP, kept)"
        )
    stamp = time.strftime("%Y%m%d-%H%M%S")
    return destination.with_name(f"{destination.name}.previous-{stamp}-{os.getpid()}")


def publish_directory(
    staging: Path, destination: Path, *, overwrite: bool = False, legacy_marker: str | None = None
) -> None:
    """Make the finished folder ``staging`` appear as ``destination`` in one rename, durably.

    Every file is fsynced first and ``OUTPUT_MARKER`` written. An existing ``destination`` that
    loopmoe published is moved aside and deleted after the swap, so a reader sees the old folder or
    the new one; any other existing folder is refused, or with ``overwrite`` moved aside and kept
    (see the module docstring).
    """
    (staging / OUTPUT_MARKER).write_text("written by loopmoe: it may replace this folder\n")
    for f in staging.rglob("*"):
        if f.is_file():
            fsync_file(f)
    fsync_dir(staging)
    aside = _check_destination(destination, overwrite, legacy_marker)
    if aside is not None:
        os.replace(destination, aside)
    os.replace(staging, destination)
    fsync_dir(destination.parent)
    if aside is not None and ".loopmoe-old-" in aside.name:
        shutil.rmtree(aside, ignore_errors=True)
    elif aside is not None:
        warnings.warn(f"moved the previous contents of {destination} aside to {aside}", stacklevel=3)


@contextmanager
def atomic_directory(destination: Path, *, overwrite: bool = False, legacy_marker: str | None = None) -> Iterator[Path]:
    """Yield an empty staging folder beside ``destination``; on success it replaces ``destination``
    under ``publish_directory``'s rule (a folder loopmoe did not write is refused unless ``overwrite``).

    The destination is checked before the work starts as well as at the swap, so a refused output
    costs nothing. On an exception the staging folder is removed and ``destination`` is untouched.
    """
    destination = Path(destination)
    if destination.exists() or destination.is_symlink():
        _check_destination_only(destination, overwrite, legacy_marker)
    destination.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(
        tempfile.mkdtemp(prefix=f".{destination.name}.loopmoe-staging-{os.getpid()}-", dir=destination.parent)
    )
    try:
        yield staging
        publish_directory(staging, destination, overwrite=overwrite, legacy_marker=legacy_marker)
    finally:
        if staging.exists():
            shutil.rmtree(staging, ignore_errors=True)


def _check_destination_only(destination: Path, overwrite: bool, legacy_marker: str | None) -> None:
    """``_check_destination``'s refusals, without moving or removing anything."""
    if destination.is_symlink() or not destination.is_dir():
        raise ConfigError(f"{destination} exists and is not a folder: choose another output path")
    if not is_loopmoe_output(destination, legacy_marker) and any(destination.iterdir()) and not overwrite:
        _check_destination(destination, overwrite)  # raises with the message naming --overwrite


# A temporary left by an interrupted write: `.NAME.loopmoe-tmp-PID-*`, `.NAME.loopmoe-staging-PID-*`,
# `.NAME.loopmoe-old-PID`, and, directly in a run's `checkpoints/` folder, a checkpoint's
# `step_N.tmp-PID`. Only names with loopmoe's tag (or in loopmoe's own checkpoints folder) match.
_TEMPORARY = re.compile(r"^\..+\.loopmoe-(?:tmp|staging|old)-(?P<pid>\d+)(?:-.*)?$")
_CHECKPOINT_TEMPORARY = re.compile(r"^step_\d+\.tmp-(?P<pid>\d+)$")


def _temporary(path: Path) -> re.Match | None:
    if path.parent.name == "checkpoints" and (m := _CHECKPOINT_TEMPORARY.match(path.name)):
        return m
    return _TEMPORARY.match(path.name)


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's live process
        return True
    return True


def _candidates(folder: Path, depth: int) -> Iterator[Path]:
    for path in sorted(folder.iterdir()):
        yield path
        if depth > 0 and path.is_dir() and not path.is_symlink() and not _temporary(path):
            yield from _candidates(path, depth - 1)


def clean_stale_temporaries(folder: Path, *, held: bool, depth: int = 2) -> list[Path]:
    """Remove temporaries of interrupted writes in ``folder`` and its subfolders down to ``depth``
    levels (not the whole tree: ``--out .`` must not sweep a repository); returns what was removed.

    ``held``: the caller holds ``folder`` exclusively (the run lock), so every temporary in it is
    stale. Otherwise only those whose writer's PID is no longer alive are removed.
    """
    removed: list[Path] = []
    if not Path(folder).is_dir():
        return removed
    for path in list(_candidates(Path(folder), depth)):
        m = _temporary(path)
        if m is None or not (path.exists() or path.is_symlink()):
            continue
        pid = int(m.group("pid"))
        if pid == os.getpid() or (not held and pid_alive(pid)):
            continue
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path, ignore_errors=True)
        else:
            path.unlink(missing_ok=True)
        removed.append(path)
    return removed
