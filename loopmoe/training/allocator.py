"""Keep the memory a CPU training step frees for the next step (glibc's malloc).

By default glibc gives large freed blocks back to the operating system: blocks above its mmap
threshold are unmapped when freed, and free memory at the top of the heap beyond the trim threshold
is released. A training step frees and reallocates the same activations every step, so the next
step takes them back page by page, each page a fault that the kernel zeroes. On the debug model
(d = 64, 1024 tokens per step) that was ~3,800 page faults a step; keeping the memory brings it
to ~70, and steps 1.15x faster with one thread, 1.10x with two (``python -m bench.cpu_allocator``,
PERFORMANCE.md).

The memory is kept, not leaked: it is reused by the next step. The process's resident size stays
near its peak, which a training loop reaches every step anyway, plus what fragmentation of the kept
heap adds (resident memory then overstates live tensors, as it already does with glibc's adaptive
defaults). Accelerators are unaffected
(their caching allocators already keep memory). A user's own ``MALLOC_*`` / ``GLIBC_TUNABLES``
settings win: nothing is changed when any is set.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import sys

# mallopt parameters (malloc.h)
M_TRIM_THRESHOLD, M_TOP_PAD, M_MMAP_THRESHOLD = -1, -2, -3
MMAP_THRESHOLD = 32 << 20  # glibc's largest: blocks above it are still mapped per allocation
TRIM_THRESHOLD = 1 << 30
TOP_PAD = 64 << 20
_done: list[bool] = []


def keep_freed_memory() -> bool:
    """Ask glibc to keep freed memory in the process (once per process); True when it is set.

    A no-op (False) off Linux, on a libc that is not glibc, with another allocator preloaded, and when
    the user set malloc tunables.
    """
    if _done:
        return _done[0]
    _done.append(False)
    user_set = any(k.startswith("MALLOC_") or k == "GLIBC_TUNABLES" for k in os.environ)
    other_malloc = any(name in os.environ.get("LD_PRELOAD", "") for name in ("jemalloc", "tcmalloc", "mimalloc"))
    if not sys.platform.startswith("linux") or user_set or other_malloc:
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
        libc.gnu_get_libc_version  # noqa: B018 (glibc only: musl has no such symbol)
    except (OSError, AttributeError):
        return False
    ok = all(
        mallopt(ctypes.c_int(param), ctypes.c_int(value)) == 1
        for param, value in (
            (M_TRIM_THRESHOLD, TRIM_THRESHOLD),
            (M_TOP_PAD, TOP_PAD),
            (M_MMAP_THRESHOLD, MMAP_THRESHOLD),
        )
    )
    _done[0] = ok
    return ok
