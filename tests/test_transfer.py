"""Leave one source / category out, per-category rates, and the choice of feature by transfer."""

import numpy as np

from sasa_patcher.probes.datasets import Prompt
from sasa_patcher.probes.probe import make_estimator
from sasa_patcher.probes.transfer import (
    choose_by_transfer,
    leave_one_category_out,
    leave_one_source_out,
    per_category_rates,
)


def test_leave_one_source_out_holds_out_whole_sources():
    prompts = []
    for source, label in (("alpha", 1), ("beta", 1), ("gamma", 0), ("delta", 0), ("mixed", 0), ("mixed", 1)):
        prompts += [Prompt(text=f"{source} request {i} {label}", label=label, source=source, form="question")
                    for i in range(12)]
    y = np.asarray([p.label for p in prompts])
    X = np.random.default_rng(0).normal(size=(len(prompts), 12))
    X[:, :2] += 3.0 * y[:, None]  # the label, whatever the source
    calibration = np.arange(len(prompts)) % 4 != 0
    result = leave_one_source_out(X, prompts, calibration, C=1.0)
    assert set(result["per_source"]) == {"alpha", "beta", "gamma", "delta", "mixed"}
    alpha = result["per_source"]["alpha"]
    assert alpha["complemented_with_heldout"] and alpha["n_test_harmful"] == 12
    assert alpha["n_test_benign"] == int(((~calibration) & (y == 0)).sum())
    assert not result["per_source"]["mixed"]["complemented_with_heldout"]
    assert result["mean_auroc"] > 0.9 and result["min_auroc"] <= result["mean_auroc"]
    # every prompt scored by the fit that never saw its source: the same as a fit without that source
    sources = np.asarray([p.source for p in prompts])
    train = calibration & (sources != "alpha")
    alone = make_estimator(1.0).fit(X[train], y[train]).predict_proba(X[sources == "alpha"])[:, 1]
    np.testing.assert_allclose(result["scores"][sources == "alpha"], alone, rtol=1e-6)
    assert not np.isnan(result["scores"]).any()


def category_prompts():
    """Harmful prompts of three hazards, each with look-alikes, plus everyday benign prompts.

    Feature 0 carries the shared "harm" signal; feature 1 fires only for hate prompts (a probe trained
    without hate cannot use it), feature 2 only for privacy look-alikes.
    """
    rng = np.random.default_rng(1)
    prompts, rows = [], []
    for category in ("violent_crimes", "hate", "privacy", "everyday"):
        for label in (1, 0):
            if category == "everyday" and label == 1:
                continue
            for i in range(20):
                prompts.append(Prompt(text=f"{category} {label} {i}", label=label, source=f"src-{i % 3}",
                                      form="question", category=category))
                x = rng.normal(size=6)
                x[0] += 3.0 * label
                rows.append(x)
    return prompts, np.asarray(rows)


def test_leave_one_category_out_scores_each_hazard_against_benign_traffic():
    prompts, X = category_prompts()
    calibration = np.arange(len(prompts)) % 3 != 0
    result = leave_one_category_out(X, prompts, calibration, C=1.0)
    assert list(result["per_category"]) == ["violent_crimes", "hate", "privacy"]  # taxonomy order, hazards only
    hate = result["per_category"]["hate"]
    heldout_benign_elsewhere = sum(1 for p, c in zip(prompts, calibration, strict=True)
                                   if not c and p.label == 0 and p.category != "hate")
    assert hate["n_test_harmful"] == 20 and hate["n_test_benign"] == 20 + heldout_benign_elsewhere
    assert result["mean_auroc"] > 0.9


def test_per_category_rates_have_intervals():
    prompts, _ = category_prompts()
    scores = np.asarray([0.9 if p.label else 0.1 for p in prompts])
    scores[0] = 0.2  # one violent prompt missed
    rates = per_category_rates(scores, prompts, threshold=0.5)
    violent = rates["tpr"]["violent_crimes"]
    assert violent["k"] == 19 and violent["n"] == 20 and violent["low"] < 0.95 < violent["high"]
    assert set(rates["fpr"]) == {"violent_crimes", "hate", "privacy", "everyday"}
    assert all(value["rate"] == 0.0 for value in rates["fpr"].values())
    assert set(rates["fpr_by_source"]) == {"src-0", "src-1", "src-2"}


def test_feature_is_chosen_by_transfer_not_by_cv():
    figures = {
        "projected-logits": {"cv_auroc": 0.99, "transfer_auroc": 0.75},
        "multi-layer": {"cv_auroc": 0.97, "transfer_auroc": 0.86},
        "hidden": {"cv_auroc": 0.98, "transfer_auroc": 0.86},
    }
    assert choose_by_transfer(figures) == "hidden"  # the best CV loses on transfer; a tie on transfer: higher CV
    figures["hidden"]["cv_auroc"] = 0.97
    assert choose_by_transfer(figures) == "hidden"  # full tie: PROBE_FEATURES order
    figures["multi-layer"]["transfer_auroc"] = 0.87
    assert choose_by_transfer(figures) == "multi-layer"
