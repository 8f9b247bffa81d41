"""``loopmoe presets``: list the shipped model presets."""

from __future__ import annotations

from loopmoe.budget import compute_budget
from loopmoe.cli.format import human
from loopmoe.presets import get_preset, list_presets


def add_parser(sub) -> None:
    p = sub.add_parser("presets", help="list the model presets")
    p.set_defaults(run=run)


def run(args) -> int:
    print(f"{'preset':<10} {'total':>8} {'active':>8}  description")
    for name, meta in list_presets().items():
        b = compute_budget(get_preset(name), seq_len=2048)
        flag = "  [paper scale]" if meta["paper_scale"] else ""
        print(f"{name:<10} {human(b.total_params):>8} {human(b.active_params):>8}  {meta['description']}{flag}")
    return 0
