"""The stated uncertainty of `loopmoe plan` on a CPU: the errors bench.plan_vs_measured recorded here."""

import json

import pytest

from loopmoe.cli.main import main
from loopmoe.planning import calibration, validation
from tests.planning.test_cost import _valid_calibration


@pytest.fixture
def cache(tmp_path, monkeypatch):
    """A calibrated machine (a valid calibration in a private cache) with no validation yet."""
    monkeypatch.setenv("LOOPMOE_CACHE_DIR", str(tmp_path))
    calibration.save_calibration(_valid_calibration())
    return tmp_path


def test_a_validation_round_trips_and_gives_the_measured_range(cache):
    path = validation.save_validation({"a": -0.2, "b": -0.1, "c": 0.0}, "2026-12-07")
    assert path.parent == cache and path != calibration.cache_path()
    record = validation.load_validation()
    assert record is not None and record["time_errors"] == {"a": -0.2, "b": -0.1, "c": 0.0}
    stated = validation.uncertainty(8000.0, record)
    # predicted / measured - 1 in [-0.2, 0]: measured in [8000, 8000 / 0.8]
    assert stated["validated"] and stated["tokens_per_s_range"] == pytest.approx([8000.0, 10000.0])
    assert stated["median_error"] == pytest.approx(-0.1)
    assert (
        stated["text"]
        == "3 measured runs here (2026-12-07): 20% low to 0%, median 10% low; expect 8,000 to 10,000 tokens/s"
    )


@pytest.mark.parametrize(
    "edit",
    [
        lambda r: r.update(isa="another ISA"),  # another machine: its errors say nothing here
        lambda r: r.update(torch="0.0"),
        lambda r: r.update(version=0),
        lambda r: r["time_errors"].update(a="x"),  # hand-edited
        lambda r: r["time_errors"].update(a=-1.5),  # a measured rate below zero
        lambda r: r.update(time_errors={}),
        lambda r: r.update(process_spread={"a": -0.1}),  # a slowest process faster than the fastest
        lambda r: r.update(process_spread={"a": float("nan")}),
        lambda r: r.update(process_spread={"a": True}),
        lambda r: r.pop("process_spread"),
        lambda r: r.update(calibration_version=3),  # errors of an older calibration procedure's predictions
    ],
)
def test_a_record_of_another_machine_or_a_broken_one_is_not_used(cache, edit):
    path = validation.save_validation({"a": -0.2}, "2026-12-07")
    record = json.loads(path.read_text())
    edit(record)
    path.write_text(json.dumps(record))
    assert validation.load_validation() is None
    path.write_text("{torn")
    assert validation.load_validation() is None


def test_slower_processes_widen_the_low_end(cache):
    """A process that ran 25% slower than the fastest of its configuration: the low end allows for it."""
    validation.save_validation({"a": -0.2, "b": 0.0}, "2026-12-07", {"a": 0.25, "b": 0.05})
    stated = validation.uncertainty(8000.0, validation.load_validation())
    assert stated["tokens_per_s_range"] == pytest.approx([8000.0 / 1.25, 10000.0])
    assert "a process ran up to 25% slower than another of the same run; expect 6,400 to 10,000" in stated["text"]


def test_bad_errors_are_refused_when_saved(cache):
    with pytest.raises(ValueError, match="finite and above -1"):
        validation.save_validation({"a": float("nan")}, "2026-12-07")
    with pytest.raises(ValueError, match="finite and above -1"):
        validation.save_validation({}, "2026-12-07")


def test_plan_states_its_uncertainty_or_that_the_machine_was_never_validated(cache, capsys):
    assert main(["plan", "configs/debug.toml"]) == 0
    assert "not validated on this machine" in capsys.readouterr().out
    validation.save_validation({"a": -0.3, "b": -0.05}, "2026-12-07")
    assert main(["plan", "configs/debug.toml", "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    low, high = data["uncertainty"]["tokens_per_s_range"]
    assert low == pytest.approx(data["tokens_per_s"] / 0.95) and high == pytest.approx(data["tokens_per_s"] / 0.7)
    assert main(["plan", "configs/debug.toml", "--hardware", "h100"]) == 0
    assert "a spec-sheet profile, not checked" in capsys.readouterr().out
