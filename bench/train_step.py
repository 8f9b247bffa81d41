"""(3) Whole-model training step: tokens/s and model FLOP utilisation, LoopMoE vs transformers.

    python -m bench.train_step [--quick]

transformers' Qwen3MoeForCausalLM (tiny config of shared/bench/hf_qwen3moe_reference.py, random
weights, ``experts_implementation`` grouped_mm and eager) and LoopMoE with T = 1 converted from the
same weights by ``loopmoe.convert.qwen3_moe``; logits are checked equal (< 1e-4) first. Batch 8 x
256, timed interleaved: forward+backward, and forward+backward+AdamW step; LoopMoE also with its
decoder layers compiled (``apply_compile``, inductor; compile time reported apart). In training mode with labels
LoopMoE computes the loss fused with the LM head (no logits), so the training loss and the LM-head and
embedding gradients are also checked against transformers' first. MFU = 3 x analytic
forward FLOPs/token (``loopmoe.budget``) x tokens/s / measured peak (``bench.peak_flops``).
Writes bench/results/train_step.json.
"""

from __future__ import annotations

import torch

from bench import common
from bench.peak_flops import peak_gflops
from loopmoe.testing import hf_parity
from loopmoe.text import markdown_table

BATCH, SEQ = 8, 256


def run(quick: bool = False) -> dict:
    from loopmoe.budget import compute_budget

    common.setup()
    peak = peak_gflops()
    refs = {impl: hf_parity.qwen_model(impl) for impl in ("grouped_mm", "eager")}
    ours = hf_parity.ours_from_qwen(refs["grouped_mm"])
    diff = {impl: hf_parity.check_logits(ours, ref) for impl, ref in refs.items()}
    flops_tok = 3 * compute_budget(ours.config, SEQ).flops_per_token  # training = fwd + 2x for bwd
    ids = common.token_batch(BATCH, SEQ)
    train_diff = hf_parity.check_training(ours.train(), refs["grouped_mm"].train(), ids)
    compiled, compile_s = common.compiled_copy(ours, ids)  # regional: every decoder layer, inductor
    compiled.zero_grad(set_to_none=True)
    compiled_loss = compiled(input_ids=ids, labels=ids).loss.item()
    eager_loss = ours(input_ids=ids, labels=ids).loss.item()
    models = {"ours": ours, "ours_compiled": compiled, **{f"hf_{k}": v for k, v in refs.items()}}
    opts = {k: torch.optim.AdamW(m.parameters(), lr=1e-4) for k, m in models.items()}
    for m in models.values():
        m.train()

    def train_step(m, opt):
        def fn():
            common.fwd_bwd(m, ids)()
            opt.step()

        return fn

    reps, tries, budget = (3, 8, 25) if quick else (5, 14, 60)
    t1 = common.interleaved(
        {k: common.fwd_bwd(m, ids) for k, m in models.items()}, reps=reps, tries=tries, budget_s=budget
    )
    t2 = common.interleaved(
        {k: train_step(m, opts[k]) for k, m in models.items()}, reps=reps, tries=tries, budget_s=budget
    )
    tokens = BATCH * SEQ
    rows = []
    for k in models:
        for what, t in (("fwd+bwd", t1), ("fwd+bwd+AdamW", t2)):
            tps = tokens / t[k]["median"]
            rows.append(
                {
                    "model": k,
                    "step": what,
                    "tok_s": tps,
                    "tok_s_min": tokens / t[k]["max"],
                    "tok_s_max": tokens / t[k]["min"],
                    "mfu": tps * flops_tok / (peak * 1e9),
                    "time": t[k],
                    "vs_hf": common.speedup(t, k, "hf_grouped_mm"),
                }
            )
    return {
        "rows": rows,
        "compile_seconds": compile_s,
        "compiled_vs_eager_loss": {"compiled": compiled_loss, "eager": eager_loss},
        "peak_gflops": peak,
        "train_flops_per_token": flops_tok,
        "max_abs_diff": diff,
        "training_rel_diff": train_diff,
        "batch": BATCH,
        "seq": SEQ,
        "quick": quick,
    }


def main(argv=None) -> dict:
    res = run(common.quick_flag(__doc__, argv))
    print(
        markdown_table(
            ["model", "step", "tok/s median [min-max]", "ms/step", "MFU", "vs HF grouped_mm (paired) [min-max]"],
            [
                [
                    r["model"],
                    r["step"],
                    f"{r['tok_s']:.0f} [{r['tok_s_min']:.0f}-{r['tok_s_max']:.0f}]",
                    f"{r['time']['median'] * 1e3:.0f}",
                    f"{100 * r['mfu']:.1f}%",
                    common.fmt_speedup(r["vs_hf"]),
                ]
                for r in res["rows"]
            ],
        )
    )
    print(
        f"batch {BATCH}x{SEQ}, {res['train_flops_per_token'] / 1e6:.1f} MFLOP/token (3x forward), "
        f"peak {res['peak_gflops']:.1f} GFLOP/s, logits max |diff| {max(res['max_abs_diff'].values()):.1e}, "
        f"training loss / LM-head grad / embedding grad rel. diff "
        + " / ".join(f"{v:.1e}" for v in res["training_rel_diff"].values())
    )
    common.write_json("train_step", res)
    return res


if __name__ == "__main__":
    main()
