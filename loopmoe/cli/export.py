"""``loopmoe export --to qwen3-moe MODEL OUT``: write a LoopMoE checkpoint in another architecture's format."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from loopmoe.convert import export_qwen3_moe
from loopmoe.options import add_options, option, options_from

EXPORTERS = {"qwen3-moe": export_qwen3_moe}  # the choices of ExportOptions.target_format


@dataclass
class ExportOptions:
    """The options of ``loopmoe export``."""

    target_format: Literal["qwen3-moe"] = option(
        help="architecture to write (loads as transformers' Qwen3MoeForCausalLM)", flag="--to"
    )
    model: Path = option(help="LoopMoE checkpoint directory", positional=True)
    out: Path = option(help="output directory", positional=True)
    overwrite: bool = option(
        False,
        help="write into an existing non-empty folder loopmoe did not write, moving its contents aside "
        "(to NAME.previous-TIMESTAMP, kept)",
    )


def add_parser(sub) -> None:
    p = sub.add_parser(
        "export",
        help="write a LoopMoE checkpoint as another architecture (exactly, or an error naming why not)",
        description="Write a LoopMoE checkpoint as a Qwen3-MoE one: a T = 1 model as it is, a looped model "
        "without iteration conditioning or re-injection unrolled into P + C*T + Q layers. Logits are identical; "
        "a model Qwen3-MoE cannot express is refused with the reasons.",
    )
    add_options(p, ExportOptions)
    p.set_defaults(run=run)


def run(args) -> int:
    opts: ExportOptions = options_from(ExportOptions, args)
    out = EXPORTERS[opts.target_format](opts.model, opts.out, overwrite=opts.overwrite)
    print(f"wrote {opts.target_format} checkpoint to {out}")
    return 0
