"""What each run of a comparison cost: wall-clock and peak memory per training session.

``RUN_DIR/cost.json`` holds one entry per call of ``run_training`` on that run (a run resumed after
an interruption has several): the steps it trained, its wall-clock seconds, and the peak resident
memory of the process during it (the high-water mark is reset before the session on Linux, so it is
this session's, not the process's lifetime peak), on CUDA the peak allocated GPU memory, and what it
ran on (``environment``: loopmoe's commit, torch/transformers versions, hardware). A
session killed before it returns leaves no entry; the per-step times in ``metrics.jsonl`` still
cover its training steps.
"""

from __future__ import annotations

import json
import resource
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch

import loopmoe
from loopmoe.atomic import atomic_write_text

COST_FILE = "cost.json"


def _reset_peak_rss() -> bool:
    """Restart the process's resident-memory high-water mark (Linux); False where it cannot."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


def _peak_rss_mib(reset: bool) -> float:
    if reset:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    # the process's lifetime peak: kibibytes on Linux, bytes on macOS
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / (1024 * 1024) if sys.platform == "darwin" else peak / 1024


def git_commit() -> str | None:
    """The commit of the loopmoe checkout this runs from (``+dirty`` with uncommitted changes); None outside git."""
    import subprocess

    root = Path(__file__).resolve().parents[2]
    try:
        commit = subprocess.run(
            ["git", "-C", str(root), "describe", "--always", "--dirty=+dirty", "--abbrev=12"],
            capture_output=True,
            text=True,
            timeout=10,
            check=True,
        ).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return None
    return commit or None


def hardware() -> str:
    """The CPU model and core count, and the GPU if there is one, in words."""
    import os
    import platform

    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    words = f"{cpu}, {os.cpu_count()} cores"
    if torch.cuda.is_available():
        words += f", {torch.cuda.get_device_name()}"
    return words


def environment() -> dict[str, Any]:
    """What produced a number: loopmoe's commit, the library versions, Python and the hardware."""
    import platform

    import transformers

    return {
        "commit": git_commit(),
        "loopmoe": loopmoe.__version__,
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "python": platform.python_version(),
        "platform": platform.platform(),
        "hardware": hardware(),
    }


def read_cost(run_dir: Path) -> list[dict[str, Any]]:
    try:
        return list(json.loads((run_dir / COST_FILE).read_text())["sessions"])
    except (OSError, ValueError, KeyError, TypeError):
        return []


@contextmanager
def recorded_session(run_dir: Path, start_step: int, end_step: int) -> Iterator[None]:
    """Measure the training session inside the block and append it to ``run_dir/cost.json``."""
    reset = _reset_peak_rss()
    cuda = torch.cuda.is_available()
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    t0 = time.perf_counter()
    yield
    session = {
        "start_step": start_step,
        "end_step": end_step,
        "wall_s": time.perf_counter() - t0,
        "peak_rss_mib": _peak_rss_mib(reset),
        "peak_rss_is_session": reset,
        "peak_cuda_mib": torch.cuda.max_memory_allocated() / 2**20 if cuda else None,
        "threads": torch.get_num_threads(),
        **environment(),
    }
    atomic_write_text(run_dir / COST_FILE, json.dumps({"sessions": [*read_cost(run_dir), session]}, indent=2))
