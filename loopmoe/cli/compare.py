"""``loopmoe compare``: balance, train every arm identically, evaluate, and write a report."""

from __future__ import annotations

from pathlib import Path

from loopmoe.compare import CompareOptions, run_comparison
from loopmoe.options import add_options, options_from


def add_parser(sub) -> None:
    p = sub.add_parser(
        "compare",
        help="the main job: LoopMoE vs its matched Vanilla MoE, trained identically, with a report",
        description="With no arguments: the small reference and its capacity-balanced LoopMoE (T=2) on the "
        "embedded corpus, 1.2M tokens each, about 10 minutes on 2 CPU cores. Re-running resumes an interrupted "
        "comparison. --config runs a study described by a file (configs/study/eltec.toml); flags typed after it "
        "override the file.",
    )
    p.add_argument(
        "--config",
        type=Path,
        metavar="TOML",
        help="a study config: top-level keys are the options below (snake_case), [arm.NAME] tables define arms",
    )
    add_options(p, CompareOptions, given_only=True)
    p.set_defaults(run=run)


def run(args) -> int:
    base = CompareOptions.from_toml(args.config) if args.config is not None else None
    run_comparison(options_from(CompareOptions, args, base))
    return 0
