"""``loopmoe train`` (the command line, so errors print as they do for users) on the stand-in model and
data, with one fault injected on one rank: ``STANDIN_FAIL=STAGE:RANK``, STAGE one of startup (opening
the logs), resume (reading this rank's checkpoint file), train (logging step 2: a full disk), export
(writing the final model).

usage: launch(["train", CONFIG, ...], nproc_per_node=2, module="tests.distributed.fault_standin")
"""

import errno
import functools
import os
import sys

import loopmoe.cli.train as train_cli
import loopmoe.training.checkpoint as checkpoint
import loopmoe.training.metrics as metrics
import loopmoe.training.run as run
from loopmoe.cli.main import main
from loopmoe.errors import ConfigError, RunError
from tests.training.standins import data_factory, model_factory


def _inject(stage: str, rank: int) -> None:
    if rank != int(os.environ["RANK"]):
        return
    if stage == "startup":

        def logger(*args, **kwargs):
            raise ConfigError("injected: train.wandb = true needs the wandb package")

        run.MetricsLogger = logger  # type: ignore[assignment,misc]
    elif stage == "resume":
        real_read = checkpoint._read

        def read(path, name):
            if name.startswith("rank_"):
                raise checkpoint.CorruptCheckpointError(f"{path / name} cannot be loaded: injected")
            return real_read(path, name)

        checkpoint._read = read
    elif stage == "train":
        real_log = run.MetricsLogger.log_step

        def log_step(self, record, router=None):
            if record["step"] == 2:
                raise metrics.LogDiskFullError(errno.ENOSPC, "disk full while writing the run's logs (injected)")
            return real_log(self, record, router)

        run.MetricsLogger.log_step = log_step  # type: ignore[method-assign]
    elif stage == "export":

        def write_final(*args, **kwargs):
            raise RunError("injected: disk full while writing the final model")

        run._write_final = write_final  # type: ignore[assignment]


if __name__ == "__main__":
    if fail := os.environ.get("STANDIN_FAIL"):
        stage, rank = fail.split(":")
        _inject(stage, int(rank))
    train_cli.run_training = functools.partial(  # type: ignore[assignment]
        run.run_training, model_factory=model_factory, data_factory=data_factory
    )
    sys.exit(main(sys.argv[1:]))
