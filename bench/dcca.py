"""(8) DCCA experts (BigMac) against SwiGLU experts at matched budgets: step time and all_to_all volume.

    python -m bench.dcca [--quick]

The reference is the ``small`` preset (SwiGLU, the default comparison's reference). Against it,
capacity balancing (``loopmoe.balance``) builds, at equal total parameters, forward FLOPs per token
and attention/FFN ratio: the DCCA Vanilla MoE (T = 1, experts at width d/4), and the SwiGLU and the
DCCA LoopMoE (T = 2). Single process, CPU: forward+backward at batch 8 x 256 is timed interleaved,
and each DCCA model is compared with the SwiGLU model of the same T by paired ratios. Without expert
parallelism nothing is communicated, so this isolates what DCCA's two projections and the changed
expert shapes cost in compute; the all_to_all volume the projections save under expert parallelism
is given analytically (``loopmoe.budget.all_to_all_bytes_per_token``, forward, bf16 rows) at
ep = 2, 4, 8. Writes bench/results/dcca.json.
"""

from __future__ import annotations

from bench import common
from loopmoe.text import markdown_table

BATCH, SEQ = 8, 256
EP_DEGREES = (2, 4, 8)
# name -> (loop count, expert type); each DCCA model is timed against the SwiGLU model of its T.
MODELS = {
    "swiglu vanilla": (1, "swiglu"),
    "dcca vanilla": (1, "dcca"),
    "swiglu loopmoe": (2, "swiglu"),
    "dcca loopmoe": (2, "dcca"),
}


def configs() -> dict:
    from loopmoe.balance import balance
    from loopmoe.presets import get_preset

    reference = get_preset("small")
    out = {"swiglu vanilla": reference}
    for name, (loops, expert_type) in MODELS.items():
        if name != "swiglu vanilla":
            out[name] = balance(reference, loops, "capacity", seq_len=SEQ, expert_type=expert_type).looped
    return out


def run(quick: bool = False) -> dict:
    import torch

    from loopmoe.budget import all_to_all_bytes_per_token, compute_budget
    from loopmoe.model import LoopMoEForCausalLM

    common.setup()
    cfgs = configs()
    models = {}
    for name, cfg in cfgs.items():
        torch.manual_seed(0)
        models[name] = LoopMoEForCausalLM(cfg).train()
    ids = common.token_batch(BATCH, SEQ, vocab=cfgs["swiglu vanilla"].vocab_size)
    t = common.interleaved(
        {k: common.fwd_bwd(m, ids) for k, m in models.items()},
        reps=5 if quick else 12,
        tries=10 if quick else 24,
        budget_s=60 if quick else 240,
    )
    rows = []
    for name, cfg in cfgs.items():
        loops = MODELS[name][0]
        b = compute_budget(cfg, SEQ)
        rows.append(
            {
                "model": name,
                "loops": loops,
                "total_params": b.total_params,
                "active_params": b.active_params,
                "flops_per_token": b.flops_per_token,
                "attn_ffn_ratio": b.attn_ffn_ratio,
                "tok_s": BATCH * SEQ / t[name]["median"],
                "time": t[name],
                # > 1: faster than the SwiGLU model of the same T
                "vs_swiglu": common.speedup(t, name, "swiglu vanilla" if loops == 1 else "swiglu loopmoe"),
                "all_to_all_bytes_per_token": {
                    ep: all_to_all_bytes_per_token(cfg, ep, bytes_per_element=2) for ep in EP_DEGREES
                },
                "config": cfg.architecture_dict(),
            }
        )
    return {"rows": rows, "batch": BATCH, "seq_len": SEQ, "quick": quick}


def _experts(row: dict) -> str:
    c = row["config"]
    width = f" width {c['dcca_dim']}" if c["dcca_dim"] else ""
    return f"{c['expert_type']}{width}: {c['num_experts']}, {c['num_experts_per_tok']}, {c['moe_intermediate_size']}"


def main(argv=None) -> dict:
    res = run(common.quick_flag(__doc__, argv))
    print(
        markdown_table(
            [
                "model",
                "experts (E, top-k, f)",
                "params",
                "fwd MFLOP/tok",
                "tok/s median",
                "vs SwiGLU, same T (paired) [min-max]",
                *(f"a2a B/tok ep={ep}" for ep in EP_DEGREES),
            ],
            [
                [
                    r["model"],
                    _experts(r),
                    f"{r['total_params'] / 1e6:.3f}M",
                    f"{r['flops_per_token'] / 1e6:.3f}",
                    f"{r['tok_s']:.0f}",
                    common.fmt_speedup(r["vs_swiglu"]),
                    *(f"{r['all_to_all_bytes_per_token'][ep]:.0f}" for ep in EP_DEGREES),
                ]
                for r in res["rows"]
            ],
            align="llrrrrrrr",
        )
    )
    common.write_json("dcca", res)
    return res


if __name__ == "__main__":
    main()
