"""Hardware profiles: what one device computes, holds and moves per second.

A profile is the handful of numbers the cost model needs (``loopmoe.planning.cost``):

- ``matmul_flops``: dense matmul peak per dtype, and ``gemm_curve``: the achieved fraction of that
  peak against the GEMM's size (small GEMMs, expert groups of a few rows, do not reach peak);
- ``attention_efficiency``: fused attention kernels against the matmul peak;
- ``memory_bandwidth``: element-wise work, optimizer steps and every op too small to be
  compute-bound are charged at this rate (the roofline's other side), and ``transcendental_s``:
  the extra seconds per element of exp / log / softmax / SiLU-family ops (a CPU computes them
  more slowly than it streams; an accelerator does not, 0);
- ``op_overhead_s``: fixed cost per framework op (a kernel launch on a GPU; PyTorch's dispatch,
  autograd bookkeeping and the model's Python on a CPU, which dominates small models there);
- ``memory_bytes`` usable per device;
- links: α (latency per collective step) and β (bytes/s per device) inside a node and across
  nodes, for the α–β collective model (``loopmoe.planning.comm``).

Accelerators come from public spec sheets (sources beside each). The achieved fractions are not
spec-sheet numbers: they are the usual measured ranges for large bf16 GEMMs on those parts
(documented in docs/planning.md), so absolute GPU predictions carry that uncertainty; the CPU
profile is measured (``calibrate_cpu``) and cached, and is what the validation bench checks. On a
CPU the planner also times each GEMM and attention shape it needs on this machine, once per
process (``measure_kernels``), instead of reading the curve: a GEMM's rate depends on its aspect
(a thin ``[N, 64] @ [64, V]`` runs at half the rate of a square one of the same size).
"""

from __future__ import annotations

import contextlib
import functools
import itertools
import json
import math
import os
import platform
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

GIB = 2**30


@dataclass(frozen=True)
class Hardware:
    name: str
    description: str
    matmul_flops: dict[str, float]  # dtype ("fp32", "bf16") -> peak dense matmul FLOP/s
    memory_bandwidth: float  # bytes/s, device memory
    memory_bytes: float  # usable memory per device
    # (GEMM size, fraction of peak) points, size = cube root of M*N*K; interpolated in log(size)
    gemm_curve: tuple[tuple[float, float], ...]
    attention_efficiency: float  # fused attention (SDPA / flash) FLOP rate / matmul peak
    op_overhead_s: float  # fixed seconds per framework op (launch / dispatch)
    intra_node_bandwidth: float  # bytes/s per device per direction inside a node
    inter_node_bandwidth: float  # bytes/s per device across nodes
    latency_s: float  # α: seconds per collective step
    devices_per_node: int
    allocator_overhead: float = 0.05  # fragmentation / caching allocator slack over live bytes
    device_type: str = "cuda"  # which kernels the model picks (loss chunking, expert kernel)
    comm_overlap: float = 0.9  # share of gradient-reduce / weight-gather time that can hide behind compute
    # FSDP2's own work per all-gather / reduce-scatter (hooks, copy-in / copy-out): measured on a CPU;
    # on an accelerator it runs on the host ahead of the kernels and is taken as hidden (0)
    fsdp2_call_overhead_s: float = 0.0
    transcendental_s: float = 0.0  # extra seconds per element of exp / log / softmax / SiLU-family ops
    measure_kernels: bool = False  # time each GEMM / attention shape on this machine (cpu)
    sources: str = ""
    extra: dict = field(default_factory=dict)  # calibration details (cpu)

    def gemm_efficiency(self, m: int, n: int, k: int) -> float:
        """Achieved fraction of the matmul peak for an ``[m, k] @ [k, n]`` GEMM."""
        size = (max(m, 1) * max(n, 1) * max(k, 1)) ** (1 / 3)
        pts = self.gemm_curve
        if size <= pts[0][0]:
            return pts[0][1] * size / pts[0][0]  # below the smallest point: proportional (latency-bound)
        for (s0, e0), (s1, e1) in itertools.pairwise(pts):
            if size <= s1:
                w = (math.log(size) - math.log(s0)) / (math.log(s1) - math.log(s0))
                return e0 + w * (e1 - e0)
        return pts[-1][1]

    def gemm_seconds(self, m: int, n: int, k: int, dtype: str) -> float:
        """Seconds for one ``[m, k] @ [k, n]`` GEMM."""
        if self.measure_kernels:
            return measured_gemm_seconds(m, n, k, self.extra["threads"]) * self.peak("fp32") / self.peak(dtype)
        return 2 * m * n * k / (self.peak(dtype) * self.gemm_efficiency(m, n, k))

    def attention_seconds(self, shape: tuple[int, ...], backward: bool, dtype: str) -> float:
        """Seconds for one causal fused-attention call (forward, or its backward) on queries of
        ``shape = (batch, heads, S, head_dim)``."""
        if self.measure_kernels:
            fwd, both = measured_attention_seconds(tuple(shape), self.extra["threads"])
            return (both - fwd if backward else fwd) * self.peak("fp32") / self.peak(dtype)
        return attention_flops(shape, backward) / (self.peak(dtype) * self.attention_efficiency)

    def peak(self, dtype: str) -> float:
        if dtype not in self.matmul_flops:
            raise ValueError(
                f"hardware {self.name!r} has no {dtype} matmul rate; use one of {sorted(self.matmul_flops)}"
            )
        return self.matmul_flops[dtype]

    def as_dict(self) -> dict:
        return asdict(self)


def attention_flops(shape: tuple[int, ...], backward: bool) -> float:
    """Causal fused attention on queries of ``shape = (batch, heads, S, head_dim)``, counted over the
    full ``S x S`` scores (the budget's convention): ``4 S^2 h_d`` per head and sequence forward,
    2.5x that backward."""
    B, H, S, hd = shape
    return 4 * B * H * S * S * hd * (2.5 if backward else 1.0)


# A large bf16 GEMM reaches ~70-80% of the dense peak on Hopper / Ampere and the rate falls for
# small ones; the curve below is the shape cuBLAS benchmarks show (size = cube root of M*N*K).
_GPU_CURVE = ((64.0, 0.02), (256.0, 0.2), (1024.0, 0.6), (2048.0, 0.72), (4096.0, 0.78), (8192.0, 0.8))

PROFILES: dict[str, Hardware] = {
    "h100": Hardware(
        name="h100",
        description="NVIDIA H100 SXM 80GB, NVLink 4 (8 per node), 8x400 Gb/s InfiniBand per node",
        # H100 SXM datasheet (nvidia.com/en-us/data-center/h100): 989 TFLOP/s dense bf16 (1979 with
        # sparsity), 67 TFLOP/s fp32 (495 TF32 dense), 3.35 TB/s HBM3, 80 GB, NVLink 900 GB/s total
        # (450 GB/s per direction); ConnectX-7 400 Gb/s = 50 GB/s per GPU.
        matmul_flops={"bf16": 989e12, "fp32": 495e12},  # fp32 matmuls run as TF32 on tensor cores
        memory_bandwidth=3.35e12,
        memory_bytes=80e9 * 0.95,
        gemm_curve=_GPU_CURVE,
        attention_efficiency=0.5,  # FlashAttention-3 forward+backward reaches ~50-60% of peak
        op_overhead_s=6e-6,
        intra_node_bandwidth=450e9 * 0.8,  # achievable NCCL bus bandwidth is ~80% of the link
        inter_node_bandwidth=50e9 * 0.8,
        latency_s=10e-6,
        devices_per_node=8,
        sources="NVIDIA H100 Tensor Core GPU datasheet (SXM5); NVIDIA ConnectX-7 product brief",
    ),
    "h200": Hardware(
        name="h200",
        description="NVIDIA H200 SXM 141GB, NVLink 4 (8 per node), 8x400 Gb/s InfiniBand per node",
        # H200 datasheet (nvidia.com/en-us/data-center/h200): same compute as H100 SXM (989 TFLOP/s
        # dense bf16), 141 GB HBM3e at 4.8 TB/s, NVLink 900 GB/s.
        matmul_flops={"bf16": 989e12, "fp32": 495e12},
        memory_bandwidth=4.8e12,
        memory_bytes=141e9 * 0.95,
        gemm_curve=_GPU_CURVE,
        attention_efficiency=0.5,
        op_overhead_s=6e-6,
        intra_node_bandwidth=450e9 * 0.8,
        inter_node_bandwidth=50e9 * 0.8,
        latency_s=10e-6,
        devices_per_node=8,
        sources="NVIDIA H200 Tensor Core GPU datasheet; NVIDIA ConnectX-7 product brief",
    ),
    "a100": Hardware(
        name="a100",
        description="NVIDIA A100 SXM 80GB, NVLink 3 (8 per node), 8x200 Gb/s InfiniBand per node",
        # A100 datasheet (nvidia.com/en-us/data-center/a100): 312 TFLOP/s dense bf16, 156 TF32,
        # 80 GB HBM2e at 2.04 TB/s, NVLink 600 GB/s total (300 per direction); HDR 200 Gb/s = 25 GB/s.
        matmul_flops={"bf16": 312e12, "fp32": 156e12},
        memory_bandwidth=2.039e12,
        memory_bytes=80e9 * 0.95,
        gemm_curve=_GPU_CURVE,
        attention_efficiency=0.45,  # FlashAttention-2 on A100
        op_overhead_s=6e-6,
        intra_node_bandwidth=300e9 * 0.8,
        inter_node_bandwidth=25e9 * 0.8,
        latency_s=10e-6,
        devices_per_node=8,
        sources="NVIDIA A100 Tensor Core GPU datasheet (SXM 80GB); NVIDIA ConnectX-6 HDR product brief",
    ),
    "ascend910b": Hardware(
        name="ascend910b",
        description="Huawei Ascend 910B-class NPU, 64 GB HBM, HCCS (8 per node), 200 Gb/s RoCE per NPU",
        # Huawei Ascend 910 / Atlas 800T A2 public specs (e.hihuawei.com Atlas 800T A2; Pangu Ultra MoE
        # report, arXiv 2505.04519, trains on Ascend 910-class NPUs): ~313 TFLOP/s fp16/bf16 dense per
        # NPU (Atlas 800T A2: 2.5 PFLOP/s fp16 for 8), 64 GB HBM2e at ~1.6 TB/s, HCCS 56 GB/s
        # per link x 7 links in a full mesh (~392 GB/s per NPU), 200 Gb/s RoCE = 25 GB/s per NPU.
        matmul_flops={"bf16": 313e12, "fp32": 78e12},
        memory_bandwidth=1.6e12,
        memory_bytes=64e9 * 0.95,
        gemm_curve=_GPU_CURVE,
        attention_efficiency=0.4,
        op_overhead_s=10e-6,
        intra_node_bandwidth=392e9 * 0.7,
        inter_node_bandwidth=25e9 * 0.8,
        latency_s=15e-6,
        devices_per_node=8,
        sources="Huawei Atlas 800T A2 training server spec sheet; Pangu Ultra MoE (arXiv 2505.04519)",
    ),
}
HARDWARE_NAMES = (*PROFILES, "cpu")


def get_hardware(name: str, threads: int | None = None, calibrate: bool = True) -> Hardware:
    """The profile ``name``; ``cpu`` is this machine's, calibrated once and cached (``threads``:
    intra-op threads per process, default all cores)."""
    if name == "cpu":
        return cpu_profile(threads, calibrate=calibrate)
    if name not in PROFILES:
        from loopmoe.text import suggest

        hint = suggest(name, HARDWARE_NAMES) or f"choose one of {', '.join(HARDWARE_NAMES)}"
        raise ValueError(f"unknown hardware {name!r}: {hint}")
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
    data, why = (None, "refresh asks for a new calibration") if refresh else _cached_calibration(path, threads)
    if data is None:
        if not calibrate:
            raise ValueError(f"{why}: run `loopmoe plan --calibrate` (about 30 s) or pass a GPU --hardware")
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
    if str(threads) not in measured:
        return None, f"the CPU calibration in {path} has no entry for {threads} threads"
    return data, ""


def save_calibration(data: dict, path: Path | None = None) -> Path:
    from loopmoe.atomic import atomic_write_text

    path = path or cache_path()
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(path, json.dumps(data, indent=2))
    return path


def cpu_from_calibration(data: dict, threads: int) -> Hardware:
    """The ``Hardware`` of a calibration (``calibrate_cpu``'s dict) at ``threads`` threads."""
    per = data["threads"][str(threads)]
    peak = max(rate for _, rate in per["gemm"])
    curve = tuple((float(size), rate / peak) for size, rate in per["gemm"])
    comm = data.get("gloo") or {}
    return Hardware(
        name="cpu",
        device_type="cpu",
        description=f"{data['cpu']} ({threads} threads per process, calibrated {data['when']})",
        matmul_flops={"fp32": peak, "bf16": peak / 4},  # CPU bf16 matmuls without AMX are far slower
        memory_bandwidth=per["memory_bandwidth"],
        memory_bytes=data["memory_bytes"],
        gemm_curve=curve,
        attention_efficiency=per["attention_rate"] / peak,
        op_overhead_s=per["op_overhead_s"],
        transcendental_s=per.get("transcendental_s", 0.0),
        measure_kernels=True,
        intra_node_bandwidth=comm.get("bandwidth", 1e9),
        inter_node_bandwidth=comm.get("bandwidth", 1e9),
        latency_s=comm.get("latency_s", 100e-6),
        devices_per_node=data["cores"],
        allocator_overhead=0.0,
        # gloo runs its collectives on CPU threads that compete with compute for the same cores
        comm_overlap=0.0,
        fsdp2_call_overhead_s=comm.get("fsdp2_call_overhead_s", 0.0),
        sources="measured by loopmoe.planning.hardware.calibrate_cpu",
        extra={"gloo": comm, "threads": threads},
    )


def _median_time(fn, reps: int, min_time: float = 0.05) -> float:
    """Median per-call wall time (the rate a long run sees, not the best burst)."""
    import statistics

    fn()
    n = 1
    while True:
        t0 = time.perf_counter()
        for _ in range(n):
            fn()
        if time.perf_counter() - t0 >= min_time:
            break
        n *= 2
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        for _ in range(n):
            fn()
        times.append((time.perf_counter() - t0) / n)
    return statistics.median(times)


GEMM_SIZES = (16, 32, 64, 128, 256, 512, 1024)
# Bumped when the calibration measures something differently: a cached one of another version is
# measured again (2: per-op cost from a training step, transcendental cost; 3: FSDP2's cost per call).
CALIBRATION_VERSION = 3


def _calibrate_threads(threads: int, quick: bool) -> dict:
    """Matmul rate by size, SDPA rate, memory bandwidth, transcendental math and framework op overhead
    at ``threads``."""
    import torch

    with _threads(threads):
        reps = 3 if quick else 5
        gemm = []
        for n in GEMM_SIZES:
            # Training GEMMs are long and thin ([tokens, d] @ [d, f]): time M = 8n rows (capped) by n x n
            # weights, and key the rate by the cube-root size the cost model looks up.
            m = min(8 * n, 4096)
            a, b = torch.randn(m, n), torch.randn(n, n)
            out = torch.empty(m, n)
            t = _median_time(lambda a=a, b=b, out=out: torch.mm(a, b, out=out), reps)
            gemm.append(((m * n * n) ** (1 / 3), 2 * m * n * n / t))
        # Memory bandwidth: a copy far larger than the caches (read + write).
        big = torch.empty(64 * 2**20 // 4)
        dst = torch.empty_like(big)
        t = _median_time(lambda: dst.copy_(big), reps)
        bandwidth = 2 * big.numel() * 4 / t
        # Fused attention (SDPA, causal), forward + backward, rated over the full S x S score FLOPs
        # (the budget's convention; the rate for accelerator-style use of this profile: the planner
        # itself times each attention shape it needs, ``measured_attention_seconds``).
        B, H, S, hd = 4, 4, 256, 32
        q, k, v = (torch.randn(B, H, S, hd, requires_grad=True) for _ in range(3))

        def attn():
            torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True).sum().backward()

        t = _median_time(attn, reps)
        attention_rate = (attention_flops((B, H, S, hd), False) + attention_flops((B, H, S, hd), True)) / t
        # Transcendental math: a log-softmax over a large [rows, vocab] block (the LM loss's), beyond
        # what streaming its bytes costs.
        logits = torch.randn(1024, 2048)
        t = _median_time(lambda: torch.log_softmax(logits, dim=-1), reps)
        transcendental_s = max(0.0, (t - 2 * logits.numel() * 4 / bandwidth) / logits.numel())
        # Framework overhead per op: a real training step of a tiny model (width 32, 32 tokens), whose
        # arithmetic is negligible: dispatch, autograd, allocation and the model's and trainer's Python
        # per op, as a training step sees them.
        from loopmoe.planning.trace import expert_kernel, tiny_trainer

        model, trainer, ids = tiny_trainer(2)

        def step():
            trainer.train_step(iter([ids]))

        # + the expert kernel's matmuls, which the dispatch count does not see inside its custom op
        kernel = expert_kernel(model.config, ids.numel())
        ops = _count_ops(step) + 2 * (kernel.forward.ops + kernel.backward.ops)
        t = _median_time(step, reps)
        return {
            "gemm": gemm,
            "memory_bandwidth": bandwidth,
            "attention_rate": attention_rate,
            "transcendental_s": transcendental_s,
            "op_overhead_s": t / ops,
        }


COLD_BYTES = 96 * 2**20  # larger than the last-level cache of the CPUs this runs on


@functools.lru_cache(maxsize=4096)
def measured_gemm_seconds(m: int, n: int, k: int, threads: int) -> float:
    """One ``[m, k] @ [k, n]`` fp32 GEMM on this machine at ``threads`` threads, as a training step
    runs it: operands not left in the cache by a previous repetition (it cycles through copies,
    ``COLD_BYTES`` of them or 64, whichever is fewer), a freshly allocated output, and the trainer's
    allocator setting. A hot, preallocated benchmark of the same shape is 10-45% faster on a 2-core
    EPYC. Timed once per process.
    """
    import torch

    from loopmoe.training.allocator import keep_freed_memory

    keep_freed_memory()  # as `loopmoe train` runs on a CPU
    per_copy = 4 * (m * k + k * n)
    copies = max(2, min(64, COLD_BYTES // max(per_copy, 1)))
    with _threads(threads):
        operands = [(torch.randn(m, k), torch.randn(k, n)) for _ in range(copies)]
        turn = itertools.cycle(operands)

        def cold():
            a, b = next(turn)
            torch.mm(a, b)

        return _median_time(cold, 5, min_time=0.02)


@functools.lru_cache(maxsize=256)
def measured_attention_seconds(shape: tuple[int, ...], threads: int) -> tuple[float, float]:
    """(forward, forward + backward) seconds of causal SDPA on queries of ``shape`` (fp32, timed once
    per process)."""
    import torch
    import torch.nn.functional as F

    with _threads(threads):
        # (keys and values with the query's heads: GQA models share them, which this slightly overstates)
        q, k, v = (torch.randn(*shape, requires_grad=True) for _ in range(3))
        g = torch.randn(*shape)

        def fwd():
            with torch.no_grad():
                F.scaled_dot_product_attention(q, k, v, is_causal=True)

        def both():
            torch.autograd.grad(F.scaled_dot_product_attention(q, k, v, is_causal=True), (q, k, v), g)

        return _median_time(fwd, 5, min_time=0.02), _median_time(both, 5, min_time=0.02)


@contextlib.contextmanager
def _threads(n: int):
    import torch

    old = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(old)


def _count_ops(fn) -> int:
    from torch.utils._python_dispatch import TorchDispatchMode

    class Count(TorchDispatchMode):
        n = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            Count.n += 1
            return func(*args, **(kwargs or {}))

    with Count():
        fn()
    return Count.n


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
        "cpu": _cpu_name(),
        "cores": cores,
        "memory_bytes": _memory_bytes(),
        "when": time.strftime("%Y-%m-%d %H:%M"),
        "threads": {str(t): _calibrate_threads(t, quick) for t in threads},
    }
    if gloo and cores >= 2:
        from loopmoe.planning.gloo_calibration import measure_gloo

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


def with_overrides(hw: Hardware, **changes) -> Hardware:
    """A copy of ``hw`` with some numbers changed (what-if studies, tests)."""
    return replace(hw, **changes)
