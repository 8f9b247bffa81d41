"""(9) Sizing the controlled study: CPU seconds per training step of every arm of a study config.

    python -m bench.study_sizing [configs/study/eltec.toml] [--steps-timed 4]

Builds every arm of the study (``resolve_arms``, at the config's BPE vocabulary) and times one
optimizer step (forward + backward + AdamW) at the study's batch x sequence length on ONE thread, the
arms interleaved (A B C ... A B C ...). The clock is the process's CPU time (``time.process_time``):
with one thread it is the wall time the step would take on an idle core, and unlike the wall time
it barely moves when other processes share the machine (caches and memory bandwidth still do).
Prints and writes (bench/results/study_sizing.json) the study's projected training time: for every
run of the plan, steps x the arm's median step time, plus held-out evaluation (forward only, about a
third of a step per batch). Data preparation and the downstream evaluations are measured separately
(see the config's comments).
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

import torch

from bench import common
from loopmoe.text import markdown_table


def step_fn(model, ids):
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)

    def step():
        optimizer.zero_grad(set_to_none=True)
        model(input_ids=ids, labels=ids).loss.backward()
        optimizer.step()

    return step


def main() -> None:
    from loopmoe.compare import CompareOptions
    from loopmoe.compare.arms import resolve_arms
    from loopmoe.model import LoopMoEForCausalLM
    from loopmoe.presets import load_model_config

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("config", nargs="?", default="configs/study/eltec.toml", type=Path)
    parser.add_argument("--steps-timed", type=int, default=4, help="timed steps per arm (after one warm-up)")
    args = parser.parse_args()
    common.setup(threads=1)
    opts = CompareOptions.from_toml(args.config).validate()
    arms = resolve_arms(opts, load_model_config(opts.reference, vocab_size=opts.bpe_vocab))
    ids = common.token_batch(opts.micro_batch_size, opts.seq_len, opts.bpe_vocab)
    steps = {}
    for name, arm in arms.items():
        torch.manual_seed(0)
        steps[name] = step_fn(LoopMoEForCausalLM(arm.config).train(), ids)
        steps[name]()  # warm-up
    cpu: dict[str, list[float]] = {name: [] for name in arms}
    for _ in range(args.steps_timed):
        for name, step in steps.items():
            t0 = time.process_time()
            step()
            cpu[name].append(time.process_time() - t0)
    per_step = {name: statistics.median(v) for name, v in cpu.items()}
    evals = opts.steps // opts.eval_every + (opts.steps % opts.eval_every != 0)
    eval_steps = evals * opts.eval_batches / 3  # a forward is about a third of a training step
    rows, total = [], 0.0
    for name, arm in arms.items():
        runs = len(arm.seeds)
        seconds = runs * (opts.steps + eval_steps) * per_step[name]
        total += seconds
        tokens_s = opts.micro_batch_size * opts.seq_len / per_step[name]
        rows.append((name, f"{per_step[name]:.3f}", f"{tokens_s:,.0f}", runs, f"{seconds / 60:.1f}"))
    print(
        markdown_table(("arm", "CPU s / step (1 thread)", "tokens/s", "runs", "training + held-out eval (min)"), rows)
    )
    print(
        f"\n{len(opts.run_plan())} runs x {opts.steps} steps x {opts.micro_batch_size * opts.seq_len} tokens "
        f"({opts.tokens_per_model:,} tokens per run), {evals} evaluations of {opts.eval_batches} batches: "
        f"{total / 3600:.2f} h of training on one idle core"
    )
    path = common.write_json(
        "study_sizing",
        {
            "config": str(args.config),
            "threads": 1,
            "clock": "process CPU time",
            "cpu_s_per_step": per_step,
            "samples": cpu,
            "steps_per_run": opts.steps,
            "tokens_per_run": opts.tokens_per_model,
            "runs": len(opts.run_plan()),
            "training_hours": total / 3600,
        },
    )
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
