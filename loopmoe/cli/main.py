"""``loopmoe`` command line: one subcommand per module in this package."""

from __future__ import annotations

import argparse
import sys

from loopmoe.cli import budget, compare, convert, presets, train
from loopmoe.cli import eval as eval_cli

SUBCOMMANDS = {"compare": compare, "budget": budget, "train": train, "eval": eval_cli, "convert": convert, "presets": presets}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="loopmoe", description="Looped Mixture-of-Experts language models.")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name, module in SUBCOMMANDS.items():
        module.add_parser(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.run(args) or 0
    except (ValueError, FileNotFoundError) as err:
        print(f"loopmoe {args.command}: error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
