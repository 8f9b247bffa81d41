"""Does keeping freed memory in the process (``loopmoe.training.allocator``) speed up CPU training?

    python -m bench.cpu_allocator [--pairs N] [--threads T] [--steps S]

glibc's malloc settings are per process and, once set, cannot be put back to its adaptive
defaults, so the two arms cannot share one process: each pair is two fresh processes started back
to back (kept, then glibc's defaults, alternating which goes first), training the debug model
(configs/debug.toml: d = 64, batch 8 x 128) with the real trainer. Per process: the median step
and the minor page faults per step. Reported: each pair's step-time ratio and their median.
Writes bench/results/cpu_allocator_{T}threads.json.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time

from bench import common

WARMUP = 3


def child(keep: bool, threads: int, steps: int) -> None:
    import resource

    import torch

    from loopmoe.distributed.env import DistInfo
    from loopmoe.training import load_run_config
    from loopmoe.training.allocator import keep_freed_memory
    from loopmoe.training.builders import planned_vocab_size

    kept = keep_freed_memory() if keep else False
    torch.set_num_threads(threads)
    cfg = load_run_config("configs/debug.toml", [f"train.max_steps={steps + WARMUP + 10}"])
    vocab, _ = planned_vocab_size(cfg)
    torch.manual_seed(0)
    cpu = DistInfo(rank=0, world_size=1, local_rank=0, device=torch.device("cpu"))  # on a GPU machine too
    trainer = common.config_trainer(cfg, vocab, cpu)
    batches = common.random_batches(cfg, vocab, seed=1)
    for _ in range(WARMUP):
        trainer.train_step(batches)
    faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    times = []
    for _ in range(steps):
        t0 = time.perf_counter()
        trainer.train_step(batches)
        times.append(time.perf_counter() - t0)
    faults = (resource.getrusage(resource.RUSAGE_SELF).ru_minflt - faults) / steps
    print(json.dumps({"kept": kept, "step_s": statistics.median(times), "faults_per_step": faults}))


def _run(keep: bool, threads: int, steps: int) -> dict:
    env = {k: v for k, v in os.environ.items() if not k.startswith("MALLOC_") and k != "GLIBC_TUNABLES"}
    env.update(PYTHONPATH=str(common.ROOT), OMP_NUM_THREADS=str(threads))
    cmd = [sys.executable, "-m", "bench.cpu_allocator", "--child", "keep" if keep else "default"]
    cmd += ["--threads", str(threads), "--steps", str(steps)]
    out = subprocess.run(cmd, cwd=common.ROOT, env=env, check=True, capture_output=True, text=True).stdout
    return json.loads(out.strip().splitlines()[-1])


def run(pairs: int, threads: int, steps: int) -> dict:
    rows = []
    for i in range(pairs):
        order = (True, False) if i % 2 == 0 else (False, True)
        got = {keep: _run(keep, threads, steps) for keep in order}
        rows.append({"kept": got[True], "default": got[False], "ratio": got[False]["step_s"] / got[True]["step_s"]})
        print(
            f"pair {i + 1}: kept {1e3 * got[True]['step_s']:.1f} ms ({got[True]['faults_per_step']:.0f} faults/step), "
            f"glibc defaults {1e3 * got[False]['step_s']:.1f} ms ({got[False]['faults_per_step']:.0f}), "
            f"speed-up {rows[-1]['ratio']:.3f}x",
            flush=True,
        )
    ratios = [r["ratio"] for r in rows]
    return {
        "threads": threads,
        "steps": steps,
        "pairs": rows,
        "speedup_median": statistics.median(ratios),
        "speedup_min": min(ratios),
        "speedup_max": max(ratios),
    }


def main(argv=None) -> dict | None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--pairs", type=int, default=4)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--child", choices=("keep", "default"), help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.child:
        child(args.child == "keep", args.threads, args.steps)
        return None
    res = run(args.pairs, args.threads, args.steps)
    print(
        f"median speed-up {res['speedup_median']:.3f}x [{res['speedup_min']:.3f}-{res['speedup_max']:.3f}] "
        f"over {args.pairs} pairs at {args.threads} thread(s)"
    )
    common.write_json(f"cpu_allocator_{args.threads}threads", res)
    return res


if __name__ == "__main__":
    main()
