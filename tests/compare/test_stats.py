"""Paired statistics against values computed by hand."""

import math

import pytest

from loopmoe.compare.stats import mean_stderr, paired_difference, t_quantile


def test_paired_difference_matches_hand_computation():
    a = {0: 5.00, 1: 5.10, 2: 4.90, 3: 7.0}  # seed 3 has no partner: left out
    b = {0: 5.10, 1: 5.15, 2: 5.05}
    d = paired_difference(a, b)
    # differences -0.10, -0.05, -0.15: mean -0.10, sd sqrt(((0)^2 + 0.05^2 + 0.05^2) / 2) = 0.05
    assert d.per_seed == pytest.approx({0: -0.10, 1: -0.05, 2: -0.15})
    assert d.n == 3 and d.mean == pytest.approx(-0.10) and d.sd == pytest.approx(0.05)
    # t_{0.975, 2} = 4.302653; half width 4.302653 * 0.05 / sqrt(3) = 0.124207
    assert t_quantile(0.975, 2) == pytest.approx(4.302653, abs=1e-6)
    assert d.ci95 == pytest.approx((-0.10 - 0.124207, -0.10 + 0.124207), abs=1e-6)
    assert not d.excludes_zero()
    tight = paired_difference({0: 1.0, 1: 2.0, 2: 3.0}, {0: 1.5, 1: 2.4, 2: 3.6})  # -0.5, -0.4, -0.6
    assert tight.ci95[1] < 0 and tight.excludes_zero()


def test_one_seed_has_no_interval_and_no_shared_seed_is_an_error():
    d = paired_difference({0: 2.0}, {0: 1.5, 1: 1.0})
    assert (d.n, d.mean, d.sd, d.ci95) == (1, 0.5, None, None) and not d.excludes_zero()
    with pytest.raises(ValueError, match="no seed in common"):
        paired_difference({0: 1.0}, {1: 1.0})


def test_mean_stderr():
    assert mean_stderr([0.5]) == (0.5, None)
    mean, stderr = mean_stderr([0.2, 0.4, 0.6])
    assert mean == pytest.approx(0.4) and stderr == pytest.approx(0.2 / math.sqrt(3))
