"""(8) Expert parallelism on CPU: ep=1 vs ep=2 and DCCA vs SwiGLU experts, step time and all_to_all bytes.

    python -m bench.expert_parallel [--quick]

Launches 2 gloo processes (``torch.distributed.run``, one thread each). Two looped models (T = 2)
are balanced to the ``small`` preset (matched total parameters, FLOPs per token and attention/FFN
ratio; expert counts even, so each rank holds half): SwiGLU experts, and DCCA experts (rows of the
DCCA width r = d/4 cross ranks). Each is built in the same processes from the same weights at two
layouts: (dp, ep) = (2, 1), plain DDP, and (1, 2), experts split over the two ranks with the
all_to_all dispatch (``loopmoe.distributed.expert_parallel``). The four training steps (forward,
backward, gradient reduction, AdamW) are timed interleaved, A B C D A B C D, each between barriers,
so all see the same (shared, loaded) machine; ratios are paired per round.

Bytes are what the exchange really sent to the other rank (``ExpertParallel.bytes_sent``: rows and
counts, forward and backward), per local token and step, beside ``loopmoe.budget.
all_to_all_bytes_per_token(backward=True)`` plus the count exchange (``8 E (ep-1)/ep`` bytes per
executed slot and rank), at uniform routing and at the off-rank share the routers really chose
(read from the routers' top-k, not from the exchange). Writes bench/results/expert_parallel.json.

On 2 CPU cores the gloo exchange is a memory copy through the loopback: the speed ratios say what
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

REFERENCE, NUM_LOOPS, EP = "small", 2, 2
EXPERT_TYPES = ("swiglu", "dcca")
BATCH, SEQ = 4, 128  # per rank


def models() -> dict:
    """The SwiGLU and DCCA LoopMoEs balanced to the same reference, expert counts divisible by EP."""
    from loopmoe.balance import balance
    from loopmoe.presets import get_preset

    reference = get_preset(REFERENCE)
    return {
        t: balance(reference, NUM_LOOPS, "capacity", seq_len=SEQ, expert_type=t, expert_multiple=EP).looped
        for t in EXPERT_TYPES
    }


def count_bytes_per_token(cfg, ep: int, tokens: int) -> float:
    """The per-expert counts each executed slot exchanges (int64, forward only), per local token."""
    return cfg.executed_depth() * 8 * cfg.num_experts * (ep - 1) / ep / tokens


class OffRankRows:
    """Counts the (token, expert) rows whose expert lives on another ep rank, from each MoE layer's
    routing decisions (``RouterStats.experts``), independently of the exchange's own accounting."""

    def __init__(self, model):
        from loopmoe.distributed.expert_parallel import expert_parallel_of, moe_layers

        exchange = expert_parallel_of(model)
        assert exchange is not None
        self.local, self.rank, self.rows = exchange.num_local, exchange.rank, 0
        for moe in moe_layers(model):
            moe.register_forward_hook(self.hook)

    def hook(self, module, args, output) -> None:
        _, stats = output
        self.rows += int((stats.experts // self.local != self.rank).sum())


def _worker(reps: int) -> None:
    from loopmoe import LoopMoEForCausalLM
    from loopmoe.budget import all_to_all_bytes_per_token, compute_budget
    from loopmoe.config import expert_width
    from loopmoe.distributed import apply_ddp, build_mesh, gradient_sync, init_distributed
    from loopmoe.distributed.expert_parallel import apply_expert_parallel, expert_parallel_of

    torch.set_num_threads(1)
    info = init_distributed()
    cfgs = models()
    layouts, counters = {}, {}
    for name, cfg in cfgs.items():
        torch.manual_seed(0)
        weights = LoopMoEForCausalLM(cfg).state_dict()
        for ep in (1, EP):
            model = LoopMoEForCausalLM(cfg)
            model.load_state_dict(weights)
            mesh = build_mesh(info.world_size, "cpu", ep)
            if ep > 1:
                apply_expert_parallel(model, mesh)
                counters[name] = OffRankRows(model)
            wrapped = apply_ddp(model)
            layouts[name, ep] = (wrapped, torch.optim.AdamW(wrapped.parameters(), lr=1e-4))
    gen = torch.Generator().manual_seed(1 + info.rank)
    x = torch.randint(0, cfgs["swiglu"].vocab_size, (BATCH, SEQ), generator=gen)

    def step(key) -> float:
        model, opt = layouts[key]
        dist.barrier()
        t0 = time.perf_counter()
        with gradient_sync(model, True):
            model(input_ids=x, labels=x).loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        dist.barrier()
        return time.perf_counter() - t0

    for key in layouts:  # warm-up
        step(key)
    for name in cfgs:
        exchange = expert_parallel_of(layouts[name, EP][0].module)
        assert exchange is not None
        exchange.bytes_sent = counters[name].rows = 0
    times: dict = {key: [] for key in layouts}
    for _ in range(reps):
        for key in layouts:
            times[key].append(step(key))
    tokens = BATCH * SEQ
    rows = []
    for name, cfg in cfgs.items():
        exchange = expert_parallel_of(layouts[name, EP][0].module)
        totals = torch.tensor([float(exchange.bytes_sent), float(counters[name].rows)], dtype=torch.float64)
        dist.all_reduce(totals)
        sent, off_rank = (float(v) / reps / info.world_size for v in totals)  # per rank and step
        counts = count_bytes_per_token(cfg, EP, tokens)
        uniform = all_to_all_bytes_per_token(cfg, EP, bytes_per_element=4, backward=True)
        share = off_rank / (tokens * cfg.num_experts_per_tok * cfg.executed_depth())  # realised
        for ep in (1, EP):
            med = statistics.median(times[name, ep])
            rows.append(
                {
                    "experts": name,
                    "row_width": expert_width(cfg),
                    "num_experts": cfg.num_experts,
                    "top_k": cfg.num_experts_per_tok,
                    "layout": f"(dp, ep) = ({info.world_size // ep}, {ep})",
                    "ep": ep,
                    "step_s_median": med,
                    "step_s_min": min(times[name, ep]),
                    "step_s_max": max(times[name, ep]),
                    "tokens_per_s": tokens * info.world_size / med,
                    **(
                        {
                            "off_rank_share": share,
                            "a2a_bytes_per_token_measured": sent / tokens,
                            "a2a_bytes_per_token_analytic_uniform": uniform + counts,
                            "a2a_bytes_per_token_analytic_realised": uniform * share * EP / (EP - 1) + counts,
                            "bytes_per_off_rank_row_exchange": (sent - counts * tokens) / (4 * off_rank),
                        }
                        if ep > 1
                        else {}
                    ),
                }
            )

    def paired(a, b) -> dict:  # per-round ratios of step times a / b (> 1: b is faster)
        ratios = [ta / tb for ta, tb in zip(times[a], times[b])]
        return {"median": statistics.median(ratios), "min": min(ratios), "max": max(ratios)}

    result = {
        "reference": REFERENCE,
        "num_loops": NUM_LOOPS,
        "models": {name: cfg.architecture_dict() for name, cfg in cfgs.items()},
        "budgets": {name: compute_budget(cfg, SEQ).as_dict() for name, cfg in cfgs.items()},
        "batch_per_rank": BATCH,
        "seq_len": SEQ,
        "processes": info.world_size,
        "backend": "gloo",
        "reps": reps,
        "rows": rows,
        # step-time ratios, paired per round: ep=2 speed over ep=1, and DCCA speed over SwiGLU
        "ep2_over_ep1_speed": {name: paired((name, 1), (name, EP)) for name in cfgs},
        "dcca_over_swiglu_speed": {f"ep={ep}": paired(("swiglu", ep), ("dcca", ep)) for ep in (1, EP)},
    }
    if info.is_main:
        common.write_json("expert_parallel", result)
        print(table(result))
    dist.destroy_process_group()


def table(result: dict) -> str:
    def fmt(r: dict, key: str) -> str:
        return f"{r[key]:.0f}" if key in r else "-"

    lines = markdown_table(
        [
            "experts (width, E, top-k)",
            "layout",
            "step ms median (min-max)",
            "off-rank share",
            "B per off-rank row",
            "a2a B/token measured",
            "analytic, realised share",
            "analytic, uniform",
        ],
        [
            [
                f"{r['experts']} ({r['row_width']}, {r['num_experts']}, {r['top_k']})",
                r["layout"],
                f"{1e3 * r['step_s_median']:.0f} ({1e3 * r['step_s_min']:.0f}-{1e3 * r['step_s_max']:.0f})",
                f"{r['off_rank_share']:.3f}" if "off_rank_share" in r else "-",
                fmt(r, "bytes_per_off_rank_row_exchange"),
                fmt(r, "a2a_bytes_per_token_measured"),
                fmt(r, "a2a_bytes_per_token_analytic_realised"),
                fmt(r, "a2a_bytes_per_token_analytic_uniform"),
            ]
            for r in result["rows"]
        ],
    )
    ratios = [(f"{name}: ep=2 / ep=1 speed", s) for name, s in result["ep2_over_ep1_speed"].items()]
    ratios += [(f"DCCA / SwiGLU speed at {ep}", s) for ep, s in result["dcca_over_swiglu_speed"].items()]
    return lines + "".join(f"\n{label}: {s['median']:.2f}x [{s['min']:.2f}-{s['max']:.2f}]" for label, s in ratios)


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    reps = 3 if args.quick else 20
    if args.worker:
        _worker(reps)
        return
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(common.ROOT)}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={EP}"]
    cmd += ["-m", "bench.expert_parallel", "--worker"] + (["--quick"] if args.quick else [])
    subprocess.run(cmd, env=env, check=True, cwd=common.ROOT)


if __name__ == "__main__":
    main()
