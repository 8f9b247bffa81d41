"""How often is ``loopmoe plan`` right? Predicted vs measured tokens/s and peak memory on this CPU.

    python -m bench.plan_vs_measured [--quick] [--steps N] [--only NAME,...]

1. Calibrates the ``cpu`` profile first, in this run (``calibrate_cpu``): a prediction is only as
   good as the calibration, and both must see the same machine conditions.
2. Trains each configuration below for a few dozen steps with the real trainer (the model, the
   parallelism, the optimizer and ``Trainer.train_step`` of ``loopmoe train``; random tokens
   instead of a corpus, and its CPU allocator settings), in a fresh process, or two under
   ``torchrun`` (gloo, one thread each). A configuration is overrides over a run config file
   (``configs/debug.toml`` unless it names another, e.g. the shipped ``configs/small-loop.toml``),
   or an arm of ``loopmoe compare``'s default study, built as the comparison builds it
   (``COMPARE_ARMS``). Measured: tokens/s over the timed steps (median step; the
   slowest rank's), in ``REPEATS`` fresh runs of which the fastest counts; and in another run,
   peak memory = the anonymous memory held between steps over that just before the model was built,
   plus the largest growth of resident memory within a step (the largest rank's), with glibc's mmap
   threshold pinned so that resident memory follows the live tensors (``MEMORY_ENV``).
3. Predicts the same runs with ``loopmoe.planning.plan_step`` and prints both, with the error.

Writes bench/results/plan_vs_measured.json (targets: median |error| <= 15%, each <= 30%), and leaves its
calibration and time errors in the cache, where ``loopmoe plan`` states them as the uncertainty of its
predictions on this machine (``loopmoe.planning.validation``).

    python -m bench.plan_vs_measured --profile NAME[,NAME...]

Which term of a prediction is off: a single-process configuration's step, measured unprofiled, and split by
``torch.profiler`` into the planner's parts (GEMMs and fused attention: their ops' own time; the update:
clipping, the update guard and ``Optimizer.step``; the rest: element-wise work and framework overhead, with the
other ops' own time shown apart), beside the parts
predicted with the machine's cached calibration (``loopmoe plan``'s). Writes
bench/results/plan_profile.json.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, NamedTuple

from bench import common
from loopmoe.compare.arms import resolve_arms
from loopmoe.compare.options import CompareOptions
from loopmoe.compare.runner import arm_run_config
from loopmoe.distributed.config import DistSection
from loopmoe.distributed.env import all_reduce_sum_, init_distributed, teardown_distributed
from loopmoe.errors import ConfigError
from loopmoe.planning import Layout, plan_step
from loopmoe.planning.calibration import calibrate_cpu, save_calibration
from loopmoe.planning.hardware import cpu_from_calibration
from loopmoe.planning.validation import save_validation
from loopmoe.presets import load_model_config
from loopmoe.text import markdown_table
from loopmoe.training import build_model_config, config_from_dict
from loopmoe.training.allocator import keep_freed_memory
from loopmoe.training.builders import planned_vocab_size
from loopmoe.training.config import apply_overrides
from loopmoe.trust import read_toml

BASE = "configs/debug.toml"
# name -> (processes, overrides[, base config file: BASE where the entry names none]); looped and
# Vanilla, T = 1..4, expert counts and sizes, DDP and FSDP2, activation checkpointing, and the
# configurations users start from: the debug preset's own core looped, the shipped looped example.
CONFIGS: dict[str, tuple[int, list[str]] | tuple[int, list[str], str]] = {
    "vanilla": (1, []),
    "T2": (1, ["model.num_loops=2", "model.num_core_layers=2"]),
    "T3_prelude": (1, ["model.num_loops=3", "model.num_core_layers=1", "model.num_prelude_layers=1"]),
    "T4": (1, ["model.num_loops=4", "model.num_core_layers=1"]),
    "T2_E16_f32": (
        1,
        ["model.num_loops=2", "model.num_core_layers=2", "model.num_experts=16", "model.moe_intermediate_size=32"],
    ),
    "vanilla_E4_f128_k1": (
        1,
        ["model.num_experts=4", "model.num_experts_per_tok=1", "model.moe_intermediate_size=128"],
    ),
    "T2_wide_ac_full": (
        1,
        [
            "model.num_loops=2",
            "model.num_core_layers=2",
            "model.hidden_size=128",
            "train.activation_checkpointing=full",
        ],
    ),
    "T4_ac_selective": (
        1,
        ["model.num_loops=4", "model.num_core_layers=1", "train.activation_checkpointing=selective"],
    ),
    "vanilla_ddp2": (2, ["dist.strategy=ddp"]),
    "T2_ddp2": (2, ["dist.strategy=ddp", "model.num_loops=2", "model.num_core_layers=2"]),
    "vanilla_fsdp2": (2, ["dist.strategy=fsdp2"]),
    "T2_fsdp2": (2, ["dist.strategy=fsdp2", "model.num_loops=2", "model.num_core_layers=2"]),
    "T4_fsdp2_ac_full": (
        2,
        ["dist.strategy=fsdp2", "model.num_loops=4", "model.num_core_layers=1", "train.activation_checkpointing=full"],
    ),
    "debug_T2": (1, ["model.num_loops=2"]),
    "small_loop": (1, [], "configs/small-loop.toml"),
}
# name -> arm of `loopmoe compare`'s default study: the `small` Vanilla reference and its capacity-balanced
# LoopMoE at T = 2, each the RunConfig the comparison trains (its data shapes, its BPE's vocabulary).
COMPARE_ARMS = {"compare_reference": "reference", "compare_looped": "looped"}
WARMUP = 3
MEMORY_STEPS = 3
# Each timed configuration runs in this many fresh processes and reports the fastest (each process's
# median step): on the 2-vCPU VM this was validated on, a process sometimes runs ~35% slower for its
# whole life (the same config at ~45 or ~60 ms a step, whatever the allocator and with nothing else
# running), so one process is a coin toss. As with `timeit`, the fastest run is the machine's speed;
# the slower ones are kept in the results (``step_s_runs``).
REPEATS = 3
# glibc's malloc raises its mmap threshold to the size of each large block freed, and from then on
# keeps such blocks in a heap it rarely returns, so resident memory overstates the live tensors by
# whatever was once freed there. The memory runs pin the threshold at glibc's initial 128 KiB, so
# that every large block returns as it is freed and resident memory follows the live tensors (what
# an accelerator's caching allocator reports as allocated); the timed runs keep memory between steps
# as `loopmoe train` does on a CPU (``loopmoe.training.allocator``).
MEMORY_ENV = {"MALLOC_MMAP_THRESHOLD_": str(128 * 1024)}


def _has_ep() -> bool:
    return "ep" in DistSection.__dataclass_fields__


class Case(NamedTuple):
    """One configuration: what the child trains and the planner predicts, and where it comes from."""

    processes: int
    raw: dict[str, Any]  # the run config before typing (``config_from_dict``'s input): JSON for the child
    source: dict[str, Any]  # for the results: {"base", "overrides"}, or {"compare_arm"}


def _from_file(processes: int, overrides: list[str], base: str = BASE) -> Case:
    raw = apply_overrides(read_toml(common.ROOT / base), overrides)
    return Case(processes, raw, {"base": base, "overrides": overrides})


def _compare_arms() -> dict[str, Case]:
    """``COMPARE_ARMS`` as ``loopmoe compare`` builds them (``runner.prepare``, ``arm_run_config``; first seed),
    at the vocabulary of its trained BPE."""
    opts = CompareOptions(arms=tuple(COMPARE_ARMS.values())).validate()
    arms = resolve_arms(opts, load_model_config(opts.reference, vocab_size=opts.bpe_vocab))
    return {
        name: Case(1, arm_run_config(opts, arms[arm], arms[arm].seeds[0]).to_dict(), {"compare_arm": arm})
        for name, arm in COMPARE_ARMS.items()
    }


def configs() -> dict[str, Case]:
    entries = dict(CONFIGS)
    if _has_ep():  # expert parallelism, where the trainer has it
        entries["T2_ep2"] = (2, ["dist.ep=2", "model.num_loops=2", "model.num_core_layers=2"])
    return {name: _from_file(*entry) for name, entry in entries.items()} | _compare_arms()


def _rss_kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"{field} missing from /proc/self/status (Linux only)")


def _child_config(raw: dict[str, Any], steps: int, world_size: int):
    """(run config, vocabulary) of a measured run of ``steps`` steps, torch's seed set to the config's. The
    schedule outlasts the steps, and keeps the config's own length where that is longer (its warmup and decay
    fit in it)."""
    import torch

    cfg = config_from_dict(raw)
    cfg.train.max_steps = max(cfg.train.max_steps, steps + WARMUP + 100)
    cfg.validate(world_size)
    vocab, _ = planned_vocab_size(cfg)
    torch.manual_seed(cfg.train.seed)
    return cfg, vocab


def child(raw: dict[str, Any], steps: int) -> None:
    """One measured run (this process, or one rank of a torchrun); rank 0 prints a JSON line."""
    import torch

    info = init_distributed()
    keep_freed_memory()  # as `loopmoe train` does on a CPU (a no-op in the memory runs: MEMORY_ENV is set)
    cfg, vocab = _child_config(raw, steps, info.world_size)
    baseline = _rss_kib("RssAnon")
    trainer = common.config_trainer(cfg, vocab, info)
    batches = common.random_batches(cfg, vocab, seed=1000 + info.rank)
    for _ in range(WARMUP):
        trainer.train_step(batches)
    # Peak = anonymous memory held between steps over the pre-model baseline (parameters, optimizer
    # state) + the largest growth of resident memory within a timed step (activations, gradients, the
    # guard's copy). Code pages the first steps paged in are file-backed, not counted.
    steady = _rss_kib("RssAnon") - baseline
    Path("/proc/self/clear_refs").write_text("5")  # restart the high-water mark
    resident = _rss_kib("VmRSS")
    times, tokens = [], 0
    for _ in range(steps):
        t0 = time.perf_counter()
        out = trainer.train_step(batches)
        times.append(time.perf_counter() - t0)
        tokens = out.tokens
    peak = torch.tensor(float(steady + _rss_kib("VmHWM") - resident) * 1024)
    step = torch.tensor(statistics.median(times))
    if info.distributed:  # the largest rank's peak and the slowest rank's step
        import torch.distributed as dist

        dist.all_reduce(peak, op=dist.ReduceOp.MAX)
        dist.all_reduce(step, op=dist.ReduceOp.MAX)
    all_reduce_sum_(torch.zeros(()))
    if info.is_main:
        print(
            json.dumps(
                {
                    "tokens_per_s": tokens / step.item(),
                    "step_s": step.item(),
                    "peak_bytes": peak.item(),
                    "step_times": times,
                    "threads": torch.get_num_threads(),
                }
            )
        )
    teardown_distributed()


GEMM_OPS = ("aten::mm", "aten::addmm", "aten::addmm_", "aten::bmm", "aten::baddbmm", "aten::addbmm")
# The update after backward, as the planner's optimizer part counts it: gradient clipping, the update guard and
# AdamW (torch's own record_function around every optimizer's step; the trainer's two methods are wrapped here).
UPDATE_EVENTS = ("Optimizer.step#", "plan_vs_measured.update.")


def child_profile(raw: dict[str, Any], steps: int) -> None:
    """One process: the median step unprofiled, then ``steps`` steps under ``torch.profiler`` split into the
    planner's parts (seconds per step); prints a JSON line."""
    import torch
    from torch.profiler import profile

    keep_freed_memory()
    cfg, vocab = _child_config(raw, 2 * steps, world_size=1)  # timed, then profiled
    trainer = common.config_trainer(cfg, vocab, init_distributed())
    for method in ("_clip", "_guarded_step"):
        setattr(trainer, method, _recorded(f"{UPDATE_EVENTS[1]}{method.strip('_')}", getattr(trainer, method)))
    batches = common.random_batches(cfg, vocab, seed=1000)
    for _ in range(WARMUP):
        trainer.train_step(batches)
    times = []
    for _ in range(steps):
        t0 = time.perf_counter()
        trainer.train_step(batches)
        times.append(time.perf_counter() - t0)
    with profile() as prof:
        for _ in range(steps):
            trainer.train_step(batches)
    parts = {"gemm": 0.0, "attention": 0.0, "optimizer": 0.0, "other ops": 0.0}
    for event in prof.events():
        in_update = False  # inside an update region counted already
        parent = event.cpu_parent
        while parent is not None and not in_update:
            in_update = parent.key.startswith(UPDATE_EVENTS)
            parent = parent.cpu_parent
        if in_update:
            continue
        if event.key.startswith(UPDATE_EVENTS):
            parts["optimizer"] += event.cpu_time_total
        elif event.key in GEMM_OPS:
            parts["gemm"] += event.self_cpu_time_total
        elif "scaled_dot_product" in event.key:
            parts["attention"] += event.self_cpu_time_total
        elif event.key.startswith(("aten::", "loopmoe::")):
            parts["other ops"] += event.self_cpu_time_total
    step = statistics.median(times)
    measured = {k: v / 1e6 / steps for k, v in parts.items()}
    # element-wise work and framework overhead: the step outside GEMMs, attention and the optimizer (the other
    # ops' own time is a part of it, measured with the profiler's per-op cost; the remainder runs between ops)
    measured["rest"] = step - measured["gemm"] - measured["attention"] - measured["optimizer"]
    print(json.dumps({"step_s": step, "parts": measured, "threads": torch.get_num_threads()}))
    teardown_distributed()


def _recorded(name: str, fn):
    """``fn`` inside a profiler region called ``name``."""
    from torch.profiler import record_function

    def wrapped(*args, **kwargs):
        with record_function(name):
            return fn(*args, **kwargs)

    return wrapped


def profile_configs(names: list[str], steps: int) -> dict:
    """``child_profile`` of each named single-process configuration, beside its prediction's parts."""
    from loopmoe.planning.calibration import cpu_profile

    cases = configs()
    wrong = [n for n in names if n not in cases or cases[n].processes != 1]
    if wrong:
        single = ", ".join(n for n, c in cases.items() if c.processes == 1)
        raise ConfigError(f"--profile: {', '.join(wrong)} is not a single-process configuration; choose from {single}")
    rows = []
    for name in names:
        procs, raw, _ = cases[name]
        measured = _child_run(procs, raw, steps, {}, mode="--child-profile")
        predicted = predict(procs, raw, lambda t: cpu_profile(t))
        c = predicted["compute"]
        parts = {
            "gemm": c["gemm"],
            "attention": c["attention"],
            "optimizer": c["optimizer"],
            "rest": c["elementwise"] + c["overhead"],
        }
        predicted_parts = {"step_s": c["total"], "parts": parts, "rest_split": (c["elementwise"], c["overhead"])}
        rows.append({"name": name, "measured": measured, "predicted": predicted_parts})
        print(f"{name}: measured {measured['step_s'] * 1e3:.1f} ms, predicted {c['total'] * 1e3:.1f} ms", flush=True)
    return {"rows": rows, "steps": steps, "machine": common.machine()}


def profile_table(res: dict) -> str:
    head = ["config", "part", "measured ms", "predicted ms", "predicted / measured"]
    rows = []
    for r in res["rows"]:
        m, p = r["measured"], r["predicted"]
        for part in ("gemm", "attention", "optimizer", "rest", "step"):
            mv = m["step_s"] if part == "step" else m["parts"][part]
            pv = p["step_s"] if part == "step" else p["parts"][part]
            rows.append([r["name"], part, f"{mv * 1e3:.1f}", f"{pv * 1e3:.1f}", f"{pv / mv:.2f}" if mv > 0 else "-"])
            if part == "rest":
                other, (elementwise, overhead) = m["parts"]["other ops"], p["rest_split"]
                rows.append(
                    [
                        r["name"],
                        "  rest: ops' own time / element-wise",
                        f"{other * 1e3:.1f}",
                        f"{elementwise * 1e3:.1f}",
                        "",
                    ]
                )
                rows.append(
                    [
                        r["name"],
                        "  rest: between ops / overhead",
                        f"{(mv - other) * 1e3:.1f}",
                        f"{overhead * 1e3:.1f}",
                        "",
                    ]
                )
    return markdown_table(head, rows)


def _child_run(procs: int, raw: dict[str, Any], steps: int, extra_env: dict[str, str], mode: str = "--child") -> dict:
    """The JSON line a child prints: a measured run (``--child``) or a profiled one (``--child-profile``)."""
    args = [mode, json.dumps(raw), "--steps", str(steps)]
    env = {**os.environ, "PYTHONPATH": str(common.ROOT), **extra_env}
    env["OMP_NUM_THREADS"] = str(max(1, (os.cpu_count() or 1) // procs))
    if procs == 1:
        cmd = [sys.executable, "-m", "bench.plan_vs_measured", *args]
    else:
        cmd = [
            sys.executable,
            "-m",
            "torch.distributed.run",
            f"--nproc_per_node={procs}",
            "--standalone",
            "-m",
            "bench.plan_vs_measured",
            *args,
        ]
    out = subprocess.run(cmd, cwd=common.ROOT, env=env, check=True, capture_output=True, text=True).stdout
    return json.loads(out.strip().splitlines()[-1])


def measure(procs: int, raw: dict[str, Any], steps: int, repeats: int = REPEATS) -> dict:
    """tokens/s from the fastest of ``repeats`` runs as `loopmoe train` runs, peak memory from a run
    with ``MEMORY_ENV``."""
    timed = sorted((_child_run(procs, raw, steps, {}) for _ in range(repeats)), key=lambda r: r["step_s"])
    chosen = timed[0]
    memory = _child_run(procs, raw, MEMORY_STEPS, MEMORY_ENV)
    return {
        **chosen,
        "step_s_runs": [r["step_s"] for r in timed],
        "peak_bytes": memory["peak_bytes"],
        "peak_bytes_timed_run": chosen["peak_bytes"],
    }


def predict(procs: int, raw: dict[str, Any], hw_by_threads) -> dict:
    cfg = config_from_dict(raw).validate(procs)
    layout = Layout.from_run_config(cfg, procs, "cpu")
    plan = plan_step(build_model_config(cfg, planned_vocab_size(cfg)[0]), layout, hw_by_threads(layout.threads))
    return plan.as_dict()


def run(quick: bool, steps: int, only: list[str] | None) -> dict:
    cases = configs()
    unknown = [name for name in only or () if name not in cases]
    if unknown:  # before calibrating: a typo would otherwise cost the calibration and measure nothing
        raise ConfigError(f"--only: no configuration {', '.join(unknown)}; choose from {', '.join(cases)}")
    cores = os.cpu_count() or 1
    t0 = time.perf_counter()
    calibration = calibrate_cpu(sorted({1, cores}), quick=quick)
    calibration_s = time.perf_counter() - t0
    chosen = {k: v for k, v in cases.items() if not only or k in only}
    rows = []
    for name, (procs, raw, source) in chosen.items():
        measured = measure(procs, raw, steps)
        predicted = predict(procs, raw, lambda t: cpu_from_calibration(calibration, t))
        row = {
            "name": name,
            "processes": procs,
            **source,
            "measured": measured,
            "predicted": predicted,
            "time_error": predicted["tokens_per_s"] / measured["tokens_per_s"] - 1,
            "memory_error": predicted["peak_memory_bytes"] / measured["peak_bytes"] - 1,
        }
        rows.append(row)
        print(
            f"{name}: measured {measured['tokens_per_s']:.0f} tok/s {measured['peak_bytes'] / 2**20:.1f} MiB, predicted "
            f"{predicted['tokens_per_s']:.0f} tok/s {predicted['peak_memory_bytes'] / 2**20:.1f} MiB",
            flush=True,
        )
    summary = {}
    for kind in ("time_error", "memory_error"):
        errs = [abs(r[kind]) for r in rows]
        summary[kind] = {
            "median_abs": statistics.median(errs),
            "max_abs": max(errs),
            "within_30": sum(e <= 0.30 for e in errs),
            "n": len(errs),
        }
    return {
        "rows": rows,
        "summary": summary,
        "calibration": calibration,
        "calibration_s": calibration_s,
        "steps": steps,
        "warmup": WARMUP,
        "quick": quick,
        "expert_parallel": _has_ep(),
    }


def table(res: dict) -> str:
    return markdown_table(
        [
            "config",
            "procs",
            "tok/s measured",
            "tok/s predicted",
            "error",
            "peak MiB measured",
            "peak MiB predicted",
            "error",
        ],
        [
            [
                r["name"],
                r["processes"],
                f"{r['measured']['tokens_per_s']:,.0f}",
                f"{r['predicted']['tokens_per_s']:,.0f}",
                f"{100 * r['time_error']:+.0f}%",
                f"{r['measured']['peak_bytes'] / 2**20:.1f}",
                f"{r['predicted']['peak_memory_bytes'] / 2**20:.1f}",
                f"{100 * r['memory_error']:+.0f}%",
            ]
            for r in res["rows"]
        ],
    )


def main(argv=None) -> dict | None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="quick calibration, 8 timed steps, a subset of configs")
    ap.add_argument("--steps", type=int, default=None, help="timed steps per configuration (default 30, quick 8)")
    ap.add_argument("--only", default=None, help="comma-separated configuration names")
    ap.add_argument("--profile", default=None, help="split these single-process configurations' steps by part")
    ap.add_argument("--child", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--child-profile", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    steps = args.steps or (8 if args.quick else 30)
    if args.child is not None:
        child(json.loads(args.child), steps)
        return None
    if args.child_profile is not None:
        child_profile(json.loads(args.child_profile), steps)
        return None
    if args.profile is not None:
        profiled = profile_configs(args.profile.split(","), steps)
        print(profile_table(profiled))
        common.write_json("plan_profile", profiled)
        return profiled
    only = (
        args.only.split(",")
        if args.only
        else (["vanilla", "T2", "debug_T2", "T2_wide_ac_full", "T2_ddp2", "T2_fsdp2"] if args.quick else None)
    )
    res = run(args.quick, steps, only)
    print(table(res))
    for kind, s in res["summary"].items():
        print(
            f"{kind}: median |error| {100 * s['median_abs']:.1f}%, max {100 * s['max_abs']:.1f}%, "
            f"{s['within_30']}/{s['n']} within 30%"
        )
    common.write_json("plan_vs_measured", res)
    # What `loopmoe plan` states with its predictions on this machine: the calibration these runs were
    # predicted with, and their errors (loopmoe.planning.validation).
    save_calibration(res["calibration"])
    runs = {r["name"]: r["measured"]["step_s_runs"] for r in res["rows"]}
    where = save_validation(
        {r["name"]: r["time_error"] for r in res["rows"]},
        time.strftime("%Y-%m-%d"),
        {name: max(steps) / min(steps) - 1 for name, steps in runs.items()},
    )
    print(f"calibration and errors saved for `loopmoe plan` on this machine ({where})")
    return res


if __name__ == "__main__":
    main()
