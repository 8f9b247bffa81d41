"""Measuring this machine: the ``cpu`` profile's calibration, gloo's α–β included, cached per machine;
and ``get_hardware``, which returns any profile by name (``cpu``: calibrated once, then read from
the cache).

Per thread count (``calibrate_cpu``): the matmul rate at several sizes, the SDPA rate, memory
bandwidth, the extra cost of transcendental math, and the rate of a training step's element-wise
ops and the framework's cost per op, both fitted on real training steps (``fit_step_costs``).
Measure under the conditions the predictions are for: other processes competing for the cores
slow every number here, and a prediction is only as good as its calibration.

The α–β of gloo collectives between two local processes (the CPU profile's links), and FSDP2's own
cost per collective (``measure_gloo``). Two processes are spawned with a file-store gloo group; each
collective is timed at sizes from 1 KiB to 16 MiB and ``t = α + bytes_on_the_wire / β`` is fitted by
least squares, where the bytes on the wire are the ring algorithm's (``comm.wire_bytes``), so the
same β serves every collective. FSDP2 spends time of its own around each all-gather and
reduce-scatter (its forward and backward hooks, the copy-in and copy-out of the flat buffers), which
neither the collective nor the model's ops include: one process (a group of one, so the collectives
move nothing) times a tiny model's training step with and without ``fully_shard`` and divides the
difference by the FSDP2 collectives of that step (``comm.plan_comm``'s count).
"""

from __future__ import annotations

import json
import math
import os
import platform
import statistics
import tempfile
import time
from collections.abc import Callable
from functools import partial
from pathlib import Path
from typing import Any

import torch

from loopmoe.atomic import atomic_write_text
from loopmoe.config import LoopMoEConfig
from loopmoe.distributed import apply_fsdp2, build_mesh
from loopmoe.distributed.config import DistStrategy
from loopmoe.errors import ConfigError
from loopmoe.planning.comm import plan_comm, wire_bytes
from loopmoe.planning.cost import plan_compute
from loopmoe.planning.hardware import (
    HARDWARE_NAMES,
    PROFILES,
    Hardware,
    attention_flops,
    cpu_from_calibration,
    with_overrides,
)
from loopmoe.planning.kernel_timing import median_time, torch_threads
from loopmoe.planning.layout import Layout
from loopmoe.planning.trace import TINY, step_trainer, tiny_trainer
from loopmoe.text import suggest

GIB = 2**30


def get_hardware(name: str, threads: int | None = None, calibrate: bool = True) -> Hardware:
    """The profile ``name``; ``cpu`` is this machine's, calibrated once and cached (``threads``:
    intra-op threads per process, default all cores)."""
    if name == "cpu":
        return cpu_profile(threads, calibrate=calibrate)
    if name not in PROFILES:
        hint = suggest(name, HARDWARE_NAMES) or f"choose one of {', '.join(HARDWARE_NAMES)}"
        raise ConfigError(f"unknown hardware {name!r}: {hint}")
    return PROFILES[name]


# --- the CPU profile: measured on this machine ------------------------------------------------------


def cache_path() -> Path:
    """Where the CPU calibration is cached ($LOOPMOE_CACHE_DIR or ~/.cache/loopmoe), one per machine."""
    root = Path(os.environ.get("LOOPMOE_CACHE_DIR") or Path.home() / ".cache" / "loopmoe")
    host = f"{platform.node()}-{os.cpu_count()}cpu".replace("/", "_")
    return root / f"hardware-cpu-{host}.json"


def cpu_profile(threads: int | None = None, calibrate: bool = True, refresh: bool = False) -> Hardware:
    """This machine as a ``Hardware``, at ``threads`` intra-op threads per process.

    The calibration (``calibrate_cpu``) runs once and is cached in ``cache_path()``; ``refresh``
    measures again (do so when the machine was busy the first time, or changed).
    """
    cores = os.cpu_count() or 1
    threads = threads or cores
    path = cache_path()
    if path.exists() and not path.is_file():  # checked first: a calibration takes a minute, then could not be saved
        raise ConfigError(
            f"the CPU calibration cache {path} is not a file: remove it, or set LOOPMOE_CACHE_DIR to another folder"
        )
    data, why = (None, "refresh asks for a new calibration") if refresh else _cached_calibration(path, threads)
    if data is None:
        if not calibrate:
            raise ConfigError(f"{why}: run `loopmoe plan --calibrate` (about a minute) or pass a GPU --hardware")
        data = calibrate_cpu(sorted({1, threads, cores}))
        save_calibration(data, path)
    return cpu_from_calibration(data, threads)


def _cached_calibration(path: Path, threads: int) -> tuple[dict | None, str]:
    """The cached calibration if it serves ``threads``, else None and why not."""
    try:
        data = json.loads(path.read_text())
        version, measured = data.get("version"), data["threads"]
    except FileNotFoundError:
        return None, f"no CPU calibration in {path}"
    except (OSError, ValueError, AttributeError, KeyError, TypeError):  # torn or edited by hand
        return None, f"the CPU calibration in {path} is unreadable"
    if version != CALIBRATION_VERSION:  # an older procedure: its numbers mean something else now
        return None, f"the CPU calibration in {path} is outdated (version {version}, now {CALIBRATION_VERSION})"
    if not isinstance(measured, dict) or str(threads) not in measured:
        return None, f"the CPU calibration in {path} has no entry for {threads} threads"
    if problem := calibration_problem(data, threads):
        return None, f"the CPU calibration in {path} holds an invalid value ({problem})"
    here = machine()
    if changed := [f"{k} {data.get(k)!r} -> {v!r}" for k, v in here.items() if data.get(k) != v]:
        return None, f"the CPU calibration in {path} was measured on another machine or torch ({', '.join(changed)})"
    return data, ""


def machine() -> dict[str, object]:
    """What a calibration is valid for: the CPU model, the instruction set torch's kernels use (AVX2,
    AVX512, AMX-capable AVX512 take different oneDNN/MKL paths), the core count and torch's version. A
    cache whose record differs is measured again: one machine's rates never serve another's plans, even
    where both have the same host name (containers often do)."""
    return {
        "cpu": _cpu_name(),
        "isa": torch.backends.cpu.get_cpu_capability(),
        "cores": os.cpu_count() or 1,
        "torch": torch.__version__,
    }


def finite_number(value: object) -> bool:
    """A finite int or float, not a bool (JSON files edited by hand, or holding NaN, are read back here)."""
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def calibration_problem(data: dict, threads: int) -> str | None:
    """What makes a calibration unusable at ``threads`` (a missing field, a wrong type, a rate that is
    not a positive finite number, a negative cost), or None: checked on every read, since the cache
    is a file anyone can edit and a NaN would otherwise reach every prediction."""

    def positive(value) -> bool:
        return finite_number(value) and value > 0

    def non_negative(value) -> bool:
        return finite_number(value) and value >= 0

    per = data["threads"][str(threads)]
    if not isinstance(per, dict):
        return f"threads.{threads} is not a table"
    gemm = per.get("gemm")
    if not isinstance(gemm, list) or not gemm:
        return f"threads.{threads}.gemm is not a non-empty list of [size, rate]"
    for point in gemm:
        if not (isinstance(point, list) and len(point) == 2 and positive(point[0]) and positive(point[1])):
            return f"threads.{threads}.gemm holds {point!r}, not [size, rate] with positive finite numbers"
    for key, check in (
        ("memory_bandwidth", positive),
        ("elementwise_bandwidth", positive),
        ("attention_rate", positive),
        ("op_overhead_s", non_negative),
        ("transcendental_s", non_negative),
    ):
        if (key in per or key != "transcendental_s") and not check(per.get(key)):
            return f"threads.{threads}.{key} = {per.get(key)!r}"
    if not positive(data.get("memory_bytes")) or not positive(data.get("cores")):
        return f"memory_bytes = {data.get('memory_bytes')!r}, cores = {data.get('cores')!r}"
    if not isinstance(data.get("cpu"), str) or not isinstance(data.get("when"), str):
        return "cpu and when must be text"
    gloo = data.get("gloo") or {}
    if not isinstance(gloo, dict):
        return "gloo is not a table"
    for key in ("bandwidth",):
        if key in gloo and not positive(gloo[key]):
            return f"gloo.{key} = {gloo[key]!r}"
    for key in ("latency_s", "fsdp2_call_overhead_s"):
        if key in gloo and not non_negative(gloo[key]):
            return f"gloo.{key} = {gloo[key]!r}"
    return None


def save_calibration(data: dict, path: Path | None = None) -> Path:
    path = path or cache_path()
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(path, json.dumps(data, indent=2))
    return path


GEMM_SIZES = (16, 32, 64, 128, 256, 512, 1024)
# Bumped when the calibration measures something differently: a cached one of another version is
# measured again (2: per-op cost from a training step, transcendental cost; 3: FSDP2's cost per call;
# 4: element-wise bandwidth and per-op cost fitted on training steps).
CALIBRATION_VERSION = 4


def _calibrate_threads(threads: int, quick: bool) -> dict:
    """Matmul rate by size, SDPA rate, memory bandwidth, transcendental math, and the element-wise rate
    and per-op cost of a training step at ``threads``."""

    with torch_threads(threads):
        reps = 3 if quick else 5
        gemm = []
        for n in GEMM_SIZES:
            # Training GEMMs are long and thin ([tokens, d] @ [d, f]): time M = 8n rows (capped) by n x n
            # weights, and key the rate by the cube-root size the cost model looks up.
            m = min(8 * n, 4096)
            a, b = torch.randn(m, n), torch.randn(n, n)
            out = torch.empty(m, n)
            t = median_time(lambda a=a, b=b, out=out: torch.mm(a, b, out=out), reps)
            gemm.append(((m * n * n) ** (1 / 3), 2 * m * n * n / t))
        # Memory bandwidth: a copy far larger than the caches (read + write).
        big = torch.empty(64 * 2**20 // 4)
        dst = torch.empty_like(big)
        t = median_time(lambda: dst.copy_(big), reps)
        bandwidth = 2 * big.numel() * 4 / t
        # Fused attention (SDPA, causal), forward + backward, rated over the full S x S score FLOPs
        # (the budget's convention; the rate for accelerator-style use of this profile: the planner
        # itself times each attention shape it needs, ``measured_attention_seconds``).
        B, H, S, hd = 4, 4, 256, 32
        q, k, v = (torch.randn(B, H, S, hd, requires_grad=True) for _ in range(3))

        def attn():
            torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True).sum().backward()

        t = median_time(attn, reps)
        attention_rate = (attention_flops((B, H, S, hd), False) + attention_flops((B, H, S, hd), True)) / t
        # Transcendental math: a log-softmax over a large [rows, vocab] block (the LM loss's), beyond
        # what streaming its bytes costs.
        logits = torch.randn(1024, 2048)
        t = median_time(lambda: torch.log_softmax(logits, dim=-1), reps)
        transcendental_s = max(0.0, (t - 2 * logits.numel() * 4 / bandwidth) / logits.numel())
        per = {
            "gemm": gemm,
            "memory_bandwidth": bandwidth,
            "attention_rate": attention_rate,
            "transcendental_s": transcendental_s,
        }
        return {**per, **fit_step_costs(per, threads, reps)}


# Real training steps the element-wise rate and the per-op cost are fitted on (``fit_step_costs``):
# (name, model config over the tiny one, micro-batch, sequence length), from a step almost all framework
# overhead (the tiny model) to ones whose activations fill the L2 and the L3 cache. Not the validation
# bench's configurations (``bench.plan_vs_measured``), so that bench checks the fit, not reproduces it.
FIT_STEPS: tuple[tuple[str, dict, int, int], ...] = (
    ("tiny", {"num_core_layers": 2}, 2, 16),
    (
        "d96_T2",
        {
            "vocab_size": 1024,
            "hidden_size": 96,
            "num_attention_heads": 4,
            "num_key_value_heads": 2,
            "head_dim": 24,
            "num_experts": 8,
            "moe_intermediate_size": 96,
            "max_position_embeddings": 128,
            "iter_cond_rank": 16,
            "iter_pe_dim": 16,
            "num_core_layers": 2,
            "num_loops": 2,
        },
        4,
        128,
    ),
    (
        "d192",
        {
            "vocab_size": 2048,
            "hidden_size": 192,
            "num_attention_heads": 6,
            "num_key_value_heads": 2,
            "head_dim": 32,
            "num_experts": 8,
            "moe_intermediate_size": 192,
            "max_position_embeddings": 256,
            "num_core_layers": 2,
        },
        4,
        256,
    ),
)


def fit_step_costs(per: dict, threads: int, reps: int) -> dict:
    """The element-wise bandwidth and the per-op cost, fitted on real training steps (``FIT_STEPS``).

    Neither is what a micro-benchmark measures: inside a step, reductions, norms, gathers and
    scatters stream well below a large copy's rate, tensors that fit a cache stream above it, and an
    op's fixed cost (dispatch, autograd, allocation, the model's Python) depends on what runs around
    it. So each step is timed, the parts the planner measures directly (GEMMs and attention at their
    shapes, transcendental math, the optimizer's bytes) are subtracted, and what is left,
    ``bytes / bandwidth + ops x cost``, is fitted by least squares on relative error over the steps
    (``bytes`` and ``ops`` from the planner's own trace, so the fit serves its cost model as it is).
    Returns ``elementwise_bandwidth``, ``op_overhead_s`` and the fit's record (``step_fit``).
    """
    hw = cpu_from_calibration(
        {
            "threads": {str(threads): {**per, "op_overhead_s": 0.0, "elementwise_bandwidth": None}},
            "cpu": "",
            "when": "",
            "memory_bytes": _memory_bytes(),
            "cores": os.cpu_count() or 1,
        },
        threads,
    )
    rows: list[dict[str, Any]] = []
    for name, changes, batch, seq in FIT_STEPS:
        model, trainer, ids = step_trainer(LoopMoEConfig(**{**TINY, **changes}), batch, seq)
        with torch_threads(threads):  # the steps at the thread count the planner times their kernels at
            step_s = median_time(lambda trainer=trainer, ids=ids: trainer.train_step(iter([ids])), reps)
        lay = Layout(micro_batch=batch, seq_len=seq, threads=threads)

        def total(hw: Hardware, cfg=model.config, lay=lay) -> float:
            return plan_compute(cfg, lay, hw).total

        fixed = total(with_overrides(hw, elementwise_bandwidth=math.inf))
        rows.append(
            {
                "name": name,
                "step_s": step_s,
                "fixed_s": fixed,  # GEMMs, attention, transcendental math, the optimizer's bytes
                "bytes": total(with_overrides(hw, elementwise_bandwidth=1.0)) - fixed,
                "ops": total(with_overrides(hw, elementwise_bandwidth=math.inf, op_overhead_s=1.0)) - fixed,
            }
        )
    per_byte, per_op = _fit_nonnegative(
        [(r["bytes"] / r["step_s"], r["ops"] / r["step_s"]) for r in rows],
        [max(0.0, r["step_s"] - r["fixed_s"]) / r["step_s"] for r in rows],
    )
    for r in rows:
        r["fitted_s"] = r["fixed_s"] + r["bytes"] * per_byte + r["ops"] * per_op
    check_step_fit(rows, per_byte, per_op)
    return {
        "elementwise_bandwidth": 1.0 / per_byte,
        "op_overhead_s": per_op,
        "step_fit": rows,
    }


# How far a fitted step may miss its measured time before the fit is refused (on a quiet 2-core VM the
# three steps came within 2.5-6.6%; a busy machine's steps do not share one rate and one per-op cost).
FIT_TOLERANCE = 0.5


def check_step_fit(rows: list[dict[str, Any]], per_byte: float, per_op: float) -> None:
    """Refuse a fit that cannot describe the steps: a rate or a cost driven to zero (every step's time
    explained by the other term alone), or a step missed by more than ``FIT_TOLERANCE``."""
    worst = max(abs(r["fitted_s"] / r["step_s"] - 1) for r in rows)
    if per_byte <= 0 or per_op <= 0 or worst > FIT_TOLERANCE:
        raise ConfigError(
            f"the CPU calibration's training steps do not fit one element-wise rate and per-op cost (worst step "
            f"off by {worst:.0%}, {per_byte:.3g} s/byte, {per_op:.3g} s/op): the machine was probably busy; run "
            "`loopmoe plan --calibrate` again when nothing else is running"
        )


def _fit_nonnegative(rows: list[tuple[float, float]], targets: list[float]) -> tuple[float, float]:
    """Least squares ``targets ≈ a x + b y`` over ``rows`` of ``(a, b)``, with ``x, y >= 0`` (the
    unconstrained solution where it is non-negative, else the better one-variable fit)."""
    saa = sum(a * a for a, _ in rows)
    sbb = sum(b * b for _, b in rows)
    sab = sum(a * b for a, b in rows)
    sat = sum(a * t for (a, _), t in zip(rows, targets))
    sbt = sum(b * t for (_, b), t in zip(rows, targets))
    det = saa * sbb - sab * sab
    if det > 0:
        x, y = (sat * sbb - sbt * sab) / det, (sbt * saa - sat * sab) / det
        if x >= 0 and y >= 0:
            return x, y
    candidates = [(max(0.0, sat / saa) if saa else 0.0, 0.0), (0.0, max(0.0, sbt / sbb) if sbb else 0.0)]

    def error(c: tuple[float, float]) -> float:
        return sum((t - a * c[0] - b * c[1]) ** 2 for (a, b), t in zip(rows, targets))

    return min(candidates, key=error)


def calibrate_cpu(threads: list[int] | None = None, quick: bool = False, gloo: bool = True) -> dict:
    """Measure this machine: per thread count, matmul rate at several sizes, SDPA rate, memory
    bandwidth and op overhead; and the gloo collective α–β between two local processes.

    Measure under the conditions the predictions are for: other processes competing for the cores
    slow every number here, and a prediction is only as good as its calibration.
    """
    cores = os.cpu_count() or 1
    threads = threads or sorted({1, cores})
    data = {
        "version": CALIBRATION_VERSION,
        **machine(),
        "memory_bytes": _memory_bytes(),
        "when": time.strftime("%Y-%m-%d %H:%M"),
        "threads": {str(t): _calibrate_threads(t, quick) for t in threads},
    }
    if gloo and cores >= 2:
        data["gloo"] = measure_gloo(quick=quick)
    return data


def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "cpu"


def _memory_bytes() -> float:
    try:
        return float(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES"))
    except (ValueError, OSError):
        return 16 * GIB


# --- gloo collectives and FSDP2's own cost ------------------------------------------------------------

SIZES = (2**10, 2**14, 2**18, 2**20, 2**22, 2**24)


def _worker(rank: int, world: int, init_file: str, out: str, quick: bool) -> None:
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
        Path(out).write_text(json.dumps(results))
    dist.destroy_process_group()


def _fsdp_worker(rank: int, init_file: str, out: str, quick: bool) -> None:
    import torch.distributed as dist

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
    import torch.multiprocessing as mp

    with tempfile.TemporaryDirectory() as tmp:
        out = str(Path(tmp) / "fsdp.json")
        mp.start_processes(_fsdp_worker, args=(str(Path(tmp) / "init"), out, quick), nprocs=1, start_method="spawn")
        times = json.loads(Path(out).read_text())
    model, _, ids = tiny_trainer(2)
    lay = Layout(devices=2, strategy=DistStrategy.FSDP2, micro_batch=ids.shape[0], seq_len=ids.shape[1])
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
    import torch.multiprocessing as mp

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
