"""``loopmoe eval --exit`` and ``--exit-sweep``: held-out loss under adaptive depth with the compute it executed,
exact at the two ends (never exiting: full depth; always exiting: T = 1), and refused where it cannot apply."""

from __future__ import annotations

import json

import pytest

from loopmoe.errors import ConfigError
from tests.evaluation import conftest as evaluation

# tests/evaluation's fixtures: tiny saved models with the shared GPT-2 tokenizer, and the in-process CLI
data_dir, gpt2_dir, gpt2_tokenizer, loopmoe_dir, run_eval = (
    evaluation.data_dir,
    evaluation.gpt2_dir,
    evaluation.gpt2_tokenizer,
    evaluation.loopmoe_dir,
    evaluation.run_eval,
)

TEXT = "tinyshakespeare/input.txt"


@pytest.fixture(scope="module")
def model_dir(request):
    """tests/evaluation's randomly initialised looped LoopMoE (T=2), saved with the shared GPT-2 tokenizer."""
    return request.getfixturevalue("loopmoe_dir")


def _perplexity(run_eval, model_dir, data_dir, tmp_path, *flags: str) -> dict:
    out = tmp_path / f"eval{len(list(tmp_path.iterdir()))}.json"
    argv = [str(model_dir), "--text", TEXT, "--data-dir", str(data_dir), "--max-tokens", "200", "--window", "32"]
    assert run_eval([*argv, *flags, "--output", str(out)]) == 0
    return json.loads(out.read_text())


def test_eval_exit_reports_the_loss_with_the_iterations_and_flops_it_executed(
    run_eval, model_dir, data_dir, tmp_path, capsys
):
    (full,) = _perplexity(run_eval, model_dir, data_dir, tmp_path)["perplexity"]
    never = _perplexity(run_eval, model_dir, data_dir, tmp_path, "--exit", "latent:0")
    assert never["exit"] == {"criterion": "latent", "threshold": 0.0, "min_loops": 1, "max_loops": 2}
    (scored,) = never["perplexity"]
    assert scored["loss"] == full["loss"]  # a threshold that never exits is full depth, bit for bit
    assert scored["exit"]["mean_loops"] == 2.0 and scored["exit"]["flops_fraction"] == pytest.approx(1.0)
    assert "| latent:0    |" in capsys.readouterr().out  # the exit table beside the perplexity table
    (once,) = _perplexity(run_eval, model_dir, data_dir, tmp_path, "--exit", "latent:1e9")["perplexity"]
    (t1,) = _perplexity(run_eval, model_dir, data_dir, tmp_path, "--num-loops", "1")["perplexity"]
    assert once["loss"] == t1["loss"] and once["exit"]["mean_loops"] == 1.0
    assert 0 < once["exit"]["flops_fraction"] < 1
    # --max-loops is the depth under a policy: a never-exiting one at 3 is the --num-loops 3 forward
    (deeper,) = _perplexity(run_eval, model_dir, data_dir, tmp_path, "--exit", "latent:0", "--max-loops", "3")[
        "perplexity"
    ]
    (t3,) = _perplexity(run_eval, model_dir, data_dir, tmp_path, "--num-loops", "3")["perplexity"]
    assert deeper["loss"] == t3["loss"] and deeper["exit"]["mean_loops"] == 3.0


def test_eval_exit_sweep_puts_the_policies_beside_the_fixed_depth_curve(run_eval, model_dir, data_dir, tmp_path):
    out_dir = tmp_path / "sweep"
    argv = [str(model_dir), "--text", TEXT, "--data-dir", str(data_dir), "--max-tokens", "64"]
    argv += ["--exit-sweep", "latent:0,1e9,cosine:0.01", "--loops", "1,3"]
    assert run_eval([*argv, "--seq-len", "32", "--sequences", "4", "--output-dir", str(out_dir)]) == 0
    assert (out_dir / "loss_vs_compute.png").stat().st_size > 1000
    record = json.loads((out_dir / "exit_sweep.json").read_text())
    assert record["sequences"] == 4 and record["seq_len"] == 32
    depth = {p["loops"]: p for p in record["depth"]["points"]}
    assert sorted(depth) == [1, 2, 3]  # the --loops counts and the trained T
    never, always, cosine = record["points"]
    assert (never["loss"], never["mean_loops"]) == (depth[2]["loss"], 2.0)
    assert (always["loss"], always["mean_loops"]) == (depth[1]["loss"], 1.0)
    assert cosine["criterion"] == "cosine" and 1.0 <= cosine["mean_loops"] <= 2.0


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (["--exit", "latent:0.1", "--depth-analysis", "--output-dir", "d"], "give one of them"),
        (["--min-loops", "2"], "bound an adaptive depth: give --exit"),
        (["--exit-sweep", "latent:0.1"], "--exit-sweep needs held-out text"),
        (["--exit", "latent"], "give CRITERION:THRESHOLD"),
        (["--exit", "gaze:0.1"], "unknown exit criterion 'gaze'"),
    ],
)
def test_bad_exit_flags_are_refused_before_the_model_loads(run_eval, tmp_path, monkeypatch, flags, message):
    from loopmoe.evaluation import loading

    def no_model(*args, **kwargs):
        raise AssertionError("the model was loaded before the flags were checked")

    monkeypatch.setattr(loading, "load_model", no_model)
    text = tmp_path / "t.txt"
    text.write_text("hello world " * 50)
    argv = [str(tmp_path), *(["--text", str(text)] if "--exit-sweep" not in flags else []), *flags]
    with pytest.raises(ConfigError, match=message):
        run_eval(argv)


def test_eval_exit_on_a_model_that_does_not_loop_is_refused(run_eval, gpt2_dir, tmp_path):
    from loopmoe import LoopMoEConfig, LoopMoEForCausalLM
    from tests.conftest import TINY

    vanilla = tmp_path / "vanilla"
    LoopMoEForCausalLM(LoopMoEConfig(**TINY, num_loops=1)).save_pretrained(vanilla)  # no tokenizer: refused first
    text = tmp_path / "t.txt"
    text.write_text("hello world " * 50)
    with pytest.raises(ConfigError, match="early exit needs a looped model"):
        run_eval([str(vanilla), "--text", str(text), "--exit", "latent:0.1"])
    with pytest.raises(ConfigError, match="early exit needs a looped model"):
        run_eval([str(vanilla), "--text", str(text), "--exit-sweep", "latent:0.1", "--output-dir", str(tmp_path)])
    with pytest.raises(ConfigError, match="needs a LoopMoE checkpoint"):
        run_eval([str(gpt2_dir), "--text", str(text), "--exit", "latent:0.1"])
