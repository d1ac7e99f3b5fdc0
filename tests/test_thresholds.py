"""The threshold rule honours the target FPR on scores of known distribution; Wilson intervals."""

import numpy as np
import pytest
from scipy.stats import norm

from sasa_patcher.probes.thresholds import (
    allowed_false_positives,
    conservative_threshold,
    rate_with_interval,
    wilson_interval,
)


@pytest.mark.parametrize("n_benign,target", [(200, 0.05), (420, 0.05), (1000, 0.01)])
def test_true_fpr_exceeds_the_target_at_most_one_minus_confidence_of_the_time(n_benign, target):
    """Benign scores ~ N(0, 1): the true FPR of threshold t is 1 - Phi(t). Over many draws it may exceed the
    target in at most ~5% of them (binomial slack for 2000 draws), where the empirical quantile does ~50%."""
    rng = np.random.default_rng(0)
    draws, violations, naive = 2000, 0, 0
    for _ in range(draws):
        benign = rng.normal(size=n_benign)
        scores = np.concatenate([benign, rng.normal(2.0, 1.0, size=50)])
        labels = np.concatenate([np.zeros(n_benign), np.ones(50)])
        choice = conservative_threshold(1 / (1 + np.exp(-scores)), labels, target, confidence=0.95)
        assert choice.guaranteed
        t = np.log(choice.threshold / (1 - choice.threshold))  # back to the normal scale
        violations += norm.sf(t) > target
        empirical = np.sort(benign)[::-1][int(np.floor(target * n_benign))]
        naive += norm.sf(empirical) > target
    assert violations / draws <= 0.05 + 3 * np.sqrt(0.05 * 0.95 / draws)
    assert naive / draws > 0.3  # the rule it replaces does break the target often


def test_small_samples_are_flagged_as_not_guaranteed():
    assert allowed_false_positives(20, 0.05) is None  # 0.95^20 = 0.36 > 0.05
    choice = conservative_threshold([0.1, 0.2, 0.3, 0.9], [0, 0, 0, 1], 0.05)
    assert not choice.guaranteed and choice.threshold == pytest.approx(0.3) and choice.allowed == 0
    assert allowed_false_positives(420, 0.05) < 21  # fewer than the empirical floor(0.05 * 420)


def test_ties_report_the_real_count_above():
    choice = conservative_threshold([0.5] * 100 + [0.9], [0] * 100 + [1], 0.05)
    assert choice.threshold == 0.5 and choice.allowed == 0


def test_wilson_interval():
    low, high = wilson_interval(5, 100)
    assert 0.02 < low < 0.05 < high < 0.12
    assert wilson_interval(0, 0) is None
    assert wilson_interval(0, 10)[0] == 0.0
    # exact at the ends, whatever the rounding (k = 0 of 100 gave a lower bound of 3.5e-18 above the rate)
    assert all(wilson_interval(0, n)[0] == 0.0 and wilson_interval(n, n)[1] == 1.0 for n in range(1, 400))
    rate = rate_with_interval([True, False, False, False])
    assert rate["rate"] == 0.25 and rate["k"] == 1 and rate["n"] == 4 and rate["low"] < 0.25 < rate["high"]
