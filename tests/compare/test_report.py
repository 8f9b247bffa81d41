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
