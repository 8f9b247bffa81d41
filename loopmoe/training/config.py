"""Run configuration: TOML files and `section.key=value` overrides mapped onto validated dataclasses.

A run is fully described by one `RunConfig`; it is stored, resolved, inside every checkpoint so
a run can be resumed or audited without the file it came from. Every error names the key and
the fix, because a typo in a config should cost seconds, not a wasted training run.

Each key's type, default and help are its field below (`option(...)`); `loopmoe train --help`
is generated from them (`loopmoe.options`), with one flag per key (`--train.max_steps 100`).
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from enum import StrEnum
from pathlib import Path
from typing import Any, get_type_hints

from loopmoe.config import CHOICE_FIELDS, CONFIG_FIELDS, LoopMoEConfig
from loopmoe.data.config import DataSection
from loopmoe.distributed.config import ActivationCheckpointing, DistSection
from loopmoe.errors import ConfigError
from loopmoe.options import coerce_value, option, parse_text, unknown_key_hint
from loopmoe.presets import config_from_table
from loopmoe.trust import read_toml


class ScheduleKind(StrEnum):
    """After the warmup: cosine decay, or WSD (warmup-stable-decay)."""

    COSINE = "cosine"
    WSD = "wsd"


class Precision(StrEnum):
    """auto: fp32 on CPU, bf16 autocast on CUDA; fp32; or bf16 autocast."""

    AUTO = "auto"
    FP32 = "fp32"
    BF16 = "bf16"


@dataclass
class ModelSection:
    """The model: a preset with explicit `LoopMoEConfig` fields over it, or one complete config.

    In TOML every key of `[model]` other than `preset`, `num_loops`, `config` and `init_from` is an explicit config field
    (e.g. `hidden_size = 128`); they are checked against the preset's config when the model is
    built. From Python, `ModelSection.of(config)` runs exactly `config` (stored in full as
    `[model.config]`, so the run directory still describes the run).
    """

    preset: str | None = option("debug", help="model preset (see `loopmoe presets`); none with model.config")
    num_loops: int | None = option(None, help="loop count T of the looped core", shown="the preset's")
    fields: dict[str, Any] = option(
        default_factory=dict,
        help="explicit LoopMoEConfig fields over the preset: every other [model] key, or model.KEY=VALUE",
        cli=False,
    )
    config: LoopMoEConfig | None = option(
        None, help="a complete LoopMoEConfig instead of preset + fields (at the tokenizer's vocab_size)", cli=False
    )
    init_from: str | None = option(
        None,
        help="start from the weights of this LoopMoE or Qwen3-MoE checkpoint folder (continued pre-training, "
        "fine-tuning): the architecture is the checkpoint's and model.preset is not used",
    )

    @classmethod
    def of(cls, config: LoopMoEConfig) -> ModelSection:
        """The section that runs exactly ``config`` (whose ``vocab_size`` must be the tokenizer's)."""
        return cls(preset=None, config=config)


@dataclass
class OptimSection:
    """AdamW hyper-parameters."""

    lr: float = option(3e-4, help="peak learning rate")
    betas: tuple[float, float] = option((0.9, 0.95), help="AdamW betas")
    weight_decay: float = option(0.1, help="AdamW weight decay")
    eps: float = option(1e-8, help="AdamW epsilon")


@dataclass
class ScheduleSection:
    """Learning-rate schedule: linear warmup, then cosine decay or WSD (warmup-stable-decay)."""

    kind: ScheduleKind = option(ScheduleKind.COSINE, help="after the warmup: cosine decay or WSD (warmup-stable-decay)")
    warmup_steps: int = option(100, help="linear warmup steps")
    decay_fraction: float = option(0.2, help="share of max_steps spent in the WSD decay phase (ignored by cosine)")
    min_lr_ratio: float = option(0.1, help="final learning rate as a fraction of optim.lr")


@dataclass
class TrainSection:
    """Loop, batch and bookkeeping settings.

    Batch sizes count sequences. Give `grad_accum` or `global_batch_size` (or both, consistent):
    global = micro_batch_size x grad_accum x world size.
    """

    max_steps: int = option(1000, help="optimizer steps", aliases=("--max-steps",))
    micro_batch_size: int = option(8, help="sequences per micro-batch on each process")
    grad_accum: int | None = option(
        None, help="micro-batches per optimizer step", shown="from global_batch_size, else 1"
    )
    global_batch_size: int | None = option(
        None, help="sequences per optimizer step over all processes (sets grad_accum)"
    )
    grad_clip: float = option(1.0, help="gradient-norm clip (0 disables clipping)")
    max_skipped_steps: int = option(
        20, help="abort after this many consecutive skipped (non-finite) steps: the run has diverged"
    )
    update_guard: bool = option(
        True,
        help="roll back an optimizer step that leaves a parameter non-finite; keeps a copy of the parameters "
        "and optimizer state each step (3x the parameters' memory with AdamW): turn off at scale",
    )
    seed: int = option(0, help="seed of the initialisation and the data order")
    precision: Precision = option(
        Precision.AUTO, help="auto: fp32 on CPU, bf16 autocast on CUDA; fp32; or bf16 autocast"
    )
    eval_every: int = option(100, help="steps between held-out evaluations")
    eval_batches: int = option(10, help="held-out batches per evaluation (0 disables evaluation)")
    checkpoint_every: int = option(200, help="steps between checkpoints", aliases=("--checkpoint-every",))
    keep_last: int = option(3, help="checkpoints kept")
    log_every: int = option(
        10, help="steps between console lines (loss, lr, grad norm, tokens/s, MFU, ETA) and router statistics"
    )
    peak_tflops: float | None = option(
        None,
        help="peak dense TFLOP/s of one accelerator, for MFU",
        shown="the datasheet BF16 peak of a known GPU; no MFU on CPU",
    )
    wandb: bool = option(
        False, help="also log to Weights & Biases (pip install 'loopmoe[wandb]'; WANDB_MODE=offline works offline)"
    )
    wandb_project: str = option("loopmoe", help="W&B project of the run (with train.wandb)")
    activation_checkpointing: ActivationCheckpointing = option(
        ActivationCheckpointing.NONE,
        help="recompute activations in backward: none, full (every executed layer) or selective "
        "(every ac_every-th executed layer)",
    )
    ac_every: int = option(2, help="with selective activation checkpointing: every n-th executed layer")
    compile: bool = option(False, help="torch.compile every decoder layer (regional compilation)")


@dataclass
class RunConfig:
    model: ModelSection = field(default_factory=ModelSection)
    data: DataSection = field(default_factory=DataSection)
    optim: OptimSection = field(default_factory=OptimSection)
    schedule: ScheduleSection = field(default_factory=ScheduleSection)
    train: TrainSection = field(default_factory=TrainSection)
    dist: DistSection = field(default_factory=DistSection)

    def to_dict(self) -> dict[str, Any]:
        """Plain nested dict (tuples become lists, `model.config` a table of every field) — JSON/TOML friendly."""
        return {
            f.name: {g.name: _plain(getattr(section, g.name)) for g in dataclasses.fields(section)}
            for f in dataclasses.fields(self)
            for section in [getattr(self, f.name)]
        }

    def grad_accum_for(self, world_size: int) -> int:
        """Micro-batches per optimizer step on each rank for this world size."""
        t = self.train
        if t.global_batch_size is None:
            return t.grad_accum or 1
        return t.global_batch_size // (t.micro_batch_size * world_size)

    def global_batch_for(self, world_size: int) -> int:
        return self.train.micro_batch_size * self.grad_accum_for(world_size) * world_size

    def validate(self, world_size: int = 1) -> RunConfig:
        """Check cross-field contradictions; raises ValueError naming the keys and the fix."""
        m, t, s, o = self.model, self.train, self.schedule, self.optim
        for name, value in _float_settings(self):
            if not math.isfinite(value):
                raise ConfigError(f"{name} = {value}: must be a finite number")
        if m.config is not None and (m.preset is not None or m.num_loops is not None or m.fields):
            raise ConfigError(
                "model.config is a complete model config: leave model.preset (none), model.num_loops and the "
                "model fields unset, or drop model.config"
            )
        if m.config is not None and m.init_from is not None:
            raise ConfigError(
                "model.config and model.init_from both define the model: the checkpoint's architecture is used "
                "with init_from, so drop model.config"
            )
        if m.config is None and m.preset is None and m.init_from is None:
            raise ConfigError("model.preset is not set: name a preset (see `loopmoe presets`) or give model.config")
        for key, value in [
            ("train.max_steps", t.max_steps),
            ("train.micro_batch_size", t.micro_batch_size),
            ("train.eval_every", t.eval_every),
            ("train.checkpoint_every", t.checkpoint_every),
            ("train.keep_last", t.keep_last),
            ("train.log_every", t.log_every),
            ("train.ac_every", t.ac_every),
            ("data.seq_len", self.data.seq_len),
        ]:
            if value < 1:
                raise ConfigError(f"{key} = {value}: must be >= 1")
        self.dist.validate(world_size, compile=t.compile)
        if t.eval_batches < 0:
            raise ConfigError(f"train.eval_batches = {t.eval_batches}: must be >= 0 (0 disables evaluation)")
        if t.max_skipped_steps < 1:
            raise ConfigError(f"train.max_skipped_steps = {t.max_skipped_steps}: must be >= 1")
        if t.grad_accum is not None and t.grad_accum < 1:
            raise ConfigError(f"train.grad_accum = {t.grad_accum}: must be >= 1")
        if t.peak_tflops is not None and t.peak_tflops <= 0:
            raise ConfigError(f"train.peak_tflops = {t.peak_tflops}: must be > 0 (or none to look it up)")
        if t.grad_clip < 0:
            raise ConfigError(f"train.grad_clip = {t.grad_clip}: must be >= 0 (0 disables clipping)")
        if o.lr <= 0 or o.eps <= 0 or o.weight_decay < 0:
            raise ConfigError("optim.lr and optim.eps must be > 0 and optim.weight_decay >= 0")
        if not all(0.0 <= b < 1.0 for b in o.betas):
            raise ConfigError(f"optim.betas = {list(o.betas)}: each beta must be in [0, 1)")
        if s.warmup_steps < 0 or s.warmup_steps >= t.max_steps:
            raise ConfigError(
                f"schedule.warmup_steps = {s.warmup_steps} must be in [0, train.max_steps = {t.max_steps}); "
                f"lower schedule.warmup_steps or raise train.max_steps"
            )
        if not 0.0 <= s.min_lr_ratio <= 1.0:
            raise ConfigError(f"schedule.min_lr_ratio = {s.min_lr_ratio}: must be in [0, 1]")
        if not 0.0 <= s.decay_fraction <= 1.0:
            raise ConfigError(f"schedule.decay_fraction = {s.decay_fraction}: must be in [0, 1]")
        if s.kind == "wsd" and s.warmup_steps + round(s.decay_fraction * t.max_steps) > t.max_steps:
            raise ConfigError(
                "schedule.warmup_steps + schedule.decay_fraction * train.max_steps exceeds train.max_steps; "
                "shorten the warmup or the decay"
            )
        if not 0.0 < self.data.val_fraction < 1.0:
            raise ConfigError(f"data.val_fraction = {self.data.val_fraction}: must be in (0, 1)")
        if t.global_batch_size is not None:
            per_step = t.micro_batch_size * world_size
            if t.global_batch_size % per_step:
                raise ConfigError(
                    f"train.global_batch_size = {t.global_batch_size} is not divisible by train.micro_batch_size x world size "
                    f"= {t.micro_batch_size} x {world_size}; use a multiple of {per_step}"
                )
            implied = t.global_batch_size // per_step
            if t.grad_accum is not None and t.grad_accum != implied:
                raise ConfigError(
                    f"train.grad_accum = {t.grad_accum} contradicts train.global_batch_size = {t.global_batch_size} "
                    f"(which implies {implied} at world size {world_size}); set only one of them"
                )
        return self


def _float_settings(cfg: RunConfig) -> list[tuple[str, float]]:
    """Every float setting of ``cfg`` (tuples element by element), named as in the TOML file."""
    out: list[tuple[str, float]] = []
    for f in dataclasses.fields(cfg):
        section = getattr(cfg, f.name)
        for g in dataclasses.fields(section):
            value = getattr(section, g.name)
            values = list(enumerate(value)) if isinstance(value, tuple) else [(None, value)]
            for i, v in values:
                if isinstance(v, float):
                    out.append((f"{f.name}.{g.name}" + (f"[{i}]" if i is not None else ""), v))
    return out


def model_fields(config: LoopMoEConfig) -> dict[str, Any]:
    """Every field of ``config`` (``CONFIG_FIELDS``): ``LoopMoEConfig(**model_fields(c))`` rebuilds ``c``."""
    return {k: getattr(config, k) for k in CONFIG_FIELDS}


def _plain(obj: Any) -> Any:
    if isinstance(obj, LoopMoEConfig):
        return model_fields(obj)
    if isinstance(obj, dict):
        return {k: _plain(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_plain(v) for v in obj]
    return obj


_SECTION_TYPES = get_type_hints(RunConfig)


def _build_section(name: str, raw: dict[str, Any]) -> Any:
    cls = _SECTION_TYPES[name]
    hints = get_type_hints(cls)
    kwargs: dict[str, Any] = {}
    if name == "model":
        extra = {k: v for k, v in raw.items() if k not in hints}
        raw = {k: v for k, v in raw.items() if k in hints}
        fields = raw.pop("fields", {})
        if not isinstance(fields, dict):
            raise ConfigError(f"model.fields = {fields!r}: expected a table of LoopMoEConfig fields")
        kwargs["fields"] = {**fields, **extra}
        if isinstance(raw.get("config"), dict):
            raw["config"] = config_from_table(raw["config"], "model.config")
    for key, value in raw.items():
        if key not in hints:
            raise ConfigError(f"unknown key '{name}.{key}'" + unknown_key_hint(key, list(hints), prefix=f"{name}."))
        kwargs[key] = coerce_value(f"{name}.{key}", value, hints[key])
    return cls(**kwargs)


def config_from_dict(raw: dict[str, Any]) -> RunConfig:
    """Build a RunConfig from nested dicts (a parsed TOML file); missing keys take defaults."""
    for name in raw:
        if name not in _SECTION_TYPES:
            raise ConfigError(f"unknown section '[{name}]'" + unknown_key_hint(name, list(_SECTION_TYPES)))
        if not isinstance(raw[name], dict):
            raise ConfigError(f"'{name}' must be a table ([{name}]), got {type(raw[name]).__name__}")
    return RunConfig(**{name: _build_section(name, raw.get(name, {})) for name in _SECTION_TYPES})


def apply_overrides(raw: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """Apply `section.key=value` strings to nested dicts (before typing, so errors name the key)."""
    out = {k: dict(v) if isinstance(v, dict) else v for k, v in raw.items()}
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override '{item}' must look like section.key=value, e.g. train.max_steps=100")
        path, text = item.split("=", 1)
        parts = path.strip().split(".")
        if len(parts) != 2:
            raise ConfigError(f"override key '{path}' must be section.key, e.g. optim.lr=3e-4")
        section, key = parts
        if section not in _SECTION_TYPES:
            raise ConfigError(
                f"unknown section '{section}' in override '{item}'" + unknown_key_hint(section, list(_SECTION_TYPES))
            )
        hint = get_type_hints(_SECTION_TYPES[section]).get(key)
        if section == "model" and hint is None:
            hint = CHOICE_FIELDS.get(key)  # a LoopMoEConfig field: `none` is a choice of some
        out.setdefault(section, {})[key] = parse_text(text, hint)
    return out


def load_run_config(
    path: str | Path | None = None, overrides: list[str] | None = None, world_size: int = 1
) -> RunConfig:
    """Read a TOML file (or start from defaults), apply overrides, type-check and validate."""
    raw: dict[str, Any] = {}
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"config file {path} not found; pass an existing .toml (see configs/)")
        raw = read_toml(path)
    return config_from_dict(apply_overrides(raw, overrides or [])).validate(world_size)
