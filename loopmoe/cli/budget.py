"""``loopmoe budget``: derive the balanced LoopMoE from a reference and print both budgets."""

from __future__ import annotations

import json
import os
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import torch

from loopmoe.balance import BalanceOptions, BalanceResult, hardware_grid
from loopmoe.budget import all_to_all_bytes_per_token
from loopmoe.compare.report import budget_table
from loopmoe.config import IterConditioning
from loopmoe.errors import ConfigError
from loopmoe.model import LoopMoEForCausalLM
from loopmoe.options import add_options, option, options_from
from loopmoe.presets import list_presets, load_model_config

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}
DType = Literal["float32", "bfloat16"]  # the keys of DTYPES: the choices of BudgetOptions.dtype / a2a_dtype


@dataclass(kw_only=True)
class BudgetOptions(BalanceOptions):
    """The options of ``loopmoe budget``: the balancing options and what to show or save."""

    reference: str = option(
        help=f"preset ({', '.join(list_presets())}), model config file (.toml/.json), or checkpoint dir",
        positional=True,
    )
    num_loops: int = option(help="loop count T of the looped core")
    seq_len: int | None = option(None, help="sequence length for FLOPs", shown="min(2048, max positions)")
    iter_conditioning: IterConditioning = option(
        "iteradaln", help="how the looped core is told its iteration (IterAdaLN or an ablation)"
    )
    ep: int | None = option(
        None, help="expert-parallel degree: also show each model's all_to_all bytes per token at it", metavar="N"
    )
    a2a_dtype: DType = option("bfloat16", help="dtype of the rows the all_to_all sends")
    json: bool = option(False, help="print JSON instead of a table")
    save_dir: Path | None = option(
        None,
        help="write both randomly initialised models as HF checkpoints in DIR/reference and DIR/looped",
        metavar="DIR",
    )
    dtype: DType = option("float32", help="dtype of the saved checkpoints")


def add_parser(sub) -> None:
    p = sub.add_parser(
        "budget",
        help="budget table of a reference Vanilla MoE and its balanced LoopMoE",
        description="Derive the LoopMoE matched to REFERENCE (a preset name, a .toml/.json model config, or a "
        "checkpoint directory) and print total/active parameters, FLOPs per token and the "
        "attention-to-FFN ratio of both.",
    )
    add_options(p, BudgetOptions)
    p.set_defaults(run=run)


def run(args) -> int:
    opts: BudgetOptions = options_from(BudgetOptions, args)
    reference = load_model_config(opts.reference)
    grid = hardware_grid(reference)
    result = opts.derive(reference, opts.num_loops, seq_len=opts.seq_len, iter_conditioning=opts.iter_conditioning)
    a2a, a2a_row = None, None
    if opts.ep is not None:
        width = torch.finfo(DTYPES[opts.a2a_dtype]).bits // 8
        a2a = {
            side: all_to_all_bytes_per_token(cfg, opts.ep, width)
            for side, cfg in (("reference", result.reference), ("looped", result.looped))
        }
        a2a_row = (opts.ep, opts.a2a_dtype, a2a["reference"], a2a["looped"])
    if opts.json:
        data = result.as_dict()
        if a2a is not None:
            data["ep"], data["a2a_dtype"] = opts.ep, opts.a2a_dtype
            for side, value in a2a.items():
                data[side]["all_to_all_bytes_per_token"] = value
        print(json.dumps(data, indent=2))
    else:
        title = f"{opts.reference}{' (hardware grid)' if grid[0] > 1 else ''}"
        print(budget_table(result, title=title, all_to_all=a2a_row))
    if opts.save_dir is not None:
        save_models(result, opts.save_dir, DTYPES[opts.dtype])
    return 0


def save_models(result: BalanceResult, directory: Path, dtype: torch.dtype) -> None:
    """Write both models, randomly initialised, as HF checkpoints (refusing what cannot fit in memory)."""

    bytes_per = torch.finfo(dtype).bits // 8
    need = max(result.reference_budget.total_params, result.looped_budget.total_params) * bytes_per
    available = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_AVPHYS_PAGES")
    if need > 0.8 * available:
        raise ConfigError(
            f"--save-dir needs about {need / 2**30:.1f} GiB to build one model in {dtype} but "
            f"{available / 2**30:.1f} GiB are free: pass --dtype bfloat16 or a smaller reference"
        )
    for name, cfg in (("reference", result.reference), ("looped", result.looped)):
        model = LoopMoEForCausalLM(cfg).to(dtype)  # type: ignore[arg-type]  # transformers: .to is typed as wraps(nn.Module.to), its self as the first argument
        model.save_pretrained(directory / name)
        del model
        print(f"wrote {directory / name}", file=sys.stderr)  # a status line: stdout stays the table or JSON
