"""Seconds per kernel on a hardware profile: a GEMM, a fused-attention call.

On an accelerator the time comes from the profile (``loopmoe.planning.hardware.Hardware``): the
matmul peak at the GEMM-efficiency curve's fraction, the attention FLOPs at ``attention_efficiency``
of the peak. On a CPU (``Hardware.measure_kernels``) each shape the planner needs is timed on this
machine, once per process: a GEMM's rate depends on its aspect (a thin ``[N, 64] @ [64, V]`` runs at
half the rate of a square one of the same size), which no curve of size alone captures. The
measured fp32 times scale to another dtype by the ratio of the profile's peaks.

``median_time`` and ``torch_threads`` are the timing tools the CPU calibration
(``loopmoe.planning.calibration``) uses as well.
"""

from __future__ import annotations

import contextlib
import functools
import itertools
import statistics
import time

from loopmoe.planning.hardware import Hardware, attention_flops
from loopmoe.training.allocator import keep_freed_memory


def gemm_seconds(hw: Hardware, m: int, n: int, k: int, dtype: str) -> float:
    """Seconds for one ``[m, k] @ [k, n]`` GEMM on ``hw``."""
    if hw.measure_kernels:
        return measured_gemm_seconds(m, n, k, hw.extra["threads"]) * hw.peak("fp32") / hw.peak(dtype)
    return 2 * m * n * k / (hw.peak(dtype) * hw.gemm_efficiency(m, n, k))


def attention_seconds(hw: Hardware, shape: tuple[int, ...], backward: bool, dtype: str) -> float:
    """Seconds for one causal fused-attention call (forward, or its backward) on ``hw``, on queries of
    ``shape = (batch, heads, S, head_dim)``."""
    if hw.measure_kernels:
        fwd, both = measured_attention_seconds(tuple(shape), hw.extra["threads"])
        return (both - fwd if backward else fwd) * hw.peak("fp32") / hw.peak(dtype)
    return attention_flops(shape, backward) / (hw.peak(dtype) * hw.attention_efficiency)


def median_time(fn, reps: int, min_time: float = 0.05) -> float:
    """Median per-call wall time (the rate a long run sees, not the best burst)."""
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


@contextlib.contextmanager
def torch_threads(n: int):
    """torch's intra-op threads set to ``n`` inside the block."""
    import torch

    old = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(old)


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

    keep_freed_memory()  # as `loopmoe train` runs on a CPU
    per_copy = 4 * (m * k + k * n)
    copies = max(2, min(64, COLD_BYTES // max(per_copy, 1)))
    with torch_threads(threads):
        operands = [(torch.randn(m, k), torch.randn(k, n)) for _ in range(copies)]
        turn = itertools.cycle(operands)

        def cold():
            a, b = next(turn)
            torch.mm(a, b)

        return median_time(cold, 5, min_time=0.02)


@functools.lru_cache(maxsize=256)
def measured_attention_seconds(shape: tuple[int, ...], threads: int) -> tuple[float, float]:
    """(forward, forward + backward) seconds of causal SDPA on queries of ``shape`` (fp32, timed once
    per process)."""
    import torch
    import torch.nn.functional as F

    with torch_threads(threads):
        # (keys and values with the query's heads: GQA models share them, which this slightly overstates)
        q, k, v = (torch.randn(*shape, requires_grad=True) for _ in range(3))
        g = torch.randn(*shape)

        def fwd():
            with torch.no_grad():
                F.scaled_dot_product_attention(q, k, v, is_causal=True)

        def both():
            torch.autograd.grad(F.scaled_dot_product_attention(q, k, v, is_causal=True), (q, k, v), g)

        return median_time(fwd, 5, min_time=0.02), median_time(both, 5, min_time=0.02)
