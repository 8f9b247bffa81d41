"""(7) Activation checkpointing: activation memory and step time of none / selective / full.

    python -m bench.activation_checkpointing [--quick]

A looped model at T = 4 (the ``bench`` preset's shapes with its core run four times, IterAdaLN),
where activations grow with the executed depth while parameters do not. For each mode of
``loopmoe.distributed.parallelize.apply_activation_checkpointing``:
- saved activations: the bytes autograd keeps for backward during the forward (unique storages,
  parameters excluded), counted with ``torch.autograd.graph.saved_tensors_hooks``: exact and
  repeatable;
- step memory: peak RSS of a training step in a fresh process (``common.step_memory``);
- step time: forward+backward, timed interleaved with the other modes (paired ratios vs ``none``).
Writes bench/results/activation_checkpointing.json.
"""

from __future__ import annotations

import argparse
import json

import torch

from bench import common
from loopmoe.text import markdown_table

BATCH, SEQ, LOOPS = 8, 256, 4
MODES = {"none": ("none", 1), "selective (every 2nd)": ("selective", 2), "full": ("full", 1)}


def build(mode: str, every: int):
    from loopmoe.distributed.parallelize import apply_activation_checkpointing
    from loopmoe.model import LoopMoEForCausalLM
    from loopmoe.presets import get_preset

    torch.manual_seed(0)
    model = LoopMoEForCausalLM(get_preset("bench", num_loops=LOOPS)).train()
    return apply_activation_checkpointing(model, mode, every)


def saved_activation_bytes(model, ids) -> int:
    """Bytes of the distinct tensors autograd saves for backward in one forward, parameters excluded."""
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    storages: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        s = t.untyped_storage()
        if s.data_ptr() not in params:
            storages[s.data_ptr()] = s.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss = model(input_ids=ids, labels=ids).loss
    loss.backward()
    model.zero_grad(set_to_none=True)
    return sum(storages.values())


def child(name: str) -> None:
    common.setup()
    model = build(*MODES[name])
    print(json.dumps(common.step_memory(model, common.token_batch(BATCH, SEQ))))


def run(quick: bool = False) -> dict:
    common.setup()
    ids = common.token_batch(BATCH, SEQ)
    models = {name: build(*spec) for name, spec in MODES.items()}
    t = common.interleaved(
        {name: common.fwd_bwd(m, ids) for name, m in models.items()},
        reps=3 if quick else 8,
        tries=6 if quick else 16,
        budget_s=40 if quick else 120,
    )
    rows = []
    for name, m in models.items():
        rows.append(
            {
                "mode": name,
                "saved_activations_mib": saved_activation_bytes(m, ids) / 2**20,
                **common.child_json("bench.activation_checkpointing", "--child", name),
                "time": t[name],
                "vs_none": common.speedup(t, name, "none"),
            }
        )
    cfg = models["none"].config
    return {"rows": rows, "batch": BATCH, "seq": SEQ, "loops": LOOPS, "executed_depth": cfg.executed_depth()}


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--child", choices=list(MODES), help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.child:
        child(args.child)
        return {}
    res = run(args.quick)
    print(
        markdown_table(
            ["mode", "saved activations MiB", "step peak RSS MiB", "step increase MiB", "fwd+bwd ms", "speed vs none"],
            [
                [
                    r["mode"],
                    f"{r['saved_activations_mib']:.0f}",
                    f"{r['peak_rss_mib']:.0f}",
                    f"{r['step_increase_mib']:.0f}",
                    common.fmt_t(r["time"]),
                    common.fmt_speedup(r["vs_none"]),
                ]
                for r in res["rows"]
            ],
        )
    )
    common.write_json("activation_checkpointing", {**res, "quick": args.quick})
    return res


if __name__ == "__main__":
    main()
