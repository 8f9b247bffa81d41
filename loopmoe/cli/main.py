"""``loopmoe`` command line: one subcommand per module in this package."""

from __future__ import annotations

import argparse
import sys

from loopmoe.cli import budget, compare, convert, presets, train
from loopmoe.cli import eval as eval_cli

SUBCOMMANDS = {
    "compare": compare,
    "budget": budget,
    "train": train,
    "eval": eval_cli,
    "convert": convert,
    "presets": presets,
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="loopmoe", description="Looped Mixture-of-Experts language models.")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for _name, module in SUBCOMMANDS.items():
        module.add_parser(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    # argparse cannot take positional `section.key=value` overrides after options
    # (`train CONFIG --max-steps 20 optim.lr=1e-3`); subcommands with overrides accept them anywhere.
    if extra and hasattr(args, "overrides") and all("=" in e and not e.startswith("-") for e in extra):
        args.overrides = [*args.overrides, *extra]
    elif extra:
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    try:
        return args.run(args) or 0
    except (ValueError, FileNotFoundError) as err:
        print(f"loopmoe {args.command}: error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
