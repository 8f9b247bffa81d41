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


def step():  # blocks of 0.25-6 MiB live together, then freed, as activations in a training step
    held = [torch.empty(n << 18).fill_(1) for n in (1, 3, 6, 12, 24, 2, 5)]
    del held
    torch.empty(20 << 18).fill_(1)


for _ in range(3):
    step()
faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(20):
    step()
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
    kept = _probe()
    if not kept["kept"]:
        pytest.skip("not glibc (musl, or another allocator preloaded): nothing to set")
    assert kept["again"]  # set once, idempotent
    assert kept["faults"] < 1000
    # The same steps fault ~1,500 times each when glibc hands freed blocks back (here: a user's pinned
    # mmap threshold, which the setting leaves alone; glibc's adaptive default does so some of the
    # time, depending on what the process freed before).
    handed_back = _probe(MALLOC_MMAP_THRESHOLD_="131072")
    assert not handed_back["kept"] and handed_back["faults"] > 10_000


def test_a_users_malloc_settings_win():
    assert not _probe(MALLOC_ARENA_MAX="2")["kept"]
    assert not _probe(GLIBC_TUNABLES="glibc.malloc.trim_threshold=1000000")["kept"]
