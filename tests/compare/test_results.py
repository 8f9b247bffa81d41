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
