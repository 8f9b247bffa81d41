"""The verdict's wording rules on synthetic paired results: a claim only from >= 3 agreeing seeds whose
95% interval excludes 0; otherwise 'no difference detectable' or 'not established'; one seed is an observation."""

import pytest

from loopmoe.compare.stats import downstream_over_seeds, paired_difference
from loopmoe.compare.verdict import attribution, judge

REF = {0: 5.00, 1: 5.10, 2: 4.95}


def _judge(looped: dict[int, float], b: dict[int, float] = REF, name: str = "reference"):
    return judge("looped", name, paired_difference(looped, b))


def test_a_clear_win_is_claimed():
    finding = _judge({0: 4.90, 1: 5.01, 2: 4.84})  # -0.10, -0.09, -0.11
    assert finding.outcome == "better"
    assert finding.sentence.startswith("looped beats reference on held-out loss by 0.1000 nats/token")
    assert "every seed agrees" in finding.sentence
    worse = _judge({0: 5.10, 1: 5.19, 2: 5.06})
    assert worse.outcome == "worse" and worse.sentence.startswith("reference beats looped")


def test_a_mixed_result_claims_nothing():
    finding = _judge({0: 4.90, 1: 5.15, 2: 4.93})  # -0.10, +0.05, -0.02: the interval includes 0
    assert finding.outcome == "no_difference"
    assert "no difference detectable at 3 seeds" in finding.sentence and "beats" not in finding.sentence
    # the interval excludes 0 but one seed of many disagrees: still not a claim
    ref = dict.fromkeys(range(12), 5.0)
    looped = dict.fromkeys(range(11), 4.9) | {11: 5.01}
    d = paired_difference(looped, ref)
    assert d.excludes_zero()
    disagree = judge("looped", "reference", d)
    assert disagree.outcome == "not_established" and "not every seed agrees" in disagree.sentence


def test_two_agreeing_seeds_are_not_enough():
    finding = _judge({0: 4.90, 1: 5.00}, {0: 5.00, 1: 5.1001})
    assert paired_difference({0: 4.90, 1: 5.00}, {0: 5.00, 1: 5.1001}).excludes_zero()
    assert finding.outcome == "not_established" and "only 2 seeds" in finding.sentence


def test_a_single_seed_is_an_observation():
    finding = _judge({0: 4.90}, {0: 5.00})
    assert finding.outcome == "observation"
    assert "single-seed observation (seed 0)" in finding.sentence and "not a result" in finding.sentence
    assert "beats" not in finding.sentence


def test_attribution_follows_both_findings():
    win = _judge({0: 4.90, 1: 5.01, 2: 4.84})
    none = _judge({0: 4.90, 1: 5.15, 2: 4.93}, name="granularity")
    win_g = judge("looped", "granularity", paired_difference({0: 4.90, 1: 5.01, 2: 4.84}, REF))
    assert "attributable to looping" in attribution(win, win_g)
    assert "cannot be separated from the finer experts" in attribution(win, none)
    assert "does not show that looped helps" in attribution(none, none)
    assert attribution(win, None) is None


def test_downstream_average_and_stderr_over_seeds_by_hand():
    rows = {
        0: [{"task": "copa", "metric": "acc", "value": 0.50, "stderr": 0.05, "n": 100}],
        1: [{"task": "copa", "metric": "acc", "value": 0.56, "stderr": 0.05, "n": 100}],
        2: [{"task": "copa", "metric": "acc", "value": 0.59, "stderr": 0.05, "n": 100}],
    }
    (row,) = downstream_over_seeds(rows)
    # mean 0.55; sample sd sqrt(((-.05)^2 + .01^2 + .04^2) / 2) = sqrt(0.0021); stderr = sd / sqrt(3)
    assert row["value"] == pytest.approx(0.55)
    assert row["stderr"] == pytest.approx((0.0021**0.5) / 3**0.5)
    assert (row["stderr_over"], row["seeds"], row["n"]) == ("seeds", 3, 100)
    (single,) = downstream_over_seeds({0: rows[0]})
    assert (single["value"], single["stderr"], single["stderr_over"]) == (0.50, 0.05, "documents")
