"""A decision threshold whose false-positive rate holds on new data, and intervals for rates.

Why not the empirical quantile: the threshold that lets exactly floor(target * n) of n benign
calibration scores through has a true false-positive rate above the target about half the time (the
quantile of a finite sample is itself random). Measured on the built-in held-out split, a 0.05 target
gave 0.079. The rule here is the exact finite-sample one for order statistics: with benign scores
drawn i.i.d. from a continuous distribution, the true false-positive rate of the threshold placed at
the (k+1)-th highest of n benign scores is Beta(k+1, n-k) distributed, so

    P(true FPR > target) = P(Binomial(n, target) <= k).

`conservative_threshold` takes the largest k (the lowest threshold, so the most harmful prompts
flagged) for which that probability is at most 1 - confidence. The scores it is given must come from
prompts the probe did not see when it was fitted (out-of-fold scores); the guarantee is then as good
as the fold models stand in for the final one.

Rates are reported with Wilson score intervals (good coverage at rates near 0 or 1 and small n).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import numpy as np
from scipy.stats import binom, norm

DEFAULT_CONFIDENCE = 0.95


@dataclass(frozen=True)
class ThresholdChoice:
    """The chosen threshold and what backs it.

    threshold:  flag when score > threshold
    allowed:    k, the number of the n benign scores above the threshold
    n_benign:   n
    confidence: 1 - delta; P(true FPR > target) <= delta when `guaranteed`
    guaranteed: False when n is too small for any threshold below the top benign score to reach the
                confidence (the threshold is then the top benign score, k = 0)
    risk:       P(Binomial(n, target) <= k), the probability that the true FPR exceeds the target
    """

    threshold: float
    allowed: int
    n_benign: int
    target_fpr: float
    confidence: float
    guaranteed: bool
    risk: float

    def to_dict(self) -> dict:
        return asdict(self)


def allowed_false_positives(n: int, target_fpr: float, confidence: float = DEFAULT_CONFIDENCE) -> int | None:
    """Largest k with P(Binomial(n, target) <= k) <= 1 - confidence, or None when even k = 0 fails."""
    if n <= 0:
        return None
    delta = 1.0 - confidence
    ks = np.arange(n + 1)
    ok = np.flatnonzero(binom.cdf(ks, n, target_fpr) <= delta + 1e-12)
    return int(ok[-1]) if len(ok) else None


def conservative_threshold(
    scores, labels, target_fpr: float, confidence: float = DEFAULT_CONFIDENCE
) -> ThresholdChoice:
    """The lowest threshold whose true FPR is <= target with probability >= confidence.

    `scores` should be out-of-fold (or otherwise unseen-by-the-probe) probabilities. Ties among the
    benign scores are handled by flagging strictly above the threshold: at most k benign scores lie
    above it.
    """
    scores, labels = np.asarray(scores, dtype=np.float64), np.asarray(labels)
    if not 0.0 < target_fpr < 1.0:
        raise ValueError(f"target_fpr must be strictly between 0 and 1, got {target_fpr}")
    if not 0.5 <= confidence < 1.0:
        raise ValueError(f"confidence must be in [0.5, 1), got {confidence}")
    negatives = np.sort(scores[labels == 0])[::-1]
    n = len(negatives)
    if n == 0:
        raise ValueError("choosing a threshold at a false-positive rate needs benign (label 0) scores")
    k = allowed_false_positives(n, target_fpr, confidence)
    guaranteed = k is not None
    k = k if guaranteed else 0
    threshold = float(min(max(negatives[k], 0.0), 1.0))
    # with ties at the threshold, fewer than k scores may lie strictly above it: report the real count
    above = int((negatives > threshold).sum())
    return ThresholdChoice(
        threshold=threshold, allowed=above, n_benign=n, target_fpr=float(target_fpr), confidence=float(confidence),
        guaranteed=guaranteed, risk=float(binom.cdf(above, n, target_fpr)),
    )


def unseen_source_threshold(
    source_held_out, out_of_fold, labels, target_fpr: float, confidence: float = DEFAULT_CONFIDENCE
) -> ThresholdChoice:
    """`conservative_threshold` on each prompt's score from a probe fitted without its source
    (`probes.transfer.leave_one_source_out`), its out-of-fold score where that is NaN (a source whose removal
    leaves one class, e.g. the only benign one).

    Why: the false-positive rate must hold on sources outside the fit (real traffic), not only on new rows of
    the fitted ones; calibration ships this threshold and the probe-ceiling measurement judges by it.
    """
    source_held_out = np.asarray(source_held_out, dtype=np.float64)
    scores = np.where(np.isnan(source_held_out), np.asarray(out_of_fold, dtype=np.float64), source_held_out)
    return conservative_threshold(scores, labels, target_fpr, confidence)


def wilson_interval(successes: int, n: int, confidence: float = DEFAULT_CONFIDENCE) -> tuple[float, float] | None:
    """Two-sided Wilson score interval for a binomial proportion (None when n == 0)."""
    if n <= 0:
        return None
    z = float(norm.ppf(0.5 + confidence / 2))
    p = successes / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    # exact at the ends: centre - half is 0 only up to rounding when k = 0 (3.5e-18 at n = 100), and a bound on
    # the wrong side of the rate breaks whatever draws it as an error bar
    low = 0.0 if successes == 0 else max(0.0, centre - half)
    high = 1.0 if successes == n else min(1.0, centre + half)
    return low, high


def rate_with_interval(flags, confidence: float = DEFAULT_CONFIDENCE) -> dict:
    """{"rate", "low", "high", "k", "n"} for a boolean array (rate None when empty)."""
    flags = np.asarray(flags, dtype=bool)
    n, k = int(flags.size), int(flags.sum())
    interval = wilson_interval(k, n, confidence)
    return {
        "rate": k / n if n else None,
        "low": interval[0] if interval else None,
        "high": interval[1] if interval else None,
        "k": k,
        "n": n,
    }
