"""(1) Peak fp32 matmul throughput of this machine: the denominator of model FLOP utilisation.

    python -m bench.peak_flops [--quick]

Square fp32 matmuls at a few sizes with the benchmark thread count; the best quiet run of the
best size is the peak. Writes bench/results/peak_flops.json.
"""

from __future__ import annotations

import json
from functools import partial

import torch

from bench import common
from loopmoe.text import markdown_table


def _matmuls(a: torch.Tensor, b: torch.Tensor, c: torch.Tensor, reps: int) -> list[torch.Tensor]:
    return [torch.mm(a, b, out=c) for _ in range(reps)]


def measure(quick: bool = False) -> dict:
    common.setup()
    sizes = [1024, 2048] if quick else [512, 1024, 2048, 3072]
    rows = []
    for n in sizes:
        a, b = torch.randn(n, n), torch.randn(n, n)
        c = torch.empty(n, n)
        reps = max(1, int(2e9 // (2 * n**3)))  # ~2 GFLOP per timed call
        fn = partial(_matmuls, a, b, c, reps)
        t = common.interleaved({"mm": fn}, reps=3 if quick else 5, tries=12, budget_s=8 if quick else 30)["mm"]
        flops = 2 * n**3 * reps
        rows.append(
            {
                "n": n,
                "gflops_median": flops / t["median"] / 1e9,
                "gflops_best": flops / t["min"] / 1e9,
                "quiet_runs": t["n"],
            }
        )
    peak = max(r["gflops_best"] for r in rows)
    return {"peak_gflops": peak, "sizes": rows}


def peak_gflops(cached: bool = True) -> float:
    """Measured peak fp32 matmul GFLOP/s: this benchmark's saved result when this machine wrote it (the
    results folder is committed, so it may hold another machine's), else a quick run."""
    path = common.RESULTS / "peak_flops.json"
    if cached and path.is_file():
        saved = json.loads(path.read_text())
        if saved.get("machine") == common.machine():
            return saved["peak_gflops"]
    return measure(quick=True)["peak_gflops"]


def main(argv=None) -> dict:
    res = measure(common.quick_flag(__doc__, argv))
    print(
        markdown_table(
            ["n", "GFLOP/s median", "GFLOP/s best", "quiet runs"],
            [[r["n"], f"{r['gflops_median']:.1f}", f"{r['gflops_best']:.1f}", r["quiet_runs"]] for r in res["sizes"]],
        )
    )
    print(f"peak fp32 matmul: {res['peak_gflops']:.1f} GFLOP/s ({torch.get_num_threads()} threads)")
    common.write_json("peak_flops", res)
    return res


if __name__ == "__main__":
    main()
