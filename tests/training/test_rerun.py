"""Re-running a finished run trains nothing and reports the finished run's final metrics."""

from loopmoe.training import load_run_config, read_metrics, run_training
from tests.training.standins import data_factory, model_factory

ARGS = [
    "data.seq_len=16",
    "train.micro_batch_size=4",
    "train.grad_accum=1",
    "train.max_steps=6",
    "schedule.warmup_steps=1",
    "train.eval_every=3",
    "train.eval_batches=2",
    "train.checkpoint_every=3",
]


def test_rerun_of_a_finished_run(tmp_path):
    cfg = load_run_config(None, ARGS)
    first = run_training(cfg, tmp_path, model_factory=model_factory, data_factory=data_factory)
    again = run_training(cfg, tmp_path, model_factory=model_factory, data_factory=data_factory)
    assert len(read_metrics(tmp_path)) == 6
    for key in ("step", "loss", "val_loss", "tokens"):
        assert again[key] == first[key], key
