"""The README's commands work as written (cheap ones run for real; the main job on a tiny budget)."""

import re
import shlex
from pathlib import Path

import pytest

from loopmoe.cli.main import main, parse_args
from loopmoe.paths import shared_data_dir

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text()
BASH_BLOCKS = re.findall(r"```bash\n(.*?)```", README, flags=re.S)
# Commands that need artefacts of earlier runs (a trained model, a Qwen checkpoint) or are the
# multi-minute jobs themselves: parsed here, exercised by their own tests.
PARSE_ONLY = (
    "loopmoe eval",
    "loopmoe convert",
    "loopmoe export",
    "loopmoe generate",
    "loopmoe serve",  # a server runs until stopped: tests/serving and tests/cli/test_serve.py
    "loopmoe train configs/debug.toml --out",
    "loopmoe compare --config",
    "loopmoe plan configs/debug.toml --hardware cpu",  # calibrates this machine (~1 min): tests/planning
    "loopmoe plan --search",  # a minute of search: tests/planning
    "loopmoe compare --num-loops 1 --expert-type dcca",  # tests/compare/test_runner.py runs it on a tiny corpus
)
TINY_COMPARE = [
    "--steps",
    "6",
    "--warmup-steps",
    "1",
    "--eval-every",
    "3",
    "--eval-batches",
    "2",
    "--tasks",
    "copa",
    "--task-limit",
    "4",
    "--text-tokens",
    "1000",
]


def readme_commands() -> list[str]:
    commands = []
    for block in BASH_BLOCKS:
        for line in block.replace("\\\n", " ").splitlines():
            line = line.split("  #")[0].strip()
            if line.startswith("loopmoe ") or line.startswith("torchrun "):
                commands.append(line)
    return commands


def test_first_lines_are_setup_plus_main_job_and_tests():
    setup, tests = BASH_BLOCKS[0].strip().splitlines()
    assert "pip install -e" in setup and setup.endswith("loopmoe compare")
    assert tests == "python -m pytest -q"
    assert tests in (ROOT / ".ci" / "run").read_text()


@pytest.mark.parametrize("command", readme_commands())
def test_readme_command(command, tmp_path, monkeypatch, capsys):
    argv = shlex.split(command)
    if argv[0] == "torchrun":
        argv = argv[argv.index("loopmoe") + 1 :]
    else:
        argv = argv[1:]
    parse_args(argv)  # every command parses, as `loopmoe` parses it
    if any(command.startswith(p) for p in PARSE_ONLY) or (argv[0] == "train" and "--dry-run" not in argv):
        return
    monkeypatch.chdir(tmp_path)
    (tmp_path / "configs").symlink_to(ROOT / "configs")
    if argv[0] == "compare":
        if "--steps" in argv:  # the longer variants: the default one stands for them
            pytest.skip("a longer variant of the default comparison")
        argv += [*TINY_COMPARE, "--out", str(tmp_path / "cmp")]
        data = shared_data_dir()
        if data is None or not (data / "copa").is_dir():  # a fresh clone without the data folder: no tasks
            argv[argv.index("copa")] = ""
    assert main(argv) == 0, capsys.readouterr().err
    if argv[0] == "compare":
        report = (tmp_path / "cmp" / "report.md").read_text()
        assert "held-out loss" in report and (tmp_path / "cmp" / "loss.png").is_file()


def test_readme_python_example():
    code = re.findall(r"## Python\n.*?```python\n(.*?)```", README, flags=re.S)[0]
    exec(compile(code, "README.md", "exec"), {})


def test_readme_compare_python_api(tmp_path, monkeypatch, capsys):
    """The README's `run_comparison(CompareOptions(...))` example runs as written, at a tiny size."""
    import dataclasses

    import loopmoe.compare

    code = re.findall(r"The same comparison from Python.*?```python\n(.*?)```", README, flags=re.S)[0]
    real = loopmoe.compare.run_comparison
    tiny = dict(reference="debug", bpe_vocab=300, seq_len=32, micro_batch_size=2, steps=3, warmup_steps=1)
    tiny |= dict(eval_every=3, eval_batches=1, tasks=(), text="", depth_loops=(1, 3), threads=1)
    monkeypatch.setattr(loopmoe.compare, "run_comparison", lambda o: real(dataclasses.replace(o, **tiny)))
    monkeypatch.chdir(tmp_path)
    exec(compile(code, "README.md", "exec"), {})
    printed = capsys.readouterr().out.splitlines()
    assert [line.split()[0] for line in printed[-4:-1]] == ["reference", "looped", "granularity"]
    assert printed[-1] == "[]" and (tmp_path / "runs" / "api" / "report.md").is_file()


@pytest.mark.parametrize(
    ("paragraph", "page"),
    [("**What study 1 found", "docs/study/v1/RESULTS.md"), ("**What study v2 found", "RESULTS.md")],
)
def test_the_study_numbers_the_readme_quotes_are_the_results_page_s(paragraph, page):
    """Every 95% interval a README study paragraph quotes is one of its results page's, rounded: the
    README cannot go stale when the study's page is regenerated."""
    results = (ROOT / page).read_text()
    intervals = {
        (round(float(lo), 3), round(float(hi), 3))
        for lo, hi in re.findall(r"\[([+-]\d+\.\d{4}), ([+-]\d+\.\d{4})\]", results)
    }
    found = README[README.index(paragraph) :].split("\n\n")[0]
    quoted = re.findall(r"\[([+−-]\d\.\d{3}), ([+−-]\d\.\d{3})\]", found)
    assert len(quoted) >= 2
    for lo, hi in quoted:
        pair = tuple(round(float(v.replace("−", "-")), 3) for v in (lo, hi))
        assert pair in intervals, f"README quotes [{lo}, {hi}], which {page} does not give"


def test_the_expert_shapes_the_readme_quotes_are_the_default_comparison_s():
    """The arms section quotes the looped and control expert shapes of the default `loopmoe compare`."""
    from loopmoe.compare import CompareOptions
    from loopmoe.compare.arms import resolve_arms
    from loopmoe.presets import load_model_config

    opts = CompareOptions(arms=("reference", "looped", "granularity")).validate()
    arms = resolve_arms(opts, load_model_config(opts.reference, vocab_size=opts.bpe_vocab))
    ref, looped, control = (arms[n].config for n in ("reference", "looped", "granularity"))
    quoted = (
        f"default {opts.bpe_vocab}-token vocabulary, `{opts.reference}`'s {ref.num_experts} x "
        f"{ref.moe_intermediate_size} become {looped.num_experts} x {looped.moe_intermediate_size} under the "
        f"default `{opts.strategy}`"
    )
    assert quoted in " ".join(README.split())
    assert f"({control.num_experts} x {control.moe_intermediate_size};" in README
