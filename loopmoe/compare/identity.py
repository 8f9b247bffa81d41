"""What identifies a comparison's run: its arm's spec and its resolved run config, as a run folder
(``compare_run.json``) and a ledger entry (``loopmoe.compare.ledger``) record them, and how two are compared."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, cast

from loopmoe.compare.arms import Arm
from loopmoe.errors import ConfigError
from loopmoe.training.config import RunConfig, config_from_dict

IDENTITY_FILE = "compare_run.json"
# Run-config keys that locate a run rather than define it (the data's identity is its fingerprint, checked
# against every checkpoint before the shared data is rebuilt).
_LOCATION_KEYS = (("data", "data_dir"),)


def identity_record(arm: Arm, cfg: RunConfig) -> dict[str, Any]:
    """What a run folder records of the run it holds: its arm's spec (seeds aside) and its resolved run config."""
    spec = {k: v for k, v in arm.spec.record().items() if k != "seeds"}
    return cast(dict[str, Any], json.loads(json.dumps({"arm": arm.name, "spec": spec, "run_config": cfg.to_dict()})))


def defining(run_config: dict[str, Any]) -> dict[str, Any]:
    """A run config as the identity compares it: read back through ``config_from_dict`` (so settings added to
    the trainer since the run was recorded take their defaults), without the keys that only locate the run."""
    try:
        raw = config_from_dict(json.loads(json.dumps(run_config))).to_dict()
    except (ValueError, TypeError, KeyError):
        raw = json.loads(json.dumps(run_config))
    raw = json.loads(json.dumps(raw, default=str))
    for section, key in _LOCATION_KEYS:
        raw.get(section, {}).pop(key, None)
    return cast(dict[str, Any], raw)


def differences(old: Any, new: Any, prefix: str = "") -> list[str]:
    """Every leaf where ``old`` and ``new`` differ, as ``"path old -> new"``."""
    if isinstance(old, dict) and isinstance(new, dict):
        out = []
        for key in sorted(set(old) | set(new)):
            out += differences(old.get(key), new.get(key), f"{prefix}.{key}" if prefix else key)
        return out
    return [] if old == new else [f"{prefix} {old!r} -> {new!r}"]


def stored_identity(run_dir: Path) -> dict[str, Any] | None:
    """The run config a run folder was trained with: its ``compare_run.json``, else the trainer's own
    ``run_config.json`` (runs trained before the comparison recorded one); None for a folder with neither."""
    for name, key in ((IDENTITY_FILE, "run_config"), ("run_config.json", None)):
        try:
            raw = json.loads((run_dir / name).read_text())
        except FileNotFoundError:
            continue
        except ValueError as error:
            raise ConfigError(f"{run_dir / name} is unreadable ({error}): pass --fresh to move the run aside") from None
        return cast(dict[str, Any], raw[key] if key else raw)
    return None
