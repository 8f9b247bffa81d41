"""Hardware profiles: what one device computes, holds and moves per second. A profile only describes;
``loopmoe.planning.calibration`` measures the ``cpu`` one and ``loopmoe.planning.kernel_timing`` turns
a profile into seconds per kernel.

A profile is the handful of numbers the cost model needs (``loopmoe.planning.cost``):

- ``matmul_flops``: dense matmul peak per dtype, and ``gemm_curve``: the achieved fraction of that
  peak against the GEMM's size (small GEMMs, expert groups of a few rows, do not reach peak);
- ``attention_efficiency``: fused attention kernels against the matmul peak;
- ``memory_bandwidth``: element-wise work, optimizer steps and every op too small to be
  compute-bound are charged at this rate (the roofline's other side; a CPU's element-wise ops inside a
  step stream at their own rate, ``elementwise_bandwidth``), and ``transcendental_s``:
  the extra seconds per element of exp / log / softmax / SiLU-family ops (a CPU computes them
  more slowly than it streams; an accelerator does not, 0);
- ``op_overhead_s``: fixed cost per framework op (a kernel launch on a GPU; PyTorch's dispatch,
  autograd bookkeeping and the model's Python on a CPU, which dominates small models there);
- ``memory_bytes`` usable per device;
- links: α (latency per collective step) and β (bytes/s per device) inside a node and across
  nodes, for the α–β collective model (``loopmoe.planning.comm``).

Accelerators take their peaks, memory and links from the spec sheets (``loopmoe.hardware.SPECS``,
sources there). The achieved fractions are not spec-sheet numbers: they are the usual measured
ranges for large bf16 GEMMs on those parts (documented in docs/planning.md), so absolute GPU
predictions carry that uncertainty; the CPU profile is measured
(``loopmoe.planning.calibration.calibrate_cpu``) and cached, and is what the validation bench
checks. On a CPU the planner also times each GEMM and attention shape it needs on this machine,
once per process (``measure_kernels``; ``loopmoe.planning.kernel_timing``), instead of reading the
curve: a GEMM's rate depends on its aspect (a thin ``[N, 64] @ [64, V]`` runs at half the rate of a
square one of the same size).
"""

from __future__ import annotations

import itertools
import math
from dataclasses import asdict, dataclass, field, replace

from loopmoe.errors import ConfigError
from loopmoe.hardware import SPECS, SpecSheet


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
    # bytes/s of a training step's element-wise ops, where they differ from a large copy's (a CPU: fitted
    # on real training steps, ``calibration.fit_step_costs``); None: ``memory_bandwidth``
    elementwise_bandwidth: float | None = None
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

    @property
    def elementwise_rate(self) -> float:
        """Bytes/s at which a step's element-wise ops stream."""
        return self.memory_bandwidth if self.elementwise_bandwidth is None else self.elementwise_bandwidth

    def peak(self, dtype: str) -> float:
        if dtype not in self.matmul_flops:
            raise ConfigError(
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
USABLE_MEMORY = 0.95  # of the spec sheet's device memory: what the framework and the driver leave


def accelerator_profile(
    spec: SpecSheet,
    attention_efficiency: float,
    op_overhead_s: float,
    latency_s: float,
    intra_link_efficiency: float = 0.8,
    inter_link_efficiency: float = 0.8,
) -> Hardware:
    """The profile of an accelerator: its spec sheet's peaks, memory and links, with the achieved
    fractions a spec sheet does not give (``*_link_efficiency``: achievable NCCL bus bandwidth over the
    link's, ~80%)."""
    return Hardware(
        name=spec.name,
        description=spec.description,
        matmul_flops={"bf16": spec.bf16_flops, "fp32": _recorded(spec, "fp32_flops")},
        memory_bandwidth=_recorded(spec, "memory_bandwidth"),
        memory_bytes=_recorded(spec, "memory_bytes") * USABLE_MEMORY,
        gemm_curve=_GPU_CURVE,
        attention_efficiency=attention_efficiency,
        op_overhead_s=op_overhead_s,
        intra_node_bandwidth=_recorded(spec, "intra_node_bandwidth") * intra_link_efficiency,
        inter_node_bandwidth=_recorded(spec, "inter_node_bandwidth") * inter_link_efficiency,
        latency_s=latency_s,
        devices_per_node=_recorded(spec, "devices_per_node"),
        sources=spec.sources,
    )


def _recorded(spec: SpecSheet, name: str):
    value = getattr(spec, name)
    if value is None:
        raise ValueError(f"the spec sheet of {spec.name!r} has no {name}, which a planner profile needs")
    return value


PROFILES: dict[str, Hardware] = {
    # FlashAttention-3 forward+backward reaches ~50-60% of peak on Hopper
    "h100": accelerator_profile(SPECS["h100"], attention_efficiency=0.5, op_overhead_s=6e-6, latency_s=10e-6),
    "h200": accelerator_profile(SPECS["h200"], attention_efficiency=0.5, op_overhead_s=6e-6, latency_s=10e-6),
    # FlashAttention-2 on A100
    "a100": accelerator_profile(SPECS["a100"], attention_efficiency=0.45, op_overhead_s=6e-6, latency_s=10e-6),
    "ascend910b": accelerator_profile(
        SPECS["ascend910b"],
        attention_efficiency=0.4,
        op_overhead_s=10e-6,
        latency_s=15e-6,
        intra_link_efficiency=0.7,
    ),
}
HARDWARE_NAMES = (*PROFILES, "cpu")


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
        elementwise_bandwidth=per["elementwise_bandwidth"],
        measure_kernels=True,
        intra_node_bandwidth=comm.get("bandwidth", 1e9),
        inter_node_bandwidth=comm.get("bandwidth", 1e9),
        latency_s=comm.get("latency_s", 100e-6),
        devices_per_node=data["cores"],
        allocator_overhead=0.0,
        # gloo runs its collectives on CPU threads that compete with compute for the same cores
        comm_overlap=0.0,
        fsdp2_call_overhead_s=comm.get("fsdp2_call_overhead_s", 0.0),
        sources="measured by loopmoe.planning.calibration.calibrate_cpu",
        extra={"gloo": comm, "threads": threads},
    )


def with_overrides(hw: Hardware, **changes) -> Hardware:
    """A copy of ``hw`` with some numbers changed (what-if studies, tests)."""
    return replace(hw, **changes)
