"""How far ``loopmoe plan`` was off on this machine: the record ``bench.plan_vs_measured`` leaves.

The ``cpu`` profile is measured here, but the planner's model of a step is not exact, and its error
is systematic on a given machine: every time prediction came out pessimistic on one 2-core CPU and
optimistic on another (PERFORMANCE.md). So one number is not the whole answer. The bench records
the errors it measured beside the calibration cache, under the same machine record
(``calibration.machine()``), and ``loopmoe plan`` states them with its prediction as a range of
tokens/s, or says that this machine was never validated.

An error is ``predicted / measured - 1`` (negative: the plan was pessimistic), so a prediction
``p`` stands for a measured rate between ``p / (1 + largest error)`` and ``p / (1 + smallest)``.
The errors are against the fastest of a few fresh processes per configuration. The record also holds how
much slower the other processes ran (``process_spread``: slowest / fastest - 1; on a 2-vCPU VM a 2-thread
process sometimes runs ~35% slower, for its whole life or from some point on), and the low end is divided
by the largest spread too, since ``loopmoe train`` may run in such a process.
"""

from __future__ import annotations

import json
import statistics
from pathlib import Path
from typing import Any

from loopmoe.atomic import atomic_write_text
from loopmoe.planning.calibration import CALIBRATION_VERSION, cache_path, finite_number, machine

VERSION = 1


def validation_path() -> Path:
    """Beside the calibration cache: ``plan-validation-<host>.json``."""
    calibration = cache_path()
    return calibration.with_name(calibration.name.replace("hardware-cpu-", "plan-validation-", 1))


def _usable(time_errors: dict, process_spread: dict) -> bool:
    """At least one error, each a finite number above -1 (a measured rate above zero); spreads finite and >= 0."""
    return (
        bool(time_errors)
        and all(finite_number(e) and e > -1 for e in time_errors.values())
        and all(finite_number(s) and s >= 0 for s in process_spread.values())
    )


def save_validation(
    time_errors: dict[str, float], date: str, process_spread: dict[str, float] | None = None, path: Path | None = None
) -> Path:
    """Record the time errors of a validation run (configuration -> predicted / measured - 1) for this machine,
    and how much slower than the fastest the other processes of each configuration ran."""
    process_spread = process_spread or {}
    if not _usable(time_errors, process_spread):
        raise ValueError(
            f"time errors must be finite and above -1, spreads finite and >= 0, got {time_errors}, {process_spread}"
        )
    path = path or validation_path()
    path.parent.mkdir(parents=True, exist_ok=True)
    record = {
        "version": VERSION,
        # errors of predictions from this calibration procedure: another's say nothing about today's plans
        "calibration_version": CALIBRATION_VERSION,
        **machine(),
        "date": date,
        "time_errors": time_errors,
        "process_spread": process_spread,
    }
    atomic_write_text(path, json.dumps(record, indent=2) + "\n")
    return path


def load_validation(path: Path | None = None) -> dict[str, Any] | None:
    """This machine's validation record, or None: none yet, unreadable, measured on another machine or torch,
    or with another calibration procedure (``calibration.CALIBRATION_VERSION``)."""
    try:
        record = json.loads((path or validation_path()).read_text())
        errors = record["time_errors"]
        if (
            record.get("version") != VERSION
            or record.get("calibration_version") != CALIBRATION_VERSION
            or not _usable(errors, record["process_spread"])
        ):
            return None
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return None
    if any(record.get(k) != v for k, v in machine().items()):
        return None
    return record


def uncertainty(tokens_per_s: float, record: dict[str, Any] | None) -> dict[str, Any]:
    """The stated uncertainty of a CPU prediction of ``tokens_per_s``: the measured rate it stands for on
    this machine (a range) and one line saying where that comes from."""
    if record is None:
        return {
            "validated": False,
            "text": "not validated on this machine (on two others its worst error was 35% and 77%, in opposite "
            "directions; PERFORMANCE.md): `python -m bench.plan_vs_measured` measures it here",
        }
    errors = list(record["time_errors"].values())
    low, high, middle = min(errors), max(errors), statistics.median(errors)
    spread = max(record["process_spread"].values(), default=0.0)
    rates = (tokens_per_s / (1 + high) / (1 + spread), tokens_per_s / (1 + low))

    def share(e: float) -> str:
        return f"{abs(e):.0%} {'low' if e < 0 else 'high'}" if round(abs(e), 2) else "0%"

    slower = f"; a process ran up to {spread:.0%} slower than another of the same run" if round(spread, 2) else ""
    return {
        "validated": True,
        "tokens_per_s_range": list(rates),
        "median_error": middle,
        "process_spread": spread,
        "text": f"{len(errors)} measured runs here ({record['date']}): {share(low)} to {share(high)}, median "
        f"{share(middle)}{slower}; expect {rates[0]:,.0f} to {rates[1]:,.0f} tokens/s",
    }
