"""What a run logs: metrics.jsonl fields, the console line every train.log_every steps, TensorBoard
(config as text and hparams, one router histogram + summary scalars per (layer, iteration))."""

import json
import re
from datetime import datetime

import pytest
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from loopmoe.budget import compute_budget
from loopmoe.config import layers_text
from loopmoe.text import human
from loopmoe.training import load_run_config, read_metrics, run_training
from loopmoe.training.builders import build_model_config, default_model_factory
from loopmoe.training.metrics import flat_config
from loopmoe.training.throughput import Throughput, format_duration, peak_flops_per_s
from tests.training.standins import VOCAB, data_factory, standin_overrides

# The real LoopMoE (router statistics per executed slot) on the synthetic loader: P=1, C=1, T=2.
TINY_LOOPMOE = {
    "model.preset": "debug",
    "model.num_loops": 2,
    "model.num_core_layers": 1,
    "model.num_prelude_layers": 1,
    "model.hidden_size": 32,
    "model.head_dim": 8,
    "model.moe_intermediate_size": 32,
    "optim.lr": 3e-3,
}
SLOTS = ("prelude.0", "core.0/iter0", "core.0/iter1")


def _step_lines(err: str) -> list[str]:
    """The console's step lines, their ``HH:MM:SS`` time stamp cut off."""
    return [line[9:] for line in err.splitlines() if re.match(r"\d\d:\d\d:\d\d step ", line)]


def _config(**extra):
    return load_run_config(None, standin_overrides(**{**TINY_LOOPMOE, **extra}))


def test_records_console_and_tensorboard(tmp_path, capfd):
    # 12 steps, a console line every 5, evaluation every 10, a configured peak of 1 GFLOP/s (so MFU shows)
    cfg, out = _config(**{"train.max_steps": 12, "train.peak_tflops": 0.001}), tmp_path
    run_training(cfg, out, model_factory=default_model_factory, data_factory=data_factory)
    err = capfd.readouterr().err
    records = read_metrics(out)
    assert [r["step"] for r in records] == list(range(1, 13))

    # wall-clock time (ISO 8601, UTC) and elapsed seconds on every record, increasing
    times = [datetime.fromisoformat(r["time"].replace("Z", "+00:00")) for r in records]
    assert times == sorted(times) and all(t.utcoffset().total_seconds() == 0 for t in times)
    elapsed = [r["elapsed_s"] for r in records]
    assert elapsed == sorted(elapsed) and elapsed[0] > 0
    # MFU of each step = tokens/s x 3 x forward FLOPs per token / configured peak
    flops = 3 * compute_budget(build_model_config(cfg, VOCAB), cfg.data.seq_len).flops_per_token
    for r in records:
        assert r["mfu"] == pytest.approx(r["tokens_per_s"] * flops / 1e9, rel=1e-12)

    # a start banner: where the run goes, from which step, and the resolved model with its counts
    budget = compute_budget(build_model_config(cfg, VOCAB), cfg.data.seq_len)
    assert re.search(rf"^\d\d:\d\d:\d\d loopmoe train: {re.escape(str(out))}, starting at step 0 of 12$", err, re.M)
    assert f"{human(budget.total_params)} params, {human(budget.active_params)} active" in err
    # one console line at steps 5 and 10 (log_every; 10 also evaluates) and at the last step, each timestamped
    lines = _step_lines(err)
    assert [line.split(" | ")[0] for line in lines] == ["step 5/12", "step 10/12", "step 12/12"]
    for line in lines:
        for part in ("loss ", "lr ", "grad_norm ", "tok/s", "MFU ", "ETA "):
            assert f"| {part}" in line or f" {part}" in line, (part, line)
    assert "val_loss" in lines[1] and "val_loss" in lines[2] and "val_loss" not in lines[0]
    step10 = records[9]
    assert f"loss {step10['loss']:.4f}" in lines[1] and f"lr {step10['lr']:.2e}" in lines[1]

    events = EventAccumulator(str(out / "tensorboard"), size_guidance={"histograms": 0, "tensors": 0})
    events.Reload()
    tags = events.Tags()
    for key in ("loss", "lm_loss", "aux_loss", "lr", "grad_norm", "tokens_per_s", "mfu"):
        assert f"train/{key}" in tags["scalars"]
    assert "val/loss" in tags["scalars"]
    # router statistics: per executed slot one histogram and three summary scalars, nothing per expert
    router_scalars = sorted(t for t in tags["scalars"] if t.startswith("router/"))
    assert router_scalars == sorted(
        f"router/{slot}/{name}" for slot in SLOTS for name in ("max_load", "entropy", "dead_experts")
    )
    assert sorted(tags["histograms"]) == sorted(f"router/{slot}/load" for slot in SLOTS)
    assert [e.step for e in events.Scalars("router/core.0/iter1/max_load")] == [5, 10]
    assert all(e.value >= 1.0 for e in events.Scalars("router/core.0/iter1/max_load"))  # >= the balanced share
    # the run config, as text and as hparams
    config_text = events.Tensors("config/text_summary")[0].tensor_proto.string_val[0].decode()
    logged = json.loads(config_text.strip("`").removeprefix("json\n"))
    resolved = logged.pop("resolved_model")  # what trained, not only the preset's name
    assert logged == cfg.to_dict() | {"data": {**cfg.to_dict()["data"], "data_dir": str(out / "data")}}
    assert resolved["total_params"] == budget.total_params and resolved["layers"] == layers_text(
        build_model_config(cfg, VOCAB)
    )
    hparams = events.PluginTagToContent("hparams")
    assert {"_hparams_/experiment", "_hparams_/session_start_info"} <= set(hparams)
    assert b"optim.lr" in hparams["_hparams_/session_start_info"]


def test_a_learned_exit_gate_logs_its_expected_depth_and_its_readouts_count_in_mfu(tmp_path, capfd):
    cfg = _config(
        **{
            "model.exit_gate": "true",
            "train.max_steps": 8,
            "train.log_every": 4,
            "train.eval_batches": 0,
            "train.peak_tflops": 0.001,
            "schedule.warmup_steps": 0,
        }
    )
    run_training(cfg, tmp_path, model_factory=default_model_factory, data_factory=data_factory)
    records = read_metrics(tmp_path)
    depths = [r["exit_depth"] for r in records]
    assert depths[0] == pytest.approx(1.5, abs=0.01)  # T = 2, λ = 1/2 at initialisation
    assert all(1 <= d <= 2 for d in depths) and depths[-1] != depths[0]
    assert records[-1]["lm_loss"] < records[0]["lm_loss"]
    budget = compute_budget(build_model_config(cfg, VOCAB), cfg.data.seq_len)
    assert budget.exit_gate_flops_per_token > 0
    flops = 3 * (budget.flops_per_token + budget.exit_gate_flops_per_token)
    for r in records:
        assert r["mfu"] == pytest.approx(r["tokens_per_s"] * flops / 1e9, rel=1e-12)
    lines = _step_lines(capfd.readouterr().err)
    assert f"exit_depth {records[3]['exit_depth']:.2f}" in lines[0]
    events = EventAccumulator(str(tmp_path / "tensorboard"))
    events.Reload()
    assert "train/exit_depth" in events.Tags()["scalars"]


def test_a_run_without_an_exit_gate_logs_no_depth(tmp_path):
    cfg = _config(**{"train.max_steps": 1, "train.eval_batches": 0, "schedule.warmup_steps": 0})
    run_training(cfg, tmp_path, model_factory=default_model_factory, data_factory=data_factory)
    assert "exit_depth" not in read_metrics(tmp_path)[0]


def test_elapsed_time_goes_on_across_a_resume(tmp_path):
    cfg = _config(
        **{"train.max_steps": 6, "train.checkpoint_every": 3, "train.eval_batches": 0, "schedule.warmup_steps": 1}
    )
    run_training(cfg, tmp_path, max_steps=3, model_factory=default_model_factory, data_factory=data_factory)
    first = read_metrics(tmp_path)[-1]["elapsed_s"]
    run_training(cfg, tmp_path, model_factory=default_model_factory, data_factory=data_factory)
    records = read_metrics(tmp_path)
    assert [r["step"] for r in records] == list(range(1, 7))
    assert records[2]["elapsed_s"] == first and records[3]["elapsed_s"] > first


def test_throughput_window_mfu_and_eta(monkeypatch):
    clock = iter([100.0, 110.0, 130.0, 0.0])
    monkeypatch.setattr("loopmoe.training.throughput.perf_counter", lambda: next(clock))
    t = Throughput(start_step=0, max_steps=30, tokens=0, flops_per_token=6.0, peak_flops=100.0, world_size=2)
    first = t.report(step=10, tokens=1000)  # 10 s for 10 steps
    assert first == {"tokens_per_s": 100.0, "mfu": 100.0 * 6.0 / 200.0, "eta_s": 20.0}
    second = t.report(step=20, tokens=1400)  # window: 400 tokens in 20 s; mean 1.5 s/step over 20 steps
    assert second == {"tokens_per_s": 20.0, "mfu": 20.0 * 6.0 / 200.0, "eta_s": 15.0}
    assert Throughput(0, 10, flops_per_token=None, peak_flops=1.0).mfu(5.0) is None
    assert format_duration(65) == "1:05" and format_duration(3725) == "1:02:05"


def test_peak_flops_is_configured_or_looked_up():
    import torch

    assert peak_flops_per_s(torch.device("cpu"), None) is None  # no MFU on CPU unless configured
    assert peak_flops_per_s(torch.device("cpu"), 2.5) == 2.5e12


def test_flat_config_keeps_scalars_and_writes_the_rest_as_json():
    assert flat_config({"optim": {"lr": 1e-3, "betas": [0.9, 0.95]}, "data": {"tokenizer": None}}) == {
        "optim.lr": 1e-3,
        "optim.betas": "[0.9, 0.95]",
        "data.tokenizer": "null",
    }


def test_wandb_offline_gets_the_same_metrics(tmp_path, monkeypatch):
    wandb = pytest.importorskip("wandb")
    monkeypatch.setenv("WANDB_MODE", "offline")  # no network, no account: the run is written under OUT/wandb
    monkeypatch.setenv("WANDB_SILENT", "true")
    logged: list[tuple[int, dict]] = []
    real_log = wandb.Run.log

    def spy(run, data, step=None, **kwargs):  # what loopmoe hands to W&B, then W&B's own logging
        logged.append((step, dict(data)))
        return real_log(run, data, step=step, **kwargs)

    monkeypatch.setattr(wandb.Run, "log", spy)
    cfg = _config(**{"train.max_steps": 6, "train.checkpoint_every": 3, "train.eval_batches": 0})
    cfg.schedule.warmup_steps = 1
    cfg.train.wandb = True
    run_training(cfg, tmp_path, max_steps=3, model_factory=default_model_factory, data_factory=data_factory)
    run_training(cfg, tmp_path, model_factory=default_model_factory, data_factory=data_factory)  # resumed

    run_id = (tmp_path / "wandb_run_id").read_text().strip()
    runs = sorted((tmp_path / "wandb").glob("offline-run-*"))
    assert len(runs) == 2 and all(r.name.endswith(run_id) for r in runs)  # the resume continues the same run
    assert all((r / f"run-{run_id}.wandb").stat().st_size > 0 for r in runs)

    records = read_metrics(tmp_path)
    assert [step for step, _ in logged] == [r["step"] for r in records] == list(range(1, 7))
    tensorboard = EventAccumulator(str(tmp_path / "tensorboard"), size_guidance={"histograms": 0})
    tensorboard.Reload()
    for step, data in logged:
        record = records[step - 1]
        assert data["train/loss"] == record["loss"] and data["train/lr"] == record["lr"]
        scalars = {k for k, v in data.items() if isinstance(v, float)}
        histograms = {k for k, v in data.items() if isinstance(v, wandb.Histogram)}
        assert scalars <= set(tensorboard.Tags()["scalars"]) and histograms <= set(tensorboard.Tags()["histograms"])
        assert ("router/core.0/iter1/load" in histograms) == (step % 5 == 0)  # log_every = 5


def test_a_tensorboard_path_that_is_a_file_is_one_line_naming_the_fix(tmp_path):
    from loopmoe.errors import ConfigError
    from loopmoe.training.metrics import MetricsLogger

    (tmp_path / "tensorboard").write_text("mine")
    with pytest.raises(ConfigError, match=r"tensorboard is a file, not a folder.*Move or remove that file"):
        MetricsLogger(tmp_path, enabled=True, max_steps=2)
    assert (tmp_path / "tensorboard").read_text() == "mine"


def test_a_disk_that_fills_under_tensorboard_is_the_one_line_disk_full_error(tmp_path, monkeypatch, capfd):
    import errno
    import time

    from tensorboard.summary.writer.record_writer import RecordWriter

    from loopmoe.errors import LoopMoEError
    from loopmoe.training.metrics import MetricsLogger

    logger = MetricsLogger(tmp_path, enabled=True, max_steps=50)

    def full(self, data):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(RecordWriter, "write", full)
    record = {"step": 1, "loss": 1.0, "lr": 1e-3, "grad_norm": 1.0, "tokens": 8, "tokens_per_s": 1.0}
    with pytest.raises(LoopMoEError, match=r"disk full while writing the run's logs.*free space and re-run"):
        for step in range(1, 51):  # the writer's thread fails on its first write; a later call reports it
            logger.log_step({**record, "step": step})
            time.sleep(0.02)
        logger.close()
    assert "Traceback" not in capfd.readouterr().err  # the writer thread's own traceback is not shown
