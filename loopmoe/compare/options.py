"""What defines a comparison: ``CompareOptions`` (the ``loopmoe compare`` flags and a study config's keys),
the options that identify its trained runs, and the ``RunConfig`` every arm is trained with."""

from __future__ import annotations

import json
import tomllib
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, cast, get_type_hints

from loopmoe.balance import STRATEGIES, BalanceOptions
from loopmoe.compare.arms import (
    BUILTIN_ARMS,
    ArmSpec,
    arm_spec_from_table,
    check_arm_name,
    check_seeds,
    parse_difference,
)
from loopmoe.config import ExpertType, LoopMoEConfig
from loopmoe.data.config import DataSection
from loopmoe.errors import ConfigError
from loopmoe.evaluation.early_exit import parse_sweep
from loopmoe.evaluation.pipeline import DEFAULT_TEXT
from loopmoe.options import coerce_value, flag_of, help_of, option, unknown_key_hint
from loopmoe.training.config import (
    ModelSection,
    OptimSection,
    RunConfig,
    ScheduleKind,
    ScheduleSection,
    TrainSection,
)

# The test-time depth curve of issue 16: loss at these loop counts for every looped arm.
DEPTH_LOOPS = (1, 2, 3, 4, 6)

OPTIONS_FILE = "options.json"
# Options that only choose what is evaluated, where, or how fast: changing them never makes the trained runs stale.
NOT_IDENTITY = (
    "out",
    "fresh",
    "tasks",
    "task_limit",
    "threads",
    "text",
    "text_tokens",
    "depth_loops",
    "exit_sweep",
    "report_only",
    "results",
    "ledger",
    "primary",
    "secondary",
)
# What a study is made of: which arms, with which settings, over which seeds. Not part of the folder's
# identity: a study folder accepts new arms and seeds, and each run's identity is checked on its own
# (its resolved run config, ``loopmoe.compare.runner``), so changing an arm's settings is caught per run.
COMPOSITION = ("arms", "arm", "seeds")


@dataclass(kw_only=True)
class CompareOptions(BalanceOptions):
    """Everything that defines a comparison; the defaults finish in about 10 minutes on 2 CPU cores.

    The balancing options are ``BalanceOptions``' (shared with ``loopmoe budget``): the arms are derived with
    ``BalanceOptions.derive``, so ``compare --reference R`` trains the looped model ``budget R`` shows.
    """

    reference: str = option("small", help="reference Vanilla MoE: preset name, model config file or checkpoint dir")
    num_loops: int = option(2, help="loop count T of the LoopMoE")
    expert_type: ExpertType | None = option(
        None,
        help="expert type of the balanced model: swiglu, or dcca (BigMac's low-dimension experts); with "
        "--num-loops 1 this compares two expert types in Vanilla MoEs",
        shown="the reference's",
    )
    source: str = option("embedded", help=help_of(DataSection, "source"))
    tokenizer: str | None = option(None, help=help_of(DataSection, "tokenizer"), shown="a BPE trained on the source")
    bpe_vocab: int = option(4096, help="vocabulary of the trained BPE")
    seq_len: int = option(256, help=help_of(DataSection, "seq_len"))
    micro_batch_size: int = option(16, help="sequences per batch", flag="--batch-size")
    steps: int = option(300, help="optimizer steps per model")
    tokens: int | None = option(
        None, help="training tokens per model (sets --steps from batch size and sequence length)"
    )
    lr: float = option(3e-3, help=help_of(OptimSection, "lr"))
    warmup_steps: int = option(30, help=help_of(ScheduleSection, "warmup_steps"))
    schedule: ScheduleKind = option("cosine", help=help_of(ScheduleSection, "kind"))
    seeds: tuple[int, ...] = option((0,), help="comma-separated seeds (mean and spread)")
    arms: tuple[str, ...] = option(
        ("reference", "looped"),
        help="comma-separated arms to train: reference, looped, granularity (a Vanilla MoE with the looped "
        "model's expert size and top-k at the reference's total parameters), or arms defined in the --config file",
    )
    arm: dict[str, ArmSpec] = option(
        default_factory=dict, help="arms defined by [arm.NAME] tables of a study config", cli=False
    )
    primary: tuple[str, ...] | None = option(
        None,
        help="the study's one primary comparison, declared before the runs: two arms A,B for the paired "
        "difference A - B (tested alone at 5%); every other comparison is secondary and Holm-corrected",
        shown="none: every comparison is secondary",
    )
    secondary: tuple[str, ...] | None = option(
        None,
        help="the study's secondary comparisons, declared before the runs: differences 'A - B' (comma-separated), "
        "Holm-corrected together as one family; the report compares exactly these and the primary",
        shown="every pair the report compares by default",
    )
    eval_every: int = option(50, help=help_of(TrainSection, "eval_every"))
    eval_batches: int = option(16, help=help_of(TrainSection, "eval_batches"))
    tasks: tuple[str, ...] = option(
        ("auto",),
        help="comma-separated downstream tasks (see `loopmoe eval --list-tasks`); 'auto': every task whose "
        "data is present; '' for none",
    )
    task_limit: int | None = option(100, help="documents per task (none: all)")
    text: str = option(
        "auto",
        help="held-out text whose perplexity every run reports (a file, or a path under the data folder); "
        f"'auto': {DEFAULT_TEXT} if the data folder has it; '' for none",
    )
    text_tokens: int | None = option(None, help="score only the first N tokens of --text (none: all)")
    depth_loops: tuple[int, ...] = option(
        DEPTH_LOOPS, help="comma-separated loop counts of the test-time depth curve of every looped arm; '' for none"
    )
    exit_sweep: tuple[str, ...] = option(
        (),
        help="adaptive depth: comma-separated exit policies CRITERION:THRESHOLD, a bare threshold taking the "
        "criterion before it (e.g. latent:0.3,0.1,0.03); every looped arm's held-out loss, core iterations and "
        "FLOPs per token under each, beside its depth curve; '' for none",
    )
    report_only: bool = option(
        False,
        help="train nothing: evaluate the finished runs and write the report, listing the runs still missing "
        "(safe while the comparison trains in another process)",
    )
    results: Path | None = option(
        None,
        help="also write the study's results page here (e.g. RESULTS.md), its figures in docs/study/ beside it",
    )
    ledger: Path | None = option(
        None,
        help="also record every finished, evaluated run in this folder (small JSON files, e.g. beside the "
        "study's config), and reuse the runs recorded there instead of training them: a study finishes over "
        "several machines or sessions",
        shown="none",
    )
    out: Path = option(default_factory=lambda: Path("runs/compare"), help="run folder")
    fresh: bool = option(
        False,
        help="start anew in --out even if it holds a comparison with other options: the old folder is "
        "moved aside to OUT.prev-N (never deleted)",
    )
    threads: int | None = option(
        None,
        help="CPU threads torch uses (torch.set_num_threads), to share the machine; a run's numbers do not "
        "depend on it beyond floating-point reduction order",
        shown="torch's default (OMP_NUM_THREADS, else all cores)",
    )

    @classmethod
    def from_toml(cls, path: Path) -> CompareOptions:
        """The options of a study config: top-level keys are these fields, ``[arm.NAME]`` tables define arms."""
        if not path.is_file():
            raise ConfigError(f"study config {path} not found; pass an existing .toml (see configs/study/eltec.toml)")
        try:
            raw = tomllib.loads(path.read_text())
        except tomllib.TOMLDecodeError as error:
            raise ConfigError(f"{path} is not valid TOML: {error}") from None
        hints = get_type_hints(cls)
        kwargs: dict[str, Any] = {}
        for key, value in raw.items():
            if key == "arm":
                if not isinstance(value, dict):
                    raise ConfigError(f"{path}: 'arm' must hold [arm.NAME] tables, got {value!r}")
                kwargs["arm"] = {name: arm_spec_from_table(name, table) for name, table in value.items()}
            elif key in hints:
                kwargs[key] = coerce_value(key, value, hints[key])
            else:
                raise ConfigError(f"{path}: unknown key '{key}'" + unknown_key_hint(key, list(hints)))
        return cls(**kwargs)

    def arm_spec(self, name: str) -> ArmSpec:
        """The spec of arm ``name``: a built-in kind, or an ``[arm.NAME]`` of the study config."""
        if name in self.arm:
            return self.arm[name]
        if name in BUILTIN_ARMS:
            return BUILTIN_ARMS[name]
        defined = sorted({*BUILTIN_ARMS, *self.arm})
        raise ConfigError(
            f"{flag_of(CompareOptions, 'arms')}: unknown arm {name!r}; choose from {', '.join(defined)}, "
            "or define it in an [arm.NAME] table of a --config file"
        )

    def validate(self) -> CompareOptions:
        def flag(name: str) -> str:
            return flag_of(CompareOptions, name)

        if self.tokens is not None:
            if self.tokens < self.micro_batch_size * self.seq_len:
                raise ConfigError(
                    f"{flag('tokens')} ({self.tokens}) is less than one batch "
                    f"({self.micro_batch_size} x {self.seq_len}); raise it"
                )
            self.steps = -(-self.tokens // (self.micro_batch_size * self.seq_len))
        if self.strategy not in STRATEGIES:
            raise ConfigError(f"{flag('strategy')} must be one of {STRATEGIES}, got {self.strategy!r}")
        for name in ("num_loops", "seq_len", "micro_batch_size", "steps", "eval_every", "bpe_vocab"):
            if getattr(self, name) < 1:
                raise ConfigError(f"{flag(name)} must be >= 1, got {getattr(self, name)}")
        if self.warmup_steps >= self.steps:
            raise ConfigError(
                f"{flag('warmup_steps')} ({self.warmup_steps}) must be below {flag('steps')} ({self.steps})"
            )
        if not self.seeds:
            raise ConfigError(f"{flag('seeds')} needs at least one seed, e.g. {flag('seeds')} 0,1,2")
        check_seeds(self.seeds, flag("seeds"))
        if not self.arms:
            raise ConfigError(f"{flag('arms')} needs at least one arm, e.g. {flag('arms')} reference,looped")
        if len(set(self.arms)) != len(self.arms):
            raise ConfigError(f"{flag('arms')} names an arm twice: {','.join(self.arms)}")
        for name, spec in self.arm.items():
            check_arm_name(name)
            spec.validate(name)
        for name in self.arms:
            self.arm_spec(name)
        if self.primary is not None:
            self._check_primary(flag("primary"))
        if self.secondary is not None:
            self._check_secondary(flag("secondary"))
        if self.prelude < 0 or self.coda < 0:
            raise ConfigError(f"{flag('prelude')} and {flag('coda')} must be >= 0, got {self.prelude}, {self.coda}")
        if any(t < 1 for t in self.depth_loops):
            raise ConfigError(f"{flag('depth_loops')} must be positive loop counts, got {self.depth_loops}")
        try:
            parse_sweep(self.exit_sweep)
        except ConfigError as error:
            raise ConfigError(f"{flag('exit_sweep')}: {error}") from None
        if self.text_tokens is not None and self.text_tokens < 2:
            raise ConfigError(f"{flag('text_tokens')} must be >= 2, got {self.text_tokens}")
        if self.report_only and self.fresh:
            raise ConfigError(
                f"{flag('report_only')} reports the comparison in --out; {flag('fresh')} would move it aside: drop one"
            )
        if self.threads is not None and self.threads < 1:
            raise ConfigError(f"{flag('threads')} must be >= 1, got {self.threads}")
        return self

    def _check_primary(self, where: str) -> None:
        assert self.primary is not None
        if len(self.primary) != 2 or self.primary[0] == self.primary[1]:
            raise ConfigError(
                f"{where} = {list(self.primary)}: name two different arms A, B (the paired difference A - B), "
                'e.g. primary = ["looped", "reference"]'
            )
        self._check_pair(self.primary[0], self.primary[1], where)

    def _check_secondary(self, where: str) -> None:
        assert self.secondary is not None
        pairs = []
        for text in self.secondary:
            pair = parse_difference(text)
            if pair is None:
                raise ConfigError(
                    f"{where}: {text!r} is not a difference of two different arms: write 'A - B' (spaces around the "
                    'minus), e.g. secondary = ["looped - reference"]'
                )
            self._check_pair(*pair, f"{where}: {text!r}")
            if pair in pairs or pair[::-1] in pairs:
                raise ConfigError(f"{where}: {text!r} compares the same two arms as an earlier entry: keep one of them")
            if self.primary is not None and set(pair) == set(self.primary):
                raise ConfigError(f"{where}: {text!r} is the primary comparison; a secondary is another pair")
            pairs.append(pair)

    def _check_pair(self, a: str, b: str, where: str) -> None:
        """Both arms are in the study and share at least 2 seeds (a paired test)."""
        for name in (a, b):
            if name not in self.arms:
                raise ConfigError(
                    f"{where}: {name!r} is not an arm of this study; add it to arms or choose from {', '.join(self.arms)}"
                )
        seeds_a, seeds_b = (set(self.arm_spec(n).seeds or self.seeds) for n in (a, b))
        if len(seeds_a & seeds_b) < 2:
            raise ConfigError(
                f"{where}: {a} and {b} share {len(seeds_a & seeds_b)} seed(s); a paired test needs at "
                "least 2 (3 for a claim): run both on the same seeds"
            )

    def run_plan(self) -> list[tuple[int, str]]:
        """(seed, arm) of every run, in training order: seed by seed through the arms that use
        ``--seeds`` (so the paired comparison fills in first), then the arms with seeds of their own."""
        shared = [(s, a) for s in self.seeds for a in self.arms if self.arm_spec(a).seeds is None]
        own = [(s, a) for a in self.arms for s in (self.arm_spec(a).seeds or ())]
        return shared + own

    @property
    def tokens_per_model(self) -> int:
        return self.steps * self.micro_batch_size * self.seq_len

    def data_section(self) -> DataSection:
        """The data every arm trains on: one tokenizer and one set of shards in OUT/data."""
        return DataSection(
            source=self.source,
            tokenizer=self.tokenizer or None,
            train_bpe_vocab=None if self.tokenizer else self.bpe_vocab,
            val_fraction=0.05,
            seq_len=self.seq_len,
            data_dir=str(self.out / "data"),
        )


def run_config_for(opts: CompareOptions, model: LoopMoEConfig, seed: int, lr: float | None = None) -> RunConfig:
    """The RunConfig of one side of the comparison: identical for every arm but for ``model`` (and an
    arm's own ``lr``, where it sets one)."""
    return RunConfig(
        model=ModelSection.of(model),
        data=opts.data_section(),
        optim=OptimSection(lr=opts.lr if lr is None else lr),
        schedule=ScheduleSection(kind=opts.schedule, warmup_steps=opts.warmup_steps),
        train=TrainSection(
            max_steps=opts.steps,
            micro_batch_size=opts.micro_batch_size,
            grad_accum=1,
            seed=seed,
            eval_every=opts.eval_every,
            eval_batches=opts.eval_batches,
            checkpoint_every=max(1, opts.steps // 4),
            keep_last=1,
            log_every=8,
        ),
    ).validate(1)


def options_record(opts: CompareOptions) -> dict[str, Any]:
    """The options as results.json records them (paths as strings): the reference and loop count first,
    then the balancing options, then the rest, in declaration order (as before the balancing options were
    ``BalanceOptions``')."""
    raw = asdict(opts)
    order = ["reference", "num_loops", *(k for k in raw if k not in ("reference", "num_loops"))]
    return {k: (str(raw[k]) if isinstance(raw[k], Path) else raw[k]) for k in order}


def identity_options(opts: CompareOptions) -> dict[str, Any]:
    """The options every run of the study folder shares, as JSON values (``--tokens`` is resolved into steps).

    The study's composition (``COMPOSITION``: arms, their tables, seeds) is left out: runs are added to a
    folder freely, and each run's own identity is checked against its run folder (``runner``).
    """
    raw = {k: v for k, v in asdict(opts).items() if k not in NOT_IDENTITY and k not in COMPOSITION}
    return cast(dict[str, Any], json.loads(json.dumps(raw, default=str)))
