"""``loopmoe convert --from qwen3-moe SRC DST``: import checkpoints of other architectures."""

from __future__ import annotations

from pathlib import Path

from loopmoe.convert import convert_qwen3_moe

CONVERTERS = {"qwen3-moe": convert_qwen3_moe}


def add_parser(sub) -> None:
    p = sub.add_parser("convert", help="convert a transformers checkpoint into a LoopMoE checkpoint")
    p.add_argument("--from", dest="source_format", choices=tuple(CONVERTERS), required=True)
    p.add_argument("src", type=Path, help="source checkpoint directory (config.json + safetensors)")
    p.add_argument("dst", type=Path, help="output directory")
    p.set_defaults(run=run)


def run(args) -> int:
    out = CONVERTERS[args.source_format](args.src, args.dst)
    print(f"wrote LoopMoE checkpoint to {out}")
    return 0
