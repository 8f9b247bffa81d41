"""``loopmoe convert --from qwen3-moe SRC DST``: import checkpoints of other architectures."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from loopmoe.convert import convert_qwen3_moe
from loopmoe.options import add_options, option, options_from

CONVERTERS = {"qwen3-moe": convert_qwen3_moe}  # the choices of ConvertOptions.source_format


@dataclass
class ConvertOptions:
    """The options of ``loopmoe convert``."""

    source_format: Literal["qwen3-moe"] = option(help="architecture of the source checkpoint", flag="--from")
    src: Path = option(help="source checkpoint directory (config.json + safetensors)", positional=True)
    dst: Path = option(help="output directory", positional=True)
    overwrite: bool = option(
        False,
        help="write into an existing non-empty folder loopmoe did not write, moving its contents aside "
        "(to NAME.previous-TIMESTAMP, kept)",
    )


def add_parser(sub) -> None:
    p = sub.add_parser(
        "convert",
        help="convert a transformers checkpoint into a LoopMoE checkpoint",
        description="Convert SRC, a transformers checkpoint of another architecture (--from qwen3-moe: config.json + "
        "safetensors), into a LoopMoE checkpoint in DST with the same weights: a T = 1 LoopMoE whose logits equal "
        "the source model's. Tokenizer files in SRC are copied along.",
    )
    add_options(p, ConvertOptions)
    p.set_defaults(run=run)


def run(args) -> int:
    opts: ConvertOptions = options_from(ConvertOptions, args)
    out = CONVERTERS[opts.source_format](opts.src, opts.dst, overwrite=opts.overwrite)
    print(f"wrote LoopMoE checkpoint to {out}")
    return 0
