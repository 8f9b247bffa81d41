"""The α–β of gloo collectives between two local processes (the CPU profile's links), and FSDP2's
own cost per collective.

Two processes are spawned with a file-store gloo group; each collective is timed at sizes from
1 KiB to 16 MiB and ``t = α + bytes_on_the_wire / β`` is fitted by least squares, where the bytes
on the wire are the ring algorithm's (``comm.wire_bytes``), so the same β serves every collective.

FSDP2 spends time of its own around each all-gather and reduce-scatter (its forward and backward
hooks, the copy-in and copy-out of the flat buffers), which neither the collective nor the model's
ops include: one process (a group of one, so the collectives move nothing) times a tiny model's
training step with and without ``fully_shard`` and divides the difference by the FSDP2
collectives of that step (``comm.plan_comm``'s count).
"""

from __future__ import annotations

import statistics
import tempfile
import time
from collections.abc import Callable
from functools import partial
from pathlib import Path

SIZES = (2**10, 2**14, 2**18, 2**20, 2**22, 2**24)


def _worker(rank: int, world: int, init_file: str, out: str, quick: bool) -> None:
    import torch
    import torch.distributed as dist

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    results: dict[str, list[tuple[int, float]]] = {"all_reduce": [], "all_gather": [], "reduce_scatter": []}
    reps = 4 if quick else 10
    for nbytes in SIZES:
        n = nbytes // 4
        x = torch.ones(n)
        gathered = torch.empty(n * world)
        shard = torch.empty(n // world)
        ops: dict[str, Callable[[], object]] = {
            "all_reduce": partial(dist.all_reduce, x),
            "all_gather": partial(dist.all_gather_into_tensor, gathered, x),
            "reduce_scatter": partial(dist.reduce_scatter_tensor, shard, x),
        }
        for name, op in ops.items():
            # Back-to-back calls after one barrier, per call: a single call after a barrier also
            # times how late the other rank left the barrier, which dwarfs a small message.
            times = []
            for _ in range(3):
                dist.barrier()
                t0 = time.perf_counter()
                for _ in range(reps):
                    op()
                times.append((time.perf_counter() - t0) / reps)
            results[name].append((nbytes, statistics.median(times)))
    if rank == 0:
        import json

        Path(out).write_text(json.dumps(results))
    dist.destroy_process_group()


def _fsdp_worker(rank: int, init_file: str, out: str, quick: bool) -> None:
    import json

    import torch
    import torch.distributed as dist

    from loopmoe.distributed import apply_fsdp2, build_mesh
    from loopmoe.planning.trace import tiny_trainer

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=1)
    mesh = build_mesh(1, "cpu", 1)
    times = {}
    for name, wrap in (("plain", None), ("fsdp2", lambda m: apply_fsdp2(m, mesh))):
        _, trainer, ids = tiny_trainer(2, wrap=wrap)
        for _ in range(2):
            trainer.train_step(iter([ids]))
        steps = []
        for _ in range(8 if quick else 25):
            t0 = time.perf_counter()
            trainer.train_step(iter([ids]))
            steps.append(time.perf_counter() - t0)
        times[name] = statistics.median(steps)
    Path(out).write_text(json.dumps(times))
    dist.destroy_process_group()


def measure_fsdp2_overhead(quick: bool = False) -> float:
    """Seconds FSDP2 itself adds per all-gather or reduce-scatter call (see the module docstring)."""
    import json

    import torch.multiprocessing as mp

    from loopmoe.planning.comm import plan_comm
    from loopmoe.planning.layout import Layout
    from loopmoe.planning.trace import tiny_trainer

    with tempfile.TemporaryDirectory() as tmp:
        out = str(Path(tmp) / "fsdp.json")
        mp.start_processes(_fsdp_worker, args=(str(Path(tmp) / "init"), out, quick), nprocs=1, start_method="spawn")
        times = json.loads(Path(out).read_text())
    from loopmoe.planning.hardware import PROFILES

    model, _, ids = tiny_trainer(2)
    lay = Layout(devices=2, strategy="fsdp2", micro_batch=ids.shape[0], seq_len=ids.shape[1])
    calls = plan_comm(model.config, lay, PROFILES["h100"]).collectives
    return max(0.0, times["fsdp2"] - times["plain"]) / (calls["all_gather"] + calls["reduce_scatter"])


def fit_alpha_beta(points: list[tuple[float, float]]) -> tuple[float, float]:
    """Least-squares ``t = α + x / β`` over (wire bytes x, seconds t); α >= 0."""
    xs, ts = [p[0] for p in points], [p[1] for p in points]
    mx, mt = statistics.fmean(xs), statistics.fmean(ts)
    slope = sum((x - mx) * (t - mt) for x, t in zip(xs, ts)) / sum((x - mx) ** 2 for x in xs)
    alpha = max(mt - slope * mx, 0.0)
    return alpha, 1.0 / max(slope, 1e-15)


def measure_gloo(quick: bool = False, world: int = 2) -> dict:
    """α (s) and β (bytes/s) of gloo all_reduce / all_gather / reduce_scatter between ``world`` local processes."""
    import json

    import torch.multiprocessing as mp

    from loopmoe.planning.comm import wire_bytes

    with tempfile.TemporaryDirectory() as tmp:
        out = str(Path(tmp) / "gloo.json")
        mp.start_processes(
            _worker, args=(world, str(Path(tmp) / "init"), out, quick), nprocs=world, start_method="spawn"
        )
        raw = json.loads(Path(out).read_text())
    fits = {}
    for name, pts in raw.items():
        alpha, beta = fit_alpha_beta([(wire_bytes(name, nbytes, world), t) for nbytes, t in pts])
        fits[name] = {"latency_s": alpha, "bandwidth": beta, "points": pts}
    return {
        "world": world,
        "latency_s": statistics.median(f["latency_s"] for f in fits.values()),
        "bandwidth": statistics.median(f["bandwidth"] for f in fits.values()),
        "collectives": fits,
        "fsdp2_call_overhead_s": measure_fsdp2_overhead(quick),
    }
