"""Train the stand-in model with `run_training` (alone or under torchrun).

usage: python train_standin.py OUT_DIR [section.key=value ...]
"""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "training"))

from standins import data_factory, model_factory  # noqa: E402

from loopmoe.distributed.env import env_world_size  # noqa: E402
from loopmoe.training import load_run_config, run_training  # noqa: E402

if __name__ == "__main__":
    out_dir, overrides = sys.argv[1], sys.argv[2:]
    cfg = load_run_config(None, overrides, world_size=env_world_size())
    run_training(cfg, out_dir, model_factory=model_factory, data_factory=data_factory)
