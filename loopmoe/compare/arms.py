"""The arms of a comparison: which models are trained, each derived from the reference.

Four kinds of arm (docs/design.md §8):

- ``reference``: the Vanilla MoE as given;
- ``looped``: its LoopMoE at T loops, balanced against it (``balance``, §7);
- ``granularity``: the control for expert granularity, a Vanilla MoE with the balanced looped
  model's expert size and top-k and the expert count that matches the reference's total parameters
  (``granularity_control``), so that "finer experts" can be told apart from "looping";
- ``granularity_matched``: the exact-budget granularity control (``matched_granularity_control``):
  its own top-k and expert size, as fine as the looped model's, with all three targets met.

The built-in arms are named after their kind and use the comparison's options (``--num-loops``,
``--strategy``, ``--prelude``, ``--coda``, ``--lr``). Further arms, the ablations, are defined in the
``[arm.NAME]`` tables of a study config (``loopmoe compare --config``): a kind plus what differs from
the built-in arm of that kind and, optionally, their own seeds.

- ``num_loops``, ``strategy``, ``prelude``, ``coda`` are balancing settings (looped and granularity
  kinds): such an arm is balanced anew against the reference (a granularity arm mirrors the looped
  model of those settings).
- ``iter_conditioning`` (looped only), and the norm and init switches ``norm_scheme``, ``qk_norm``,
  ``initializer_range`` (every kind, the reference included) switch only that on the arm's model (same
  heads and experts), so the ablation isolates the switch; its budget moves by what the switch itself
  adds or removes (IterAdaLN's parameters and FLOPs, QK-norm's weights), which the arms table reports.
- ``lr`` (every kind): the arm's peak learning rate instead of the comparison's ``--lr``.
"""

from __future__ import annotations

import dataclasses
import math
import re
from dataclasses import asdict, dataclass
from enum import StrEnum
from typing import TYPE_CHECKING, Any, get_type_hints

from loopmoe.balance import Strategy, granularity_control, matched_granularity_control
from loopmoe.budget import Budget, compute_budget
from loopmoe.config import IterConditioning, LoopMoEConfig, NormScheme
from loopmoe.errors import ConfigError
from loopmoe.options import coerce_value, unknown_key_hint

if TYPE_CHECKING:
    from loopmoe.balance import BalanceResult
    from loopmoe.compare.options import CompareOptions  # options.py imports this module: types only


class ArmKind(StrEnum):
    """What an arm is (module docstring)."""

    REFERENCE = "reference"
    LOOPED = "looped"
    GRANULARITY = "granularity"
    GRANULARITY_MATCHED = "granularity_matched"


ARM_KINDS: tuple[str, ...] = tuple(kind.value for kind in ArmKind)
_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]*")
# Balancing settings (the looped model an arm is, or mirrors), and switches every kind may set on its model.
BALANCING = ("num_loops", "strategy", "prelude", "coda")
SWITCHES = ("norm_scheme", "qk_norm", "initializer_range")  # norm and init ablations
# Which settings an arm of each kind may change (the others do not apply to it).
_APPLIES = {
    "reference": (*SWITCHES, "lr"),
    "looped": (*BALANCING, "iter_conditioning", *SWITCHES, "lr"),
    "granularity": (*BALANCING, *SWITCHES, "lr"),
    "granularity_matched": (*BALANCING, *SWITCHES, "lr"),
}
# ArmSpec fields added after results.json first recorded specs: written only when set (old files round-trip).
LATER_SPEC_KEYS = ("prelude", "coda", "qk_norm", "initializer_range", "lr")


@dataclass(frozen=True)
class ArmSpec:
    """One arm: its kind and what differs from the comparison's options (``None``: as they say)."""

    kind: ArmKind
    num_loops: int | None = None  # T of the looped model (of a granularity arm: of the looped model it mirrors)
    strategy: Strategy | None = None
    iter_conditioning: IterConditioning | None = None  # None: iteradaln, the balanced default
    norm_scheme: NormScheme | None = None  # None: the reference's
    seeds: tuple[int, ...] | None = None  # None: the comparison's --seeds
    prelude: int | None = None  # P of the looped model (None: --prelude)
    coda: int | None = None  # Q of the looped model (None: --coda)
    qk_norm: bool | None = None  # None: the reference's
    initializer_range: float | None = None  # None: the reference's
    lr: float | None = None  # None: the comparison's --lr

    def switches(self) -> dict[str, Any]:
        """The norm/init switches (and iteration conditioning) this arm sets on its model."""
        keys = ("iter_conditioning", *SWITCHES)
        return {k: getattr(self, k) for k in keys if getattr(self, k) is not None}

    def balancing(self, opts: CompareOptions) -> tuple[int, str, int, int]:
        """(T, strategy, P, Q) of the looped model this arm is or mirrors, under ``opts``."""
        return (
            self.num_loops or opts.num_loops,
            self.strategy or opts.strategy,
            opts.prelude if self.prelude is None else self.prelude,
            opts.coda if self.coda is None else self.coda,
        )

    def record(self) -> dict[str, Any]:
        """The spec as results.json records it: the keys it always had, and the later ones where set."""
        return {k: v for k, v in asdict(self).items() if k not in LATER_SPEC_KEYS or v is not None}

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
        if self.seeds is not None:
            if not self.seeds:
                raise ConfigError(f"{where} seeds = []: give at least one seed, or remove the key to use --seeds")
            check_seeds(self.seeds, f"{where} seeds")
        for key in ("prelude", "coda"):
            value = getattr(self, key)
            if value is not None and value < 0:
                raise ConfigError(f"{where} {key} = {value}: must be a whole number of layers >= 0")
        for key in ("lr", "initializer_range"):
            value = getattr(self, key)
            if value is not None and not (math.isfinite(value) and value > 0):
                raise ConfigError(f"{where} {key} = {value}: must be a positive number (remove it for the default)")
        return self


def check_seeds(seeds: tuple[int, ...], where: str) -> None:
    """Seeds are whole numbers >= 0 (they seed numpy's generators), each given once; errors name the fix."""
    bad = [s for s in seeds if s < 0]
    if bad:
        raise ConfigError(f"{where} = {list(seeds)}: seed {bad[0]} is negative; seeds are whole numbers >= 0")
    if len(set(seeds)) != len(seeds):
        raise ConfigError(f"{where} = {list(seeds)} names a seed twice; give each seed once")


BUILTIN_ARMS = {kind.value: ArmSpec(kind) for kind in ArmKind}


MAX_ARM_NAME = 100  # a run folder's name (file systems allow 255 bytes; `.prev-N` suffixes need room)


def check_arm_name(name: str) -> str:
    if not _NAME.fullmatch(name):
        raise ConfigError(
            f"arm name {name!r} must be a folder name of letters, digits, '_', '.' and '-' (e.g. 'looped-T4')"
        )
    if len(name) > MAX_ARM_NAME:
        raise ConfigError(f"arm name {name[:20]}... has {len(name)} characters: use at most {MAX_ARM_NAME}")
    return name


def parse_difference(text: str) -> tuple[str, str] | None:
    """``"A - B"`` (the paired difference A - B, as the report writes it) -> ``(A, B)``; None unless A and B are
    two different arm names. Arm names have no spaces, so the spaced minus is unambiguous (``looped-pl - reference``)."""
    parts = [part.strip() for part in text.split(" - ")]
    if len(parts) != 2 or parts[0] == parts[1] or not all(_NAME.fullmatch(part) for part in parts):
        return None
    return parts[0], parts[1]


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
    lr: float | None = None  # the arm's peak learning rate (None: the comparison's --lr)


def _switched(config: LoopMoEConfig, changes: dict[str, Any]) -> LoopMoEConfig:
    """``config`` with ``changes`` (validated anew), or ``config`` itself when there are none."""
    if not changes:
        return config
    tokens = {k: getattr(config, k) for k in ("pad_token_id", "bos_token_id", "eos_token_id")}
    return LoopMoEConfig(**{**config.architecture_dict(), **tokens, **changes})


def resolve_arms(opts: CompareOptions, reference: LoopMoEConfig) -> dict[str, Arm]:
    """Every selected arm (``opts.arms``) built against ``reference``, in the order given.

    Balancing runs once per distinct (T, strategy, P, Q): a granularity arm reuses its looped arm's result.
    Any arm that cannot be built (a balancing that misses its tolerances, a control with no exact match)
    raises ``ConfigError`` here, before anything trains.
    """
    cache: dict[tuple, BalanceResult] = {}

    def balanced(spec: ArmSpec) -> BalanceResult:
        key = spec.balancing(opts)
        if key not in cache:
            loops, strategy, prelude, coda = key
            derive = dataclasses.replace(opts, prelude=prelude, coda=coda).derive
            cache[key] = derive(reference, loops, seq_len=opts.seq_len, strategy=strategy)
        return cache[key]

    arms = {}
    for name in opts.arms:
        spec = opts.arm_spec(name)
        result = None if spec.kind == "reference" else balanced(spec)
        if result is None:
            config = reference
        elif spec.kind == "looped":
            config = result.looped
        elif spec.kind == "granularity_matched":
            try:
                config = matched_granularity_control(result)
            except ConfigError as error:
                raise ConfigError(f"arm {name!r}: {error}") from None
        else:
            config = granularity_control(result)
        config = _switched(config, spec.switches())
        budget = compute_budget(config, opts.seq_len)
        arms[name] = Arm(name, spec, config, budget, spec.seeds or opts.seeds, result, spec.lr)
    return arms
