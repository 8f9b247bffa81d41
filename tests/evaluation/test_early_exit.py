"""Adaptive depth measured: exit policies through the evaluation API, the stored sweep of a run, refusals."""

from __future__ import annotations

import json

import pytest
import torch

from loopmoe import LoopMoEConfig, LoopMoEForCausalLM
from loopmoe.budget import adaptive_flops_per_token, compute_budget
from loopmoe.errors import ConfigError
from loopmoe.evaluation.depth import heldout_loss
from loopmoe.evaluation.early_exit import IterationTally, early_exit, exit_point, exit_sweep, parse_sweep
from loopmoe.evaluation.pipeline import EVAL_DIR, EXIT_DIR, RunEvaluation, evaluate_run
from loopmoe.model.adaptive import ExitPolicy
from tests.conftest import TINY
from tests.evaluation import record_measurements

LOOPED = dict(TINY, num_prelude_layers=1, num_coda_layers=1, num_loops=3)
SEQ = 12


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return LoopMoEForCausalLM(LoopMoEConfig(**LOOPED)).eval()


@pytest.fixture(scope="module")
def batches():
    torch.manual_seed(1)
    return list(torch.randint(0, 97, (3, 2, SEQ)))


def test_a_sweep_is_criterion_threshold_items_a_bare_threshold_taking_the_criterion_before_it():
    assert parse_sweep(["latent:0.1", "0.03", "kl:1e-3", ""]) == [
        ExitPolicy("latent", 0.1),
        ExitPolicy("latent", 0.03),
        ExitPolicy("kl", 0.001),
    ]
    assert parse_sweep(["cosine:0.01"], min_loops=2, max_loops=5) == [ExitPolicy("cosine", 0.01, 2, 5)]
    assert parse_sweep([]) == []


@pytest.mark.parametrize(
    ("items", "message"),
    [
        (["0.1"], "has no criterion; start with CRITERION:THRESHOLD"),
        (["latent:x"], "is not a number"),
        (["nope:0.1"], "unknown exit criterion 'nope'"),
        (["latent:-1"], "must be a finite number >= 0"),
        (["latent:0.1", "0.1"], "listed twice"),
    ],
)
def test_a_bad_sweep_names_the_fix(items, message):
    with pytest.raises(ConfigError, match=message):
        parse_sweep(items)


def test_a_policy_that_never_exits_is_the_trained_depth_and_one_that_always_exits_is_t1(model, batches):
    full = exit_point(model, batches, ExitPolicy("latent", 0.0), SEQ)
    assert full.loss == heldout_loss(model, batches)  # bit for bit: the same calls as full depth
    assert (full.mean_loops, full.max_loops, full.flops_fraction) == (3.0, 3, pytest.approx(1.0))
    assert full.flops_per_token == pytest.approx(compute_budget(model.config, SEQ).flops_per_token)
    first = exit_point(model, batches, ExitPolicy("latent", 1e9), SEQ)
    assert first.loss == heldout_loss(model, batches, num_loops=1)
    assert first.mean_loops == 1.0
    assert first.flops_per_token == pytest.approx(compute_budget(model.config, SEQ, num_loops=1).flops_per_token)


def test_a_sweep_reports_the_iterations_the_forwards_executed(model, batches):
    policy = ExitPolicy("latent", 0.5, min_loops=1, max_loops=4)  # beyond the trained T: test-time depth
    (point,) = exit_sweep(model, batches, [policy], SEQ)
    executed = [
        model(input_ids=x, use_cache=False, exit_criterion="latent", exit_threshold=0.5, max_loops=4) for x in batches
    ]
    mean = torch.cat([o.exit_loops.flatten() for o in executed]).float().mean().item()
    assert 1.0 < point.mean_loops < 4.0 and point.mean_loops == pytest.approx(mean)
    assert point.flops_per_token == pytest.approx(adaptive_flops_per_token(model.config, SEQ, mean, "latent", 4))
    assert point.flops_fraction == pytest.approx(
        point.flops_per_token / compute_budget(model.config, SEQ).flops_per_token
    )


def test_the_exit_hooks_apply_inside_the_block_only(model, batches):
    tally = IterationTally()
    with early_exit(model, ExitPolicy("latent", 1e9), tally), torch.no_grad():
        out = model(batches[0], use_cache=False)
    assert out.exit_loops is not None and out.exit_loops.eq(1).all()
    assert (tally.iterations, tally.positions, tally.mean) == (2 * SEQ, 2 * SEQ, 1.0)
    with torch.no_grad():
        assert model(batches[0], use_cache=False).exit_loops is None  # hooks removed


def test_exit_on_a_model_that_does_not_loop_is_refused(batches):
    from transformers import GPT2Config, GPT2LMHeadModel

    vanilla = LoopMoEForCausalLM(LoopMoEConfig(**{**LOOPED, "num_loops": 1})).eval()
    with pytest.raises(ConfigError, match="early exit needs a looped model"):
        exit_sweep(vanilla, batches, [ExitPolicy("latent", 0.1)], SEQ)
    gpt2 = GPT2LMHeadModel(GPT2Config(vocab_size=97, n_positions=32, n_embd=16, n_layer=1, n_head=2)).eval()
    with pytest.raises(ConfigError, match="needs a LoopMoE checkpoint"), early_exit(gpt2, ExitPolicy("latent", 0.1)):
        pass


def _run_dir(tmp_path, model):
    model.save_pretrained(tmp_path / "final")
    return tmp_path


def _evaluate(run_dir, batches, sweep, measured=None):
    return evaluate_run(
        run_dir,
        val_batches=lambda: iter(batches),
        seq_len=SEQ,
        depth_loops=(1, 3),
        text=None,
        text_tokens=None,
        tasks=(),
        task_limit=None,
        exit_sweep=sweep,
        log=lambda *a: None,
    )


def test_a_runs_sweep_is_stored_per_policy_reused_and_redone_when_the_policy_changes(
    tmp_path, model, batches, monkeypatch
):
    from loopmoe.evaluation import pipeline

    run_dir = _run_dir(tmp_path, model)
    evaluation = _evaluate(run_dir, batches, ("latent:0", "1e9"))
    folder = run_dir / EVAL_DIR / EXIT_DIR
    assert sorted(p.name for p in folder.iterdir()) == ["latent_0.0_1-T.json", "latent_1000000000.0_1-T.json"]
    never, always = evaluation.exit_sweep
    points = {p.loops: p for p in evaluation.depth.points}
    assert never.loss == points[3].loss and never.mean_loops == 3.0  # the depth curve's trained point, exactly
    assert always.loss == points[1].loss and always.mean_loops == 1.0
    assert evaluation.wall_s["exit_sweep"] is not None
    assert RunEvaluation.from_dict(json.loads(json.dumps(evaluation.to_dict()))) == evaluation

    def no_model(*args, **kwargs):
        raise AssertionError("a stored sweep loaded the model again")

    monkeypatch.setattr(pipeline, "load_model", no_model)
    assert _evaluate(run_dir, batches, ("latent:0", "1e9")).exit_sweep == evaluation.exit_sweep
    monkeypatch.undo()
    # A changed policy is measured (alone); a stored point whose params name another policy is never reused.
    measured = record_measurements(monkeypatch)
    again = _evaluate(run_dir, batches, ("latent:0", "0.5"))
    assert measured == ["latent_0.5_1-T.json"] and again.exit_sweep[0] == never
    record = json.loads((folder / "latent_0.0_1-T.json").read_text())
    record["params"]["policy"]["min_loops"] = 2
    (folder / "latent_0.0_1-T.json").write_text(json.dumps(record))
    measured.clear()
    _evaluate(run_dir, batches, ("latent:0",))
    assert measured == ["latent_0.0_1-T.json"]


def test_a_run_that_does_not_loop_gets_no_sweep(tmp_path, batches):
    torch.manual_seed(0)
    vanilla = LoopMoEForCausalLM(LoopMoEConfig(**{**LOOPED, "num_loops": 1})).eval()
    evaluation = _evaluate(_run_dir(tmp_path, vanilla), batches, ("latent:0.1",))
    assert evaluation.exit_sweep is None and "exit_sweep" not in evaluation.to_dict()
    assert not (tmp_path / EVAL_DIR / EXIT_DIR).exists()


def test_task_scoring_runs_every_lm_eval_forward_under_the_policy(loopmoe_dir, data_dir):
    from loopmoe.evaluation import load_hf_tokenizer, load_model, wrap_model
    from loopmoe.evaluation.pipeline import task_scores

    model, tokenizer = load_model(loopmoe_dir), load_hf_tokenizer(loopmoe_dir)
    lm = wrap_model(model, tokenizer, batch_size=4)
    executed: list[torch.Tensor] = []
    handle = model.register_forward_hook(lambda module, args, out: executed.append(out.exit_loops))

    def loglikelihoods(**kwargs) -> list:
        _, raw = task_scores(model, lm, ["copa"], data_dir, limit=3, log_samples=True, **kwargs)
        return [s["resps"] for s in raw["samples"]["copa"]]

    try:
        exited = loglikelihoods(exit_policy=ExitPolicy("latent", 1e9))
        assert executed and all(e is not None and e.eq(1).all() for e in executed)  # every forward lm-eval made
        executed.clear()
        assert exited == loglikelihoods(num_loops=1)  # exiting after one iteration: the T = 1 scores
        assert executed and all(e is None for e in executed)  # the policy ends with its block
        assert exited != loglikelihoods()
    finally:
        handle.remove()
