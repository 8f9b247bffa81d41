"""Shared helpers of the benchmark scripts: timing on a busy machine, tables, I/O.

Timing follows ``shared/bench/hf_qwen3moe_reference.py``: a run only counts when the rest of the
machine used < 8% of the cores during it (other processes may share the cores), ours and
the reference are timed *interleaved* in one process (A B A B ...), and we report the median with
the min/max of the accepted runs. The reference models and the parity checks run before timing
come from ``loopmoe.testing.hf_parity`` (shared with the tests).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

from loopmoe.atomic import atomic_write_text

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "bench" / "results"
DOCS = ROOT / "docs"

BUSY_LIMIT = 0.08  # fraction of the machine other processes may use during an accepted run


def quick_flag(doc: str, argv=None) -> bool:
    """The ``--quick`` flag of a bench whose only option it is (its module docstring's first line is the help)."""
    ap = argparse.ArgumentParser(description=doc.splitlines()[0])
    ap.add_argument("--quick", action="store_true")
    return ap.parse_args(argv).quick


def setup(threads: int = 2) -> None:
    torch.set_num_threads(threads)
    torch.manual_seed(0)


def busy():
    """(machine busy jiffies, own jiffies, time): detects other processes stealing the cores."""
    with open("/proc/stat") as f:
        v = list(map(int, f.readline().split()[1:]))
    with open("/proc/self/stat") as f:
        s = f.read().rsplit(")", 1)[1].split()
    return sum(v) - v[3] - v[4], int(s[11]) + int(s[12]), time.perf_counter()


def timed(fn) -> tuple[float, float]:
    """Run fn once; return (wall seconds, fraction of the machine used by others meanwhile)."""
    hz, ncpu = os.sysconf("SC_CLK_TCK"), os.cpu_count()
    a = busy()
    fn()
    b = busy()
    wall = b[2] - a[2]
    other = ((b[0] - a[0]) - (b[1] - a[1])) / (hz * ncpu * wall)
    return wall, other


def interleaved(fns: dict, reps: int = 5, tries: int = 20, warmup: int = 1, budget_s: float | None = None) -> dict:
    """Time several callables A B C A B C ... until each has ``reps`` quiet runs (or ``tries`` rounds,
    or ``budget_s`` seconds after the first complete round: keeps --quick bounded on a busy machine).

    Returns {name: {"median", "min", "max", "n", "rejected"}} in seconds. When the machine never
    gets quiet, the least-disturbed runs are kept (and ``rejected`` says so) rather than nothing.
    """
    for fn in fns.values():
        for _ in range(warmup):
            fn()
    ok = {k: [] for k in fns}
    noisy = {k: [] for k in fns}
    rounds = {k: {} for k in fns}  # round -> wall of the quiet runs, for ratios within one round
    start = time.perf_counter()
    for r in range(tries):
        for name, fn in fns.items():
            if len(ok[name]) >= reps:
                continue
            wall, other = timed(fn)
            (ok if other < BUSY_LIMIT else noisy)[name].append((wall, other))
            if other < BUSY_LIMIT:
                rounds[name][r] = wall
        if all(len(v) >= reps for v in ok.values()):
            break
        if budget_s is not None and time.perf_counter() - start > budget_s:
            break
    out = {}
    for name in fns:
        runs = [w for w, _ in ok[name]]
        if len(runs) < 2:  # machine never quiet: keep the least-disturbed runs, flagged
            runs += [w for w, _ in sorted(noisy[name], key=lambda t: t[1])[: max(0, 3 - len(runs))]]
        out[name] = {
            "median": statistics.median(runs),
            "min": min(runs),
            "max": max(runs),
            "n": len(ok[name]),
            "rejected": len(noisy[name]),
            "rounds": rounds[name],
        }
    return out


def speedup(stats: dict, name: str, baseline: str) -> dict:
    """How many times faster ``name`` ran than ``baseline``: the median over the rounds in which both
    had a quiet run of ``baseline time / name time`` (paired ratios cancel the machine's slow drifts),
    with its min and max; the ratio of medians when no round has both."""
    a, b = stats[name].get("rounds", {}), stats[baseline].get("rounds", {})
    ratios = [b[r] / a[r] for r in a if r in b]
    if not ratios:
        ratios = [stats[baseline]["median"] / stats[name]["median"]]
    return {"median": statistics.median(ratios), "min": min(ratios), "max": max(ratios), "pairs": len(ratios)}


def fmt_speedup(s: dict) -> str:
    return f"{s['median']:.2f}x [{s['min']:.2f}-{s['max']:.2f}]"


def machine() -> dict:
    return {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "transformers": __import__("transformers").__version__,
        "threads": torch.get_num_threads(),
        "cpu": _cpu_name(),
        "isa": torch.backends.cpu.get_cpu_capability(),  # the kernels torch picks (AVX2, AVX512, ...)
        "cores": os.cpu_count(),
    }


def _cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor()


def write_json(name: str, payload: dict) -> Path:
    RESULTS.mkdir(parents=True, exist_ok=True)
    path = RESULTS / f"{name}.json"
    payload = {"machine": machine(), **payload}
    atomic_write_text(path, json.dumps(payload, indent=2))  # a bench killed mid-write keeps the last results
    return path


def fmt_t(stats: dict, scale: float = 1e3) -> str:
    return f"{stats['median'] * scale:.1f} [{stats['min'] * scale:.1f}-{stats['max'] * scale:.1f}]"


def step_memory(model, ids) -> dict:
    """Peak RSS of one forward+backward on ``ids`` after a first one, and its increase over the RSS
    before it (activations and gradients). Run it in a fresh process (``child_json``): building a
    model peaks higher than a step, and the high-water mark is per process."""
    model(input_ids=ids, labels=ids).loss.backward()  # first step: gradients and allocator pools now exist
    model.zero_grad(set_to_none=True)
    built = _status_kib("VmRSS")
    Path("/proc/self/clear_refs").write_text("5")  # restart the high-water mark
    model(input_ids=ids, labels=ids).loss.backward()
    peak = _status_kib("VmHWM")
    return {
        "rss_before_step_mib": built / 1024,
        "peak_rss_mib": peak / 1024,
        "step_increase_mib": (peak - built) / 1024,
    }


def _status_kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"{field} missing from /proc/self/status (Linux only)")


def child_json(module: str, *args: str) -> dict:
    """Run ``python -m module args`` from the repository root and parse the last line it prints as JSON."""
    out = subprocess.run(
        [sys.executable, "-m", module, *args],
        cwd=ROOT,  # where `bench` and `loopmoe` import from, as for the parent's `python -m`
        check=True,
        capture_output=True,
        text=True,
    ).stdout
    return json.loads(out.strip().splitlines()[-1])


def token_batch(batch: int, seq: int, vocab: int = 8192) -> torch.Tensor:
    """The fixed batch every training benchmark times: the same tokens for every model."""
    import torch

    return torch.randint(2, vocab, (batch, seq), generator=torch.Generator().manual_seed(0))


def compiled_copy(model, ids):
    """A copy of ``model`` with every decoder layer compiled as ``loopmoe train`` compiles it (``train.compile``:
    ``apply_compile``, inductor), in training mode, and the seconds its first forward + backward on ``ids``
    took (the compiling)."""
    import copy

    from loopmoe.distributed.parallelize import apply_compile

    start = time.perf_counter()
    compiled = apply_compile(copy.deepcopy(model).train())
    fwd_bwd(compiled, ids)()  # compiles the forward and backward graphs
    return compiled, time.perf_counter() - start


def fwd_bwd(model, ids):
    """One forward + backward of the LM loss on ``ids``: the unit the training benchmarks time."""

    def step():
        model.zero_grad(set_to_none=True)
        model(input_ids=ids, labels=ids).loss.backward()

    return step


def config_trainer(cfg, vocab: int, info):
    """The trainer `loopmoe train` builds for the RunConfig ``cfg`` (model parallelised as it does),
    seeded by the caller, to time on ``random_batches``."""
    from loopmoe.model import LoopMoEForCausalLM
    from loopmoe.training import build_model_config
    from loopmoe.training.optim import build_optimizer, build_scheduler
    from loopmoe.training.run import parallelize_for, trainer_for

    model = parallelize_for(LoopMoEForCausalLM(build_model_config(cfg, vocab)), cfg, info.device)
    optimizer = build_optimizer(model, cfg)
    return trainer_for(model, optimizer, build_scheduler(optimizer, cfg), cfg, info)


def random_batches(cfg, vocab: int, seed: int):
    """An endless stream of uniform random token batches of ``cfg``'s micro-batch shape."""
    g = torch.Generator().manual_seed(seed)
    shape = (cfg.train.micro_batch_size, cfg.data.seq_len)
    return iter(lambda: torch.randint(0, vocab, shape, generator=g), None)
