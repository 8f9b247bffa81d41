"""Run Python in a process where ``import loopmoe`` fails: an environment with only torch + transformers.

Checkpoints loopmoe writes must work for users who never installed it (``trust_remote_code=True``
in transformers, ``lm_eval --model hf``, HF ``Trainer``). Uninstalling the package for a test is
not possible, so the child process puts a finder first on ``sys.meta_path`` that refuses every
``loopmoe`` module, before anything else is imported.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

BLOCKER = """
import importlib.abc, sys
class _NoLoopMoE(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.split(".", 1)[0] == "loopmoe":
            raise ModuleNotFoundError(f"No module named {name!r} (blocked: an environment without loopmoe)", name=name)
        return None
sys.meta_path.insert(0, _NoLoopMoE())
"""


def run_without_loopmoe(
    script: str, cwd: str | Path, *, timeout: float = 600, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess:
    """Run ``script`` with ``python -c`` in ``cwd`` with loopmoe unimportable; raise with its output on failure.

    transformers' remote-code module cache goes to ``cwd/hf_modules`` and the hub is offline.
    """
    full_env = {
        **os.environ,
        "HF_MODULES_CACHE": str(Path(cwd) / "hf_modules"),
        "HF_HUB_OFFLINE": "1",
        "HF_DATASETS_OFFLINE": "1",
        "TOKENIZERS_PARALLELISM": "false",
        **(env or {}),
    }
    result = subprocess.run(
        [sys.executable, "-c", BLOCKER + script], cwd=cwd, env=full_env, capture_output=True, text=True, timeout=timeout
    )
    if result.returncode != 0:
        raise AssertionError(f"the script failed without loopmoe (exit {result.returncode}):\n{result.stderr[-6000:]}")
    return result
