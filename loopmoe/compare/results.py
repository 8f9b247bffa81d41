"""What a comparison found: the dataclasses that *are* ``results.json``'s schema.

``StudyResults.to_dict()`` is the file's content key for key, in the order it has always been written, so
a study stored before these classes existed loads with ``StudyResults.from_dict`` and is written back byte
for byte (``json.dumps(..., indent=2, default=str)``). JSON turns the seeds of ``runs`` into strings;
``from_dict`` turns them back into ints.

Records that belong to other parts of loopmoe stay their own JSON: the options as given
(``dataclasses.asdict`` of ``CompareOptions``), the balancing (``BalanceResult.as_dict``), each arm's
architecture and training config, the trainer's metrics rows, ``cost.json``'s sessions, the perplexity
(``PerplexityResult.as_dict``) and task rows (``harness.summarize``) of a run's evaluation.
"""

from __future__ import annotations

import json
import statistics
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from loopmoe.atomic import atomic_write_text
from loopmoe.budget import Budget
from loopmoe.compare.arms import Arm, ArmSpec
from loopmoe.evaluation.pipeline import RunEvaluation

RESULTS_FILE = "results.json"
# The budget figures of an arm, recorded with their deviation from the reference.
BUDGET_KEYS = ("total_params", "active_params", "flops_per_token", "attn_ffn_ratio")


@dataclass
class ArmRecord:
    """An arm as the results record it: its spec, seeds, architecture, budget and deviations from the reference."""

    spec: ArmSpec
    seeds: tuple[int, ...]
    config: dict[str, Any]  # LoopMoEConfig.architecture_dict()
    total_params: int
    active_params: int
    flops_per_token: float
    attn_ffn_ratio: float
    deviations: dict[str, float]  # BUDGET_KEYS -> this arm's / the reference's - 1

    @classmethod
    def of(cls, arm: Arm, reference: Budget) -> ArmRecord:
        return cls(
            spec=arm.spec,
            seeds=tuple(arm.seeds),
            config=arm.config.architecture_dict(),
            **{k: getattr(arm.budget, k) for k in BUDGET_KEYS},
            deviations={k: getattr(arm.budget, k) / getattr(reference, k) - 1.0 for k in BUDGET_KEYS},
        )

    def to_dict(self) -> dict[str, Any]:
        return {
            "spec": self.spec.record(),
            "seeds": list(self.seeds),
            "config": self.config,
            **{k: getattr(self, k) for k in BUDGET_KEYS},
            "deviations": self.deviations,
        }

    @classmethod
    def from_dict(cls, raw: dict[str, Any]) -> ArmRecord:
        spec = dict(raw["spec"])
        if spec.get("seeds") is not None:
            spec["seeds"] = tuple(spec["seeds"])
        return cls(
            spec=ArmSpec(**spec),
            seeds=tuple(raw["seeds"]),
            config=raw["config"],
            **{k: raw[k] for k in BUDGET_KEYS},
            deviations=raw["deviations"],
        )


@dataclass
class RunRecord:
    """One finished run, read from its folder (so a skipped run reads like a trained one), and its evaluation."""

    val_loss: float | None  # the last held-out loss the trainer logged
    train_loss: float  # the last step's
    final_dir: str
    metrics: list[dict[str, Any]]  # metrics.jsonl's rows
    cost: list[dict[str, Any]]  # cost.json's sessions
    eval: RunEvaluation

    def to_dict(self) -> dict[str, Any]:
        return {
            "val_loss": self.val_loss,
            "train_loss": self.train_loss,
            "final_dir": self.final_dir,
            "metrics": self.metrics,
            "cost": self.cost,
            "eval": self.eval.to_dict(),
        }

    @classmethod
    def from_dict(cls, raw: dict[str, Any]) -> RunRecord:
        return cls(
            val_loss=raw["val_loss"],
            train_loss=raw["train_loss"],
            final_dir=raw["final_dir"],
            metrics=raw["metrics"],
            cost=raw.get("cost", []),
            eval=RunEvaluation.from_dict(raw["eval"]),
        )


@dataclass(frozen=True)
class MissingRun:
    """A run of the plan not finished when the report was written (``--report-only``)."""

    arm: str
    seed: int
    step: int  # its last checkpoint's (0: none)


@dataclass(frozen=True)
class TextSource:
    """The held-out text every run was scored on."""

    path: str
    name: str  # what the report calls it


@dataclass
class StudyResults:
    """results.json: a comparison's options, arms, finished runs and what was measured of them."""

    options: dict[str, Any]  # CompareOptions as given (asdict; paths as strings)
    budget: dict[str, Any] | None  # BalanceResult.as_dict() of the main looped arm; None without one
    arms: dict[str, ArmRecord]
    runs: dict[str, dict[int, RunRecord]]  # arm -> seed -> run (an arm with no finished run: {})
    missing: list[MissingRun] = field(default_factory=list)
    downstream: dict[str, list[dict[str, Any]]] = field(default_factory=dict)  # stats.downstream_over_seeds rows
    text: TextSource | None = None
    data: dict[str, Any] = field(default_factory=dict)  # the shared data: source, vocabulary, tokens per split
    run_configs: dict[str, Any] = field(default_factory=dict)  # arm -> RunConfig.to_dict() of its first seed
    environment: dict[str, Any] = field(default_factory=dict)  # cost.environment() of the report's process
    # evaluations the options asked for (or 'auto' would have run) that did not run, each with why; written
    # only when there is one, so a results.json of before it round-trips
    not_evaluated: list[str] = field(default_factory=list)

    def finished_runs(self) -> dict[str, dict[int, RunRecord]]:
        """The arms with at least one finished run."""
        return {name: seeds for name, seeds in self.runs.items() if seeds}

    def to_dict(self) -> dict[str, Any]:
        return {
            "options": self.options,
            "budget": self.budget,
            "arms": {name: arm.to_dict() for name, arm in self.arms.items()},
            "runs": {name: {s: r.to_dict() for s, r in seeds.items()} for name, seeds in self.runs.items()},
            "missing": [asdict(m) for m in self.missing],
            "downstream": self.downstream,
            "text": None if self.text is None else asdict(self.text),
            "data": self.data,
            "run_configs": self.run_configs,
            "environment": self.environment,
            **({"not_evaluated": self.not_evaluated} if self.not_evaluated else {}),
        }

    @classmethod
    def from_dict(cls, raw: dict[str, Any]) -> StudyResults:
        text = raw.get("text")
        return cls(
            options=raw["options"],
            budget=raw["budget"],
            arms={name: ArmRecord.from_dict(arm) for name, arm in raw["arms"].items()},
            runs={
                name: {int(s): RunRecord.from_dict(r) for s, r in seeds.items()} for name, seeds in raw["runs"].items()
            },
            missing=[MissingRun(**m) for m in raw.get("missing") or []],
            downstream=raw.get("downstream") or {},
            text=None if not text else TextSource(**text),
            data=raw.get("data") or {},
            run_configs=raw.get("run_configs") or {},
            environment=raw.get("environment") or {},
            not_evaluated=raw.get("not_evaluated") or [],
        )

    def dumps(self) -> str:
        """results.json's text."""
        return json.dumps(self.to_dict(), indent=2, default=str)

    def save(self, path: Path) -> None:
        atomic_write_text(path, self.dumps())

    @classmethod
    def load(cls, path: Path) -> StudyResults:
        return cls.from_dict(json.loads(path.read_text()))


def stored_options(path: Path) -> dict[str, Any] | None:
    """The options recorded in a results.json, or None where there is none to read. Only the options are
    read, so this works for a results.json of any age (the options were always recorded)."""
    try:
        options = json.loads(path.read_text())["options"]
    except (OSError, ValueError, KeyError, TypeError):
        return None
    return options if isinstance(options, dict) else None


@dataclass(frozen=True)
class DepthMean:
    """One arm at one loop count: the held-out loss of each seed, their mean, and the FLOPs per token there."""

    losses: list[float]
    flops_per_token: float
    untrained_iteration_vectors: bool

    @property
    def loss(self) -> float:
        return statistics.fmean(self.losses)


def depth_means(runs: dict[str, dict[int, RunRecord]]) -> dict[str, dict[int, DepthMean]]:
    """Per arm and loop count (ascending): the depth curves of its seeds, averaged."""
    out: dict[str, dict[int, DepthMean]] = {}
    for name, seeds in runs.items():
        by_loops: dict[int, DepthMean] = {}
        for run in seeds.values():
            for point in run.eval.depth.points:
                seen = by_loops.get(point.loops)
                losses = [*(seen.losses if seen else []), point.loss]
                flops = seen.flops_per_token if seen else point.flops_per_token
                by_loops[point.loops] = DepthMean(losses, flops, point.untrained_iteration_vectors)
        out[name] = dict(sorted(by_loops.items()))
    return out


@dataclass(frozen=True)
class ExitMean:
    """One looped arm under one exit policy (``loopmoe.evaluation.early_exit``): per seed, the held-out loss and
    the core iterations per token executed, with their means; and the FLOPs per token at the mean iterations."""

    label: str  # the policy, e.g. latent:0.03
    criterion: str
    losses: list[float]
    mean_loops: list[float]
    flops_per_token: list[float]
    flops_fraction: list[float]  # of the trained depth's FLOPs per token

    @property
    def loss(self) -> float:
        return statistics.fmean(self.losses)

    @property
    def loops(self) -> float:
        return statistics.fmean(self.mean_loops)

    @property
    def flops(self) -> float:
        return statistics.fmean(self.flops_per_token)

    @property
    def fraction(self) -> float:
        return statistics.fmean(self.flops_fraction)


def exit_means(runs: dict[str, dict[int, RunRecord]]) -> dict[str, list[ExitMean]]:
    """Per looped arm with an exit sweep: each policy's points over its seeds, in the sweep's order."""
    out: dict[str, list[ExitMean]] = {}
    for name, seeds in runs.items():
        by_policy: dict[str, ExitMean] = {}
        for run in seeds.values():
            for point in run.eval.exit_sweep or ():
                label = point.label(run.eval.depth.trained_loops)
                seen = by_policy.get(label) or ExitMean(label, point.criterion, [], [], [], [])
                by_policy[label] = ExitMean(
                    label,
                    point.criterion,
                    [*seen.losses, point.loss],
                    [*seen.mean_loops, point.mean_loops],
                    [*seen.flops_per_token, point.flops_per_token],
                    [*seen.flops_fraction, point.flops_fraction],
                )
        if by_policy:
            out[name] = list(by_policy.values())
    return out
