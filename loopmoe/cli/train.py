"""``loopmoe train CONFIG [section.key=value ...]``: one training run (single process or torchrun)."""

from __future__ import annotations

import json
import os
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import get_type_hints

from loopmoe.budget import compute_budget
from loopmoe.config import CONFIG_FIELDS, LoopMoEConfig, config_field_help
from loopmoe.distributed.env import env_world_size
from loopmoe.distributed.launch import launch
from loopmoe.errors import ConfigError
from loopmoe.options import (
    add_options,
    add_override_flags,
    add_overrides,
    given_overrides,
    metavar_of,
    option,
    options_from,
)
from loopmoe.text import human
from loopmoe.training import build_model_config, load_run_config, run_training
from loopmoe.training.builders import planned_vocab_size
from loopmoe.training.config import ModelSection, RunConfig

# LoopMoEConfig fields a run does not take from [model]: the tokenizer gives the vocabulary and token ids.
_FROM_TOKENIZER = ("vocab_size", "pad_token_id", "bos_token_id", "eos_token_id")


_LAUNCHER = "multi-process launcher (instead of torchrun)"


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
        help="start again from step 0: the previous run (checkpoints, e.g. ones that no longer verify, metrics.jsonl, "
        "run_config.json, tensorboard/, final/) is moved aside whole into OUT/restarted-<time>/, never deleted",
    )
    rebuild_data: bool = option(
        False,
        help="on resume, if the corpus or tokenizer changed since the checkpoint: move the old data aside "
        "(OUT/data/<name>.stepN) and continue on rebuilt data, instead of refusing",
    )
    nproc_per_node: int | None = option(
        None,
        help="start N training processes on this machine, as torchrun --nproc_per_node=N -m loopmoe train would "
        "(same launcher and environment), but a failed run ends with one line, not torchrun's traceback",
        aliases=("--nproc_per_node",),
        metavar="N",
        group=_LAUNCHER,
        shown="one process, no launcher",
    )
    nnodes: int = option(
        1, help="machines taking part (run the same command on each; with --nproc-per-node)", group=_LAUNCHER
    )
    node_rank: int = option(
        0, help="this machine's index among --nnodes (0 runs the rendezvous)", aliases=("--node_rank",), group=_LAUNCHER
    )
    master_addr: str = option(
        "127.0.0.1", help="address of machine 0, for --nnodes > 1", aliases=("--master_addr",), group=_LAUNCHER
    )
    master_port: int | None = option(
        None,
        help="port of the rendezvous on machine 0",
        aliases=("--master_port",),
        group=_LAUNCHER,
        shown="a free port with --nnodes 1, else 29500",
    )

    def launcher_flags_given(self) -> bool:
        return (self.nnodes, self.node_rank, self.master_addr, self.master_port) != (1, 0, "127.0.0.1", None)

    def worker_command(self) -> list[str]:
        """What each launched process runs after ``python -m loopmoe``: these options less the launcher's."""
        command = ["train", str(self.config), *self.overrides]
        if self.out is not None:
            command += ["--out", str(self.out)]
        return command + ["--restart"] * self.restart + ["--rebuild-data"] * self.rebuild_data


def add_parser(sub) -> None:
    p = sub.add_parser(
        "train",
        help="train a model from a run config (TOML)",
        description="Train from a TOML run config with dotted overrides (train.max_steps=100 optim.lr=3e-4, or "
        "--train.max_steps 100 --optim.lr 3e-4). Re-running the same command resumes from the newest complete "
        "checkpoint in --out. Multi-process: loopmoe train --nproc-per-node N CONFIG ... (or torchrun "
        "--nproc_per_node=N -m loopmoe train CONFIG ...).",
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
    opts: TrainOptions = options_from(TrainOptions, args)
    opts.overrides = [*opts.overrides, *given_overrides(args)]
    if opts.nproc_per_node is None and opts.launcher_flags_given():
        raise ConfigError("--nnodes, --node-rank, --master-addr and --master-port need --nproc-per-node N")
    if opts.nproc_per_node is not None and "RANK" in os.environ:
        raise ConfigError("--nproc-per-node starts its own processes: drop it when running under torchrun")
    if opts.nproc_per_node is not None and (opts.nproc_per_node < 1 or opts.nnodes < 1):
        raise ConfigError(
            f"--nproc-per-node {opts.nproc_per_node} --nnodes {opts.nnodes}: both must be whole numbers >= 1"
        )
    world_size = env_world_size() if opts.nproc_per_node is None else opts.nproc_per_node * opts.nnodes
    # Checked here, before any process starts: a config error is one line from the launcher itself.
    cfg = load_run_config(opts.config, opts.overrides, world_size=world_size)
    out = opts.out or Path("runs") / opts.config.stem
    if opts.dry_run:
        print_dry_run(cfg)
        return 0
    if opts.nproc_per_node is not None:
        return launch(
            opts.worker_command(),
            nproc_per_node=opts.nproc_per_node,
            nnodes=opts.nnodes,
            node_rank=opts.node_rank,
            master_addr=opts.master_addr,
            master_port=opts.master_port,
        )
    try:
        final = run_training(cfg, out, restart=opts.restart, rebuild_data=opts.rebuild_data)
    except KeyboardInterrupt:
        if "TORCHELASTIC_RUN_ID" not in os.environ:
            raise  # one process: Python's own ending (the user pressed Ctrl-C and sees where it stopped)
        # A worker of the launcher (or torchrun), which forwards Ctrl-C to every worker: end quietly, one
        # line from rank 0, instead of one KeyboardInterrupt traceback per worker.
        if os.environ.get("RANK", "0") == "0":
            print(
                "loopmoe train: interrupted; re-run the same command to resume from the last checkpoint",
                file=sys.stderr,
            )
        return 130
    if os.environ.get("RANK", "0") == "0":  # under torchrun, one summary, not one per process
        summary = {
            k: final[k] for k in ("step", "loss", "val_loss", "tokens", "skipped_steps", "final_dir") if k in final
        }
        print(json.dumps(summary, indent=2))
    return 0


def print_dry_run(cfg) -> None:
    """The resolved run config, and the budget of the model it builds (vocabulary from the tokenizer setting)."""
    print(json.dumps(cfg.to_dict(), indent=2, default=str))
    vocab, note = planned_vocab_size(cfg)
    model_cfg = build_model_config(cfg, vocab)
    b = compute_budget(model_cfg, cfg.data.seq_len)
    print(
        f"\nmodel: {model_cfg.num_prelude_layers}+{model_cfg.num_core_layers}x{model_cfg.num_loops}+"
        f"{model_cfg.num_coda_layers} layers, total {human(b.total_params)}, active {human(b.active_params)}, "
        f"{human(b.flops_per_token)} FLOPs/token at seq_len {cfg.data.seq_len}, attn/FFN ratio "
        f"{b.attn_ffn_ratio:.4f} (vocabulary {vocab}{note})"
    )
