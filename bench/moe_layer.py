"""(2) MoE layer forward+backward throughput: LoopMoE's SparseMoE vs transformers' Qwen3-MoE block.

    python -m bench.moe_layer [--quick]

For each expert configuration and token count, both layers get the same weights (router and
3-D expert tensors), their outputs are checked equal (max abs diff < 1e-4), then
``y = layer(x); (y * g).sum().backward()`` is timed interleaved: ours, transformers with
``experts_implementation="grouped_mm"`` and ``"eager"``. Our timing includes the router
statistics and balancing losses (the reference block computes none). Writes
bench/results/moe_layer.json and docs/moe_layer_throughput.png.
"""

from __future__ import annotations

from pathlib import Path

import torch

from bench import common
from loopmoe.text import markdown_table

# (name, hidden d, experts E, top-k, expert size f)
CONFIGS = [
    ("E8-k2-f512 (bench)", 256, 8, 2, 512),
    ("E32-k4-f128 (fine-grained)", 256, 32, 4, 128),
    ("E64-k8-f64 (finer)", 256, 64, 8, 64),
]
TOKENS = [64, 256, 1024, 2048, 4096]
QUICK_TOKENS = [256, 2048]
IMPLS = ("grouped_mm", "eager")


def build(d: int, E: int, k: int, f: int, seed: int = 0):
    from transformers import Qwen3MoeConfig
    from transformers.models.qwen3_moe.modeling_qwen3_moe import Qwen3MoeSparseMoeBlock

    from loopmoe import LoopMoEConfig
    from loopmoe.model.moe import SparseMoE

    torch.manual_seed(seed)
    ours = SparseMoE(
        LoopMoEConfig(hidden_size=d, num_experts=E, num_experts_per_tok=k, moe_intermediate_size=f, norm_topk_prob=True)
    )
    with torch.no_grad():
        torch.nn.init.normal_(ours.gate.weight, std=0.02)
        torch.nn.init.normal_(ours.experts.gate_up_proj, std=0.02)
        torch.nn.init.normal_(ours.experts.down_proj, std=0.02)
    refs = {}
    for impl in IMPLS:
        qcfg = Qwen3MoeConfig(
            hidden_size=d, num_experts=E, num_experts_per_tok=k, moe_intermediate_size=f, norm_topk_prob=True
        )
        qcfg._experts_implementation = impl
        ref = Qwen3MoeSparseMoeBlock(qcfg)
        with torch.no_grad():
            ref.gate.weight.copy_(ours.gate.weight)
            ref.experts.gate_up_proj.copy_(ours.experts.gate_up_proj)
            ref.experts.down_proj.copy_(ours.experts.down_proj)
        refs[impl] = ref
    return ours, refs


def step(layer, x: torch.Tensor, g: torch.Tensor, ours_layer: bool = False):
    """The timed unit: ``y = layer(x); (y * g).sum().backward()`` (ours returns a tuple, the reference a tensor)."""

    def fn():
        xi = x.detach().requires_grad_()
        layer.zero_grad(set_to_none=True)
        out = layer(xi)[0] if ours_layer else layer(xi)
        (out * g).sum().backward()

    return fn


def run(quick: bool = False) -> dict:
    common.setup()
    tokens = QUICK_TOKENS if quick else TOKENS
    configs = CONFIGS[:2] if quick else CONFIGS
    results = []
    for name, d, E, k, f in configs:
        ours, refs = build(d, E, k, f)
        for n in tokens:
            x = torch.randn(1, n, d, generator=torch.Generator().manual_seed(n)) * 0.5
            g = torch.randn(1, n, d, generator=torch.Generator().manual_seed(n + 1))
            with torch.no_grad():
                y = ours(x)[0]
                diffs = {impl: (y - ref(x)).abs().max().item() for impl, ref in refs.items()}
            if max(diffs.values()) >= 1e-4:
                raise AssertionError(f"{name} N={n}: outputs differ from transformers: {diffs}")

            fns = {"ours": step(ours, x, g, True), **{f"hf_{impl}": step(ref, x, g) for impl, ref in refs.items()}}
            t = common.interleaved(fns, reps=3 if quick else 5, tries=8 if quick else 12, budget_s=6 if quick else 12)
            row = {
                "config": name,
                "d": d,
                "E": E,
                "k": k,
                "f": f,
                "tokens": n,
                "max_abs_diff": diffs,
                **{f"{key}_s": v for key, v in t.items()},
                **{f"{key}_tok_s": n / v["median"] for key, v in t.items()},
            }
            results.append(row)
            print(
                f"  {name:28s} N={n:5d}: " + ", ".join(f"{key} {n / v['median']:8.0f} tok/s" for key, v in t.items()),
                flush=True,
            )
    return {"rows": results, "quick": quick}


def plot(res: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    configs = list(dict.fromkeys(r["config"] for r in res["rows"]))
    fig, axes = plt.subplots(1, len(configs), figsize=(5 * len(configs), 4), squeeze=False)
    for ax, cfg in zip(axes[0], configs):
        rows = [r for r in res["rows"] if r["config"] == cfg]
        n = [r["tokens"] for r in rows]
        for key, style in (("ours", "o-"), ("hf_grouped_mm", "s--"), ("hf_eager", "^:")):
            med = [r[f"{key}_tok_s"] for r in rows]
            lo = [r["tokens"] / r[f"{key}_s"]["max"] for r in rows]
            hi = [r["tokens"] / r[f"{key}_s"]["min"] for r in rows]
            ax.plot(n, med, style, label={"ours": "LoopMoE SparseMoE"}.get(key, key.replace("hf_", "transformers ")))
            ax.fill_between(n, lo, hi, alpha=0.15)
        ax.set_xscale("log", base=2)
        ax.set_xlabel("tokens per call")
        ax.set_ylabel("fwd+bwd tokens/s")
        ax.set_title(cfg)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.suptitle(f"MoE layer forward+backward, fp32 CPU, {torch.get_num_threads()} threads (median, band = min..max)")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv=None) -> dict:
    res = run(common.quick_flag(__doc__, argv))
    rows = [
        [
            r["config"],
            r["tokens"],
            f"{r['ours_tok_s']:.0f}",
            f"{r['hf_grouped_mm_tok_s']:.0f}",
            f"{r['hf_eager_tok_s']:.0f}",
            f"{r['ours_tok_s'] / r['hf_grouped_mm_tok_s']:.2f}x",
            f"{r['ours_tok_s'] / r['hf_eager_tok_s']:.2f}x",
            f"{max(r['max_abs_diff'].values()):.1e}",
        ]
        for r in res["rows"]
    ]
    print(
        markdown_table(
            ["config", "tokens", "ours tok/s", "HF grouped_mm", "HF eager", "vs grouped_mm", "vs eager", "max |diff|"],
            rows,
        )
    )
    common.write_json("moe_layer", res)
    png = common.DOCS / ("moe_layer_throughput_quick.png" if res["quick"] else "moe_layer_throughput.png")
    plot(res, png)
    print(f"plot: {png.relative_to(common.ROOT)}")
    return res


if __name__ == "__main__":
    main()
