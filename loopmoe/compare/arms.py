"""The arms of a comparison: which models are trained, each derived from the reference.

Three kinds of arm (docs/design.md §8):

- ``reference``: the Vanilla MoE as given;
- ``looped``: its LoopMoE at T loops, balanced against it (``balance``, §7);
- ``granularity``: the control for expert granularity, a Vanilla MoE with the balanced looped
  model's expert size and top-k and the expert count that matches the reference's total parameters
  (``granularity_control``), so that "finer experts" can be told apart from "looping".

The built-in arms are named after their kind and use the comparison's options (``--num-loops``,
``--strategy``). Further arms, the ablations, are defined in the ``[arm.NAME]`` tables of a study
config (``loopmoe compare --config``): a kind plus what differs from the built-in arm of that kind
(``num_loops``, ``strategy``, ``iter_conditioning``, ``norm_scheme``) and, optionally, their own
seeds. ``num_loops`` and ``strategy`` are balancing settings: such an arm is balanced anew against the
reference. ``iter_conditioning`` and ``norm_scheme`` switch only that on the balanced looped model
(same heads and experts), so the ablation isolates the switch; its budget moves by what the switch
itself adds or removes (IterAdaLN's parameters and FLOPs), which the arms table reports.
"""

from __future__ import annotations

import re
from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING, Any, Literal, get_args, get_type_hints

from loopmoe.balance import Strategy, granularity_control
from loopmoe.budget import Budget, compute_budget
from loopmoe.config import IterConditioning, LoopMoEConfig, NormScheme
from loopmoe.errors import ConfigError
from loopmoe.options import coerce_value, unknown_key_hint

if TYPE_CHECKING:
    from loopmoe.balance import BalanceResult
    from loopmoe.compare.options import CompareOptions  # options.py imports this module: types only

ArmKind = Literal["reference", "looped", "granularity"]
ARM_KINDS: tuple[str, ...] = get_args(ArmKind)
_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]*")
# Which settings an arm of each kind may change (the others do not apply to it).
_APPLIES = {
    "reference": (),
    "looped": ("num_loops", "strategy", "iter_conditioning", "norm_scheme"),
    "granularity": ("num_loops", "strategy"),
}


@dataclass(frozen=True)
class ArmSpec:
    """One arm: its kind and what differs from the comparison's options (``None``: as they say)."""

    kind: ArmKind
    num_loops: int | None = None  # T of the looped model (of a granularity arm: of the looped model it mirrors)
    strategy: Strategy | None = None
    iter_conditioning: IterConditioning | None = None  # None: iteradaln, the balanced default
    norm_scheme: NormScheme | None = None  # None: the reference's
    seeds: tuple[int, ...] | None = None  # None: the comparison's --seeds

    def validate(self, name: str) -> ArmSpec:
        where = f"[arm.{name}]"
        if self.kind not in ARM_KINDS:
            raise ConfigError(f"{where} kind = {self.kind!r}: must be one of {', '.join(ARM_KINDS)}")
        for key, value in asdict(self).items():
            if key not in ("kind", "seeds") and value is not None and key not in _APPLIES[self.kind]:
                allowed = ", ".join(_APPLIES[self.kind]) or "nothing but seeds"
                raise ConfigError(
                    f"{where} sets {key}, which a {self.kind} arm does not have (it may set {allowed}); "
                    "remove the key or change kind"
                )
        if self.num_loops is not None and self.num_loops < 2:
            raise ConfigError(f"{where} num_loops = {self.num_loops}: a looped model needs at least 2 loops")
        if self.seeds is not None and not self.seeds:
            raise ConfigError(f"{where} seeds = []: give at least one seed, or remove the key to use --seeds")
        return self


BUILTIN_ARMS = {"reference": ArmSpec("reference"), "looped": ArmSpec("looped"), "granularity": ArmSpec("granularity")}


def check_arm_name(name: str) -> str:
    if not _NAME.fullmatch(name):
        raise ConfigError(
            f"arm name {name!r} must be a folder name of letters, digits, '_', '.' and '-' (e.g. 'looped-T4')"
        )
    return name


def arm_spec_from_table(name: str, table: Any) -> ArmSpec:
    """An ``[arm.NAME]`` table of a study config as an ArmSpec; errors name the key to fix."""
    check_arm_name(name)
    if not isinstance(table, dict):
        raise ConfigError(f"arm.{name} must be a table ([arm.{name}] with kind = ...), got {table!r}")
    hints = get_type_hints(ArmSpec)
    if "kind" not in table:
        raise ConfigError(f"[arm.{name}] has no kind: add kind = one of {', '.join(repr(k) for k in ARM_KINDS)}")
    kwargs = {}
    for key, value in table.items():
        if key not in hints:
            raise ConfigError(f"unknown key 'arm.{name}.{key}'" + unknown_key_hint(key, list(hints), f"arm.{name}."))
        kwargs[key] = coerce_value(f"arm.{name}.{key}", value, hints[key])
    return ArmSpec(**kwargs).validate(name)


@dataclass
class Arm:
    """A resolved arm: its model config, budget, and the balancing result it came from (if any)."""

    name: str
    spec: ArmSpec
    config: LoopMoEConfig
    budget: Budget
    seeds: tuple[int, ...]
    balanced: BalanceResult | None  # the looped model's balancing (looped and granularity arms)


def _switched(config: LoopMoEConfig, changes: dict[str, Any]) -> LoopMoEConfig:
    """``config`` with ``changes`` (validated anew), or ``config`` itself when there are none."""
    if not changes:
        return config
    tokens = {k: getattr(config, k) for k in ("pad_token_id", "bos_token_id", "eos_token_id")}
    return LoopMoEConfig(**{**config.architecture_dict(), **tokens, **changes})


def resolve_arms(opts: CompareOptions, reference: LoopMoEConfig) -> dict[str, Arm]:
    """Every selected arm (``opts.arms``) built against ``reference``, in the order given.

    Balancing runs once per distinct looped setting: a granularity arm reuses its looped arm's result.
    """
    cache: dict[tuple, BalanceResult] = {}

    def balanced(spec: ArmSpec) -> BalanceResult:
        key = (spec.num_loops or opts.num_loops, spec.strategy or opts.strategy)
        if key not in cache:
            cache[key] = opts.derive(reference, key[0], seq_len=opts.seq_len, strategy=key[1])
        return cache[key]

    arms = {}
    for name in opts.arms:
        spec = opts.arm_spec(name)
        result = None if spec.kind == "reference" else balanced(spec)
        if result is None:
            config = reference
        elif spec.kind == "looped":
            switches = {"iter_conditioning": spec.iter_conditioning, "norm_scheme": spec.norm_scheme}
            config = _switched(result.looped, {k: v for k, v in switches.items() if v is not None})
        else:
            config = granularity_control(result)
        arms[name] = Arm(name, spec, config, compute_budget(config, opts.seq_len), spec.seeds or opts.seeds, result)
    return arms
