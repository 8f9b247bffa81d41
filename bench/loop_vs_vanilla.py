"""(5) LoopMoE vs its balanced Vanilla MoE reference: training tokens/s and peak memory.

    python -m bench.loop_vs_vanilla [--quick] [--loops 2] [--strategy per_layer|capacity] [--compile] [--widths]

The reference is the "bench" preset (the transformers tiny Qwen3-MoE shape; its weights come from
transformers through the converter and its logits are checked against transformers first). The
looped model is ``balance(reference, loops, strategy).looped`` (the default strategy unless
``--strategy``): matched total parameters, forward FLOPs per token and attention/FFN ratio. Throughput: forward+backward at batch 8 x 256, timed interleaved.
Two controls locate a gap: the looped shapes unrolled (no weight sharing) and the loop without
iteration conditioning. Peak memory: one subprocess per model (the peak RSS of a training step after
a first one, and its increase over the RSS before it = activations and gradients).

``--compile`` adds the Vanilla and the LoopMoE compiled as the trainer compiles them (``apply_compile``:
every decoder layer, inductor), the LoopMoE paired against the compiled Vanilla. ``--widths`` repeats the
pair and the unconditioned loop at wider versions of the reference (``WIDTHS``), so that the share of the
step IterAdaLN's per-token modulation costs can be read against the width. Each eager model's step is also
predicted by the planner, split into GEMMs, attention, element-wise work and per-op overhead
(``predicted_parts``, each row's ``predicted_s``), which says what a measured gap is made of. Writes
bench/results/loop_vs_vanilla.json.
"""

from __future__ import annotations

import argparse
import json

import torch

from bench import common
from bench.peak_flops import peak_gflops
from loopmoe.balance import DEFAULT_STRATEGY, STRATEGIES
from loopmoe.testing import hf_parity
from loopmoe.text import markdown_table

BATCH, SEQ = 8, 256
# (hidden size, batch) of the width sweep: heads and expert size scale with the width (head size and depth
# kept), the batch shrinks so that a step stays within seconds. IterAdaLN's modulation is element-wise and
# rank-r work, O(d) per token, against the layers' O(d^2) matmuls.
WIDTHS = ((256, 8), (512, 4), (1024, 2))
NO_CONDITIONING = "control: loop, no conditioning"


def configs(loops: int, strategy: str = DEFAULT_STRATEGY):
    from loopmoe.balance import balance
    from loopmoe.presets import get_preset

    reference = get_preset("bench")
    return reference, balance(reference, loops, strategy=strategy, seq_len=SEQ).looped


def controls(looped):
    """Where a gap comes from: the looped model's shapes without weight sharing (C*T distinct layers,
    T = 1: twice the parameters, same FLOPs), and the loop without iteration conditioning."""
    from loopmoe.config import LoopMoEConfig

    def variant(**overrides) -> LoopMoEConfig:  # a validated config, as balance() builds its candidates
        return LoopMoEConfig(**{**looped.architecture_dict(), "pad_token_id": looped.pad_token_id, **overrides})

    return {
        "control: shapes unrolled": variant(
            num_core_layers=looped.num_core_layers * looped.num_loops, num_loops=1, iter_conditioning="none"
        ),
        NO_CONDITIONING: variant(iter_conditioning="none"),
    }


def widened(reference, width: int):
    """The reference at ``width``: hidden size, attention heads and expert size scaled together."""
    from loopmoe.config import LoopMoEConfig

    scale = width // reference.hidden_size
    return LoopMoEConfig(
        **{
            **reference.architecture_dict(),
            "pad_token_id": reference.pad_token_id,
            "hidden_size": width,
            "num_attention_heads": reference.num_attention_heads * scale,
            "num_key_value_heads": reference.num_key_value_heads * scale,
            "moe_intermediate_size": reference.moe_intermediate_size * scale,
        }
    )


def width_sweep(loops: int, quick: bool, strategy: str = DEFAULT_STRATEGY) -> list[dict]:
    """At each width of ``WIDTHS``: the LoopMoE and its unconditioned loop paired against the Vanilla, and the
    share of the LoopMoE's step that its iteration conditioning costs (1 - unconditioned / conditioned time)."""
    from loopmoe.balance import balance
    from loopmoe.model import LoopMoEForCausalLM
    from loopmoe.presets import get_preset

    reference = get_preset("bench")  # configs()'s reference
    rows = []
    for width, batch in WIDTHS:
        vanilla = widened(reference, width)
        looped = balance(vanilla, loops, strategy=strategy, seq_len=SEQ).looped
        models = {}
        for name, cfg in {
            "vanilla": vanilla,
            "loopmoe": looped,
            NO_CONDITIONING: controls(looped)[NO_CONDITIONING],
        }.items():
            torch.manual_seed(0)
            models[name] = LoopMoEForCausalLM(cfg).train()
        ids = common.token_batch(batch, SEQ)
        t = common.interleaved(
            {k: common.fwd_bwd(m, ids) for k, m in models.items()},
            reps=3 if quick else 8,
            tries=6 if quick else 16,
            budget_s=60 if quick else 200,
        )
        rows.append(
            {
                "hidden_size": width,
                "batch": batch,
                "iter_cond_rank": looped.iter_cond_rank,
                "vanilla_tok_s": batch * SEQ / t["vanilla"]["median"],
                "loopmoe_vs_vanilla": common.speedup(t, "loopmoe", "vanilla"),
                "no_conditioning_vs_vanilla": common.speedup(t, NO_CONDITIONING, "vanilla"),
                "conditioning_share": 1 - t[NO_CONDITIONING]["median"] / t["loopmoe"]["median"],
                "time": t,
            }
        )
        print(f"  width {width}: {rows[-1]['conditioning_share']:.1%} of the LoopMoE step is conditioning", flush=True)
    return rows


def predicted_parts(cfg) -> dict:
    """The planner's fwd+bwd seconds of ``cfg`` at the bench's batch on this machine, by kind of work
    (``loopmoe.planning.cost.plan_compute`` on this machine's cached calibration, measured first, about a
    minute, where there is none; the optimizer left out as the bench leaves it out), from the model's traced
    ops: side by side for two models, what a gap between them is made of. A row's ``predicted_s``."""
    from loopmoe.planning import Layout
    from loopmoe.planning.calibration import cpu_profile
    from loopmoe.planning.cost import plan_compute

    threads = torch.get_num_threads()
    c = plan_compute(cfg, Layout(micro_batch=BATCH, seq_len=SEQ, threads=threads), cpu_profile(threads))
    return {"gemm": c.gemm, "attention": c.attention, "elementwise": c.elementwise, "overhead": c.overhead}


def child(which: str, loops: int, strategy: str) -> None:
    """Build one model, run one training step, print its memory as JSON (run in a fresh process)."""
    from loopmoe.model import LoopMoEForCausalLM

    common.setup()
    cfg = dict(zip(("vanilla", "loopmoe"), configs(loops, strategy)))[which]
    model = LoopMoEForCausalLM(cfg).train()
    ids = torch.randint(2, cfg.vocab_size, (BATCH, SEQ))
    print(json.dumps(common.step_memory(model, ids)))


def memory(which: str, loops: int, strategy: str) -> dict:
    return common.child_json("bench.loop_vs_vanilla", "--child", which, "--loops", str(loops), "--strategy", strategy)


def run(
    quick: bool = False,
    loops: int = 2,
    compiled: bool = False,
    widths: bool = False,
    strategy: str = DEFAULT_STRATEGY,
) -> dict:
    from loopmoe.budget import compute_budget
    from loopmoe.model import LoopMoEForCausalLM

    common.setup()
    ref_cfg, loop_cfg = configs(loops, strategy)
    hf = hf_parity.qwen_model("grouped_mm")
    vanilla = hf_parity.ours_from_qwen(hf)
    diff = hf_parity.check_logits(vanilla, hf)
    cfgs = {"vanilla": ref_cfg, "loopmoe": loop_cfg, **controls(loop_cfg)}
    models = {"vanilla": vanilla}
    for name, cfg in list(cfgs.items())[1:]:
        torch.manual_seed(0)
        models[name] = LoopMoEForCausalLM(cfg)
    ids = common.token_batch(BATCH, SEQ)
    for m in models.values():
        m.train()
    compile_s = {}
    if compiled:  # as `loopmoe train` compiles (train.compile): every decoder layer, inductor
        for name in ("vanilla", "loopmoe"):
            models[f"{name} (compiled)"], compile_s[name] = common.compiled_copy(models[name], ids)
            cfgs[f"{name} (compiled)"] = cfgs[name]

    t = common.interleaved(
        {k: common.fwd_bwd(m, ids) for k, m in models.items()},
        reps=5 if quick else 12,
        tries=10 if quick else 24,
        budget_s=45 if quick else 150,
    )
    peak = peak_gflops()
    rows = []
    for name, cfg in cfgs.items():
        b = compute_budget(cfg, SEQ)
        tps = BATCH * SEQ / t[name]["median"]
        rows.append(
            {
                "model": name,
                "loops": cfg.num_loops,
                "total_params": b.total_params,
                "flops_per_token": b.flops_per_token,
                "attn_ffn_ratio": b.attn_ffn_ratio,
                "tok_s": tps,
                "tok_s_min": BATCH * SEQ / t[name]["max"],
                "tok_s_max": BATCH * SEQ / t[name]["min"],
                "mfu": tps * 3 * b.flops_per_token / (peak * 1e9),
                "time": t[name],
                # compiled models against the compiled Vanilla
                "vs_vanilla": common.speedup(t, name, "vanilla (compiled)" if "compiled" in name else "vanilla"),
                "shape": {
                    k: getattr(cfg, k)
                    for k in (
                        "num_core_layers",
                        "num_loops",
                        "num_attention_heads",
                        "num_key_value_heads",
                        "head_dim",
                        "num_experts",
                        "num_experts_per_tok",
                        "moe_intermediate_size",
                        "iter_conditioning",
                    )
                },
                **(memory(name, loops, strategy) if name in ("vanilla", "loopmoe") else {}),
            }
        )
        if "compiled" not in name:  # the planner models eager steps
            rows[-1]["predicted_s"] = predicted_parts(cfg)
    return {
        "rows": rows,
        "loops": loops,
        "max_abs_diff_vanilla_vs_hf": diff,
        "peak_gflops": peak,
        "quick": quick,
        "compile_seconds": compile_s,
        "widths": width_sweep(loops, quick, strategy) if widths else [],
        "strategy": strategy,
    }


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--loops", type=int, default=2)
    ap.add_argument("--compile", action="store_true", help="also time both models compiled (apply_compile)")
    ap.add_argument("--widths", action="store_true", help="also the pair at wider references (WIDTHS)")
    ap.add_argument("--strategy", choices=STRATEGIES, default=DEFAULT_STRATEGY, help="how the LoopMoE is balanced")
    ap.add_argument("--child", choices=("vanilla", "loopmoe"), help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.child:
        return child(args.child, args.loops, args.strategy)
    res = run(args.quick, args.loops, args.compile, args.widths, args.strategy)
    print(
        markdown_table(
            [
                "model",
                "T",
                "params",
                "fwd MFLOP/tok",
                "tok/s median [min-max]",
                "vs vanilla (paired) [min-max]",
                "MFU",
                "peak RSS MiB",
                "step +MiB",
            ],
            [
                [
                    r["model"],
                    r["loops"],
                    f"{r['total_params'] / 1e6:.2f}M",
                    f"{r['flops_per_token'] / 1e6:.2f}",
                    f"{r['tok_s']:.0f} [{r['tok_s_min']:.0f}-{r['tok_s_max']:.0f}]",
                    common.fmt_speedup(r["vs_vanilla"]),
                    f"{100 * r['mfu']:.1f}%",
                    *(
                        f"{r[k]:.0f}" if k in r else "-"  # controls: not measured
                        for k in ("peak_rss_mib", "step_increase_mib")
                    ),
                ]
                for r in res["rows"]
            ],
        )
    )
    for r in res["rows"]:
        print(f"  {r['model']}: {r['shape']}")
    base = sum(res["rows"][0]["predicted_s"].values())
    print("Where the time goes, as the planner predicts it (fwd+bwd ms, this machine's calibration):")
    print(
        markdown_table(
            ["model", "GEMMs", "attention", "element-wise", "op overhead", "total", "predicted vs vanilla", "measured"],
            [
                [
                    r["model"],
                    *(f"{1e3 * r['predicted_s'][k]:.1f}" for k in ("gemm", "attention", "elementwise", "overhead")),
                    f"{1e3 * sum(r['predicted_s'].values()):.1f}",
                    f"{base / sum(r['predicted_s'].values()):.2f}x",
                    common.fmt_speedup(r["vs_vanilla"]),
                ]
                for r in res["rows"]
                if "predicted_s" in r
            ],
        )
    )
    if res["widths"]:
        print(
            markdown_table(
                [
                    "width d",
                    "batch",
                    "r",
                    "vanilla tok/s",
                    "loopmoe vs vanilla",
                    "no conditioning vs vanilla",
                    "conditioning share",
                ],
                [
                    [
                        w["hidden_size"],
                        w["batch"],
                        w["iter_cond_rank"],
                        f"{w['vanilla_tok_s']:.0f}",
                        common.fmt_speedup(w["loopmoe_vs_vanilla"]),
                        common.fmt_speedup(w["no_conditioning_vs_vanilla"]),
                        f"{100 * w['conditioning_share']:.1f}%",
                    ]
                    for w in res["widths"]
                ],
            )
        )
    common.write_json("loop_vs_vanilla", res)
    return res


if __name__ == "__main__":
    main()
