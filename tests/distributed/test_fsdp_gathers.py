"""FSDP2 gathers a looped core layer 2T times per micro-batch with `reshard_after_forward`, T without,
as `loopmoe.planning.comm` predicts (2 gloo processes)."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.parametrize("reshard", [True, False])
def test_core_all_gathers_match_the_plan(reshard):
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc_per_node=2",
        "-m",
        "tests.distributed.fsdp_gathers_standin",
        str(reshard),
    ]
    out = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    measured, predicted = (int(x) for x in out.stdout.strip().splitlines()[-1].split())
    assert measured == predicted
