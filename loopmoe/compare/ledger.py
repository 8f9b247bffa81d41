"""A study's ledger: one small JSON entry per finished, evaluated run, kept where the code is kept.

A run folder (``OUT/seed{s}/{arm}``) holds checkpoints of megabytes and lives under ``runs/``, which a fresh
checkout, another machine or the next working session does not have. A study of tens of CPU-hours is
finished over several of them, so ``loopmoe compare --ledger DIR`` records what the report reads of every
run in ``DIR/seed{s}/{arm}.json``, small enough to commit beside the study's config:

- ``identity``: the arm's spec and the resolved run config (``loopmoe.compare.identity``), as the run folder's
  ``compare_run.json`` records it;
- ``data``: the fingerprints of the tokenizer and shards it was trained on (``PreparedData.fingerprints``);
- ``evaluation``: the settings and input digests it was measured under (``evaluation_settings``);
- ``record``: its ``RunRecord`` (metrics, cost and evaluation), as results.json holds it.

A run that is not finished in OUT but has an entry is not trained again: its entry answers, provided all
three of identity, data and evaluation settings equal what the study asks now. An entry of other settings
or other data is refused like a run folder of other settings (``--fresh`` moves it aside, never deletes
it). An entry measured under other evaluation settings (other tasks, text or depth curve) cannot answer
without its checkpoint: the run trains again, and says why. Entries are written after each run's
evaluation, atomically, and only when their content changed.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import torch

from loopmoe.atomic import atomic_write_text, move_aside
from loopmoe.compare.identity import defining, differences
from loopmoe.compare.results import RunRecord
from loopmoe.errors import ConfigError
from loopmoe.evaluation.pipeline import batches_sha256, files_sha256, task_data_sha256
from loopmoe.paths import shared_data_dir
from loopmoe.trust import read_json

SCHEMA = 1
MARKER = "ledger.json"  # what makes a folder a ledger loopmoe may write into
_ABOUT = (
    "loopmoe compare --ledger: one entry per finished, evaluated run (seed{s}/{arm}.json); "
    "see loopmoe/compare/ledger.py"
)


def evaluation_settings(
    *,
    val_batches: Iterable[torch.Tensor],
    depth_loops: Iterable[int],
    text: Path | None,
    text_tokens: int | None,
    tasks: tuple[str, ...],
    task_limit: int | None,
    exit_sweep: tuple[str, ...] = (),
) -> dict[str, Any]:
    """What a run's evaluation was measured under: every setting of ``evaluate_run`` and a digest of every
    input it read besides the weights (held-out batches, text, task data), so equal settings mean equal
    measurements. Paths are left out (they differ between machines); contents are in."""
    settings: dict[str, Any] = {
        "val_batches_sha256": batches_sha256(list(val_batches)),
        "depth_loops": sorted(set(depth_loops)),
        "text": None
        if text is None
        else {"name": text.name, "sha256": files_sha256([text]), "max_tokens": text_tokens},
        "tasks": list(tasks),
        "task_limit": task_limit if tasks else None,
        "task_data_sha256": task_data_sha256(tasks, shared_data_dir()) if tasks else None,
    }
    if exit_sweep:  # recorded only when asked for: entries of studies without a sweep stay as they were
        settings["exit_sweep"] = list(exit_sweep)
    return settings


class Ledger:
    """The ledger folder ``root``: ``entry``/``record`` read it, ``check`` refuses stale entries, ``write`` adds."""

    def __init__(self, root: Path):
        self.root = root

    @classmethod
    def open(cls, root: Path, *, create: bool) -> Ledger:
        """The ledger at ``root``; with ``create``, a new or empty folder becomes one. A folder of the user's
        (not empty, no marker) is refused: loopmoe writes only into its own folders."""
        if root.exists() and not root.is_dir():
            raise ConfigError(f"--ledger {root} is a file, not a folder: choose another --ledger")
        marker = root / MARKER
        if root.is_dir() and not marker.is_file() and any(root.iterdir()):
            raise ConfigError(
                f"--ledger {root} is a folder that holds no ledger (no {MARKER}) and is not empty: choose a new or "
                "empty folder"
            )
        if marker.is_file():
            head = read_json(marker, ConfigError, fix="restore it (e.g. from git) or choose another --ledger")
            if head.get("schema") != SCHEMA:
                raise ConfigError(
                    f"{marker} is a ledger of schema {head.get('schema')!r}; this loopmoe reads schema {SCHEMA}: "
                    "upgrade loopmoe or choose another --ledger"
                )
        elif create:
            root.mkdir(parents=True, exist_ok=True)
            atomic_write_text(marker, json.dumps({"schema": SCHEMA, "about": _ABOUT}, indent=2) + "\n")
        return cls(root)

    def path(self, seed: int, arm: str) -> Path:
        return self.root / f"seed{seed}" / f"{arm}.json"

    def entry(self, seed: int, arm: str) -> dict[str, Any] | None:
        """The entry of ``arm``'s run ``seed`` (checked for shape), or None where there is none."""
        path = self.path(seed, arm)
        if not path.is_file():
            return None
        fix = "restore it (e.g. from git), or delete it to train the run again"
        raw = read_json(path, ConfigError, fix=fix)
        missing = [k for k in ("schema", "identity", "data", "evaluation", "record") if k not in raw]
        if missing or raw["schema"] != SCHEMA or not isinstance(raw["identity"], dict):
            why = f"lacks {', '.join(missing)}" if missing else f"is not a schema-{SCHEMA} entry"
            raise ConfigError(f"ledger entry {path} {why}; {fix}")
        try:
            RunRecord.from_dict(raw["record"])
        except (KeyError, TypeError, ValueError, AttributeError) as error:
            raise ConfigError(f"ledger entry {path} holds no readable run record ({error!r}); {fix}") from None
        return raw

    def check(
        self,
        wanted: Mapping[tuple[int, str], dict[str, Any]],
        data: Mapping[str, str],
        *,
        fresh: bool,
        report_only: bool,
        log=print,
    ) -> None:
        """Refuse (or, with ``fresh``, move aside) every entry of the plan recorded with other settings than its
        arm gives now (``wanted``: identity records) or trained on other data (``data``: fingerprints)."""
        changed: list[tuple[Path, str]] = []
        for (seed, arm), identity in wanted.items():
            raw = self.entry(seed, arm)
            if raw is None:
                continue
            stored = raw["identity"].get("run_config", {})
            diff = differences(defining(stored), defining(identity["run_config"]))
            if diff:
                changed.append((self.path(seed, arm), ", ".join(diff[:4]) + (" (...)" if len(diff) > 4 else "")))
            elif dict(raw["data"]) != dict(data):
                changed.append((self.path(seed, arm), "it was trained on other data (tokenizer or corpus changed)"))
        if not changed:
            return
        if not fresh or report_only:
            path, why = changed[0]
            more = (
                f" (and {len(changed) - 1} other entr{'ies' if len(changed) > 2 else 'y'})" if len(changed) > 1 else ""
            )
            raise ConfigError(
                f"ledger entry {path} records a run of other settings than its arm now gives: {why}{more}; nothing "
                "was trained. Restore the arm's settings to reuse it, give the changed arm a new name, or pass "
                "--fresh to move the changed entries aside and train them anew"
            )
        for path, why in changed:
            log(f"moved ledger entry {path} aside to {move_aside(path)} ({why})")

    def record(self, seed: int, arm: str, settings: dict[str, Any], log=print) -> RunRecord | None:
        """The run record the ledger holds for this run, if it was measured under ``settings`` (identity and
        data are ``check``'s); None, with the reason logged, where it cannot answer."""
        raw = self.entry(seed, arm)
        if raw is None:
            return None
        diff = differences(raw["evaluation"], settings)
        if diff:
            log(
                f"   ledger entry {self.path(seed, arm)} was measured under other evaluation settings "
                f"({'; '.join(diff[:3])}); its checkpoint is not here, so the run trains again"
            )
            return None
        return RunRecord.from_dict(raw["record"])

    def write(
        self,
        seed: int,
        arm: str,
        *,
        identity: dict[str, Any],
        data: Mapping[str, str],
        settings: dict[str, Any],
        record: RunRecord,
    ) -> None:
        """Record a finished, evaluated run (atomically; untouched where the entry already says the same)."""
        entry = {
            "schema": SCHEMA,
            "arm": arm,
            "seed": seed,
            "identity": identity,
            "data": dict(data),
            "evaluation": settings,
            "record": record.to_dict(),
        }
        text = json.dumps(entry, indent=1, default=str) + "\n"
        path = self.path(seed, arm)
        if path.is_file() and path.read_text() == text:
            return
        path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_text(path, text)
