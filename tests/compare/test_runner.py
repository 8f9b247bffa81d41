"""The comparison is controlled: both sides differ only in [model]; options validate; data is optional."""

import pytest

from loopmoe.balance import balance
from loopmoe.compare import CompareOptions
from loopmoe.compare.options import identity_options, run_config_for
from loopmoe.compare.runner import available_tasks, run_comparison
from loopmoe.presets import get_preset
from tests.compare import TINY_COMPARE


def test_both_models_train_under_identical_conditions(tmp_path):
    opts = CompareOptions(out=tmp_path).validate()
    result = balance(get_preset("small"), opts.num_loops, seq_len=opts.seq_len)
    ref = run_config_for(opts, result.reference, seed=3).to_dict()
    looped = run_config_for(opts, result.looped, seed=3).to_dict()
    assert {k: v for k, v in ref.items() if k != "model"} == {k: v for k, v in looped.items() if k != "model"}
    assert ref["train"]["seed"] == 3 and ref["data"]["data_dir"] == str(tmp_path / "data")
    assert (ref["model"]["config"]["num_loops"], looped["model"]["config"]["num_loops"]) == (1, 2)
    assert looped["model"]["config"]["num_experts"] == result.looped.num_experts


def test_options_validate_and_tokens_set_steps():
    opts = CompareOptions(tokens=1_000_000).validate()
    assert opts.steps == -(-1_000_000 // (opts.micro_batch_size * opts.seq_len))
    for bad, message in (
        ({"tokens": 10}, "less than one batch"),
        ({"warmup_steps": 500}, "--warmup-steps"),
        ({"seeds": ()}, "--seeds"),
        ({"strategy": "x"}, "--strategy"),
        ({"exit_sweep": ("0.1",)}, "--exit-sweep: .* has no criterion"),
    ):
        with pytest.raises(ValueError, match=message):
            CompareOptions(**bad).validate()
    # an exit sweep only chooses what is evaluated: changing it never makes the trained runs stale
    assert identity_options(CompareOptions(exit_sweep=("latent:0.1",))) == identity_options(CompareOptions())


def test_downstream_tasks_follow_the_data_that_is_present(tmp_path, monkeypatch):
    monkeypatch.setenv("LOOPMOE_DATA_DIR", str(tmp_path))
    assert available_tasks() == ()  # a fresh machine: the main job still runs, without downstream tasks
    (tmp_path / "copa").mkdir()
    (tmp_path / "copa" / "val.jsonl").write_text("{}\n")
    assert available_tasks() == ("copa",)


class _Prepared(Exception):
    """Raised instead of building data and training: the test only checks what happens before."""


def _stop_before_training(*args, **kwargs):
    raise _Prepared


def test_rerun_with_other_options_is_refused_naming_them(tmp_path, monkeypatch):
    import json

    from loopmoe.compare import runner

    monkeypatch.setattr(runner, "prepare", _stop_before_training)
    out = tmp_path / "cmp"
    with pytest.raises(_Prepared):
        runner.run_comparison(CompareOptions(out=out), log=lambda *a: None)
    (out / "seed0" / "reference").mkdir(parents=True)
    (out / "seed0" / "reference" / "marker").write_text("old run")
    saved = json.loads((out / "options.json").read_text())
    assert saved["lr"] == 3e-3 and "out" not in saved
    # same options (and evaluation-only ones changed): resumes
    with pytest.raises(_Prepared):
        runner.run_comparison(CompareOptions(out=out, task_limit=5), log=lambda *a: None)
    with pytest.raises(ValueError, match=r"other options: --lr 0\.003 -> 0\.001, --steps 300 -> 400.*--fresh"):
        runner.run_comparison(CompareOptions(out=out, lr=1e-3, steps=400), log=lambda *a: None)
    assert json.loads((out / "options.json").read_text()) == saved
    # --fresh moves the old comparison aside, never deletes it
    with pytest.raises(_Prepared):
        runner.run_comparison(CompareOptions(out=out, lr=1e-3, fresh=True), log=lambda *a: None)
    assert (tmp_path / "cmp.prev-1" / "seed0" / "reference" / "marker").read_text() == "old run"
    assert json.loads((out / "options.json").read_text())["lr"] == 1e-3
    assert not (out / "seed0").exists()


def test_report_only_reads_an_existing_comparison_and_writes_nothing_before(tmp_path, monkeypatch):
    from loopmoe.compare import runner

    monkeypatch.setattr(runner, "prepare", _stop_before_training)
    out = tmp_path / "cmp"
    with pytest.raises(ValueError, match="holds no comparison"):
        runner.run_comparison(CompareOptions(out=out, report_only=True), log=lambda *a: None)
    assert not out.exists()
    with pytest.raises(_Prepared):
        runner.run_comparison(CompareOptions(out=out), log=lambda *a: None)
    written = (out / "options.json").stat().st_mtime_ns
    with pytest.raises(_Prepared):  # evaluation-only options may differ
        runner.run_comparison(CompareOptions(out=out, report_only=True, task_limit=3), log=lambda *a: None)
    assert (out / "options.json").stat().st_mtime_ns == written
    with pytest.raises(ValueError, match="other options: --lr"):
        runner.run_comparison(CompareOptions(out=out, report_only=True, lr=1e-3, fresh=False), log=lambda *a: None)
    with pytest.raises(ValueError, match="--fresh would move it aside"):
        CompareOptions(out=out, report_only=True, fresh=True).validate()


def test_unrecorded_runs_in_out_are_refused(tmp_path, monkeypatch):
    from loopmoe.compare import runner

    monkeypatch.setattr(runner, "prepare", _stop_before_training)
    (tmp_path / "seed0").mkdir()
    with pytest.raises(ValueError, match="options are not recorded.*--fresh"):
        runner.run_comparison(CompareOptions(out=tmp_path), log=lambda *a: None)


def test_changed_corpus_is_refused_before_the_shared_data_is_rebuilt(tmp_path):
    import json

    from loopmoe.compare import runner

    corpus = tmp_path / "corpus.txt"
    corpus.write_text("some text\n\nmore text\n")
    out = tmp_path / "cmp"
    ckpt = out / "seed0" / "reference" / "checkpoints" / "step_0000001"
    ckpt.mkdir(parents=True)
    (ckpt / "meta.json").write_text(
        json.dumps(
            {
                "step": 1,
                "tokens": 64,
                "skipped_steps": 0,
                "data": {"tokenizer_sha256": "old", "shards_fingerprint": "old"},
            }
        )
    )
    (out / "data" / "shards").mkdir(parents=True)
    (out / "data" / "shards" / "marker").write_text("trained on this")
    opts = CompareOptions(out=out, source=str(corpus), bpe_vocab=300).validate()
    with pytest.raises(ValueError, match=r"seed0/reference was trained on other data.*--fresh"):
        runner.prepare(opts)
    assert (out / "data" / "shards" / "marker").read_text() == "trained on this"
    assert not (out / "data" / "tokenizer").exists()


def test_study_config_parses_and_flags_typed_after_it_override(tmp_path):
    from pathlib import Path

    from loopmoe.cli.main import build_parser
    from loopmoe.options import options_from

    study = CompareOptions.from_toml(Path(__file__).resolve().parents[2] / "configs/study/eltec.toml").validate()
    assert {"reference", "looped", "granularity"} <= set(study.arms) and len(study.seeds) >= 3
    assert all(study.arm_spec(a).seeds is None for a in ("reference", "looped", "granularity"))
    config = tmp_path / "s.toml"
    config.write_text(
        'steps = 50\nwarmup_steps = 5\nseeds = [0, 1]\narms = ["reference", "t4"]\n[arm.t4]\nkind = "looped"\nnum_loops = 4\n'
    )
    args = build_parser().parse_args(["compare", "--config", str(config), "--seeds", "3", "--out", str(tmp_path / "o")])
    opts = options_from(CompareOptions, args, CompareOptions.from_toml(config)).validate()
    assert (opts.steps, opts.seeds, opts.arms, opts.out) == (50, (3,), ("reference", "t4"), tmp_path / "o")
    assert opts.arm["t4"].num_loops == 4 and opts.lr == CompareOptions().lr  # untyped flags keep file / defaults
    # without --config, untyped flags are the defaults, as before
    assert options_from(CompareOptions, build_parser().parse_args(["compare"])) == CompareOptions()


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("step = 5\n", r"unknown key 'step'; did you mean 'steps'"),
        ("seeds = 0\n", r"seeds = 0: expected a list"),
        ("lr = 'fast'\n", r"lr = 'fast': expected float"),
        ("arm = 3\n", r"'arm' must hold \[arm.NAME\] tables"),
        ("arms = ['reference', 'abl']\n", r"unknown arm 'abl'.*define it in an \[arm.NAME\] table"),
        ("steps = [\n", r"not valid TOML"),
    ],
)
def test_study_config_errors_name_the_fix(tmp_path, text, message):
    config = tmp_path / "s.toml"
    config.write_text(text)
    with pytest.raises(ValueError, match=message):
        CompareOptions.from_toml(config).validate()
    with pytest.raises(ValueError, match=r"study config .*missing.toml not found"):
        CompareOptions.from_toml(tmp_path / "missing.toml")


def test_comparison_resumes_skipping_finished_runs(tmp_path, monkeypatch):
    """A study killed mid-way: re-running trains only what is not finished, and reports every arm."""
    import shutil

    import torch

    import loopmoe.training
    from loopmoe.compare import runner

    opts = dict(
        TINY_COMPARE,
        seeds=(0, 1),
        arms=("reference", "looped", "granularity"),
        tasks=(),
        text="",
        out=tmp_path / "cmp",
    )
    logs: list[str] = []
    threads: list[int] = []  # --threads 1 is applied (recorded here, so this test process keeps its setting)
    monkeypatch.setattr(torch, "set_num_threads", threads.append)
    first = runner.run_comparison(CompareOptions(**opts), log=logs.append)
    assert threads == [1]
    assert set(first.runs) == {"reference", "looped", "granularity"}
    assert all(set(r) == {0, 1} for r in first.runs.values())
    (session,) = first.runs["looped"][1].cost  # what the run cost: one training session, measured
    assert (session["start_step"], session["end_step"], session["threads"]) == (0, 4, torch.get_num_threads())
    assert session["wall_s"] > 0 and session["peak_rss_mib"] > 50
    report = (tmp_path / "cmp" / "report.md").read_text()
    assert "looped - reference" in report and "looped - granularity" in report and "granularity - reference" in report
    # as if killed during seed 1's granularity run: its folder is gone, everything else finished
    shutil.rmtree(tmp_path / "cmp" / "seed1" / "granularity")
    trained: list[str] = []
    real = loopmoe.training.run_training

    def spy(cfg, run_dir, *args, **kwargs):
        trained.append(str(run_dir))
        return real(cfg, run_dir, *args, **kwargs)

    monkeypatch.setattr(loopmoe.training, "run_training", spy)
    logs.clear()
    second = runner.run_comparison(CompareOptions(**opts), log=logs.append)
    assert trained == [str(tmp_path / "cmp" / "seed1" / "granularity")]
    assert sum("finished earlier, skipped" in line for line in logs) == 5
    assert any(line.startswith("\n[6/6] == training granularity (seed 1") for line in logs)
    for name in ("reference", "looped"):
        assert second.runs[name][1].val_loss == first.runs[name][1].val_loss
    assert second.runs["granularity"][1].val_loss == pytest.approx(first.runs["granularity"][1].val_loss)
    # A torn final export (a file cut short): the run is not finished, and re-running it trains no step
    # but exports final/ again from its last checkpoint, after which it verifies and scores as before.
    weights = tmp_path / "cmp" / "seed0" / "looped" / "final" / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    trained.clear()
    third = runner.run_comparison(CompareOptions(**opts), log=logs.append)
    assert trained == [str(tmp_path / "cmp" / "seed0" / "looped")]
    assert runner.is_finished(tmp_path / "cmp" / "seed0" / "looped", opts["steps"])
    assert third.runs["looped"][0].val_loss == first.runs["looped"][0].val_loss


def test_options_json_without_later_options_still_resumes(tmp_path, monkeypatch):
    """A comparison recorded before --expert-type existed resumes with the default, and a changed expert type is refused."""
    import json

    from loopmoe.compare import runner

    monkeypatch.setattr(runner, "prepare", _stop_before_training)
    with pytest.raises(_Prepared):
        runner.run_comparison(CompareOptions(out=tmp_path), log=lambda *a: None)
    (tmp_path / "seed0").mkdir()
    saved = json.loads((tmp_path / "options.json").read_text())
    old = {k: v for k, v in saved.items() if k not in ("expert_type", "dcca_dim")}
    (tmp_path / "options.json").write_text(json.dumps(old))
    with pytest.raises(_Prepared):
        runner.run_comparison(CompareOptions(out=tmp_path), log=lambda *a: None)
    with pytest.raises(ValueError, match="--expert-type None -> 'dcca'"):
        runner.run_comparison(CompareOptions(out=tmp_path, expert_type="dcca"), log=lambda *a: None)


def test_two_expert_types_compare_at_matched_budgets(tmp_path):
    """--num-loops 1 --expert-type dcca: a SwiGLU Vanilla MoE against a DCCA Vanilla MoE (BigMac's
    experts), balanced, trained, evaluated and reported end to end (a few steps on a tiny corpus)."""
    from transformers import AutoModelForCausalLM

    from loopmoe.compare import runner

    corpus = tmp_path / "corpus"
    corpus.mkdir()
    for i in range(25):  # documents enough to hold 5% out
        (corpus / f"{i}.txt").write_text(f"document {i}: the quick brown fox jumps over the lazy dog\n" * 400)
    opts = CompareOptions(
        out=tmp_path / "cmp",
        source=str(corpus),
        bpe_vocab=300,
        num_loops=1,
        expert_type="dcca",
        seq_len=64,
        micro_batch_size=4,
        steps=4,
        warmup_steps=1,
        eval_every=2,
        eval_batches=1,
        tasks=(),
    )
    results = runner.run_comparison(opts, log=lambda *a: None)
    budget = results.budget
    ref, other = budget["reference"]["config"], budget["looped"]["config"]
    assert (ref["expert_type"], other["expert_type"]) == ("swiglu", "dcca")
    assert other["num_loops"] == 1 and other["dcca_dim"] == ref["hidden_size"] // 4
    assert all(abs(budget["deviations"][k]) <= tol for k, tol in budget["tolerances"].items())
    model = AutoModelForCausalLM.from_pretrained(results.runs["looped"][0].final_dir)
    assert model.config.expert_type == "dcca" and model.model.core[0].mlp.descend is not None
    assert "| expert type" in (opts.out / "report.md").read_text()


def test_a_study_never_writes_over_a_users_file_or_into_a_users_folder(tmp_path, monkeypatch):
    """`results = PATH` and `out` follow the rule of what loopmoe may replace, checked before anything trains."""
    import loopmoe.training

    monkeypatch.setattr(loopmoe.training, "run_training", _stop_before_training)
    notes = tmp_path / "notes.md"
    notes.write_text("my notes\n")
    opts = dict(TINY_COMPARE, tasks=(), text="")
    with pytest.raises(ValueError, match="is not a results page loopmoe wrote"):
        run_comparison(CompareOptions(**opts, out=tmp_path / "cmp", results=notes))
    assert notes.read_text() == "my notes\n" and not (tmp_path / "docs").exists()
    with pytest.raises(ValueError, match="is a folder: give the path"):
        run_comparison(CompareOptions(**opts, out=tmp_path / "cmp", results=tmp_path))
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "thesis.tex").write_text("keep")
    with pytest.raises(ValueError, match="holds no comparison .* and is not empty"):
        run_comparison(CompareOptions(**opts, out=mine))
    assert sorted(p.name for p in mine.iterdir()) == ["thesis.tex"]
    (tmp_path / "a-file").write_text("x")
    with pytest.raises(ValueError, match="is a file, not a folder"):
        run_comparison(CompareOptions(**opts, out=tmp_path / "a-file"))


def test_an_arm_name_too_long_for_a_folder_is_refused_at_validation():
    from loopmoe.compare.arms import check_arm_name

    with pytest.raises(ValueError, match="has 300 characters: use at most 100"):
        check_arm_name("a" * 300)
