"""``loopmoe plan RUN_CONFIG [section.key=value ...] --hardware NAME [--devices N] [--json]``: the predicted
cost of a training run (docs/planning.md) without running it."""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path

from loopmoe.console import status
from loopmoe.errors import ConfigError
from loopmoe.options import add_options, option, options_from
from loopmoe.planning import Layout, get_hardware, plan_step
from loopmoe.planning.calibration import cpu_profile
from loopmoe.planning.hardware import HARDWARE_NAMES
from loopmoe.planning.search import check_loops, pareto_plot, search
from loopmoe.planning.validation import load_validation, uncertainty
from loopmoe.text import human, markdown_table
from loopmoe.training import build_model_config, load_run_config
from loopmoe.training.builders import planned_vocab_size


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
    search: bool = option(False, help="search model shapes x layouts instead of planning one run", group="search")
    total_params: float | None = option(
        None, help="--search: total parameters of every shape, e.g. 3e9", group="search"
    )
    num_loops: tuple[int, ...] = option(
        (1, 2, 4), help="--search: loop counts T (T > 1 balanced against T = 1)", group="search"
    )
    loops: tuple[int, ...] | None = option(None, help="--search: deprecated spelling of --num-loops", group="search")
    seq_len: int = option(2048, help="--search: sequence length", group="search")
    global_batch_tokens: int = option(2**22, help="--search: tokens per optimizer step", group="search")
    flops_per_token: float | None = option(
        None, help="--search: keep shapes within 10%% of these forward FLOPs per token", group="search"
    )
    top: int = option(10, help="--search: rows of the table", group="search")
    plot: Path = option(Path("plan_search.png"), help="--search: Pareto plot PNG", group="search")


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
    opts: PlanOptions = options_from(PlanOptions, args)
    if opts.search:
        return run_search(opts)
    if opts.config is None:
        raise ConfigError("loopmoe plan needs a run config (e.g. configs/debug.toml)")
    if opts.devices < 1:
        raise ConfigError(f"--devices must be >= 1, got {opts.devices}")
    cfg = load_run_config(opts.config, opts.overrides, world_size=opts.devices)
    device_type = "cpu" if opts.hardware == "cpu" else "cuda"
    layout = Layout.from_run_config(cfg, opts.devices, device_type)
    if opts.hardware == "cpu" and opts.calibrate:
        cpu_profile(layout.threads, refresh=True)
    hw = get_hardware(opts.hardware, threads=layout.threads)
    vocab, _ = planned_vocab_size(cfg)
    model_cfg = build_model_config(cfg, vocab)
    plan = plan_step(model_cfg, layout, hw)
    stated = stated_uncertainty(opts.hardware, plan.tokens_per_s)
    if opts.json:
        print(json.dumps({"config": str(opts.config), **plan.as_dict(), "uncertainty": stated}, indent=2))
    else:
        print(format_plan(plan, stated["text"]))
    return 0


def stated_uncertainty(hardware: str, tokens_per_s: float) -> dict:
    """How far the prediction may be off: for ``cpu``, what ``bench.plan_vs_measured`` measured on this
    machine (``planning.validation``); a GPU profile is a spec sheet the plan has not been checked against."""
    if hardware == "cpu":
        return uncertainty(tokens_per_s, load_validation())
    return {
        "validated": False,
        "text": "a spec-sheet profile, not checked against measured runs (docs/planning.md)",
    }


def format_plan(plan, uncertain: str) -> str:
    c, m, comm = plan.compute, plan.memory, plan.comm
    lay = plan.layout
    rows = [
        ["tokens/s (all devices)", f"{plan.tokens_per_s:,.0f}"],
        ["  uncertainty", uncertain],
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


def run_search(opts: PlanOptions) -> int:
    if opts.total_params is None:
        raise ConfigError("--search needs --total-params, e.g. --total-params 3e9")
    if not math.isfinite(opts.total_params) or opts.total_params <= 0:
        raise ConfigError(f"--total-params {opts.total_params}: must be a positive finite number, e.g. 3e9")
    if opts.config is not None:
        raise ConfigError("--search builds its own shapes: drop the run config (or drop --search to plan that run)")
    loops = opts.num_loops
    if opts.loops is not None:
        status("loopmoe plan: --loops is deprecated and will be removed; use --num-loops")
        loops = opts.loops
    check_search_options(opts)
    check_loops(tuple(loops))
    hw = get_hardware(opts.hardware, threads=1)
    found = search(
        hw,
        opts.devices,
        opts.total_params,
        tuple(loops),
        opts.seq_len,
        opts.global_batch_tokens,
        opts.flops_per_token,
        progress=True,
    )
    if not found:
        raise ConfigError(
            f"no shape of {human(opts.total_params)} parameters fits {opts.devices} x {hw.name} in any layout: "
            "use more --devices, a larger --hardware, a shorter --seq-len or fewer --total-params"
        )
    title = f"{human(opts.total_params)} params on {opts.devices} x {hw.name}"
    plot = pareto_plot(found, opts.plot, title)
    rows = [c.row() for c in found]
    if opts.json:
        print(
            json.dumps({"hardware": hw.name, "devices": opts.devices, "plot": str(plot), "candidates": rows}, indent=2)
        )
        return 0
    table = [
        [
            i + 1,
            r["num_loops"],
            r["hidden_size"],
            r["layers"],
            r["heads"],
            r["experts"],
            human(r["active_params"]),
            human(r["flops_per_token"]),
            f"{r['tokens_per_s']:,.0f}",
            "-" if r["vs_reference"] is None else f"{r['vs_reference']:.2f}x",
            human(r["flops_per_s"]),
            f"{100 * r['mfu']:.0f}%",
            f"{r['peak_memory_bytes'] / 2**30:.1f}",
            _layout_text(r["layout"]),
        ]
        for i, r in enumerate(rows[: opts.top])
    ]
    print(f"{title}: {len(rows)} shapes fit; the {min(opts.top, len(rows))} that train the most model FLOPs per second")
    print(
        markdown_table(
            [
                "#",
                "T",
                "d",
                "layers",
                "heads",
                "k/E x f",
                "active",
                "FLOPs/tok",
                "tok/s",
                "vs T=1",
                "FLOP/s",
                "MFU",
                "GiB",
                "layout",
            ],
            table,
        )
    )
    print(SEARCH_LEGEND)
    print(f"Pareto plot: {plot}")
    return 0


SEARCH_LEGEND = """\
T: loop count (1: Vanilla MoE); d: hidden size; layers: prelude + core x T + coda; heads: query/key-value heads
x head size; k/E x f: top-k of E experts of intermediate size f; active: parameters a token uses; FLOPs/tok:
forward FLOPs per token (a looped shape matches its Vanilla reference's); tok/s: predicted training tokens per
second over all devices; vs T=1: tok/s over the Vanilla reference it was balanced against (same total
parameters and FLOPs/tok); FLOP/s: model FLOPs trained per second (tok/s x 3 x FLOPs/tok), the ranking; MFU:
that over the devices' peak; GiB: predicted peak memory per device; layout: data-parallel strategy, expert
parallel degree, micro-batch x accumulation, activation checkpointing."""


def check_search_options(opts: PlanOptions) -> None:
    """Every --search option that cannot work, in one line, before a minute of simulation."""
    if opts.devices < 1:
        raise ConfigError(f"--devices must be >= 1, got {opts.devices}")
    if opts.seq_len < 1:
        raise ConfigError(f"--seq-len must be >= 1, got {opts.seq_len}")
    if opts.global_batch_tokens < opts.seq_len * opts.devices:
        raise ConfigError(
            f"--global-batch-tokens {opts.global_batch_tokens} is less than one sequence per device "
            f"(--seq-len {opts.seq_len} x --devices {opts.devices} = {opts.seq_len * opts.devices}): give at least that"
        )
    if opts.flops_per_token is not None and not (math.isfinite(opts.flops_per_token) and opts.flops_per_token > 0):
        raise ConfigError(f"--flops-per-token {opts.flops_per_token}: must be a positive finite number, e.g. 2e9")
    if opts.top < 1:
        raise ConfigError(f"--top {opts.top}: the table needs at least one row (e.g. --top 10)")
    if opts.plot.is_dir() or (opts.plot.parent.exists() and not opts.plot.parent.is_dir()):
        raise ConfigError(f"--plot {opts.plot}: not a file path one can write; give a file name, e.g. search.png")


def _layout_text(lay: dict) -> str:
    strategy = lay["strategy"] + (
        "" if lay["strategy"] == "ddp" else ("/reshard" if lay["reshard_after_forward"] else "/keep")
    )
    return f"{strategy} ep{lay['ep']} mb{lay['micro_batch']}x{lay['grad_accum']} AC {lay['activation_checkpointing']}"
