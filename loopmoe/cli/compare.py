"""``loopmoe compare``: balance, train both models identically, evaluate, and write a report."""

from __future__ import annotations

from pathlib import Path

from loopmoe.balance import STRATEGIES
from loopmoe.compare import CompareOptions, run_comparison

DEFAULTS = CompareOptions()


def _ints(text: str) -> tuple[int, ...]:
    try:
        return tuple(int(v) for v in text.split(",") if v.strip())
    except ValueError:
        raise ValueError(f"--seeds takes comma-separated integers, e.g. 0,1,2; got {text!r}") from None


def add_parser(sub) -> None:
    p = sub.add_parser(
        "compare",
        help="the main job: LoopMoE vs its matched Vanilla MoE, trained identically, with a report",
        description="With no arguments: the small reference and its capacity-balanced LoopMoE (T=2) on the "
        "embedded corpus, 1.2M tokens each, about 10 minutes on 2 CPU cores. Re-running resumes an interrupted comparison.",
    )
    p.add_argument("--reference", default=DEFAULTS.reference, help="preset name, model config file or checkpoint dir")
    p.add_argument("--loops", type=int, default=DEFAULTS.loops, help="loop count T of the LoopMoE")
    p.add_argument("--strategy", choices=STRATEGIES, default=DEFAULTS.strategy)
    p.add_argument("--prelude", type=int, default=DEFAULTS.prelude, help="prelude layers of the LoopMoE")
    p.add_argument("--coda", type=int, default=DEFAULTS.coda, help="coda layers of the LoopMoE")
    p.add_argument(
        "--source",
        default=DEFAULTS.source,
        help="corpus: 'embedded', a text/JSONL file or folder, a shared-data name (tinyshakespeare), hf:NAME",
    )
    p.add_argument(
        "--tokenizer", default=None, help="tokenizer.json / HF dir / shared name (gpt2); default: train a BPE"
    )
    p.add_argument("--bpe-vocab", type=int, default=DEFAULTS.bpe_vocab, help="vocabulary of the trained BPE")
    p.add_argument("--seq-len", type=int, default=DEFAULTS.seq_len)
    p.add_argument("--batch-size", dest="micro_batch_size", type=int, default=DEFAULTS.micro_batch_size)
    p.add_argument("--steps", type=int, default=DEFAULTS.steps, help="optimizer steps per model")
    p.add_argument(
        "--tokens",
        type=int,
        default=None,
        help="training tokens per model (sets --steps from batch size and sequence length)",
    )
    p.add_argument("--lr", type=float, default=DEFAULTS.lr)
    p.add_argument("--warmup-steps", type=int, default=DEFAULTS.warmup_steps)
    p.add_argument("--schedule", choices=("cosine", "wsd"), default=DEFAULTS.schedule)
    p.add_argument("--seeds", type=_ints, default=DEFAULTS.seeds, help="comma-separated seeds (mean and spread)")
    p.add_argument("--eval-every", type=int, default=DEFAULTS.eval_every)
    p.add_argument("--eval-batches", type=int, default=DEFAULTS.eval_batches)
    p.add_argument(
        "--tasks",
        type=lambda s: tuple(t for t in s.split(",") if t),
        default=DEFAULTS.tasks,
        help="comma-separated downstream tasks (see `loopmoe eval --list-tasks`); 'auto' (default): "
        "every task whose data is present; '' for none",
    )
    p.add_argument("--task-limit", type=int, default=DEFAULTS.task_limit, help="documents per task")
    p.add_argument("--out", type=Path, default=DEFAULTS.out, help="run folder")
    p.set_defaults(run=run)


def run(args) -> int:
    fields = {k: getattr(args, k) for k in CompareOptions.__dataclass_fields__}
    run_comparison(CompareOptions(**fields))
    return 0
