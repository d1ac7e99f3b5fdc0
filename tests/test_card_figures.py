"""The model card's calibration figures (sasa_patcher.export.card_figures): which keys are read, the
per-hazard table with its text chart, the policy and the feature candidates."""

from __future__ import annotations

from test_model_card import CALIBRATED_METRICS

from sasa_patcher.export.card_figures import calibration_section, is_trained


def test_untrained_until_a_threshold_or_a_held_out_auroc():
    assert not is_trained({"threshold": float("inf"), "metrics": {}})
    assert is_trained({"threshold": 0.4}) and is_trained({"threshold": float("inf"), "metrics": {"auroc": 0.7}})
    assert "**untrained probe**" in "\n".join(calibration_section({"threshold": float("inf")}))


def test_only_keys_calibration_writes_are_read():
    """Keys nothing writes (old spellings) are not special: listed verbatim, never as held-out figures."""
    text = "\n".join(calibration_section({"threshold": 0.5, "metrics": {"held_out_auroc": 0.8, "n_unsafe": 4}}))
    assert "| AUROC |" not in text and "| held_out_auroc | 0.8 |" in text and "| n_unsafe | 4 |" in text


def test_per_hazard_table_chart_policy_and_candidates():
    rate = {"rate": 0.8, "low": 0.6, "high": 0.9, "k": 8, "n": 10}
    metrics = {
        **CALIBRATED_METRICS,
        "features": "multi-layer",
        "per_category_tpr": {"hate": rate, "privacy": {**rate, "rate": 0.3, "k": 3}},
        "per_family_fpr": {"hate": {**rate, "rate": 0.1, "k": 1}, "everyday": {**rate, "rate": 0.0, "k": 0}},
        "loco_auroc": {"hate": 0.71, "privacy": 0.65},
        "candidates": {"projected-logits": {"cv_auroc": 0.98, "loco_mean_auroc": 0.7, "loso_mean_auroc": 0.8},
                       "multi-layer": {"cv_auroc": 0.97, "loco_mean_auroc": 0.85, "loso_mean_auroc": 0.88}},
        "features_chosen_by": "transfer",
        "policy": {"harmful": ["hate", "privacy"], "allowed": ["sexual_content"]},
        "tpr_interval": [0.85, 0.93], "fpr_interval": [0.02, 0.07], "interval_confidence": 0.95,
        "threshold_rule": {"target_fpr": 0.05, "confidence": 0.95, "allowed": 13, "n_benign": 420, "guaranteed": True},
    }
    text = "\n".join(calibration_section({"threshold": 0.5, "metrics": metrics}))
    assert "| hate | 0.80 (8/10) [0.60, 0.90] | ████████░░ | 0.10 (1/10) [0.60, 0.90] | 0.71 |" in text
    assert "| privacy | 0.30 (3/10) [0.60, 0.90] | ███░░░░░░░ | - | 0.65 |" in text
    assert "| everyday | - |  | 0.00 (0/10) [0.60, 0.90] | - |" in text
    assert "| multi-layer | 0.97 | 0.85 | 0.88 | yes |" in text
    assert "not counted as harmful (relabelled benign): sexual_content" in text
    assert "Held-out TPR 95% interval (Wilson): [0.850, 0.930]" in text
    assert "{'rate'" not in text  # no dict dumped verbatim


def test_traffic_figures_per_modality_per_held_out_source_and_transfer():
    rate = {"rate": 0.25, "low": 0.1, "high": 0.5, "k": 2, "n": 8}
    metrics = {
        **CALIBRATED_METRICS,
        "heldout_by_modality": {"text": {"auroc": 0.9, "tpr": rate, "fpr": rate},
                                "image": {"auroc": None, "tpr": rate, "fpr": {**rate, "rate": 0.0, "k": 0}},
                                "harmful_image_by_variant": {"typographic": {**rate, "rate": 0.125, "k": 1}}},
        "loso_fpr_by_source": {"chitchat": {**rate, "rate": 0.5, "k": 4}},
        "loso_fpr_by_modality": {"text": rate, "image": rate},
        "transfer": {"past-tense": {"flagged": {**rate, "rate": 0.75, "k": 6}, "flagged_at_rows_threshold": rate}},
        "threshold_rows_rule": {"threshold": 0.6, "heldout_tpr": 0.8, "heldout_fpr": 0.04},
    }
    text = "\n".join(calibration_section({"threshold": 0.7, "metrics": metrics}))
    assert "| image | - | 0.25 (2/8) [0.10, 0.50] | 0.00 (0/8) [0.10, 0.50] | 0.25 (2/8) [0.10, 0.50] | - |" in text
    assert "| typographic | 0.12 (1/8) [0.10, 0.50] |" in text
    assert "| chitchat | 0.50 (4/8) [0.10, 0.50] | █████░░░░░ |" in text
    assert "| past-tense | 0.75 (6/8) [0.10, 0.50] | 0.25 (2/8) [0.10, 0.50] |" in text
    assert "threshold 0.6, held-out TPR 0.8 at FPR 0.04" in text
    assert "heldout_by_modality" not in text  # shown as tables, never dumped verbatim
