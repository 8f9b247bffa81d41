"""``loopmoe budget``: derive the balanced LoopMoE from a reference and print both budgets."""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch

from loopmoe.balance import STRATEGIES, BalanceResult, balance
from loopmoe.cli.format import human
from loopmoe.presets import is_paper_scale, list_presets, load_model_config

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}


def add_parser(sub) -> None:
    p = sub.add_parser(
        "budget",
        help="budget table of a reference Vanilla MoE and its balanced LoopMoE",
        description="Derive the LoopMoE matched to REFERENCE (a preset name, a .toml/.json model config, or a "
        "checkpoint directory) and print total/active parameters, FLOPs per token and the "
        "attention-to-FFN ratio of both.",
    )
    p.add_argument("reference", help=f"preset ({', '.join(list_presets())}), config file, or checkpoint dir")
    p.add_argument("--loops", type=int, required=True, help="loop count T of the looped core")
    p.add_argument(
        "--strategy",
        choices=STRATEGIES,
        default="capacity",
        help="capacity (match params, FLOPs and ratio) or naive (same shapes, more experts)",
    )
    p.add_argument(
        "--seq-len", type=int, default=None, help="sequence length for FLOPs (default min(2048, max positions))"
    )
    p.add_argument("--prelude", type=int, default=0, help="prelude layers P run once before the core")
    p.add_argument("--coda", type=int, default=0, help="coda layers Q run once after the core")
    p.add_argument(
        "--iter-conditioning",
        default="iteradaln",
        choices=("none", "iter_embedding", "adaln_iter", "adaln_token", "iteradaln"),
    )
    p.add_argument("--json", action="store_true", help="print JSON instead of a table")
    p.add_argument(
        "--save-dir",
        type=Path,
        default=None,
        help="write both randomly initialised models as HF checkpoints in DIR/reference and DIR/looped",
    )
    p.add_argument("--dtype", choices=tuple(DTYPES), default="float32", help="dtype of the saved checkpoints")
    p.set_defaults(run=run)


def run(args) -> int:
    reference = load_model_config(args.reference)
    result = balance(
        reference,
        args.loops,
        strategy=args.strategy,
        seq_len=args.seq_len,
        num_prelude_layers=args.prelude,
        num_coda_layers=args.coda,
        iter_conditioning=args.iter_conditioning,
    )
    if args.json:
        print(json.dumps(result.as_dict(), indent=2))
    else:
        paper = (
            Path(args.reference).suffix == "" and args.reference in list_presets() and is_paper_scale(args.reference)
        )
        print(format_table(result, title=f"{args.reference}{' (paper scale)' if paper else ''}"))
    if args.save_dir is not None:
        save_models(result, args.save_dir, DTYPES[args.dtype])
    return 0


def format_table(result: BalanceResult, title: str = "") -> str:
    ref, loop = result.reference, result.looped
    rb, lb = result.reference_budget, result.looped_budget
    dev = result.deviations

    def layers(c):
        return f"{c.num_prelude_layers}+{c.num_core_layers}x{c.num_loops}+{c.num_coda_layers}"

    rows = [
        ("layers P+CxT+Q", layers(ref), layers(loop), ""),
        ("executed depth", rb.executed_depth, lb.executed_depth, ""),
        (
            "heads q/kv x size",
            f"{ref.num_attention_heads}/{ref.num_key_value_heads}x{ref.head_dim}",
            f"{loop.num_attention_heads}/{loop.num_key_value_heads}x{loop.head_dim}",
            "",
        ),
        (
            "experts E, top-k",
            f"{ref.num_experts}, {ref.num_experts_per_tok}",
            f"{loop.num_experts}, {loop.num_experts_per_tok}",
            "",
        ),
        (
            "expert size f (shared)",
            f"{ref.moe_intermediate_size} ({ref.shared_expert_intermediate_size})",
            f"{loop.moe_intermediate_size} ({loop.shared_expert_intermediate_size})",
            "",
        ),
        ("iteration conditioning", ref.iter_conditioning, loop.iter_conditioning, ""),
        ("total params", human(rb.total_params), human(lb.total_params), f"{dev['total_params']:+.2%}"),
        (
            "active params",
            human(rb.active_params),
            human(lb.active_params),
            f"{lb.active_params / rb.active_params - 1:+.2%}",
        ),
        (
            f"FLOPs/token (S={result.seq_len})",
            human(rb.flops_per_token),
            human(lb.flops_per_token),
            f"{dev['flops_per_token']:+.2%}",
        ),
        (
            "attn/FFN active ratio",
            f"{rb.attn_ffn_ratio:.4f}",
            f"{lb.attn_ffn_ratio:.4f}",
            f"{dev['attn_ffn_ratio']:+.2%}",
        ),
    ]
    head = ("", "reference (Vanilla MoE)", f"looped ({result.strategy})", "deviation")
    widths = [max(len(str(r[i])) for r in [*rows, head]) for i in range(4)]

    def line(r):
        return "| " + " | ".join(str(v).ljust(w) for v, w in zip(r, widths)) + " |"

    out = [
        f"## Budget: {title}, loops={loop.num_loops}" if title else "## Budget",
        "",
        line(head),
        "|" + "|".join("-" * (w + 2) for w in widths) + "|",
    ]
    out += [line(r) for r in rows]
    return "\n".join(out)


def save_models(result: BalanceResult, directory: Path, dtype: torch.dtype) -> None:
    """Write both models, randomly initialised, as HF checkpoints (refusing what cannot fit in memory)."""
    from loopmoe.model import LoopMoEForCausalLM

    bytes_per = torch.finfo(dtype).bits // 8
    need = max(result.reference_budget.total_params, result.looped_budget.total_params) * bytes_per
    available = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_AVPHYS_PAGES")
    if need > 0.8 * available:
        raise ValueError(
            f"--save-dir needs about {need / 2**30:.1f} GiB to build one model in {dtype} but "
            f"{available / 2**30:.1f} GiB are free: pass --dtype bfloat16 or a smaller reference"
        )
    for name, cfg in (("reference", result.reference), ("looped", result.looped)):
        model = LoopMoEForCausalLM(cfg).to(dtype)  # type: ignore[arg-type]  # transformers: .to is typed as wraps(nn.Module.to), its self as the first argument
        model.save_pretrained(directory / name)
        del model
        print(f"wrote {directory / name}")
