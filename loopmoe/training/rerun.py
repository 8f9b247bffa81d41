"""What a re-run may change of the settings a run was trained with: one rule, for a finished run and an
interrupted one alike.

Every setting of the run config stored in the checkpoint (``CheckpointMeta.config``) is compared with
the re-run's:

- ``FIXED`` settings say what the trained steps are (the model, the data, the seed). They cannot change
  within a run: the re-run is refused before anything is loaded, naming the fix (the original settings,
  ``--restart``, or a new ``--out``; for the data, ``--rebuild-data`` continues the run on new data).
- Every other setting only affects the steps still to train (optimizer, schedule, ``max_steps``, batch,
  precision, evaluation / logging / checkpoint cadence, parallel layout): its change warns, naming each
  key, and applies from the next step. A finished run has no next step, so there the change is neither
  used nor recorded: ``run_config.json`` keeps the settings the weights were trained with.

A setting the stored config does not name (written by an older version) is not compared.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from loopmoe.errors import RunError

FIXED = ("model", "data", "train.seed")
NOT_FIXED = ("data.data_dir",)  # where the data is cached: the data itself is checked by its fingerprints


class SettingChangedError(RunError, ValueError):
    """A re-run changes a setting that cannot change within a run; the message names the fix."""


def _under(key: str, prefixes: tuple[str, ...]) -> bool:
    return any(key == p or key.startswith(p + ".") for p in prefixes)


@dataclass(frozen=True)
class SettingChange:
    """One setting that differs: ``key`` as in the TOML file (tables key by key, e.g. ``model.fields.hidden_size``)."""

    key: str
    old: Any
    new: Any

    @property
    def fixed(self) -> bool:
        return _under(self.key, FIXED) and not _under(self.key, NOT_FIXED)

    def __str__(self) -> str:
        return f"{self.key}: {self.old!r} -> {self.new!r}"


def setting_changes(saved: Mapping[str, Any], current: Mapping[str, Any]) -> list[SettingChange]:
    """Every setting of ``current`` (``RunConfig.to_dict()``) that differs from the stored ``saved``."""
    out: list[SettingChange] = []
    for section, table in current.items():
        old = saved.get(section)
        if isinstance(old, Mapping):
            for key in (k for k in table if k in old):
                out += _diff(old[key], table[key], f"{section}.{key}")
    return out


def _diff(old: Any, new: Any, key: str) -> list[SettingChange]:
    if isinstance(old, Mapping) and isinstance(new, Mapping):
        return [c for k in sorted({*old, *new}, key=str) for c in _diff(old.get(k), new.get(k), f"{key}.{k}")]
    return [] if old == new else [SettingChange(key, old, new)]


def refuse_fixed_changes(
    changes: list[SettingChange], path: Path, step: int, max_steps: int, *, rebuild_data: bool = False
) -> None:
    """ValueError (one line, naming the fix) if a ``FIXED`` setting changed, or ``max_steps`` is below ``step``.

    With ``rebuild_data`` the data settings may change: the run continues on the new data.
    """
    fixed = [c for c in changes if c.fixed and not (rebuild_data and _under(c.key, ("data",)))]
    if fixed:
        listed = "; ".join(map(str, fixed))
        if any(_under(c.key, ("model",)) for c in fixed):
            what = f"a different model ({listed}), whose weights do not fit this one"
        else:
            what = f"other settings ({listed}), which cannot change within a run"
        data = (
            " or continue it on the new data with --rebuild-data,"
            if any(_under(c.key, ("data",)) for c in fixed)
            else ""
        )
        raise SettingChangedError(
            f"cannot resume {path}: it was trained with {what}. Re-run with the original settings,{data} "
            "or train again from step 0 with --restart (the checkpoints are moved aside), or train into a new --out directory"
        )
    if max_steps < step:
        raise SettingChangedError(
            f"train.max_steps = {max_steps} is below the step of the checkpoint to resume, {step} ({path}); "
            f"raise train.max_steps to at least {step}, or start a new --out directory"
        )


def announce_changes(
    changes: list[SettingChange], run_dir: Path, step: int, max_steps: int, lr: tuple[float, float] | None = None
) -> None:
    """Warn, naming each changed setting (those ``refuse_fixed_changes`` let through): it applies from
    step ``step + 1``, or, in a finished run, not at all. ``lr``: the learning rate the checkpoint would
    have stepped with, and the one the changed settings give; a jump between them is said in numbers (a
    longer ``max_steps`` stretches a decaying schedule, so the lr rises again where the run left off)."""
    if not changes:
        return
    jump = ""
    if lr is not None and step < max_steps and not math.isclose(lr[0], lr[1], rel_tol=0.01):
        jump = (
            f"; the learning rate jumps from {lr[0]:.3g} to {lr[1]:.3g} at step {step + 1}, because the schedule "
            f"is recomputed over train.max_steps = {max_steps} from its start (to decay on smoothly instead, "
            "start a new run from this one's weights with model.init_from and a schedule of its own)"
        )
    listed = "; ".join(map(str, changes))
    if step >= max_steps:
        warnings.warn(
            f"{run_dir} finished at step {step} = train.max_steps, so nothing is trained: the changed "
            f"settings ({listed}) are not used and not recorded; raise train.max_steps to continue the run with them",
            stacklevel=3,
        )
    else:
        warnings.warn(
            f"resuming at step {step} with a changed schedule or other settings ({listed}): the new settings "
            f"apply from step {step + 1}{jump}",
            stacklevel=3,
        )
