"""Training: run configuration, optimizer and schedules, the trainer, checkpoints, `run_training`."""

from loopmoe.training.builders import DataBundle, build_model_config
from loopmoe.training.checkpoint import CheckpointManager, CorruptCheckpointError
from loopmoe.training.config import RunConfig, config_from_dict, load_run_config
from loopmoe.training.metrics import read_metrics
from loopmoe.training.optim import WarmupCosine, WarmupStableDecay, build_optimizer, build_scheduler
from loopmoe.training.run import run_training
from loopmoe.training.trainer import Trainer

__all__ = [
    "CheckpointManager",
    "CorruptCheckpointError",
    "DataBundle",
    "RunConfig",
    "Trainer",
    "WarmupCosine",
    "WarmupStableDecay",
    "build_model_config",
    "build_optimizer",
    "build_scheduler",
    "config_from_dict",
    "load_run_config",
    "read_metrics",
    "run_training",
]
