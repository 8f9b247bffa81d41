"""Named model presets (TOML files beside this module) and loading model configs from files.

A preset is a flat TOML table of ``LoopMoEConfig`` fields plus ``description`` and, for the
paper-scale ones, ``paper_scale = true``. ``load_model_config`` accepts a preset name, a TOML
file (flat, or with a ``[model]`` table), a JSON config, or a checkpoint directory.
"""

from __future__ import annotations

import re
import tomllib
from importlib import resources
from pathlib import Path

from loopmoe.config import ARCHITECTURE_FIELDS, CONFIG_FIELDS, LoopMoEConfig
from loopmoe.convert import loopmoe_config_from_qwen3_moe
from loopmoe.errors import ConfigError, MissingFileError
from loopmoe.text import suggest
from loopmoe.trust import read_json, read_toml

PRESET_META_KEYS = ("description", "paper_scale")


def list_presets() -> dict[str, dict]:
    """``{name: {"description": ..., "paper_scale": bool}}`` for every shipped preset."""
    out = {}
    for entry in sorted(resources.files(__package__).iterdir(), key=lambda p: p.name):
        if entry.name.endswith(".toml"):
            data = tomllib.loads(entry.read_text())
            out[entry.name[:-5]] = {
                "description": data.get("description", ""),
                "paper_scale": bool(data.get("paper_scale", False)),
            }
    return out


PRESET_NAME = re.compile(r"[A-Za-z0-9_-]+")


def _preset_table(name: str) -> dict:
    if not PRESET_NAME.fullmatch(name):
        raise ConfigError(
            f"invalid preset name {name!r}: a preset name is a name ([A-Za-z0-9_-]+), not a path "
            f"(available: {', '.join(list_presets())}); pass a model config file as a path ending in .toml or .json"
        )
    entry = resources.files(__package__) / f"{name}.toml"
    if not entry.is_file():
        names = list(list_presets())
        hint = suggest(name, names)
        raise ConfigError(f"unknown preset {name!r} (available: {', '.join(names)}){f'; {hint}' if hint else ''}")
    return tomllib.loads(entry.read_text())


def config_from_table(table: dict, source: str) -> LoopMoEConfig:
    """Build a config from a dict of fields, rejecting unknown keys with a suggestion."""
    table = {k: v for k, v in table.items() if k not in PRESET_META_KEYS}
    unknown = sorted(set(table) - set(CONFIG_FIELDS))
    if unknown:
        hints = [f"{k!r} ({hint})" if (hint := suggest(k, CONFIG_FIELDS)) else repr(k) for k in unknown]
        raise ConfigError(
            f"{source}: unknown model field(s) {', '.join(hints)}; valid fields are the arguments of LoopMoEConfig"
        )
    return LoopMoEConfig(**table)


def get_preset(name: str, **overrides) -> LoopMoEConfig:
    """The preset ``name`` as a LoopMoEConfig, with field ``overrides`` applied."""
    return config_from_table({**_preset_table(name), **overrides}, f"preset {name!r}")


def is_paper_scale(name: str) -> bool:
    return bool(_preset_table(name).get("paper_scale", False))


def load_model_config(spec: str | Path, **overrides) -> LoopMoEConfig:
    """A model config from a preset name, a ``.toml`` / ``.json`` file, or a checkpoint directory."""
    path = Path(spec)
    if path.is_dir():
        path = path / "config.json"
        if not path.is_file():
            raise MissingFileError(f"{spec} is a directory without config.json: pass a checkpoint directory")
    if path.suffix == ".toml" and path.is_file():
        table = read_toml(path)
        table = table.get("model", table)
        preset = table.pop("preset", None)
        base = _preset_table(preset) if preset else {}
        return config_from_table({**base, **table, **overrides}, str(path))
    if path.suffix == ".json" and path.is_file():
        data = read_json(path, ConfigError, "pass a model config.json")
        if data.get("model_type") == "qwen3_moe":
            return loopmoe_config_from_qwen3_moe({**data, **overrides})
        if data.get("model_type") not in (None, LoopMoEConfig.model_type):
            raise ConfigError(f"{path}: model_type {data.get('model_type')!r} is not a LoopMoE or Qwen3-MoE config")
        return config_from_table(
            {k: v for k, v in {**data, **overrides}.items() if k in ARCHITECTURE_FIELDS}, str(path)
        )
    if path.suffix in (".toml", ".json"):
        raise MissingFileError(f"model config file {path} not found")
    return get_preset(str(spec), **overrides)
