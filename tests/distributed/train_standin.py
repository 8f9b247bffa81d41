"""Train with `run_training` (alone or under torchrun) on the synthetic loader.

usage: python -m tests.distributed.train_standin OUT_DIR [section.key=value ...]
(from the repository root, or with it on PYTHONPATH; under torchrun: ``torchrun ... -m tests.distributed.train_standin``)
With PARITY_MODEL=loopmoe the real LoopMoE (built from the [model] overrides) replaces the stand-in.
"""

import os
import sys

from loopmoe.distributed.env import env_world_size
from loopmoe.training import load_run_config, run_training
from tests.training.standins import data_factory, model_factory

if __name__ == "__main__":
    out_dir, overrides = sys.argv[1], sys.argv[2:]
    cfg = load_run_config(None, overrides, world_size=env_world_size())
    if os.environ.get("PARITY_MODEL") == "loopmoe":
        from loopmoe.training.builders import default_model_factory as model_factory
    run_training(cfg, out_dir, model_factory=model_factory, data_factory=data_factory)
