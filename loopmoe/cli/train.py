"""``loopmoe train CONFIG [section.key=value ...]``: one training run (single process or torchrun)."""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import get_type_hints

from loopmoe.config import CONFIG_FIELDS, LoopMoEConfig, config_field_help
from loopmoe.options import (
    add_options,
    add_override_flags,
    add_overrides,
    given_overrides,
    metavar_of,
    option,
    options_from,
)
from loopmoe.training.config import ModelSection, RunConfig

# LoopMoEConfig fields a run does not take from [model]: the tokenizer gives the vocabulary and token ids.
_FROM_TOKENIZER = ("vocab_size", "pad_token_id", "bos_token_id", "eos_token_id")


@dataclass
class TrainOptions:
    """The options of ``loopmoe train`` beside the run config's own keys."""

    config: Path = option(help="run config, e.g. configs/debug.toml", positional=True)
    overrides: list[str] = option(
        default_factory=list, help="config overrides, e.g. optim.lr=1e-3", positional=True, metavar="section.key=value"
    )
    out: Path | None = option(None, help="run directory", shown="runs/<config name>")
    dry_run: bool = option(False, help="print the resolved config and model budget, then exit")
    restart: bool = option(
        False,
        help="start again from step 0: existing checkpoints (e.g. ones that no longer verify) are moved aside "
        "into OUT/checkpoints/rejected-<time>/, never deleted",
    )
    rebuild_data: bool = option(
        False,
        help="on resume, if the corpus or tokenizer changed since the checkpoint: move the old data aside "
        "(OUT/data/<name>.stepN) and continue on rebuilt data, instead of refusing",
    )


def add_parser(sub) -> None:
    p = sub.add_parser(
        "train",
        help="train a model from a run config (TOML)",
        description="Train from a TOML run config with dotted overrides (train.max_steps=100 optim.lr=3e-4, or "
        "--train.max_steps 100 --optim.lr 3e-4). Re-running the same command resumes from the newest complete "
        "checkpoint in --out. Multi-process: torchrun --nproc_per_node=N -m loopmoe train CONFIG ...",
    )
    add_options(p, TrainOptions)
    for name, cls in get_type_hints(RunConfig).items():
        doc = " ".join((cls.__doc__ or "").split("\n\n")[0].split())
        add_overrides(
            p,
            name,
            cls,
            f"[{name}] keys",
            f"{doc} A flag overrides the config file; the default is that of a key the file omits.",
        )
        if name == "model":
            _add_model_fields(p)
    p.set_defaults(run=run)


def _add_model_fields(parser) -> None:
    """``--model.KEY`` for every LoopMoEConfig field a run config may set over the preset, with the
    meaning documented on ``LoopMoEConfig`` (``config_field_help``)."""
    section = get_type_hints(ModelSection)
    hints = get_type_hints(LoopMoEConfig.__init__)
    meaning = config_field_help()
    keys = [
        (f, (), metavar_of(hints[f]), f"{meaning[f].replace('``', '').rstrip('.')} (default: the preset's)")
        for f in CONFIG_FIELDS
        if f not in section and f not in _FROM_TOKENIZER
    ]
    group = parser.add_argument_group(
        "[model] LoopMoEConfig fields",
        "Architecture fields over the preset (in TOML: plain [model] keys, e.g. hidden_size = 128).",
    )
    add_override_flags(group, "model", keys)


def run(args) -> int:
    from loopmoe.distributed.env import env_world_size
    from loopmoe.training import load_run_config, run_training

    opts: TrainOptions = options_from(TrainOptions, args)
    overrides = [*opts.overrides, *given_overrides(args)]
    cfg = load_run_config(opts.config, overrides, world_size=env_world_size())
    out = opts.out or Path("runs") / opts.config.stem
    if opts.dry_run:
        print_dry_run(cfg)
        return 0
    final = run_training(cfg, out, restart=opts.restart, rebuild_data=opts.rebuild_data)
    if os.environ.get("RANK", "0") == "0":  # under torchrun, one summary, not one per process
        summary = {
            k: final[k] for k in ("step", "loss", "val_loss", "tokens", "skipped_steps", "final_dir") if k in final
        }
        print(json.dumps(summary, indent=2))
    return 0


def print_dry_run(cfg) -> None:
    """The resolved run config, and the budget of the model it builds (vocabulary from the tokenizer setting)."""
    from loopmoe.budget import compute_budget
    from loopmoe.presets import get_preset
    from loopmoe.text import human
    from loopmoe.training import build_model_config

    print(json.dumps(cfg.to_dict(), indent=2, default=str))
    if cfg.model.config is not None:
        vocab, note = cfg.model.config.vocab_size, " of model.config"
    elif cfg.data.train_bpe_vocab:
        vocab, note = cfg.data.train_bpe_vocab, ""
    else:
        vocab, note = get_preset(cfg.model.preset).vocab_size, " from the preset; the tokenizer sets it"
    model_cfg = build_model_config(cfg, vocab)
    b = compute_budget(model_cfg, cfg.data.seq_len)
    print(
        f"\nmodel: {model_cfg.num_prelude_layers}+{model_cfg.num_core_layers}x{model_cfg.num_loops}+"
        f"{model_cfg.num_coda_layers} layers, total {human(b.total_params)}, active {human(b.active_params)}, "
        f"{human(b.flops_per_token)} FLOPs/token at seq_len {cfg.data.seq_len}, attn/FFN ratio "
        f"{b.attn_ffn_ratio:.4f} (vocabulary {vocab}{note})"
    )
