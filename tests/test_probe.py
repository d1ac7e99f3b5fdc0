"""Probe fitting, folding into the graph's ProbeHead, threshold, figures, feature choice, digest."""

from __future__ import annotations

import dataclasses
import math

import numpy as np
import pytest
import torch
from sklearn.linear_model import LogisticRegression
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler

from sasa_patcher.modeling_sasa import ProbeHead
from sasa_patcher.probes.datasets import Prompt
from sasa_patcher.probes.probe import (
    cross_validate,
    data_digest,
    fit_probe,
    graph_scores,
    operating_point,
    select_feature,
    write_probe,
)
from tiny_calibration import patched_tiny, synthetic_prompts, tiny_processor, write_image


def synthetic_features(n: int, d: int, seed: int = 0, signal: float = 1.0):
    rng = np.random.default_rng(seed)
    labels = (np.arange(n) % 2).astype(np.int64)
    X = rng.normal(size=(n, d)) * rng.uniform(0.1, 5.0, size=d) + rng.normal(size=d) * 10
    X[:, : max(1, d // 10)] += signal * labels[:, None]
    return X.astype(np.float32), labels


@pytest.mark.parametrize("n,d", [(60, 200), (120, 16)])  # more features than rows (row-space basis), and fewer
def test_folded_probe_head_reproduces_sklearn_predict_proba(n, d):
    X, y = synthetic_features(n, d)
    fit = fit_probe(X, y, Cs=[1e-3, 1e-1, 10.0], folds=3)
    head = ProbeHead(d)
    with torch.no_grad():
        head.linear.weight.copy_(torch.as_tensor(fit.weight).reshape(1, -1))
        head.linear.bias.fill_(fit.bias)
    X_new, _ = synthetic_features(40, d, seed=1)
    expected = fit.pipeline.predict_proba(X_new.astype(np.float64))[:, 1]
    with torch.no_grad():
        got = head(torch.as_tensor(X_new)).double().numpy()
    assert np.abs(got - expected).max() <= 1e-5
    assert np.abs(fit.predict_proba(X_new) - expected).max() <= 1e-9


def test_row_space_fit_equals_the_plain_fit():
    """Fitting in the rows' span is a speed-up, not an approximation."""
    X, y = synthetic_features(40, 300, seed=3)
    fit = fit_probe(X, y, Cs=[0.05], folds=3)
    plain = make_pipeline(
        StandardScaler(), LogisticRegression(C=0.05, class_weight="balanced", max_iter=20000, tol=1e-10)
    ).fit(X, y)
    X_new, _ = synthetic_features(30, 300, seed=4)
    assert np.abs(fit.pipeline.predict_proba(X_new) - plain.predict_proba(X_new)).max() <= 1e-4


def test_cross_validation_is_seeded_and_picks_a_grid_value():
    X, y = synthetic_features(80, 30, signal=4.0)
    groups = [f"g{i // 2}" for i in range(80)]
    first = cross_validate(X, y, groups, Cs=[1e-3, 1.0], folds=4, seed=7)
    second = cross_validate(X, y, groups, Cs=[1e-3, 1.0], folds=4, seed=7)
    assert first.auroc_by_C == second.auroc_by_C
    assert np.array_equal(first.oof_scores, second.oof_scores)
    assert first.Cs[first.best_index] in (1e-3, 1.0)
    assert min(first.auroc_by_C) > 0.8


def test_operating_point_counts():
    scores = np.array([0.9, 0.8, 0.3, 0.7, 0.2, 0.1])
    labels = np.array([1, 1, 1, 0, 0, 0])
    point = operating_point(scores, labels, 0.5)
    assert point["tpr"] == pytest.approx(2 / 3) and point["fpr"] == pytest.approx(1 / 3)
    assert point["auroc"] == pytest.approx(8 / 9)
    assert (point["n_harmful"], point["n_benign"]) == (3, 3)


def test_feature_selection_records_every_candidate_and_picks_the_informative_one():
    X, y = synthetic_features(80, 20, signal=6.0)
    noise = np.random.default_rng(5).normal(size=(80, 20)).astype(np.float32)
    choice = select_feature({"projected-logits": noise, "logits": X, "hidden": noise[:, :5]}, y,
                            Cs=[1e-2, 1.0], folds=3)
    assert choice.name == "logits"
    assert set(choice.figures) == {"projected-logits", "logits", "hidden"}
    assert choice.figures["logits"]["cv_auroc"] > choice.figures["hidden"]["cv_auroc"]
    assert choice.figures["hidden"]["dim"] == 5


def test_feature_selection_ties_go_to_the_paper_feature():
    X, y = synthetic_features(40, 10, signal=50.0)
    choice = select_feature({"logits": X, "projected-logits": X.copy()}, y, Cs=[1.0], folds=3)
    assert choice.name == "projected-logits"


def test_digest_covers_text_label_and_image_bytes(tmp_path):
    image = write_image(tmp_path / "a.png", 0)
    prompts = [Prompt("one thing", 0, "s", "imperative"), Prompt("other thing", 1, "s", "imperative", image=image)]
    digest = data_digest(prompts)
    assert digest == data_digest(prompts[::-1])
    assert digest != data_digest([dataclasses.replace(prompts[0], label=1), prompts[1]])
    assert digest != data_digest([dataclasses.replace(prompts[0], text="one thing!"), prompts[1]])
    write_image(image, 1)
    assert digest != data_digest(prompts)


@pytest.mark.parametrize("feature", ["projected-logits", "logits", "hidden"])
def test_written_probe_is_what_the_graph_computes(feature, tmp_path):
    from sasa_patcher.probes.features import encode_prompts, extract_features

    model = patched_tiny("qwen2_vl")
    processor = tiny_processor("qwen2_vl")
    prompts = synthetic_prompts(24, image_dir=tmp_path)
    features = extract_features(model, processor, prompts, batch_size=8, progress=False, layer_states=False)
    X, y = features.candidates[feature], features.labels
    fit = fit_probe(X, y, Cs=[1e-2, 1.0], folds=3)
    settings = write_probe(model, fit, feature=feature, threshold=0.5, layers=(2, 4),
                           metrics={"auroc": 0.9, "features": feature, "layers": [2, 4]})
    assert model.config.sasa["probe_features"] == feature and model.config.sasa["threshold"] == 0.5
    assert model.config.sasa["safety_layer"] == 2 and settings.semantic_layer == 4
    assert model.config.sasa["metrics"]["auroc"] == 0.9
    assert math.isclose(model.sasa_probe.threshold.item(), 0.5)
    assert np.abs(graph_scores(model, X) - fit.pipeline.predict_proba(X.double().numpy())[:, 1]).max() <= 1e-5
    # the patched forward's own verdict (features recomputed at the new layers) matches sklearn
    again = extract_features(model, processor, prompts[:4], candidates=(feature,), layer_states=False, progress=False)
    with torch.no_grad():
        batch = encode_prompts(processor, prompts[:4])
        verdict = model(**batch, use_cache=False).unsafe_prob.double().numpy()  # scoring: no cache, so no gate state
    expected = fit.pipeline.predict_proba(again.candidates[feature].double().numpy())[:, 1]
    assert np.abs(verdict - expected).max() <= 1e-5
