"""Pieces of the comparison report that its end-to-end tests do not pin down."""

from loopmoe.compare.figures import COLORS, color_of
from loopmoe.compare.report import _mean_spread


def test_every_arm_of_a_full_study_gets_its_own_colour():
    names = ["reference", "looped", "granularity", "looped-T4", "granularity-T4"]
    names += [f"cond-{c}" for c in ("none", "iter_embedding", "adaln_iter", "adaln_token")]
    names += ["balance-naive", "norm-sandwich", "extra-1", "extra-2", "extra-3", "extra-4"]
    colours = [color_of(n, names) for n in names]
    assert len(set(colours)) == len(names)
    assert all(color_of(n, names) == c for n, c in COLORS.items())  # the built-in arms keep theirs


def test_scores_print_at_the_precision_their_size_calls_for():
    assert _mean_spread([4.7840, 4.7763, 4.7518]) == "4.7707 ± 0.0168"
    assert _mean_spread([891.2, 830.0, 887.0]) == "869.4 ± 34.2"  # the spread at the mean's precision
    assert _mean_spread([5_148_167.2, 4_950_000.0]) == "5,049,084 ± 140,125"
    assert _mean_spread([0.5]) == "0.5000"


def _stored(exit_sweep: bool):
    """tests/compare/test_results' stored study, with an exit sweep on both seeds of its looped arm or without."""
    import copy
    import json

    from loopmoe.compare.results import StudyResults
    from tests.compare.test_results import STORED

    raw = copy.deepcopy(STORED)
    for seed, offset in (("0", 0.0), ("1", 0.02)) if exit_sweep else ():
        raw["runs"]["looped"][seed]["eval"]["exit_sweep"] = [
            {
                "criterion": "latent",
                "threshold": threshold,
                "min_loops": 1,
                "max_loops": 2,
                "loss": 5.0 + threshold + offset,
                "mean_loops": 1.5 - threshold - offset,
                "flops_per_token": 1e6 * (1.5 - threshold - offset),
                "flops_fraction": (1.5 - threshold - offset) / 2,
            }
            for threshold in (0.1, 0.03)
        ]
    return StudyResults.from_dict(json.loads(json.dumps(raw)))


def test_the_report_shows_the_exit_sweep_of_a_looped_arm_beside_its_depth_curve(tmp_path):
    from loopmoe.compare.report import report_lines

    page = "\n".join(report_lines(_stored(exit_sweep=True), "", tmp_path))
    section = page.split("### Adaptive depth (early exit)")[1].split("## Cost")[0]
    # means over the two seeds, against the same arm's mean at its trained T (5.0 and 5.11)
    assert (
        "| looped | latent:0.1  |     2 |        5.1100 |      +0.0550 |       1.390 of 2 |       1.39M |   69.5% |"
        in section
    )
    assert (
        "| looped | latent:0.03 |     2 |        5.0400 |      -0.0150 |       1.460 of 2 |       1.46M |   73.0% |"
        in section
    )
    assert "reference" not in section  # a Vanilla MoE has no sweep
    for figure in ("depth.png", "loss_vs_flops.png"):
        assert (tmp_path / figure).stat().st_size > 1000
    assert "Adaptive depth" not in "\n".join(report_lines(_stored(exit_sweep=False), "", tmp_path))
