"""`loopmoe plan --search`: only fitting layouts, balanced shapes, and a cheaper twin ranked first."""

import json

import pytest

from loopmoe.budget import compute_budget
from loopmoe.cli.main import main
from loopmoe.planning import search as search_mod
from loopmoe.planning.cost import plan_step
from loopmoe.planning.hardware import PROFILES, with_overrides
from loopmoe.planning.layout import Layout
from loopmoe.presets import get_preset


@pytest.fixture
def small_grid(monkeypatch):
    monkeypatch.setattr(search_mod, "WIDTHS", (256,))
    monkeypatch.setattr(search_mod, "DEPTHS", (4,))
    monkeypatch.setattr(search_mod, "EXPERTS", (8,))
    monkeypatch.setattr(search_mod, "TOP_K", (2,))
    monkeypatch.setattr(search_mod, "MICRO_BATCHES", (1, 8))


def test_search_returns_only_fitting_layouts_of_balanced_shapes(small_grid):
    target = 4e7
    unlimited = search_mod.search(PROFILES["h100"], 4, target, loops=(1, 2), seq_len=512, global_batch_tokens=2**16)
    assert {c.config.num_loops for c in unlimited} == {1, 2}
    # A device that cannot hold the roomiest layouts: what comes back fits, and the choice changes.
    peaks = [c.plan.memory.peak for c in unlimited]
    small = with_overrides(PROFILES["h100"], memory_bytes=min(peaks) * 1.2)
    found = search_mod.search(small, 4, target, loops=(1, 2), seq_len=512, global_batch_tokens=2**16)
    assert found
    for c in found:
        assert c.plan.fits and c.plan.memory.peak <= small.memory_bytes
        ref = compute_budget(c.reference, 512)
        assert abs(c.plan.total_params / ref.total_params - 1) <= 0.01  # balanced: matched parameters
        assert abs(c.plan.flops_per_token / ref.flops_per_token - 1) <= 0.01  # ... and FLOPs per token
    # ranked by model FLOPs trained per second; a looped shape carries its speed relative to its reference
    assert [c.flops_per_s for c in found] == sorted((c.flops_per_s for c in found), reverse=True)
    speed = {id(c.config): c.plan.tokens_per_s for c in found if c.config.num_loops == 1}
    for c in found:
        if id(c.reference) in speed:
            assert c.vs_reference == pytest.approx(c.plan.tokens_per_s / speed[id(c.reference)])
    assert any(c.config.num_loops == 2 and c.vs_reference is not None for c in found)


def test_a_strictly_cheaper_twin_ranks_first():
    cfg = get_preset("debug", num_loops=4, num_core_layers=1)
    hw = PROFILES["a100"]
    # Same model, same work; the twin reshards the core after every use: 2T gathers instead of T.
    costly = plan_step(cfg, Layout(devices=16, strategy="fsdp2", reshard_after_forward=True), hw)
    cheap = plan_step(cfg, Layout(devices=16, strategy="fsdp2", reshard_after_forward=False), hw)
    assert cheap.compute.total == costly.compute.total
    assert cheap.comm.collectives["all_gather"] < costly.comm.collectives["all_gather"]
    assert search_mod.rank([costly, cheap])[0] is cheap
    # Unless it does not fit: ranking never returns a layout over the device's memory.
    tight = with_overrides(hw, memory_bytes=(cheap.memory.peak + costly.memory.peak) / 2)
    assert cheap.memory.peak > costly.memory.peak
    ranked = search_mod.rank([plan_step(cfg, p.layout, tight) for p in (costly, cheap)])
    assert [p.layout.reshard_after_forward for p in ranked] == [True]


def test_search_cli_json_and_plot(small_grid, tmp_path, capsys):
    plot = tmp_path / "pareto.png"
    argv = [
        "plan",
        "--search",
        "--hardware",
        "h100",
        "--devices",
        "4",
        "--total-params",
        "4e7",
        "--num-loops",
        "1,2",
        "--seq-len",
        "512",
        "--global-batch-tokens",
        "65536",
        "--plot",
        str(plot),
        "--json",
    ]
    assert main(argv) == 0
    captured = capsys.readouterr()
    data = json.loads(captured.out)
    assert data["candidates"] and plot.stat().st_size > 1000
    assert "simulating 2 shapes" in captured.err  # said before the minutes of simulation, not after
    # the table: ranked by model FLOP/s, each looped shape against its reference, and a legend of the columns
    assert main(argv[:-1]) == 0
    table = capsys.readouterr().out
    assert "most model FLOPs per second" in table and "| vs T=1 |" in table and "FLOP/s: model FLOPs" in table
    assert main(["plan", "--search", "--hardware", "h100"]) == 2
    assert "--total-params" in capsys.readouterr().err


def test_search_loops_is_num_loops_with_a_deprecation_note(small_grid, tmp_path, capsys):
    argv = ["plan", "--search", "--hardware", "h100", "--devices", "4", "--total-params", "4e7", "--seq-len", "512"]
    argv += ["--global-batch-tokens", "65536", "--plot", str(tmp_path / "p.png"), "--json"]
    assert main([*argv, "--num-loops", "2"]) == 0
    spelled = capsys.readouterr()
    assert "deprecated" not in spelled.err
    assert main([*argv, "--loops", "2"]) == 0  # the old spelling still works ...
    old = capsys.readouterr()
    assert "--loops is deprecated" in old.err and "--num-loops" in old.err  # ... and says what to write instead
    assert json.loads(old.out)["candidates"] == json.loads(spelled.out)["candidates"]
    assert {c["num_loops"] for c in json.loads(spelled.out)["candidates"]} == {2}
    assert main([*argv, "--num-loops", "0,2"]) == 2
    assert "--num-loops must be positive" in capsys.readouterr().err


def test_search_derives_the_looped_model_loopmoe_budget_derives(monkeypatch, tmp_path, capsys):
    # A reference at GPU-cluster scale (where `budget` puts experts and heads on the hardware grid):
    # `plan --search` and `loopmoe budget` on that reference give one looped model.
    monkeypatch.setattr(search_mod, "WIDTHS", (2048,))
    monkeypatch.setattr(search_mod, "DEPTHS", (12,))
    monkeypatch.setattr(search_mod, "EXPERTS", (64,))
    monkeypatch.setattr(search_mod, "TOP_K", (8,))
    [(looped, ref)] = [(c, r) for c, r in search_mod.shapes(3e9, (2,), 2048)]
    path = tmp_path / "reference.json"
    path.write_text(json.dumps(ref.architecture_dict()))
    assert main(["budget", str(path), "--num-loops", "2", "--seq-len", "2048", "--json"]) == 0
    budget_looped = json.loads(capsys.readouterr().out)["looped"]["config"]
    assert budget_looped == json.loads(json.dumps(looped.architecture_dict()))
    assert looped.num_experts % 8 == 0 and looped.head_dim % 16 == 0  # the hardware grid


# --- Reliability round 2 (P19): every --search option that cannot work is one line, before any simulation --


@pytest.mark.parametrize(
    "flags, message",
    [
        (["--top", "-1"], "--top -1: the table needs at least one row"),
        (["--top", "0"], "--top 0"),
        (["--global-batch-tokens", "0"], "--global-batch-tokens 0 is less than one sequence per device"),
        (["--seq-len", "0"], "--seq-len must be >= 1"),
        (["--devices", "-1"], "--devices must be >= 1"),
        (["--flops-per-token", "nan"], "--flops-per-token nan"),
        (["--num-loops", "100000"], "--num-loops 100000: a loop count must divide a core depth"),
        (["--loops", "7"], "--num-loops 7: a loop count must divide a core depth"),
        (["--total-params", "1e8"], "--search covers about"),
        (["--total-params", "inf"], "--total-params inf: must be a positive finite number"),
    ],
)
def test_search_options_that_cannot_work_are_one_line(tmp_path, capsys, monkeypatch, flags, message):
    monkeypatch.setattr(search_mod, "plan_step", lambda *a, **k: pytest.fail("simulated before refusing"))
    argv = ["plan", "--search", "--hardware", "h100", "--total-params", "1e9", "--plot", str(tmp_path / "p.png")]
    assert main([*argv, *flags]) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err, err
    assert not (tmp_path / "p.png").exists()


def test_search_plot_that_is_a_folder_is_refused_before_the_search(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(search_mod, "plan_step", lambda *a, **k: pytest.fail("simulated before refusing"))
    assert main(["plan", "--search", "--hardware", "h100", "--total-params", "1e9", "--plot", str(tmp_path)]) == 2
    assert "--plot" in capsys.readouterr().err


def test_loop_counts_the_grid_cannot_build_are_named_and_the_rest_searched(small_grid):
    with pytest.warns(UserWarning, match="--num-loops 3: a loop count must divide"):
        found = search_mod.search(PROFILES["h100"], 4, 4e7, loops=(1, 3), seq_len=512, global_batch_tokens=2**16)
    assert found and {c.config.num_loops for c in found} == {1}
