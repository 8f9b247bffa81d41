"""``loopmoe train CONFIG [section.key=value ...]``: one training run (single process or torchrun)."""

from __future__ import annotations

import json
import os
from pathlib import Path


def add_parser(sub) -> None:
    p = sub.add_parser(
        "train",
        help="train a model from a run config (TOML)",
        description="Train from a TOML run config with dotted overrides (train.max_steps=100 optim.lr=3e-4). "
        "Re-running the same command resumes from the newest complete checkpoint in --out. "
        "Multi-process: torchrun --nproc_per_node=N -m loopmoe train CONFIG ...",
    )
    p.add_argument("config", type=Path, help="run config, e.g. configs/debug.toml")
    p.add_argument("overrides", nargs="*", metavar="section.key=value", help="config overrides")
    p.add_argument("--out", type=Path, default=None, help="run directory (default runs/<config name>)")
    p.add_argument("--max-steps", type=int, default=None, help="override train.max_steps")
    p.add_argument("--checkpoint-every", type=int, default=None, help="override train.checkpoint_every")
    p.add_argument("--dry-run", action="store_true", help="print the resolved config and model budget, then exit")
    p.set_defaults(run=run)


def run(args) -> int:
    from loopmoe.distributed.env import env_world_size
    from loopmoe.training import load_run_config, run_training

    overrides = list(args.overrides)
    if args.max_steps is not None:
        overrides.append(f"train.max_steps={args.max_steps}")
    if args.checkpoint_every is not None:
        overrides.append(f"train.checkpoint_every={args.checkpoint_every}")
    cfg = load_run_config(args.config, overrides, world_size=env_world_size())
    out = args.out or Path("runs") / args.config.stem
    if args.dry_run:
        print_dry_run(cfg)
        return 0
    final = run_training(cfg, out)
    if os.environ.get("RANK", "0") == "0":  # under torchrun, one summary, not one per process
        summary = {
            k: final[k] for k in ("step", "loss", "val_loss", "tokens", "skipped_steps", "final_dir") if k in final
        }
        print(json.dumps(summary, indent=2))
    return 0


def print_dry_run(cfg) -> None:
    """The resolved run config, and the budget of the model it builds (vocabulary from the tokenizer setting)."""
    from loopmoe.budget import compute_budget
    from loopmoe.cli.format import human
    from loopmoe.presets import get_preset
    from loopmoe.training import build_model_config

    print(json.dumps(cfg.to_dict(), indent=2, default=str))
    vocab = cfg.data.train_bpe_vocab or get_preset(cfg.model.preset).vocab_size
    model_cfg = build_model_config(cfg, vocab)
    b = compute_budget(model_cfg, cfg.data.seq_len)
    print(
        f"\nmodel: {model_cfg.num_prelude_layers}+{model_cfg.num_core_layers}x{model_cfg.num_loops}+"
        f"{model_cfg.num_coda_layers} layers, total {human(b.total_params)}, active {human(b.active_params)}, "
        f"{human(b.flops_per_token)} FLOPs/token at seq_len {cfg.data.seq_len}, attn/FFN ratio "
        f"{b.attn_ffn_ratio:.4f} (vocabulary {vocab}{'' if cfg.data.train_bpe_vocab else ' from the preset; the tokenizer sets it'})"
    )
