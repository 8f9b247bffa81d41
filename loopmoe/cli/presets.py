"""``loopmoe presets``: list the shipped model presets."""

from __future__ import annotations

from loopmoe.budget import compute_budget
from loopmoe.presets import get_preset, list_presets
from loopmoe.text import human, markdown_table


def add_parser(sub) -> None:
    p = sub.add_parser(
        "presets",
        help="list the model presets",
        description="List the shipped model presets (Vanilla MoE reference configs, T = 1) with their total and "
        "active parameters at sequence length 2048. Use a name as `loopmoe budget NAME`, or as model.preset in a "
        "run config; paper-scale presets are marked.",
    )
    p.set_defaults(run=run)


def run(args) -> int:
    rows = []
    for name, meta in list_presets().items():
        b = compute_budget(get_preset(name), seq_len=2048)
        flag = " [paper scale]" if meta["paper_scale"] else ""
        rows.append((name, human(b.total_params), human(b.active_params), f"{meta['description']}{flag}"))
    print(markdown_table(("preset", "total", "active", "description"), rows, align="lrrl"))
    return 0
