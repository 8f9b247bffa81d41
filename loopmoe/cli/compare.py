"""``loopmoe compare``: balance, train both models identically, evaluate, and write a report."""

from __future__ import annotations

from loopmoe.compare import CompareOptions, run_comparison
from loopmoe.options import add_options, options_from


def add_parser(sub) -> None:
    p = sub.add_parser(
        "compare",
        help="the main job: LoopMoE vs its matched Vanilla MoE, trained identically, with a report",
        description="With no arguments: the small reference and its capacity-balanced LoopMoE (T=2) on the "
        "embedded corpus, 1.2M tokens each, about 10 minutes on 2 CPU cores. Re-running resumes an interrupted comparison.",
    )
    add_options(p, CompareOptions)
    p.set_defaults(run=run)


def run(args) -> int:
    run_comparison(options_from(CompareOptions, args))
    return 0
