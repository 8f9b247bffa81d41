"""``loopmoe plan --search``: model shapes x parallel layouts, simulated, ranked by predicted throughput.

Shapes. Vanilla MoE references whose total parameters match the target: width ``d`` (heads of
128, GQA groups of 4), layer count ``L``, expert count ``E`` and top-``k`` from small grids, the
expert size ``f`` solved so that ``loopmoe.budget``'s total hits the target (rounded to 64). For every
loop count ``T > 1`` that divides ``L``, the reference's LoopMoE is derived by
``loopmoe.balance.BalanceOptions.derive``, as ``loopmoe budget`` and ``loopmoe compare`` derive it
(capacity balancing: the same total parameters, FLOPs per token and attention-to-FFN ratio; at 1B+
parameters on the hardware grid); references it cannot balance are dropped for that ``T``. So every shape
has the target's total parameters, and each looped one the FLOPs per token of its reference.

Layouts. For each shape: DDP or FSDP2 (with and without ``reshard_after_forward`` for the core),
expert-parallel degrees that divide both the devices and ``E``, micro-batches, and activation
checkpointing none / selective / full; the global batch is held at ``global_batch_tokens`` by
gradient accumulation. Only layouts whose predicted peak fits the device's memory are kept, and
each shape keeps its fastest.

Ranking. Every shape has the target's total parameters, but not the same FLOPs per token: a Vanilla
shape with top-2 of many small experts does less work per token than one with top-8, so tokens/s alone
would rank the cheapest shapes first whatever their quality. Shapes are ranked by the model FLOPs they
train per second (tokens/s x training FLOPs per token), the hardware's throughput at that shape; a looped
shape and its Vanilla reference do the same FLOPs per token, so between the two this is tokens/s, and
``Candidate.vs_reference`` gives their ratio. ``flops_per_token`` keeps only shapes within 10% of it.
"""

from __future__ import annotations

import dataclasses
import itertools
import math
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from loopmoe.atomic import save_figure
from loopmoe.balance import BalanceOptions
from loopmoe.budget import compute_budget
from loopmoe.config import LoopMoEConfig, layers_text
from loopmoe.console import Progress, status
from loopmoe.errors import ConfigError
from loopmoe.hardware import model_flops_per_token
from loopmoe.planning.cost import StepPlan, plan_step
from loopmoe.planning.hardware import Hardware
from loopmoe.planning.layout import Layout

WIDTHS = (1024, 2048, 3072)
DEPTHS = (12, 24)
EXPERTS = (16, 64)
TOP_K = (2, 8)
HEAD_DIM, GQA_GROUP = 128, 4
MICRO_BATCHES = (1, 2, 4, 8)
AC_MODES = ("none", "selective", "full")


@dataclass(frozen=True)
class Candidate:
    """A shape with its best fitting layout."""

    config: LoopMoEConfig
    reference: LoopMoEConfig  # the Vanilla MoE it was balanced against (itself when T = 1)
    plan: StepPlan
    vs_reference: float | None = None  # tokens/s over its reference's (same FLOPs/token); None: not simulated

    @property
    def flops_per_s(self) -> float:
        """Model FLOPs trained per second (forward and backward): what the search ranks by."""
        return self.plan.tokens_per_s * model_flops_per_token(self.plan.flops_per_token)

    def row(self) -> dict:
        c, p = self.config, self.plan
        return {
            "num_loops": c.num_loops,
            "hidden_size": c.hidden_size,
            "layers": layers_text(c),
            "heads": f"{c.num_attention_heads}/{c.num_key_value_heads}x{c.head_dim}",
            "experts": f"{c.num_experts_per_tok}/{c.num_experts}x{c.moe_intermediate_size}",
            "total_params": p.total_params,
            "active_params": p.active_params,
            "flops_per_token": p.flops_per_token,
            "tokens_per_s": p.tokens_per_s,
            "flops_per_s": self.flops_per_s,
            "vs_reference": self.vs_reference,
            "mfu": p.mfu,
            "peak_memory_bytes": p.memory.peak,
            "layout": p.layout.as_dict(),
        }


def _grid_shape(d: int, L: int, E: int, k: int, seq_len: int, vocab_size: int) -> dict[str, Any]:
    """The fields of one grid point (width d, depth L, E experts, top-k) but its expert size."""
    heads = d // HEAD_DIM
    return dict(
        vocab_size=vocab_size,
        hidden_size=d,
        num_core_layers=L,
        num_attention_heads=heads,
        num_key_value_heads=max(1, heads // GQA_GROUP),
        head_dim=HEAD_DIM,
        num_experts=E,
        num_experts_per_tok=k,
        max_position_embeddings=max(4096, seq_len),
    )


def grid_param_range(seq_len: int, vocab_size: int = 32000) -> tuple[float, float]:
    """The smallest and largest total parameters ``reference_shapes`` can build (expert size 128 to 4 x d)."""
    totals = []
    for d, L, E in ((min(WIDTHS), min(DEPTHS), min(EXPERTS)), (max(WIDTHS), max(DEPTHS), max(EXPERTS))):
        f = 128 if d == min(WIDTHS) else 4 * d
        cfg = LoopMoEConfig(**_grid_shape(d, L, E, min(TOP_K), seq_len, vocab_size), moe_intermediate_size=f)
        totals.append(compute_budget(cfg, seq_len).total_params)
    return totals[0], totals[1]


def check_loops(loops: tuple[int, ...]) -> None:
    """Refuse loop counts the grid cannot build: a looped shape needs ``T`` to divide its core depth
    (one of ``DEPTHS``); counts that divide none are named (all of them unusable: an error)."""
    if not loops or any(not isinstance(T, int) or T < 1 for T in loops):
        raise ConfigError(f"--num-loops must be positive loop counts, e.g. 1,2,4; got {loops}")
    unusable = [T for T in loops if T > 1 and all(L % T for L in DEPTHS)]
    if not unusable:
        return
    divisors = sorted({T for L in DEPTHS for T in range(1, L + 1) if L % T == 0})
    text = (
        f"--num-loops {','.join(map(str, unusable))}: a loop count must divide a core depth of the search grid "
        f"{DEPTHS}, i.e. be one of {','.join(map(str, divisors))}"
    )
    if len(unusable) == len(loops):
        raise ConfigError(text)
    warnings.warn(f"{text}; searching the others only", stacklevel=3)


def reference_shapes(total_params: float, seq_len: int, vocab_size: int = 32000) -> list[LoopMoEConfig]:
    """Vanilla MoE configs of ``total_params`` (within 2%) over the width / depth / expert grids."""
    out = []
    for d, L, E, k in itertools.product(WIDTHS, DEPTHS, EXPERTS, TOP_K):
        if k >= E:
            continue
        base = _grid_shape(d, L, E, k, seq_len, vocab_size)
        at = {
            f: compute_budget(LoopMoEConfig(**base, moe_intermediate_size=f), seq_len).total_params for f in (64, 128)
        }
        f = 64 * round((64 + (total_params - at[64]) * 64 / (at[128] - at[64])) / 64)
        if not 128 <= f <= 4 * d:
            continue
        cfg = LoopMoEConfig(**base, moe_intermediate_size=f)
        if abs(compute_budget(cfg, seq_len).total_params / total_params - 1) <= 0.02:
            out.append(cfg)
    return out


def shapes(
    total_params: float, loops: tuple[int, ...], seq_len: int, balancing: BalanceOptions | None = None
) -> list[tuple[LoopMoEConfig, LoopMoEConfig]]:
    """(config, its Vanilla reference) for every reference and loop count that balances under
    ``balancing`` (default: ``loopmoe budget``'s defaults)."""
    balancing = balancing or BalanceOptions()
    out = []
    for ref in reference_shapes(total_params, seq_len):
        for T in loops:
            if T == 1:
                out.append((ref, ref))
                continue
            if ref.num_core_layers % T:
                continue
            try:
                out.append((balancing.derive(ref, T, seq_len=seq_len).looped, ref))
            except ValueError:
                continue  # no balanced LoopMoE at this T: the reference stays Vanilla-only
    return out


def layouts(cfg: LoopMoEConfig, devices: int, seq_len: int, global_batch_tokens: int, dtype: str) -> list[Layout]:
    out = []
    eps = [e for e in (1, 2, 4, 8, 16) if devices % e == 0 and cfg.num_experts % e == 0]
    for mb, ac, ep in itertools.product(MICRO_BATCHES, AC_MODES, eps):
        accum = max(1, math.ceil(global_batch_tokens / (mb * seq_len * devices)))
        common = dict(
            devices=devices,
            ep=ep,
            micro_batch=mb,
            seq_len=seq_len,
            grad_accum=accum,
            activation_checkpointing=ac,
            dtype=dtype,
        )
        out.append(Layout(strategy="ddp", **common))  # type: ignore[arg-type]
        if devices > 1:
            for reshard in (True, False):
                out.append(Layout(strategy="fsdp2", reshard_after_forward=reshard, **common))  # type: ignore[arg-type]
    return out


def rank(plans: list[StepPlan]) -> list[StepPlan]:
    """Fitting plans, fastest first (ties: less memory)."""
    return sorted((p for p in plans if p.fits), key=lambda p: (-p.tokens_per_s, p.memory.peak))


def search(
    hw: Hardware,
    devices: int,
    total_params: float,
    loops: tuple[int, ...] = (1, 2, 4),
    seq_len: int = 2048,
    global_batch_tokens: int = 2**22,
    flops_per_token: float | None = None,
    progress: bool = False,
    balancing: BalanceOptions | None = None,
) -> list[Candidate]:
    """Every balanced shape with its fastest fitting layout, fastest first (``progress``: a bar on
    stderr, one trace of each shape per micro-batch takes a fraction of a second; ``balancing``: how
    looped shapes are derived, ``shapes``)."""
    dtype = "bf16" if hw.device_type != "cpu" else "fp32"
    found = []
    if not (isinstance(total_params, (int, float)) and math.isfinite(total_params) and total_params > 0):
        raise ConfigError(f"--total-params {total_params}: must be a positive finite number, e.g. 3e9")
    check_loops(loops)
    if not reference_shapes(total_params, seq_len):
        low, high = grid_param_range(seq_len)
        raise ConfigError(
            f"no model of {total_params:.3g} parameters on the search grid (widths {WIDTHS}, depths {DEPTHS}, "
            f"experts {EXPERTS}, expert sizes 128 to 4 x width): --search covers about {low:.2g} to {high:.2g} "
            "total parameters; give --total-params in that range"
        )
    candidates = shapes(total_params, loops, seq_len, balancing)
    if not candidates:
        raise ConfigError(
            f"no shape of {total_params:.3g} parameters balances as a LoopMoE at --num-loops "
            f"{','.join(map(str, loops))} (capacity balancing against the Vanilla references failed for each): "
            "add 1 to --num-loops for the Vanilla shapes, or try other loop counts"
        )
    if flops_per_token is not None:
        candidates = [
            (cfg, ref)
            for cfg, ref in candidates
            if abs(compute_budget(cfg, seq_len).flops_per_token / flops_per_token - 1) <= 0.1
        ]
    if progress:
        status(
            f"simulating {len(candidates)} shapes of {total_params:.3g} parameters (T = "
            f"{', '.join(map(str, loops))}) on {devices} x {hw.name}, each in up to "
            f"{len(layouts(candidates[0][0], devices, seq_len, global_batch_tokens, dtype)) if candidates else 0} "
            "layouts"
        )
    with Progress("simulating shapes", unit="shape", enabled=progress, total=len(candidates), every_s=10) as bar:
        for cfg, ref in candidates:
            bar.update(1)
            plans = [plan_step(cfg, lay, hw) for lay in layouts(cfg, devices, seq_len, global_batch_tokens, dtype)]
            best = rank(plans)
            if best:
                found.append(Candidate(cfg, ref, best[0]))
    # a T = 1 shape is its own reference: the looped shapes derived from it hold the same config object
    speed = {id(c.config): c.plan.tokens_per_s for c in found if c.config.num_loops == 1}
    found = [
        dataclasses.replace(c, vs_reference=c.plan.tokens_per_s / speed[id(c.reference)])
        if id(c.reference) in speed
        else c
        for c in found
    ]
    return sorted(found, key=lambda c: -c.flops_per_s)


def pareto_plot(candidates: list[Candidate], path: str | Path, title: str) -> Path:
    """Predicted tokens/s vs active parameters per token, coloured by loop count; the Pareto front joined."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.5, 4.2))
    loops = sorted({c.config.num_loops for c in candidates})
    cmap = plt.get_cmap("viridis", max(2, len(loops)))
    for i, T in enumerate(loops):
        pts = [c for c in candidates if c.config.num_loops == T]
        ax.scatter(
            [c.plan.active_params for c in pts],
            [c.plan.tokens_per_s for c in pts],
            s=18,
            color=cmap(i),
            label=f"T = {T}",
            alpha=0.8,
        )
    front, best = [], -1.0
    for c in sorted(candidates, key=lambda c: -c.plan.active_params):  # more active params is better for quality
        if c.plan.tokens_per_s > best:
            front.append(c)
            best = c.plan.tokens_per_s
    ax.plot(
        [c.plan.active_params for c in front],
        [c.plan.tokens_per_s for c in front],
        color="grey",
        lw=1,
        label="Pareto front",
    )
    ax.set(xlabel="active parameters per token", ylabel="predicted tokens/s (all devices)", title=title)
    ax.set_xscale("log")
    ax.legend(fontsize=8)
    fig.tight_layout()
    path = Path(path)
    save_figure(fig, path)
    plt.close(fig)
    return path
