"""Atomic, durable writes: a file or a folder is either wholly there or not there at all.

Everything loopmoe writes that a later run reads back (checkpoints, shards, tokenizers, metrics,
run configs, reports) goes through here, so every writer has the same guarantee: the content is
written under a temporary name private to this process, flushed to disk (``fsync``), renamed into
place in one ``os.replace`` and the rename itself made durable (``fsync`` of the parent folder).
A crash at any moment leaves the old version or the new one, never a torn one; a stale
temporary (``.NAME.tmp-PID-*`` / ``.NAME.staging-PID-*``) is all an interrupted write can leave
behind, and ``clean_stale_temporaries`` removes those whose writer is gone.
"""

from __future__ import annotations

import io
import os
import re
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path


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
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.tmp-{os.getpid()}-", dir=path.parent)
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


def publish_directory(staging: Path, destination: Path) -> None:
    """Make the finished folder ``staging`` appear as ``destination`` in one rename, durably.

    Every file is fsynced first; an existing ``destination`` is moved aside and deleted after the
    swap, so a reader sees the old folder or the new one.
    """
    for f in staging.rglob("*"):
        if f.is_file():
            fsync_file(f)
    fsync_dir(staging)
    old = None
    if destination.exists():
        old = destination.with_name(f".{destination.name}.old-{os.getpid()}")
        os.replace(destination, old)
    os.replace(staging, destination)
    fsync_dir(destination.parent)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


@contextmanager
def atomic_directory(destination: Path) -> Iterator[Path]:
    """Yield an empty staging folder beside ``destination``; on success it replaces ``destination``.

    On an exception the staging folder is removed and ``destination`` is untouched.
    """
    destination = Path(destination)
    destination.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{destination.name}.staging-{os.getpid()}-", dir=destination.parent))
    try:
        yield staging
        publish_directory(staging, destination)
    finally:
        if staging.exists():
            shutil.rmtree(staging, ignore_errors=True)


# A temporary left by an interrupted write: `.NAME.tmp-PID-*`, `.NAME.staging-PID-*`, `.NAME.old-PID`
# (older versions wrote no PID), and a checkpoint's `step_N.tmp` / `step_N.tmp-PID`.
_TEMPORARY = re.compile(r"^(?:\..+\.(?:tmp|staging|old)-(?P<pid>\d+)?.*|step_\d+\.tmp(?:-(?P<cpid>\d+))?)$")


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
        if depth > 0 and path.is_dir() and not path.is_symlink() and not _TEMPORARY.match(path.name):
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
        m = _TEMPORARY.match(path.name)
        if m is None or not (path.exists() or path.is_symlink()):
            continue
        pid = m.group("pid") or m.group("cpid")
        if not held and (pid is None or int(pid) == os.getpid() or pid_alive(int(pid))):
            continue
        if held and pid is not None and int(pid) == os.getpid():
            continue
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path, ignore_errors=True)
        else:
            path.unlink(missing_ok=True)
        removed.append(path)
    return removed
