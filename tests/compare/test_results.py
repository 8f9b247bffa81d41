"""results.json's schema: a stored study loads into the dataclasses and is written back byte for byte."""

import json

from loopmoe.compare.arms import ArmSpec
from loopmoe.compare.results import MissingRun, StudyResults, TextSource, depth_means
from loopmoe.compare.verdict import comparisons


def _run(loss: float, seed_offset: float = 0.0) -> dict:
    """A run record as results.json holds it (the writer's key order)."""
    points = [
        {
            "loops": t,
            "loss": loss + 0.1 * (2 - t) + seed_offset,
            "flops_per_token": 1e6 * t,
            "untrained_iteration_vectors": False,
        }
        for t in (1, 2)
    ]
    return {
        "val_loss": loss + seed_offset,
        "train_loss": loss + 0.2,
        "final_dir": "/runs/x/final",
        "metrics": [{"step": 4, "loss": loss + 0.2, "lm_loss": loss + 0.2, "tokens": 256, "val_loss": loss}],
        "cost": [{"start_step": 0, "end_step": 4, "wall_s": 1.5, "peak_rss_mib": 512.0, "threads": 1}],
        "eval": {
            "depth": {
                "trained_loops": 2,
                "points": points,
                "unrunnable": {"17": "num_loops=17 exceeds max_loops=16"},
                "expert_load": {"core.0@0": [0.5, 0.5]},
            },
            "expert_load": {"core.0@0": [0.5, 0.5]},
            "text": {
                "name": "t.txt",
                "tokens": 300,
                "bytes": 1200,
                "nll": 1500.0,
                "window": 32,
                "stride": 16,
                "loss": 5.0,
                "perplexity": 148.4,
                "bits_per_byte": 1.8,
            },
            "tasks": [{"task": "copa", "metric": "acc", "value": 0.5, "stderr": 0.1, "n": 3}],
            "wall_s": {"depth": 0.5, "text": 0.2, "tasks": None},
        },
    }


def _spec(kind: str, **kwargs) -> dict:
    return {
        "kind": kind,
        "num_loops": None,
        "strategy": None,
        "iter_conditioning": None,
        "norm_scheme": None,
        "seeds": None,
        **kwargs,
    }


def _arm(spec: dict, seeds: list[int]) -> dict:
    return {
        "spec": spec,
        "seeds": seeds,
        "config": {"num_loops": 2, "num_experts": 8},
        "total_params": 1000,
        "active_params": 500,
        "flops_per_token": 2e6,
        "attn_ffn_ratio": 0.5,
        "deviations": {"total_params": 0.0, "active_params": 0.01, "flops_per_token": -0.002, "attn_ffn_ratio": 0.03},
    }


STORED = {
    "options": {
        "reference": "debug",
        "seeds": [0, 1],
        "arm": {"cond": _spec("looped", iter_conditioning="none", seeds=[0])},
        "steps": 4,
        "micro_batch_size": 2,
        "seq_len": 32,
        "out": "runs/cmp",
    },
    "budget": {"reference": {"config": {}}, "looped": {"config": {}}, "deviations": {}, "tolerances": {}},
    "arms": {
        "reference": _arm(_spec("reference"), [0, 1]),
        "looped": _arm(_spec("looped"), [0, 1]),
        "cond": _arm(_spec("looped", iter_conditioning="none", seeds=[0]), [0]),
    },
    "runs": {
        "reference": {"0": _run(5.2), "1": _run(5.3)},
        "looped": {"1": _run(5.1, 0.01), "0": _run(5.0)},  # the order runs finished in is kept
        "cond": {},
    },
    "missing": [{"arm": "cond", "seed": 0, "step": 2}],
    "downstream": {
        "looped": [
            {"task": "copa", "metric": "acc", "value": 0.5, "stderr": 0.0, "stderr_over": "seeds", "seeds": 2, "n": 3}
        ]
    },
    "text": {"path": "/data/t.txt", "name": "t.txt"},
    "data": {"source": "embedded", "bpe_vocab": 300, "train_tokens": 1000, "val_tokens": 50},
    "run_configs": {"reference": {"train": {"seed": 0}}},
    "environment": {"commit": None, "torch": "2.x"},
}


def test_a_stored_study_round_trips_byte_for_byte(tmp_path):
    text = json.dumps(STORED, indent=2, default=str)
    path = tmp_path / "results.json"
    path.write_text(text)
    results = StudyResults.load(path)
    assert results.dumps() == text
    results.save(tmp_path / "again.json")
    assert (tmp_path / "again.json").read_text() == text
    # and the typed view reads what the dicts held
    assert list(results.runs["looped"]) == [1, 0]  # seeds are ints again, in the stored order
    assert (
        results.runs["looped"][0].eval.depth.points[1].loss
        == STORED["runs"]["looped"]["0"]["eval"]["depth"]["points"][1]["loss"]
    )
    assert results.arms["cond"].spec == ArmSpec("looped", iter_conditioning="none", seeds=(0,))
    assert results.missing == [MissingRun("cond", 0, 2)] and results.text == TextSource("/data/t.txt", "t.txt")
    assert list(results.finished_runs()) == ["reference", "looped"]


def test_a_study_written_before_later_keys_still_loads():
    old = {
        k: v
        for k, v in STORED.items()
        if k not in ("missing", "downstream", "text", "data", "run_configs", "environment")
    }
    old["runs"] = {"reference": {"0": {**_run(5.2), "eval": {**_run(5.2)["eval"]}}}}
    del old["runs"]["reference"]["0"]["eval"]["wall_s"]
    results = StudyResults.from_dict(json.loads(json.dumps(old)))
    assert results.missing == [] and results.text is None and results.runs["reference"][0].eval.wall_s == {}


def test_depth_means_and_comparisons_read_the_typed_results():
    results = StudyResults.from_dict(json.loads(json.dumps(STORED)))
    means = depth_means(results.finished_runs())
    assert list(means["looped"]) == [1, 2]
    assert means["looped"][2].loss == (5.0 + 5.11) / 2 and means["looped"][2].flops_per_token == 2e6
    assert comparisons(results.arms) == [("looped", "reference"), ("cond", "reference"), ("cond", "looped")]


def test_a_study_with_an_exit_sweep_round_trips_and_one_without_has_none(tmp_path):
    import copy

    from loopmoe.evaluation.early_exit import ExitPoint

    stored = copy.deepcopy(STORED)
    point = {
        "criterion": "latent",
        "threshold": 0.03,
        "min_loops": 1,
        "max_loops": 2,
        "loss": 5.02,
        "mean_loops": 1.4,
        "flops_per_token": 1.4e6,
        "flops_fraction": 0.7,
    }
    stored["runs"]["looped"]["0"]["eval"]["exit_sweep"] = [point]
    text = json.dumps(stored, indent=2, default=str)
    results = StudyResults.from_dict(json.loads(text))
    assert results.dumps() == text
    assert results.runs["looped"][0].eval.exit_sweep == [ExitPoint(**point)]
    assert results.runs["looped"][1].eval.exit_sweep is None  # measured without a sweep: no key written
    assert StudyResults.from_dict(json.loads(json.dumps(STORED))).dumps() == json.dumps(STORED, indent=2)


def test_evaluations_that_did_not_run_are_named_with_why_in_the_report(tmp_path, monkeypatch):
    """A study without the data folder says which evaluations it left out, instead of silently dropping them."""
    from loopmoe.compare import CompareOptions
    from loopmoe.compare.options import options_record
    from loopmoe.compare.report import write_report
    from loopmoe.compare.runner import not_evaluated
    from loopmoe.evaluation import SHIPPED_TASKS

    monkeypatch.setenv("LOOPMOE_DATA_DIR", str(tmp_path / "empty"))
    (tmp_path / "empty").mkdir()
    notes = not_evaluated(CompareOptions(), text=None, tasks=())
    assert notes[0].startswith("held-out text perplexity:") and "wikitext" in notes[0].lower()
    assert notes[1].startswith(f"downstream tasks {', '.join(SHIPPED_TASKS)}: their data files are not in")
    assert not_evaluated(CompareOptions(text="", tasks=(), depth_loops=()), text=None, tasks=()) == [
        "held-out text perplexity: --text '' asks for none",
        "downstream tasks: --tasks '' asks for none",
        "test-time depth curve: --depth-loops '' asks for none",
    ]
    options = {**options_record(CompareOptions().validate()), **STORED["options"]}
    results = StudyResults.from_dict(json.loads(json.dumps({**STORED, "options": options, "not_evaluated": notes})))
    assert json.loads(results.dumps())["not_evaluated"] == notes  # stored, and round-tripped
    report = write_report(tmp_path, results, "").read_text()
    assert "**Not evaluated:**" in report and f"- {notes[1]}" in report
