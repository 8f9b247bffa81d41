"""``loopmoe plan RUN_CONFIG [section.key=value ...] --hardware NAME [--devices N] [--json]``: the predicted
cost of a training run (docs/planning.md) without running it."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from loopmoe.options import add_options, option, options_from
from loopmoe.planning.hardware import HARDWARE_NAMES


@dataclass
class PlanOptions:
    """The options of ``loopmoe plan``."""

    config: Path | None = option(
        None, help="run config (as for `loopmoe train`), e.g. configs/debug.toml", positional=True
    )
    overrides: list[str] = option(
        default_factory=list,
        help="config overrides, e.g. dist.strategy=fsdp2",
        positional=True,
        metavar="section.key=value",
    )
    hardware: str = option("cpu", help=f"device profile: {', '.join(HARDWARE_NAMES)} (cpu: calibrated here, cached)")
    devices: int = option(1, help="processes / accelerators the run uses (torchrun's world size)")
    json: bool = option(False, help="print the plan as JSON only")
    calibrate: bool = option(False, help="measure the cpu profile again (about a minute) before planning")


def add_parser(sub) -> None:
    p = sub.add_parser(
        "plan",
        help="predict tokens/s, step-time split, peak memory and MFU of a training run",
        description="Simulate one optimizer step of the run RUN_CONFIG would train (the same file and overrides as "
        "`loopmoe train`) on --devices devices of --hardware: compute per executed (iteration, layer) slot, "
        "α–β communication, memory per device. Method and accuracy: docs/planning.md.",
    )
    add_options(p, PlanOptions)
    p.set_defaults(run=run)


def run(args) -> int:
    from loopmoe.planning import Layout, get_hardware, plan_step
    from loopmoe.planning.hardware import cpu_profile
    from loopmoe.training import build_model_config, load_run_config
    from loopmoe.training.builders import planned_vocab_size

    opts: PlanOptions = options_from(PlanOptions, args)
    if opts.config is None:
        raise ValueError("loopmoe plan needs a run config (e.g. configs/debug.toml)")
    if opts.devices < 1:
        raise ValueError(f"--devices must be >= 1, got {opts.devices}")
    cfg = load_run_config(opts.config, opts.overrides, world_size=opts.devices)
    device_type = "cpu" if opts.hardware == "cpu" else "cuda"
    layout = Layout.from_run_config(cfg, opts.devices, device_type)
    if opts.hardware == "cpu" and opts.calibrate:
        cpu_profile(layout.threads, refresh=True)
    hw = get_hardware(opts.hardware, threads=layout.threads)
    vocab, _ = planned_vocab_size(cfg)
    model_cfg = build_model_config(cfg, vocab)
    plan = plan_step(model_cfg, layout, hw)
    if opts.json:
        print(json.dumps({"config": str(opts.config), **plan.as_dict()}, indent=2))
    else:
        print(format_plan(plan))
    return 0


def format_plan(plan) -> str:
    from loopmoe.text import human, markdown_table

    c, m, comm = plan.compute, plan.memory, plan.comm
    lay = plan.layout
    rows = [
        ["tokens/s (all devices)", f"{plan.tokens_per_s:,.0f}"],
        ["step time", f"{plan.step_time * 1e3:.1f} ms"],
        [
            "  compute",
            f"{c.total * 1e3:.1f} ms (GEMM {c.gemm * 1e3:.1f}, attention {c.attention * 1e3:.1f}, "
            f"element-wise {c.elementwise * 1e3:.1f}, op overhead {c.overhead * 1e3:.1f}, optimizer {c.optimizer * 1e3:.1f}; "
            f"recomputation {c.recompute * 1e3:.1f} of it)",
        ],
        [
            "  communication",
            f"{comm.total * 1e3:.1f} ms ({', '.join(f'{k} x{v}' for k, v in comm.collectives.items()) or 'none'})",
        ],
        ["  exposed communication", f"{plan.exposed_comm * 1e3:.1f} ms"],
        [
            "peak memory / device",
            f"{m.peak / 2**20:,.1f} MiB at the {m.peak_moment} ({'fits' if plan.fits else 'does NOT fit'})",
        ],
        [
            "  params / grads / AdamW",
            f"{m.params / 2**20:,.1f} / {m.grads / 2**20:,.1f} / {m.optimizer / 2**20:,.1f} MiB",
        ],
        ["  activations / workspace", f"{m.activations / 2**20:,.1f} / {m.workspace / 2**20:,.1f} MiB"],
        ["  update guard / comm buffers", f"{m.update_guard / 2**20:,.1f} / {m.comm_buffers / 2**20:,.1f} MiB"],
        ["MFU", f"{100 * plan.mfu:.1f}%"],
        [
            "model",
            f"{human(plan.total_params)} total, {human(plan.active_params)} active, "
            f"{human(plan.flops_per_token)} FLOPs/token",
        ],
    ]
    head = (
        f"{lay.devices} x {plan.hardware}, {lay.strategy if lay.devices > 1 else 'single device'}"
        f"{f', ep {lay.ep}' if lay.ep > 1 else ''}, micro-batch {lay.micro_batch} x {lay.seq_len}, "
        f"grad_accum {lay.grad_accum}, AC {lay.activation_checkpointing}, {lay.dtype}"
    )
    return head + "\n" + markdown_table(["", "predicted"], rows)
