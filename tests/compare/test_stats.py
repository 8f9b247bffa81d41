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


def test_paired_p_value_and_mde_match_scipy():
    from scipy.stats import ttest_rel

    a = {0: 4.80, 1: 4.83, 2: 4.79, 3: 4.85, 4: 4.81}
    b = {0: 4.75, 1: 4.80, 2: 4.77, 3: 4.78, 4: 4.79}
    diff = paired_difference(a, b)
    expected = ttest_rel([a[s] for s in sorted(a)], [b[s] for s in sorted(b)]).pvalue
    assert diff.p_value == pytest.approx(expected, rel=1e-9)
    # MDE: the effect at which the paired t-test has 80% power (noncentral t, by simulation-free check).
    from scipy.stats import nct, t

    mde = diff.mde()
    ncp = mde / (diff.sd / 5**0.5)
    crit = t.ppf(0.975, 4)
    power = nct.sf(crit, 4, ncp) + nct.cdf(-crit, 4, ncp)
    assert 0.75 < power < 0.85  # the usual normal-quantile approximation of the noncentral t
    assert paired_difference({0: 1.0}, {0: 0.5}).p_value is None


def test_holm_step_down():
    from loopmoe.compare.stats import holm

    out = holm({"a": 0.01, "b": 0.04, "c": 0.03, "d": 0.5})
    assert out["a"].adjusted == pytest.approx(0.04) and out["a"].rejected
    assert out["c"].adjusted == pytest.approx(0.09) and not out["c"].rejected
    assert out["b"].adjusted == pytest.approx(0.09)  # monotone: never below an earlier step's
    assert out["d"].adjusted == pytest.approx(0.5)
    # The study-1 headline: p = 0.010 among 7 held-out pairs does not survive (7 x 0.010 > 0.05).
    assert not holm({"headline": 0.010, **{f"other{i}": 0.5 for i in range(6)}})["headline"].rejected


def test_prediction_interval_is_wider_than_the_confidence_interval():
    from loopmoe.compare.stats import prediction_interval

    values = [4.80, 4.83, 4.86]
    low, high = prediction_interval(values)
    assert low < min(values) and high > max(values)
    assert prediction_interval([4.8]) is None
