"""One process at a time per run folder: an exclusive ``flock`` on ``OUT/.lock``, held for the run.

Two ``loopmoe train`` on the same ``--out`` would write over each other's checkpoints and metrics;
the second one instead stops at once, naming the first one's PID. The lock is released by the
kernel when the holder exits, however it exits (``kill -9`` included), so it never goes stale.
"""

from __future__ import annotations

import fcntl
import os
from pathlib import Path

from loopmoe.errors import RunError

LOCK_NAME = ".lock"


class RunDirBusyError(RunError, RuntimeError):
    """Another live process holds the run folder's lock."""


class RunLock:
    """Exclusive lock on a run folder; ``acquire`` fails at once if someone else holds it."""

    def __init__(self, out_dir: str | Path):
        self.out_dir = Path(out_dir)
        self.path = self.out_dir / LOCK_NAME
        self._fd: int | None = None

    def acquire(self) -> RunLock:
        self.out_dir.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 64, 0).decode(errors="replace").strip() or "unknown"
            os.close(fd)
            raise RunDirBusyError(
                f"another loopmoe process (pid {holder}) is using {self.out_dir}; wait for it to finish, "
                "stop it, or choose another --out"
            ) from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        os.fsync(fd)
        self._fd = fd
        return self

    def release(self) -> None:
        if self._fd is not None:
            fcntl.flock(self._fd, fcntl.LOCK_UN)
            os.close(self._fd)
            self._fd = None

    def __enter__(self) -> RunLock:
        return self.acquire()

    def __exit__(self, *exc: object) -> None:
        self.release()
