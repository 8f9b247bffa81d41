"""Capacity balancing: derive a LoopMoE from a reference Vanilla MoE at matched budgets.

Rule (docs/design.md §7, ours). Given a reference with L layers and a loop count T
(``P + C*T + Q = L``), pick the looped model's query heads H', key/value heads H_kv', head size
h_d', top-k', expert size f' and expert count E' (width, vocabulary and executed depth fixed) so
that against the reference

1. total parameters match (default tolerance 1%),
2. forward FLOPs per token match (1%),
3. the attention-to-FFN active ratio matches (5%).

Continuous relaxation, with ``a = A`` and ``phi = k*F + G`` per layer and ``t = L / (P+C+Q)``:
``A' = t*a*(a+phi)/(phi+t*a)`` and ``phi' = phi*(a+phi)/(phi+t*a)``, which keeps ``A'+phi' = a+phi``
(FLOPs) and ``A'/(t*phi') = a/phi`` (ratio); E' then absorbs the remaining parameters. At small
widths the attention scores (``sigma = 2*h_d*H*S`` multiply-adds per layer, growing with A' at a
fixed GQA group) are a large share of the FLOPs, and so is IterAdaLN's per-token modulation
(``m`` multiply-adds per executed layer, averaged over the core's share); the search therefore aims
at ``A' = t*a*(a+sigma+phi-m)/(t*(a+sigma)+phi)``, with ``phi' = phi*A'/(t*a)``. The
search walks the integer grid around that point and scores each candidate on the exact budgets
of ``loopmoe.budget`` (IterAdaLN, attention scores and routers included), so what it reports is
what the model has. The FFN weights ``phi`` are those a token multiplies (``budget.ffn_matmul_weights``),
so a DCCA reference or target (``expert_type``, BigMac's low-dimension experts) balances by the
same rule: the balanced model may take another expert type than the reference (e.g. DCCA experts
against a SwiGLU reference), and its shared experts keep the reference's share of the FFN weights.
Strategy ``naive`` keeps the reference shapes and grows E' to the closest
parameter match only: the ablation that shows why balancing matters (its deviations are
reported, not enforced).
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from dataclasses import dataclass, field
from enum import StrEnum
from types import SimpleNamespace

from loopmoe.budget import Budget, compute_budget, ffn_matmul_weights, layer_shapes, modulation_matmul_weights
from loopmoe.config import ExpertType, IterConditioning, LoopMoEConfig, expert_width
from loopmoe.errors import ConfigError
from loopmoe.options import option


class Strategy(StrEnum):
    """How the looped model is sized against its reference (the three readings of §7)."""

    CAPACITY = "capacity"  # match params, FLOPs and ρ_unique (ours)
    PER_LAYER = "per_layer"  # match params, FLOPs and ρ_per_layer: the reference's layer, IterAdaLN absorbed
    NAIVE = "naive"  # the reference's shapes, E' for params only: the ablation


STRATEGIES: tuple[str, ...] = tuple(strategy.value for strategy in Strategy)
# The default, chosen by study v2 (RESULTS.md, docs/design.md §7) under the rule its config declared before the
# results: per_layer unless capacity balancing was established better.
DEFAULT_STRATEGY = Strategy.PER_LAYER
# The two readings of the third target (docs/design.md §6): unique attention / executed FFN (ours,
# capacity balancing) and attention / FFN weights per executed layer (per_layer; naive reports it).
RATIO_READINGS = ("attn_ffn_ratio", "attn_ffn_ratio_per_layer")
DEVIATION_KEYS = ("total_params", "flops_per_token", *RATIO_READINGS)
TARGETS = ("total_params", "flops_per_token", "attn_ffn_ratio")  # capacity's; see targets_of


def ratio_reading(strategy: str) -> str:
    """The ratio a strategy's third target reads: ``attn_ffn_ratio`` (capacity) or ``attn_ffn_ratio_per_layer``."""
    return "attn_ffn_ratio" if strategy == "capacity" else "attn_ffn_ratio_per_layer"


def targets_of(strategy: str) -> tuple[str, str, str]:
    """The three targets a strategy matches (naive reports them without enforcing them)."""
    return ("total_params", "flops_per_token", ratio_reading(strategy))


@dataclass
class BalanceResult:
    reference: LoopMoEConfig
    looped: LoopMoEConfig
    strategy: str
    seq_len: int
    reference_budget: Budget
    looped_budget: Budget
    deviations: dict[str, float]  # relative, looped / reference - 1
    tolerances: dict[str, float] = field(default_factory=dict)

    @property
    def targets(self) -> tuple[str, str, str]:
        return targets_of(self.strategy)

    def as_dict(self) -> dict:
        def side(cfg, budget):
            return {"config": cfg.architecture_dict(), **{k: v for k, v in budget.as_dict().items() if k != "seq_len"}}

        reading = ratio_reading(self.strategy)
        return {
            "strategy": self.strategy,
            "seq_len": self.seq_len,
            "reference": side(self.reference, self.reference_budget),
            "looped": side(self.looped, self.looped_budget),
            # Every reading's deviation; `targets` names the three this strategy matches (its own
            # reading of the ratio), `other_ratio` the reading it does not (shown beside, not matched).
            "deviations": self.deviations,
            "targets": list(self.targets),
            "enforced": self.strategy != "naive",
            "ratio_reading": reading,
            "other_ratio": next(r for r in RATIO_READINGS if r != reading),
            "tolerances": self.tolerances,
        }


def deviations(reference: Budget, looped: Budget) -> dict[str, float]:
    """Relative deviation (looped / reference - 1) of the parameters, FLOPs and both ratio readings."""
    return {k: getattr(looped, k) / getattr(reference, k) - 1.0 for k in DEVIATION_KEYS}


def _score(dev: dict[str, float], tol: dict[str, float], strategy: str = "capacity") -> float:
    return max(abs(dev[k]) / tol[k] for k in targets_of(strategy))


def _linear_solve(f, lo: int, hi: int, target: float) -> float:
    """x with f(x) = target, for f linear in x (evaluated at two integer points)."""
    y_lo, y_hi = f(lo), f(hi)
    return lo + (target - y_lo) * (hi - lo) / (y_hi - y_lo)


# References of at least this many parameters are sized for GPU clusters with expert parallelism
# (the paper-* presets, `plan --search` at billions of parameters): their looped models keep E' a
# multiple of 8 (EP degrees up to 8 divide it) and h_d' a multiple of 16 (GEMM-friendly heads).
HARDWARE_GRID_MIN_PARAMS = 1e9
HARDWARE_EXPERT_MULTIPLE, HARDWARE_HEAD_DIM_MULTIPLE = 8, 16


def hardware_grid(reference: LoopMoEConfig) -> tuple[int, int | None]:
    """``(expert_multiple, head_dim_multiple)`` a balance of ``reference`` uses when none is given.

    ``(8, 16)`` at GPU-cluster scale (``HARDWARE_GRID_MIN_PARAMS``); else ``(1, None)``: any expert
    count, and a head-size grid scaled to the reference.
    """
    if compute_budget(reference, 1).total_params >= HARDWARE_GRID_MIN_PARAMS:
        return HARDWARE_EXPERT_MULTIPLE, HARDWARE_HEAD_DIM_MULTIPLE
    return 1, None


def balance(
    reference: LoopMoEConfig,
    num_loops: int,
    strategy: str = DEFAULT_STRATEGY,
    seq_len: int | None = None,
    num_prelude_layers: int = 0,
    num_coda_layers: int = 0,
    iter_conditioning: str = "iteradaln",
    tolerances: dict[str, float] | None = None,
    head_dim_multiple: int | None = None,
    ffn_multiple: int | None = None,
    expert_type: str | None = None,
    dcca_dim: int | None = None,
    expert_multiple: int | None = None,
    **looped_overrides,
) -> BalanceResult:
    """Return the looped config matched to ``reference`` at ``num_loops`` iterations of the core.

    ``expert_type`` / ``dcca_dim``: the balanced model's experts (default: the reference's type; a
    DCCA width defaults to the reference's, else to the config default ``hidden_size // 4``). A
    DCCA router keeps the reference's ``dcca_router_input`` when both are DCCA.
    ``head_dim_multiple`` / ``ffn_multiple`` set the integer grid of h_d' and f' (default: a power of
    two that scales with the reference, so tiny models get a fine grid and large ones
    hardware-friendly sizes). ``expert_multiple`` makes E' a multiple (so that an expert-parallel
    degree dividing it splits the experts evenly). Left unset, both follow ``hardware_grid(reference)``:
    experts a multiple of 8 and head sizes of 16 for references at GPU-cluster scale, so that
    ``loopmoe budget``, ``loopmoe compare`` and ``loopmoe plan --search`` derive one looped model from one
    reference. Raises ``ValueError`` naming the target that cannot be
    met and what to change, the constraint to relax included.
    """
    if strategy not in STRATEGIES:
        raise ConfigError(f"strategy must be one of {STRATEGIES}, got {strategy!r}")
    if reference.num_loops != 1:
        raise ConfigError(f"the reference must be a Vanilla MoE (num_loops=1), got num_loops={reference.num_loops}")
    for name, value in (("num_prelude_layers", num_prelude_layers), ("num_coda_layers", num_coda_layers)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 0:
            raise ConfigError(f"{name} must be a whole number >= 0, got {value!r}")
    if isinstance(num_loops, bool) or not isinstance(num_loops, int) or num_loops < 1:
        raise ConfigError(f"num_loops must be a whole number >= 1, got {num_loops!r}")
    for name, multiple in (
        ("expert_multiple", expert_multiple),
        ("head_dim_multiple", head_dim_multiple),
        ("ffn_multiple", ffn_multiple),
    ):
        if multiple is not None and (isinstance(multiple, bool) or not isinstance(multiple, int) or multiple < 1):
            raise ConfigError(f"{name} must be a whole number >= 1, got {multiple!r}")
    if head_dim_multiple is not None and head_dim_multiple % 2:
        raise ConfigError(
            f"head_dim_multiple must be even (rotary embeddings pair dimensions), got {head_dim_multiple}"
        )
    grid_experts, grid_head_dim = hardware_grid(reference)
    expert_multiple = expert_multiple or grid_experts
    head_dim_multiple = head_dim_multiple or grid_head_dim
    tol = {
        "total_params": 0.01,
        "flops_per_token": 0.01,
        "attn_ffn_ratio": 0.05,
        "attn_ffn_ratio_per_layer": 0.05,
        **(tolerances or {}),
    }
    L = reference.executed_depth()
    body = L - num_prelude_layers - num_coda_layers
    if num_loops < 1 or body < num_loops or body % num_loops:
        fix = (
            f"Choose num_loops from the divisors of {body}, or change num_prelude_layers / num_coda_layers."
            if body >= 1
            else f"Use fewer prelude + coda layers (at most {L - 1} together)."
        )
        raise ConfigError(
            f"cannot loop {L} executed layers as prelude {num_prelude_layers} + core x {num_loops} + coda "
            f"{num_coda_layers}: L - P - Q = {body} must be a positive multiple of num_loops. {fix}"
        )
    seq_len = seq_len or min(2048, reference.max_position_embeddings)
    head_dim_multiple = head_dim_multiple or _grid(reference.head_dim, 16)
    ffn_multiple = ffn_multiple or _grid(reference.moe_intermediate_size, 64)
    ref_budget = compute_budget(reference, seq_len)

    base = {
        **reference.architecture_dict(),
        **looped_overrides,
        "num_prelude_layers": num_prelude_layers,
        "num_core_layers": body // num_loops,
        "num_coda_layers": num_coda_layers,
        "num_loops": num_loops,
        "iter_conditioning": iter_conditioning if num_loops > 1 else "none",
    }
    for key in ("pad_token_id", "bos_token_id", "eos_token_id"):
        base[key] = getattr(reference, key)
    same_experts = expert_type in (None, reference.expert_type)
    base["expert_type"] = reference.expert_type if expert_type is None else expert_type
    base["dcca_dim"] = reference.dcca_dim if dcca_dim is None and same_experts else dcca_dim
    base["dcca_router_input"] = reference.dcca_router_input if same_experts else "hidden"
    # Validates the target's fields with errors that name the fix, and resolves the default DCCA width.
    base["dcca_dim"] = LoopMoEConfig(**base).dcca_dim

    def make(**shape) -> LoopMoEConfig:
        return LoopMoEConfig(**{**base, **shape})

    def budget(**shape) -> Budget:
        # The search scores thousands of candidates: a plain namespace of fields is enough for the
        # budget and far cheaper than a transformers config; the winner is built and validated below.
        return compute_budget(SimpleNamespace(**{**base, **shape}), seq_len)

    def fit_experts(shape: dict) -> int:
        """E' (>= top-k', a multiple of ``expert_multiple``) whose total parameters are closest to the reference's."""
        k = shape.get("num_experts_per_tok", reference.num_experts_per_tok)
        return _experts_for_params(
            lambda n: budget(**{**shape, "num_experts": n}), k, ref_budget.total_params, expert_multiple
        )

    if strategy == "naive":
        shape: dict[str, int] = {}
        shape["num_experts"] = fit_experts(shape)
        best = shape
    elif strategy == "per_layer":
        best = _per_layer_search(reference, ref_budget, base, budget, fit_experts, head_dim_multiple, ffn_multiple, tol)
    else:
        best = _capacity_search(
            reference, ref_budget, base, budget, fit_experts, num_loops, L, head_dim_multiple, ffn_multiple, tol
        )
    looped = make(**best)
    looped_budget = compute_budget(looped, seq_len)
    dev = deviations(ref_budget, looped_budget)
    # The naive ablation exists to show the mismatch, so it reports deviations without enforcing them.
    failed = [k for k in targets_of(strategy) if abs(dev[k]) > tol[k]] if strategy != "naive" else []
    if failed:
        detail = "; ".join(f"{k} off by {dev[k]:+.2%} (tolerance {tol[k]:.0%})" for k in failed)
        raise ConfigError(
            f"{strategy} balancing of {L} layers at num_loops={num_loops} cannot meet: {detail}. Best candidate: "
            f"heads {looped.num_attention_heads}/{looped.num_key_value_heads} x {looped.head_dim}, top-"
            f"{looped.num_experts_per_tok} of {looped.num_experts} experts of size {looped.moe_intermediate_size}. "
            f"Try another loop count, a shorter seq_len (attention scores grow with the looped attention; now "
            f"{seq_len}), finer grids (head_dim_multiple / ffn_multiple, now {head_dim_multiple} / "
            f"{ffn_multiple}), a wider reference (more experts or heads give the solver room), or looser tolerances."
            + (
                f" The hardware constraints narrow the search: relax expert_multiple (--expert-multiple, now "
                f"{expert_multiple}) or head_dim_multiple (--head-dim-multiple, now {head_dim_multiple})."
                if expert_multiple > 1
                else ""
            )
        )
    enforced = {k: tol[k] for k in targets_of(strategy)}  # the tolerances of this strategy's own targets
    return BalanceResult(reference, looped, strategy, seq_len, ref_budget, looped_budget, dev, enforced)


def _experts_for_params(budget_with, top_k: int, total_params: int, multiple: int = 1) -> int:
    """E (>= top-k, a multiple of ``multiple``) whose total parameters are closest to ``total_params``;
    ``budget_with(E)`` is the budget with E experts (linear in E, so two evaluations solve it)."""
    e = _linear_solve(lambda n: budget_with(n).total_params, top_k, top_k + 1, total_params)
    return max(multiple * math.ceil(top_k / multiple), multiple * round(e / multiple))


@dataclass(kw_only=True)
class BalanceOptions:
    """How a looped model is derived from its reference: the one set of balancing options.

    ``loopmoe budget`` and ``loopmoe compare`` take these as their own options (their option classes
    inherit them, so every flag and study key is declared once, here) and balance through
    ``derive``: the same reference and options give the same looped model in both.
    """

    strategy: Strategy = option(
        DEFAULT_STRATEGY,
        help="per_layer (the reference's layer shapes, attention/FFN per executed layer), capacity (unique "
        "attention / executed FFN) or naive (the reference's shapes, more experts; unenforced)",
    )
    prelude: int = option(0, help="prelude layers P of the LoopMoE, run once before the core")
    coda: int = option(0, help="coda layers Q of the LoopMoE, run once after the core")
    expert_type: ExpertType | None = option(
        None,
        help="expert type of the balanced model: swiglu, or dcca (BigMac's low-dimension experts)",
        shown="the reference's",
    )
    dcca_dim: int | None = option(
        None, help="width of the balanced model's DCCA experts", shown="the reference's, else hidden_size // 4"
    )
    expert_multiple: int | None = option(
        None,
        help="make the expert count a multiple of N (expert parallelism)",
        shown="8 for references of 1B+ parameters, else 1",
    )
    head_dim_multiple: int | None = option(
        None,
        help="make the head size a multiple of N",
        shown="16 for references of 1B+ parameters, else scaled to the reference",
    )

    def derive(self, reference: LoopMoEConfig, num_loops: int, seq_len: int | None = None, **settings) -> BalanceResult:
        """``balance(reference, num_loops, ...)`` under these options (``settings``: balance's other arguments)."""
        return balance(
            reference,
            num_loops,
            strategy=settings.pop("strategy", self.strategy),
            seq_len=seq_len,
            num_prelude_layers=self.prelude,
            num_coda_layers=self.coda,
            expert_type=self.expert_type,
            dcca_dim=self.dcca_dim,
            expert_multiple=self.expert_multiple,
            head_dim_multiple=self.head_dim_multiple,
            **settings,
        )


def granularity_control(result: BalanceResult) -> LoopMoEConfig:
    """The granularity control of a balanced pair: a Vanilla MoE with the looped model's experts.

    Capacity balancing changes two things at once: the model loops, and its experts get finer and
    more numerous (``small``, T = 2: 8 x 128 -> 28 x 76). Finer experts help on their own, so the
    control keeps everything of the reference (T = 1, layers, heads, width) but takes the looped
    model's expert type (and DCCA width), expert size f', top-k' and shared-expert size f_s', with the
    expert count E chosen so that
    total parameters are closest to the reference's. Its FLOPs per token are reported, not matched:
    with the reference's attention and k' experts of size f' they are what they are (matching them
    would need another top-k, which is the looped model's by definition of the control). Total
    parameters move in steps of one expert per layer, so they match to within half that step.
    """
    reference, looped = result.reference, result.looped
    base = {
        **reference.architecture_dict(),
        **{
            k: getattr(looped, k)
            for k in (
                "expert_type",
                "dcca_dim",
                "dcca_router_input",
                "moe_intermediate_size",
                "num_experts_per_tok",
                "shared_expert_intermediate_size",
            )
        },
    }
    for key in ("pad_token_id", "bos_token_id", "eos_token_id"):
        base[key] = getattr(reference, key)
    target = compute_budget(reference, result.seq_len).total_params
    experts = _experts_for_params(
        lambda n: compute_budget(SimpleNamespace(**{**base, "num_experts": n}), result.seq_len),
        looped.num_experts_per_tok,
        target,
    )
    return LoopMoEConfig(**{**base, "num_experts": experts})


def matched_granularity_control(result: BalanceResult) -> LoopMoEConfig:
    """The exact-budget granularity control: a Vanilla MoE at the reference's budgets with experts as fine
    as the looped model's.

    ``granularity_control`` takes the looped model's top-k' and f' as they are, so its FLOPs fall
    short of the reference's (-8% for ``small`` at T = 2) and it mixes granularity with compute.
    This control keeps the reference's attention and depth and chooses its own top-k and f with
    ``k * f`` equal to the reference's (FLOPs and the attention/FFN ratio match) and E with
    ``E * f`` equal to the reference's (parameters match), taking the f closest to the looped
    model's f' (``small`` at T = 2: 16 experts of 64, top-4, against the reference's 8 x 128, top-2).
    All three targets are met within the balancing tolerances, or ``ConfigError`` says which is not.
    """
    reference, looped, seq_len = result.reference, result.looped, result.seq_len
    ref_budget = compute_budget(reference, seq_len)
    tol = {k: result.tolerances.get(k, 0.05 if "ratio" in k else 0.01) for k in DEVIATION_KEYS}
    base = {**reference.architecture_dict()}
    for key in ("pad_token_id", "bos_token_id", "eos_token_id"):
        base[key] = getattr(reference, key)
    executed = reference.num_experts_per_tok * reference.moe_intermediate_size  # k * f, the FLOPs to keep
    ffn_mult = _grid(reference.moe_intermediate_size, 64)
    best, best_key = None, None
    for k in range(1, 8 * reference.num_experts_per_tok + 1):
        f = max(ffn_mult, ffn_mult * round(executed / k / ffn_mult))
        shape = {**base, "num_experts_per_tok": k, "moe_intermediate_size": f}
        experts = _experts_for_params(
            lambda n, shape=shape: compute_budget(SimpleNamespace(**{**shape, "num_experts": n}), seq_len),
            k,
            ref_budget.total_params,
        )
        cand = {**shape, "num_experts": experts}
        score = _score(deviations(ref_budget, compute_budget(SimpleNamespace(**cand), seq_len)), tol)
        order = (score > 1, abs(math.log(f / looped.moe_intermediate_size)), score)
        if best_key is None or order < best_key:
            best, best_key = cand, order
    assert best is not None and best_key is not None
    control = LoopMoEConfig(**best)
    if best_key[0]:
        dev = deviations(ref_budget, compute_budget(control, seq_len))
        raise ConfigError(
            f"no exact-budget granularity control near expert size {looped.moe_intermediate_size}: the closest, "
            f"top-{control.num_experts_per_tok} of {control.num_experts} x {control.moe_intermediate_size}, is off by "
            + ", ".join(f"{k} {dev[k]:+.2%}" for k in TARGETS)
            + "; use the granularity control (kind 'granularity'), or a reference whose k * f has more divisors"
        )
    return control


def _grid(size: int, parts: int) -> int:
    """Largest power of two <= size / parts (at least 2)."""
    return 2 ** max(1, int(math.log2(max(2, size // parts))))


def _per_layer_search(reference, ref_budget, base, budget, fit_experts, hd_mult, ffn_mult, tol) -> dict:
    """The ``per_layer`` strategy: the reference's layer, every executed layer, with IterAdaLN absorbed.

    The looped model keeps the reference's heads and executes as many layers, so its attention/FFN
    ratio per executed layer is the reference's at the reference's shapes; only IterAdaLN's per-token
    matmuls are extra FLOPs. They are taken out of the head size h_d' and the expert size f' (with
    the shared experts scaled alike) in proportion, which keeps A'/phi' near A/phi, and the top-k'
    may move by one where the grid is coarse; E' then matches the total parameters. Among the
    candidates that meet all three targets the one closest to the reference's shapes wins.
    """
    ref_hd, ref_f, ref_k = reference.head_dim, reference.moe_intermediate_size, reference.num_experts_per_tok
    ref_shapes = layer_shapes(reference, core=False)
    shared_per_expert_weight = ref_shapes.shared / ref_shapes.expert
    # Another expert type (DCCA experts of width d_e against SwiGLU ones of width d): the same expert FLOPs
    # take d/d_e times the expert size, or that many times the top-k (BigMac's), as in _capacity_search.
    d, target_width = reference.hidden_size, expert_width(SimpleNamespace(**base))
    widen = expert_width(reference) / target_width
    extra_k = {round(ref_k * widen)} if widen > 1 else set()
    base_rank = LoopMoEConfig(**base).iter_cond_rank  # the default rank of this width
    uses_token = IterConditioning(base["iter_conditioning"]).uses_token

    rank = base_rank
    ranks = sorted({rank, *(r for r in (3 * rank // 4, rank // 2, rank // 4) if r >= 4)}, reverse=True)

    def candidates() -> Iterator[dict]:
        smallest_hd = max(hd_mult * math.ceil(8 / hd_mult), hd_mult * math.floor(0.6 * ref_hd / hd_mult))
        for r in ranks if uses_token else [rank]:
            for hd in range(smallest_hd, ref_hd + 1, hd_mult):
                if hd % 2:
                    continue
                for k in sorted({max(1, ref_k - 1), ref_k, ref_k + 1, *extra_k}):
                    centre = ref_f * ref_k * widen / k  # the expert size of the reference's expert FLOPs at k
                    low = max(ffn_mult, ffn_mult * math.floor(0.6 * centre / ffn_mult))
                    for f in range(low, math.ceil(1.1 * centre) + 1, ffn_mult):
                        shared = shared_per_expert_weight * target_width * f / d
                        yield {
                            "iter_cond_rank": r,
                            "head_dim": hd,
                            "num_experts_per_tok": k,
                            "moe_intermediate_size": f,
                            "shared_expert_intermediate_size": ffn_mult * round(shared / ffn_mult) if shared else 0,
                        }

    best, best_key = None, None
    for shape in candidates():
        # FLOPs do not depend on E' but through the router: prune on the reference's E first.
        dev = deviations(ref_budget, budget(**shape, num_experts=reference.num_experts))
        if abs(dev["flops_per_token"]) > 3 * tol["flops_per_token"]:
            continue
        cand = {**shape, "num_experts": fit_experts(shape)}
        dev = deviations(ref_budget, budget(**cand))
        score = _score(dev, tol, "per_layer")
        change = (
            abs(shape["iter_cond_rank"] / rank - 1)
            + abs(shape["head_dim"] / ref_hd - 1)
            + abs(shape["moe_intermediate_size"] * shape["num_experts_per_tok"] / (ref_f * ref_k * widen) - 1)
            + abs(shape["num_experts_per_tok"] - ref_k)
        )
        key = (score > 1, score if score > 1 else 0.0, change, score)
        if best_key is None or key < best_key:
            best, best_key = cand, key
    if best is None:  # nothing near the budget: report the reference's shapes, whose deviations name the problem
        best = {"num_experts": fit_experts({})}
    return best


def _capacity_search(reference, ref_budget, base, budget, fit_experts, loops, L, hd_mult, ffn_mult, tol) -> dict:
    d = reference.hidden_size
    group = reference.num_attention_heads // reference.num_key_value_heads
    a = d * reference.head_dim * (2 * reference.num_attention_heads + 2 * reference.num_key_value_heads)
    ref_shapes = layer_shapes(reference, core=False)
    phi = ffn_matmul_weights(reference, ref_shapes)
    sigma = 2 * reference.head_dim * reference.num_attention_heads * ref_budget.seq_len
    t = L / (base["num_prelude_layers"] + base["num_core_layers"] + base["num_coda_layers"])
    # Per-token IterAdaLN matmuls (W_h, W_mod) of the core, averaged over executed layers: FLOPs
    # the looped model spends that the reference does not, taken out of the shared budget.
    m = modulation_matmul_weights(LoopMoEConfig(**{**base, "num_loops": loops})) * base["num_core_layers"] * loops / L
    attn_target = t * a * (a + sigma + phi - m) / (t * (a + sigma) + phi)
    # Shared experts keep the reference's ratio of shared to routed-expert weights, G'/F' = G/F: with
    # the same expert type that is f_s'/f' = f_s/f; DCCA experts (width d_e) against SwiGLU ones
    # (width d) get d_e/d of the shared size that ratio alone would give.
    shared_per_expert_weight = ref_shapes.shared / ref_shapes.expert
    target_width = expert_width(SimpleNamespace(**base))
    # Top-k' from 1 to the reference's k, or to d/d_e times it for DCCA experts against a SwiGLU
    # reference: at width d_e the same expert FLOPs buy that many more experts per token (BigMac's
    # larger top-k), and the finer step lets a Vanilla DCCA model meet the budgets at all.
    ref_k = reference.num_experts_per_tok
    max_k = ref_k * max(1, expert_width(reference) // target_width)

    best, best_key = None, None
    smallest = hd_mult * math.ceil(8 / hd_mult)  # narrower heads are not attention heads worth having
    for hd in range(smallest, 4 * reference.head_dim + 1, hd_mult):
        if hd % 2:
            continue
        per_kv_group = 2 * d * hd * (group + 1)  # attention params of one (group of H, 1 kv head)
        centre = attn_target / per_kv_group
        for n_kv in range(max(1, math.floor(centre) - 1), math.ceil(centre) + 2):
            heads = {"head_dim": hd, "num_attention_heads": n_kv * group, "num_key_value_heads": n_kv}
            for k in range(1, max_k + 1):
                shape = {**heads, "num_experts_per_tok": k, "num_experts": reference.num_experts}

                def with_ffn(f: float, on_grid: bool = True) -> dict:
                    shared = shared_per_expert_weight * target_width * f / d
                    return {
                        **shape,  # noqa: B023
                        "moe_intermediate_size": f,
                        "shared_expert_intermediate_size": ffn_mult * round(shared / ffn_mult) if on_grid else shared,
                    }

                for _ in range(2):  # FLOPs depend on E' through the router; two passes settle it
                    # Solved with the shared size off the grid: rounded at the two small sizes the
                    # solve evaluates, it would not grow with f there (FLOPs would look flatter than they are).
                    f = _linear_solve(
                        lambda x: budget(**with_ffn(x, on_grid=False)).flops_per_token,
                        ffn_mult,
                        2 * ffn_mult,
                        ref_budget.flops_per_token,
                    )
                    f = max(ffn_mult, ffn_mult * round(f / ffn_mult))
                    shape = {**with_ffn(f)}
                    shape["num_experts"] = fit_experts(shape)
                for df in (-ffn_mult, 0, ffn_mult):
                    f2 = shape["moe_intermediate_size"] + df
                    if f2 < ffn_mult:
                        continue
                    cand = with_ffn(f2)
                    cand["num_experts"] = fit_experts(cand)
                    dev = deviations(ref_budget, budget(**cand))
                    # Prefer feasible, then the reference's top-k and the nearest head size, then accuracy;
                    # among infeasible ones the least-bad (it is what the error message reports).
                    score = _score(dev, tol)
                    key = (
                        score > 1,
                        score if score > 1 else 0.0,
                        abs(k - ref_k),
                        abs(hd - reference.head_dim),
                        score,
                    )
                    if best_key is None or key < best_key:
                        best, best_key = cand, key
    assert best is not None, "the head-size grid is never empty"
    return best
