"""Publish a directory all at once, so an interrupted write never looks finished.

Shard builds and tokenizer training write into a hidden staging folder beside
the destination and rename it into place only after every file is complete. A
crash leaves at most a stale ``.<name>.staging-*`` folder, never a destination
that passes the "already built" check with half its data.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path


@contextmanager
def atomic_directory(destination: Path) -> Iterator[Path]:
    """Yield an empty staging folder; on success it replaces ``destination``.

    An existing ``destination`` is moved aside first and deleted after the swap.
    On an exception the staging folder is removed and ``destination`` is untouched.
    """
    destination = Path(destination)
    destination.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{destination.name}.staging-", dir=destination.parent))
    try:
        yield staging
        old = None
        if destination.exists():
            old = destination.with_name(f".{destination.name}.old-{os.getpid()}")
            os.replace(destination, old)
        os.replace(staging, destination)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    finally:
        if staging.exists():
            shutil.rmtree(staging, ignore_errors=True)
