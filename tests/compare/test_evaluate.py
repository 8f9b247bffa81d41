"""The evaluation stage of a comparison: stored per run, reused, redone when stale; the depth curve and
FLOPs agree with direct model calls; the report and RESULTS.md list every section and mark missing runs."""

import json
import shutil
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from loopmoe.compare import CompareOptions
from loopmoe.compare.arms import ArmSpec
from loopmoe.compare.results import MissingRun
from loopmoe.evaluation.pipeline import evaluate_run
from tests.compare import TINY_COMPARE
from tests.evaluation import record_measurements


def _options(out: Path, **overrides) -> CompareOptions:
    opts = dict(
        TINY_COMPARE,
        eval_batches=2,
        seeds=(0, 1),
        arms=("reference", "looped", "cond-emb"),
        arm={"cond-emb": ArmSpec("looped", iter_conditioning="iter_embedding", seeds=(0,))},
        tasks=("copa",),
        task_limit=3,
        text="copa/val.jsonl",  # any text file of the data folder: the study uses WikiText-2's test set
        text_tokens=300,
        depth_loops=(1, 2, 3, 17),  # 17: beyond the iter_embedding table (max_loops 16)
        out=out,
    )
    return CompareOptions(**{**opts, **overrides})


@pytest.fixture(scope="module")
def study(tmp_path_factory, request):
    """A tiny finished study (5 runs of 4 steps) with its results page; skipped without the task data."""
    from loopmoe.paths import shared_data_dir

    data = shared_data_dir()
    if data is None or not (data / "copa" / "val.jsonl").is_file():
        pytest.skip("needs the copa data in the shared data folder ($LOOPMOE_DATA_DIR or ../shared/data)")
    from loopmoe.compare import run_comparison

    root = tmp_path_factory.mktemp("study")
    results = run_comparison(_options(root / "cmp", results=root / "RESULTS.md"), log=lambda *a: None)
    return root, results


def _eval_args(opts: CompareOptions, val_batches):
    from loopmoe.evaluation.pipeline import resolve_text

    return dict(
        val_batches=val_batches,
        seq_len=opts.seq_len,
        depth_loops=opts.depth_loops,
        text=resolve_text(opts.text),
        text_tokens=opts.text_tokens,
        tasks=opts.tasks,
        task_limit=opts.task_limit,
        log=lambda *a: None,
    )


def _val_batches(root: Path):
    from loopmoe.data import load_shards
    from loopmoe.data.loader import validation_batches

    shards = load_shards(root / "cmp" / "data" / "shards")
    return lambda: validation_batches(
        shards.tokens("val"), batch_size=2, seq_len=32, num_batches=2, rank=0, world_size=1
    )


def test_every_run_is_evaluated_and_stored_with_it(study):
    root, results = study
    for name, seeds in (("reference", (0, 1)), ("looped", (0, 1)), ("cond-emb", (0,))):
        assert set(results.runs[name]) == set(seeds)
        for seed in seeds:
            folder = root / "cmp" / f"seed{seed}" / name / "eval"
            looped = name != "reference"  # looped arms also store the iteration cosine
            assert sorted(p.name for p in folder.iterdir()) == [
                *(["cosine.json"] if looped else []),
                "depth.json",
                "tasks.json",
                "text.json",
            ]
            run = results.runs[name][seed]
            assert run.eval.tasks == json.loads((folder / "tasks.json").read_text())["result"]
            assert run.eval.text["tokens"] == 300  # the first 300 ids, after an end-of-text context token
    # downstream for EVERY seed, averaged in the report's table
    (acc,) = [r for r in results.downstream["looped"] if r["metric"] == "acc"]
    per_seed = [next(r for r in results.runs["looped"][s].eval.tasks if r["metric"] == "acc") for s in (0, 1)]
    assert acc["value"] == pytest.approx((per_seed[0]["value"] + per_seed[1]["value"]) / 2)
    assert (acc["seeds"], acc["stderr_over"]) == (2, "seeds")


def test_stored_evaluation_is_reused_and_redone_only_when_stale(study, monkeypatch):
    root, results = study
    from loopmoe.evaluation import pipeline

    opts = _options(root / "cmp")
    run_dir = root / "cmp" / "seed1" / "looped"

    def no_model(*args, **kwargs):
        raise AssertionError("a stored evaluation loaded the model again")

    monkeypatch.setattr(pipeline, "load_model", no_model)
    again = evaluate_run(run_dir, **_eval_args(opts, _val_batches(root)))
    assert {k: getattr(again, k) for k in ("depth", "text", "tasks")} == {
        k: getattr(results.runs["looped"][1].eval, k) for k in ("depth", "text", "tasks")
    }
    monkeypatch.undo()
    # as if killed while scoring the tasks: only they are measured again; a changed --task-limit is stale
    depth_before = (run_dir / "eval" / "depth.json").read_text()
    (run_dir / "eval" / "tasks.json").unlink()
    measured = record_measurements(monkeypatch)
    evaluate_run(run_dir, **_eval_args(opts, _val_batches(root)))
    assert measured == ["tasks.json"]
    assert (run_dir / "eval" / "depth.json").read_text() == depth_before
    measured.clear()
    rows = evaluate_run(run_dir, **{**_eval_args(opts, _val_batches(root)), "task_limit": 2}).tasks
    assert measured == ["tasks.json"] and {r["n"] for r in rows} == {2}


def test_depth_curve_and_flops_match_direct_model_calls(study):
    from loopmoe.budget import compute_budget
    from loopmoe.evaluation import load_model
    from loopmoe.flops import count_forward_flops

    root, results = study
    batches = list(_val_batches(root)())
    run = results.runs["looped"][0]
    depth = run.eval.depth
    points = {p.loops: p for p in depth.points}
    assert depth.trained_loops == 2 and sorted(points) == [1, 2, 3, 17] and depth.unrunnable == {}
    # the trained depth reproduces the training run's own last held-out loss
    assert points[2].loss == pytest.approx(run.val_loss, rel=1e-5)
    model = load_model(Path(run.final_dir))
    for t, point in points.items():
        with torch.no_grad():
            losses = [
                F.cross_entropy(model(input_ids=x, num_loops=t).logits[:, :-1].reshape(-1, 300), x[:, 1:].reshape(-1))
                for x in batches
            ]
        assert point.loss == pytest.approx(float(sum(losses) / len(losses)), rel=1e-5)
        assert point.flops_per_token == compute_budget(model.config, 32, num_loops=t).flops_per_token
        # audited: the real forward at two lengths differs from the budget by one per-sequence constant
        # (the iteration-conditioning MLP runs once per sequence, which the budget leaves out by design)
        extra = [
            count_forward_flops(model, batches[0][:1, :s], num_loops=t)
            - compute_budget(model.config, s, t).flops_per_token * s
            for s in (32, 16)
        ]
        assert extra[0] == extra[1] and 0 <= extra[0] < 0.01 * point.flops_per_token * 32
        assert point.untrained_iteration_vectors is False
    # a Vanilla MoE has one depth, its own
    (only,) = results.runs["reference"][0].eval.depth.points
    assert only.loops == 1 and only.loss == pytest.approx(results.runs["reference"][0].val_loss, rel=1e-5)
    # the iter_embedding ablation cannot run past its table, and its vectors beyond T=2 are untrained
    emb = results.runs["cond-emb"][0].eval.depth
    assert list(emb.unrunnable) == ["17"] and "max_loops=16" in emb.unrunnable["17"]
    assert [p.untrained_iteration_vectors for p in emb.points] == [False, False, True]


def test_results_page_has_every_section_and_marks_missing_runs(study, tmp_path, monkeypatch):
    import loopmoe.training
    from loopmoe.compare import run_comparison

    root, _ = study
    page = (root / "RESULTS.md").read_text()
    for section in (
        "## Setup",
        "## Budget",
        "## Arms",
        "## Verdict",
        "## Results",
        "perplexity",
        "## Downstream",
        "## Test-time depth and executed compute",
        "## Cost",
        "## Environment",
        "## Configurations",
    ):
        assert section in page, section
    for figure in ("loss.png", "expert_load.png", "depth.png", "loss_vs_flops.png"):
        assert f"](docs/study/{figure})" in page and (root / "docs" / "study" / figure).is_file()
    assert "cond-emb cannot run at T = 17" in page
    assert "single seed (0) scored" in page and "95% prediction interval" in page and "Incomplete" not in page
    assert "5 of 5 planned runs finished" in page
    # a study still running: copy it, drop a run, regenerate without training anything
    shutil.copytree(root / "cmp", tmp_path / "cmp")
    shutil.rmtree(tmp_path / "cmp" / "seed1" / "looped")

    def no_training(*args, **kwargs):
        raise AssertionError("--report-only trained a run")

    monkeypatch.setattr(loopmoe.training, "run_training", no_training)
    results = run_comparison(
        _options(tmp_path / "cmp", report_only=True, results=tmp_path / "RESULTS.md"), log=lambda *a: None
    )
    assert results.missing == [MissingRun("looped", 1, 0)]
    assert set(results.runs["looped"]) == {0}
    page = (tmp_path / "RESULTS.md").read_text()
    assert "**Incomplete: 1 run(s) of the plan are not finished**" in page
    assert "| looped | 1    | 0/4" in page and "4 of 5 planned runs finished" in page


def test_stored_evaluations_are_keyed_on_the_content_of_the_data_they_read(study, monkeypatch, tmp_path):
    import shutil

    from loopmoe.paths import shared_data_dir

    root, _ = study
    opts = _options(root / "cmp")
    run_dir = root / "cmp" / "seed0" / "reference"
    measured = record_measurements(monkeypatch)
    # The same task data reached through another data folder (a copy): content-keyed, so reused.
    data = tmp_path / "data"
    shutil.copytree(shared_data_dir() / "copa", data / "copa")
    monkeypatch.setenv("LOOPMOE_DATA_DIR", str(data))
    args = _eval_args(opts, _val_batches(root))
    evaluate_run(run_dir, **{**args, "text": data / "copa" / "val.jsonl"})
    assert measured == ["text.json"]  # another path: measured once
    measured.clear()
    evaluate_run(run_dir, **{**args, "text": data / "copa" / "val.jsonl"})
    assert measured == []
    # Edited in place: the held-out text and the task's data files are measured again.
    for path in sorted((data / "copa").iterdir()):  # flip every label
        rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
        path.write_text("".join(json.dumps({**row, "label": 1 - row["label"]}) + "\n" for row in rows))
    evaluate_run(run_dir, **{**args, "text": data / "copa" / "val.jsonl"})
    assert sorted(measured) == ["tasks.json", "text.json"]
