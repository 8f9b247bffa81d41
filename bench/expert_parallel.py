"""(8) Expert parallelism on CPU: training-step tokens/s and all_to_all bytes per token, ep=1 vs ep=2.

    python -m bench.expert_parallel [--quick]

Launches 2 gloo processes (``torch.distributed.run``, one thread each). Both layouts are built in
the same processes from the same weights: (dp, ep) = (2, 1), plain DDP, and (1, 2), experts split
over the two ranks with the all_to_all dispatch (``loopmoe.distributed.expert_parallel``). Their
training steps (forward, backward, gradient reduction, AdamW) are timed interleaved, A B A B, so
both see the same machine. The bytes are those the exchange really sent to the other rank (from
its split sizes: rows and counts, forward and backward), printed beside the analytic volume of
docs/design.md §9 (uniform routing):
``4 * k * d * 4 B * (ep-1)/ep`` per token and executed MoE slot, plus ``8 E (ep-1)/ep`` bytes of
counts per slot. Writes bench/results/expert_parallel.json.

On 2 CPU cores the gloo exchange is a memory copy through the loopback: the speed ratio says what
the dispatch costs in software (sort, permutations, two exchanges), not what an interconnect does.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import time

import torch
import torch.distributed as dist

from bench import common
from loopmoe.text import markdown_table

# A looped model (T = 2, IterAdaLN, one prelude layer) with enough experts to split: debug widths.
MODEL = {
    "num_loops": 2,
    "num_prelude_layers": 1,
    "num_core_layers": 2,
    "hidden_size": 128,
    "head_dim": 32,
    "num_experts": 8,
    "num_experts_per_tok": 2,
    "moe_intermediate_size": 128,
}
BATCH, SEQ = 4, 128  # per rank


def analytic_bytes_per_token(cfg, ep: int, tokens: int) -> float:
    """docs/design.md §9: rows (dispatch + combine, forward + backward) and counts, per local token."""
    slots = cfg.num_prelude_layers + cfg.num_loops * cfg.num_core_layers + cfg.num_coda_layers
    off_rank = (ep - 1) / ep
    rows = 4 * cfg.num_experts_per_tok * cfg.hidden_size * 4 * off_rank  # fp32 rows of width d
    counts = 8 * cfg.num_experts * off_rank / tokens
    return slots * (rows + counts)


def _worker(reps: int) -> None:
    from loopmoe import LoopMoEForCausalLM
    from loopmoe.distributed import apply_ddp, build_mesh, gradient_sync, init_distributed
    from loopmoe.distributed.expert_parallel import apply_expert_parallel, expert_parallel_of
    from loopmoe.presets import get_preset

    torch.set_num_threads(1)
    info = init_distributed()
    cfg = get_preset("debug", **MODEL)
    torch.manual_seed(0)
    weights = LoopMoEForCausalLM(cfg).state_dict()
    layouts = {}
    for ep in (1, 2):
        model = LoopMoEForCausalLM(cfg)
        model.load_state_dict(weights)
        if ep > 1:
            apply_expert_parallel(model, build_mesh(info.world_size, "cpu", ep))
        else:
            build_mesh(info.world_size, "cpu", 1)
        wrapped = apply_ddp(model)
        layouts[ep] = (wrapped, torch.optim.AdamW(wrapped.parameters(), lr=1e-4))
    gen = torch.Generator().manual_seed(1 + info.rank)
    x = torch.randint(0, cfg.vocab_size, (BATCH, SEQ), generator=gen)

    def step(ep: int) -> float:
        model, opt = layouts[ep]
        dist.barrier()
        t0 = time.perf_counter()
        with gradient_sync(model, True):
            model(input_ids=x, labels=x).loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        dist.barrier()
        return time.perf_counter() - t0

    for ep in layouts:  # warm-up
        step(ep)
    times: dict[int, list[float]] = {1: [], 2: []}
    exchange = expert_parallel_of(layouts[2][0].module)
    assert exchange is not None
    exchange.bytes_sent = 0
    for _ in range(reps):
        for ep in layouts:
            times[ep].append(step(ep))
    sent = torch.tensor(float(exchange.bytes_sent) / reps)
    dist.all_reduce(sent)
    tokens = BATCH * SEQ
    if info.is_main:
        rows = []
        for ep in (1, 2):
            med = statistics.median(times[ep])
            rows.append(
                {
                    "layout": f"(dp, ep) = ({info.world_size // ep}, {ep})",
                    "ep": ep,
                    "step_s_median": med,
                    "step_s_min": min(times[ep]),
                    "step_s_max": max(times[ep]),
                    "tokens_per_s": tokens * info.world_size / med,
                    "a2a_bytes_per_token_measured": 0.0 if ep == 1 else float(sent) / info.world_size / tokens,
                    "a2a_bytes_per_token_analytic": analytic_bytes_per_token(cfg, ep, tokens),
                }
            )
        ratio = rows[1]["tokens_per_s"] / rows[0]["tokens_per_s"]
        result = {
            "model": MODEL,
            "batch_per_rank": BATCH,
            "seq_len": SEQ,
            "processes": info.world_size,
            "backend": "gloo",
            "reps": reps,
            "rows": rows,
            "ep2_over_ep1_tokens_per_s": ratio,
        }
        common.write_json("expert_parallel", result)
        print(table(result))
    dist.destroy_process_group()


def table(result: dict) -> str:
    return (
        markdown_table(
            ["layout", "tokens/s", "step ms (min-max)", "a2a bytes/token measured", "analytic (uniform routing)"],
            [
                [
                    r["layout"],
                    f"{r['tokens_per_s']:.0f}",
                    f"{1e3 * r['step_s_median']:.0f} ({1e3 * r['step_s_min']:.0f}-{1e3 * r['step_s_max']:.0f})",
                    f"{r['a2a_bytes_per_token_measured']:.0f}",
                    f"{r['a2a_bytes_per_token_analytic']:.0f}",
                ]
                for r in result["rows"]
            ],
        )
        + f"\nep=2 / ep=1 tokens/s: {result['ep2_over_ep1_tokens_per_s']:.2f}x"
    )


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    reps = 3 if args.quick else 10
    if args.worker:
        _worker(reps)
        return
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(common.ROOT)}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"]
    cmd += ["-m", "bench.expert_parallel", "--worker"] + (["--quick"] if args.quick else [])
    subprocess.run(cmd, env=env, check=True, cwd=common.ROOT)


if __name__ == "__main__":
    main()
