"""Run every benchmark in order and print their tables: ``python -m bench.run_all [--quick]``.

peak FLOPs first (the MFU denominator of the others), then the MoE layer, the training step,
generation (in memory, then as users load it), LoopMoE vs its matched Vanilla MoE, the data
pipeline, activation checkpointing, DCCA against SwiGLU experts and expert parallelism. JSON results go to
bench/results/, plots to docs/. ``--quick`` (fewer sizes and repetitions) takes a few minutes.
"""

from __future__ import annotations

import argparse
import time

from bench import (
    activation_checkpointing,
    data_pipeline,
    dcca,
    decode_vs_hf,
    expert_parallel,
    generate,
    loop_vs_vanilla,
    moe_layer,
    peak_flops,
    train_step,
)

BENCHMARKS = [
    ("peak fp32 matmul", peak_flops),
    ("MoE layer", moe_layer),
    ("training step", train_step),
    ("generation", generate),
    ("decoding as users load it (from_pretrained, both models)", decode_vs_hf),
    ("LoopMoE vs Vanilla MoE", loop_vs_vanilla),
    ("data pipeline", data_pipeline),
    ("activation checkpointing", activation_checkpointing),
    ("DCCA vs SwiGLU experts", dcca),
    ("expert parallelism (2 gloo processes)", expert_parallel),
]


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--only", nargs="*", help="module names to run, e.g. train_step generate")
    args = ap.parse_args(argv)
    start = time.perf_counter()
    for title, module in BENCHMARKS:
        name = module.__name__.rsplit(".", 1)[-1]
        if args.only and name not in args.only:
            continue
        print(f"\n## {title}  (python -m bench.{name}{' --quick' if args.quick else ''})", flush=True)
        t0 = time.perf_counter()
        module.main(["--quick"] if args.quick else [])
        print(f"[{name}: {time.perf_counter() - t0:.0f} s]", flush=True)
    print(f"\nall benchmarks: {time.perf_counter() - start:.0f} s")


if __name__ == "__main__":
    main()
