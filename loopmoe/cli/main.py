"""``loopmoe`` command line: one subcommand per module in this package."""

from __future__ import annotations

import argparse
import os
import sys
import warnings
from functools import partial

from loopmoe import __version__
from loopmoe.cli import budget, compare, convert, export, generate, plan, presets, serve, tasks, train
from loopmoe.cli import eval as eval_cli
from loopmoe.console import quiet_library_progress
from loopmoe.errors import LoopMoEError

SUBCOMMANDS = {
    "compare": compare,
    "budget": budget,
    "train": train,
    "eval": eval_cli,
    "generate": generate,
    "serve": serve,
    "convert": convert,
    "export": export,
    "presets": presets,
    "tasks": tasks,
    "plan": plan,
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="loopmoe", description="Looped Mixture-of-Experts language models.")
    parser.add_argument("--version", action="version", version=version_line())
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for _name, module in SUBCOMMANDS.items():
        module.add_parser(sub)
    return parser


def version_line() -> str:
    """``loopmoe X (torch Y, transformers Z)``: what a bug report needs to say."""
    import torch
    import transformers

    return f"loopmoe {__version__} (torch {torch.__version__}, transformers {transformers.__version__})"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """The command line parsed, positional ``section.key=value`` overrides accepted anywhere."""
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    # argparse cannot take positional `section.key=value` overrides after options
    # (`train CONFIG --max-steps 20 optim.lr=1e-3`); subcommands with overrides accept them anywhere.
    if extra and hasattr(args, "overrides") and all("=" in e and not e.startswith("-") for e in extra):
        args.overrides = [*args.overrides, *extra]
    elif extra:
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    quiet_library_progress()  # not on a terminal: no per-item bars of transformers / datasets in the log
    formatted = warnings.formatwarning
    warnings.formatwarning = partial(_one_line_warning, args.command)
    try:
        code = args.run(args) or 0
        sys.stdout.flush()  # inside the try: a closed pipe (`loopmoe budget --json | head -1`) surfaces here
        return code
    except BrokenPipeError:
        # The reader went away: stop quietly, as `cat` does. Point stdout at devnull so the interpreter's
        # final flush does not raise again.
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        return 141  # 128 + SIGPIPE, what a shell reports for a process killed by SIGPIPE
    except LoopMoEError as err:
        if os.environ.get("LOOPMOE_TRACEBACK") == "1":
            raise
        # Under torchrun every rank hits the same config error: say it once (rank 0), with no traceback.
        # Any other exception is a bug whose location matters: it keeps its traceback.
        if os.environ.get("RANK", "0") == "0":
            print(f"loopmoe {args.command}: error: {err}", file=sys.stderr)
        return 2
    finally:
        warnings.formatwarning = formatted


def _one_line_warning(command: str, message, category, filename, lineno, line=None) -> str:
    """A warning shown as ``loopmoe COMMAND: warning: ...``, like errors: the message says it all, not the
    source line (only the text changes: filters and recording work as ever)."""
    return f"loopmoe {command}: warning: {message}\n"


if __name__ == "__main__":
    sys.exit(main())
