"""`loopmoe train` keeps freed CPU memory in the process (glibc), unless the user set malloc tunables."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
PROBE = """
import json, resource, torch
from loopmoe.training.allocator import keep_freed_memory
kept = keep_freed_memory()
again = keep_freed_memory()
torch.randn(4 << 20).sum()  # a 16 MiB block, freed
faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(20):
    torch.randn(4 << 20).sum()  # the same size again: faulted back in, unless the memory was kept
print(json.dumps({"kept": kept, "again": again, "faults": resource.getrusage(resource.RUSAGE_SELF).ru_minflt - faults}))
"""


def _probe(**env: str) -> dict:
    clean = {k: v for k, v in os.environ.items() if not k.startswith("MALLOC_") and k != "GLIBC_TUNABLES"}
    out = subprocess.run(
        [sys.executable, "-c", PROBE],
        env={**clean, "PYTHONPATH": str(ROOT), **env},
        cwd=ROOT,
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    return json.loads(out.strip().splitlines()[-1])


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's malloc")
def test_freed_memory_is_kept_and_not_faulted_back_in():
    kept, default = _probe(), _probe(MALLOC_ARENA_MAX="2")  # any MALLOC_* setting of the user's wins
    assert kept["kept"] and kept["again"]  # set once, idempotent
    assert not default["kept"]
    # 20 allocations of 16 MiB: ~4,000 faults each with glibc's defaults, next to none when kept.
    assert kept["faults"] < 1000 < default["faults"]
