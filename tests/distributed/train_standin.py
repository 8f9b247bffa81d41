"""Train with `run_training` (alone or under torchrun) on the synthetic loader.

usage: python train_standin.py OUT_DIR [section.key=value ...]
With PARITY_MODEL=loopmoe the real LoopMoE (built from the [model] overrides) replaces the stand-in.
"""

import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "training"))

from standins import data_factory, model_factory

from loopmoe.distributed.env import env_world_size
from loopmoe.training import load_run_config, run_training

if __name__ == "__main__":
    out_dir, overrides = sys.argv[1], sys.argv[2:]
    cfg = load_run_config(None, overrides, world_size=env_world_size())
    if os.environ.get("PARITY_MODEL") == "loopmoe":
        from loopmoe.training.builders import default_model_factory as model_factory
    run_training(cfg, out_dir, model_factory=model_factory, data_factory=data_factory)
