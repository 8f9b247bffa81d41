"""What the console shows: live progress bars on a terminal, a few plain lines everywhere else.

A log file or CI never sees a live bar: each redraw of a tqdm bar (``\\r``) becomes one more line,
and lm-eval, datasets and transformers draw one per task, per ``Map:``, per checkpoint load. So
when stderr is not a terminal:

- our own progress (``progress_bar``) draws no bar and says what it did in one line at the end;
- ``quiet_library_progress`` turns off the bars of transformers, datasets and huggingface_hub
  through their own switches (the CLI calls it once at start);
- ``quiet_lm_eval`` (around an lm-eval evaluation) turns off lm-eval's per-request bars, which
  have no switch of their own, for the duration of the call.

Whatever the terminal, ``quiet_lm_eval`` keeps lm-eval's INFO/WARNING chatter about our own
shipped tasks (``Overwriting default num_fewshot``, ``Custom kwargs can be passed ...``) and
git's ``fatal: not a git repository`` (lm-eval asks git for a commit hash of the working
directory) off the console; errors still show.
"""

from __future__ import annotations

import logging
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from tqdm.auto import tqdm


def interactive() -> bool:
    """Whether stderr, where progress goes, is a terminal someone watches."""
    return sys.stderr.isatty()


def status(message: str) -> None:
    """A status line on stderr (stdout stays for results: tables, JSON)."""
    print(message, file=sys.stderr, flush=True)


class Progress:
    """A tqdm bar on a terminal; elsewhere one line every ``every_s`` seconds of work (``DESC: N/TOTAL UNITs,
    S s``, so a long job in a log file is seen to move) and a summary line at ``close`` (``DESC: N UNIT in S s``
    plus the postfix). Use as a context manager."""

    def __init__(self, desc: str, unit: str, enabled: bool = True, total: int | None = None, every_s: float = 30.0):
        self.desc, self.unit, self.enabled, self.total, self.every_s = desc, unit, enabled, total, every_s
        self.count, self.postfix, self.t0 = 0, "", time.perf_counter()
        self.last = self.t0
        self.bar = tqdm(desc=desc, unit=unit, total=total, disable=not (enabled and interactive()))

    def update(self, n: int, **postfix: Any) -> None:
        self.count += n
        self.bar.update(n)
        if postfix:
            self.bar.set_postfix(postfix)
            self.postfix = ", ".join(f"{k}={v}" for k, v in postfix.items())
        now = time.perf_counter()
        if self.bar.disable and self.enabled and now - self.last >= self.every_s:
            self.last = now
            of = f"/{self.total}" if self.total is not None else ""
            status(f"{self.desc}: {self.count}{of} {self.unit}s, {now - self.t0:.0f} s")

    def close(self) -> None:
        if self.bar.disable and self.enabled:
            extra = f" ({self.postfix})" if self.postfix else ""
            status(f"{self.desc}: {self.count} {self.unit}s in {time.perf_counter() - self.t0:.1f} s{extra}")
        self.bar.close()

    def __enter__(self) -> Progress:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def quiet_library_progress() -> None:
    """Turn off the progress bars of transformers, datasets and huggingface_hub (not on a terminal)."""
    if interactive():
        return
    import datasets
    import huggingface_hub.utils
    import transformers

    transformers.utils.logging.disable_progress_bar()
    datasets.disable_progress_bars()
    huggingface_hub.utils.disable_progress_bars()


def _quiet_git_commit_hash() -> str | None:
    """lm-eval's ``get_git_commit_hash`` (git's answer, else the commit read from ``.git`` files) without
    git's error on stderr outside a repository."""
    from lm_eval.loggers.utils import get_commit_from_path

    try:
        out = subprocess.run(["git", "describe", "--always"], capture_output=True, text=True, check=False)
    except FileNotFoundError:
        out = None
    if out is not None and out.returncode == 0:
        return out.stdout.strip()
    return get_commit_from_path(os.getcwd())


@contextmanager
def quiet_lm_eval() -> Iterator[None]:
    """Around ``lm_eval.simple_evaluate``: its loggers at ERROR, git asked quietly, and (not on a
    terminal) its tqdm bars off; everything is restored afterwards. transformers' tokenizer logger
    too: lm-eval tokenises whole documents longer than ``model_max_length`` (the training length)
    and cuts them to the model's window itself, so the "longer than the maximum" warning is noise."""
    import lm_eval.evaluator
    import tqdm.std

    loggers = [logging.getLogger(name) for name in ("lm_eval", "lm-eval", "transformers.tokenization_utils_base")]
    levels = [lg.level for lg in loggers]
    git_hash = lm_eval.evaluator.get_git_commit_hash
    tqdm_init = tqdm.std.tqdm.__init__  # as a function (its class attribute is a partialmethod: kept as is)
    tqdm_init_attribute = vars(tqdm.std.tqdm)["__init__"]
    for lg in loggers:
        lg.setLevel(logging.ERROR)
    lm_eval.evaluator.get_git_commit_hash = _quiet_git_commit_hash
    if not interactive():
        # lm-eval passes disable= itself (rank != 0), so only forcing the argument turns its bars off.
        def no_bar(self, *args: Any, **kwargs: Any) -> None:
            kwargs["disable"] = True
            tqdm_init(self, *args, **kwargs)

        tqdm.std.tqdm.__init__ = no_bar
    try:
        yield
    finally:
        setattr(tqdm.std.tqdm, "__init__", tqdm_init_attribute)  # noqa: B010  (the descriptor, not a function)
        lm_eval.evaluator.get_git_commit_hash = git_hash
        for lg, level in zip(loggers, levels):
            lg.setLevel(level)
