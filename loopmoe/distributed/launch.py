"""``loopmoe train --nproc-per-node N``: torchrun's launcher, run in-process, with one-line failures.

``torchrun`` ends every failed run with its own ~20-line Python traceback (``ChildFailedError``), even
when the workers already said what was wrong in one line. This module starts the workers through the
same code torchrun runs (``torch.distributed.run``: its argument parser, its rendezvous choice, the
elastic agent), so each worker gets exactly the environment torchrun gives it (``RANK``,
``WORLD_SIZE``, ``LOCAL_RANK``, ``LOCAL_WORLD_SIZE``, ``MASTER_ADDR``/``MASTER_PORT``, ``TORCHELASTIC_*``)
and runs ``python -u -m loopmoe train ...`` as ``torchrun -m loopmoe train ...`` would. Only the ending
differs: a worker failure is caught and reported as one line naming the root-cause rank and its exit
code, and the launcher exits non-zero.
"""

from __future__ import annotations

import logging
import os
import signal
import sys
from collections.abc import Sequence
from typing import Any

# The exit status `loopmoe` gives a user-facing error after printing it (`loopmoe.cli.main`): when a
# worker ends with it, the reason is already on the terminal and the launcher adds nothing.
USER_ERROR_STATUS = 2


def launch(
    command: Sequence[str],
    *,
    nproc_per_node: int,
    nnodes: int = 1,
    node_rank: int = 0,
    master_addr: str = "127.0.0.1",
    master_port: int | None = None,
    module: str = "loopmoe",
) -> int:
    """Run ``python -m MODULE COMMAND...`` (``loopmoe``) on ``nproc_per_node`` processes of this machine (of
    ``nnodes`` machines), as ``torchrun`` would; returns the exit status to end with.

    One machine (``nnodes=1``, no ``master_port``): torchrun's standalone rendezvous on a free local
    port, so two launches side by side never collide. Several machines: the static rendezvous at
    ``master_addr:master_port`` (29500 by default), with this machine as ``node_rank``; run the same
    command on each machine.
    """
    from torch.distributed.elastic.multiprocessing.api import SignalException
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.run import get_args_parser, run

    # As torchrun: one OpenMP thread per worker unless the user says otherwise (torchrun also prints a
    # banner about it; setting it here keeps the output to what the workers print).
    if nproc_per_node > 1:
        os.environ.setdefault("OMP_NUM_THREADS", "1")
    argv = [f"--nproc-per-node={nproc_per_node}", f"--nnodes={nnodes}", f"--node-rank={node_rank}"]
    argv += [f"--master-addr={master_addr}"]
    if master_port is not None:
        argv += [f"--master-port={master_port}"]
    args = get_args_parser().parse_args([*argv, "-m", module, *command])
    with _launcher_logs_quiet():
        try:
            run(args)
        except ChildFailedError as err:
            rank, failure = err.get_first_failure()
            if failure.exitcode == USER_ERROR_STATUS:
                return USER_ERROR_STATUS
            print(f"{module} {command[0]}: error: {_describe(rank, failure, err.failures)}", file=sys.stderr)
            return failure.exitcode if failure.exitcode > 0 else 128 - failure.exitcode
        except SignalException as err:  # the launcher was interrupted (Ctrl-C, SIGTERM): workers are stopped
            return 128 + int(err.sigval)
    return 0


def _describe(rank: int, failure: Any, failures: dict[int, Any]) -> str:
    """``process rank 1 failed first (exit code 1); its output above says why``; a signal by name."""
    how = (
        f"killed by {signal.Signals(-failure.exitcode).name}"
        if failure.exitcode < 0
        else f"exit code {failure.exitcode}; its output above says why"
    )
    others = f"; {len(failures) - 1} other process(es) failed after it" if len(failures) > 1 else ""
    return f"process rank {rank} failed first ({how}){others}"


class _launcher_logs_quiet:
    """Keep the elastic agent's own log lines (its launch config, "failed (exitcode: 2) local_rank: 0",
    "Sending process N closing signal SIGTERM") off the terminal: the failure is reported as one line
    instead. A failure of the launcher itself (a rendezvous that cannot start) still raises."""

    def __enter__(self) -> None:
        # Each elastic module's logger sets its own level (torch's `get_logger`), so a parent's level
        # would not filter them; in the launcher process only the agent logs, so disable up to ERROR.
        self.disabled = logging.root.manager.disable
        logging.disable(logging.ERROR)

    def __exit__(self, *exc: object) -> None:
        logging.disable(self.disabled)
