"""The built-in calibration set (sasa_patcher.probes.calibration_set): balanced by label and form,
augmented equally, mixed across sources, deterministic."""

from collections import Counter

import numpy as np
import pytest

from sasa_patcher.probes.calibration_set import builtin_calibration_set, format_summary, summarize
from sasa_patcher.probes.datasets import BENIGN, HARMFUL, normalise_text
from sasa_patcher.probes.form_augment import detect_form


@pytest.fixture(scope="module")
def builtin():
    return builtin_calibration_set()


def test_builtin_set_is_balanced_by_label_and_form(builtin):
    cells = Counter((p.label, p.form) for p in builtin)
    assert cells == {(HARMFUL, "imperative"): 300, (HARMFUL, "question"): 300, (BENIGN, "imperative"): 300,
                     (BENIGN, "question"): 300}  # fmt: skip


def test_builtin_set_augments_every_cell_equally(builtin):
    augmented = Counter((p.label, p.form) for p in builtin if p.augmented)
    assert set(augmented.values()) == {100}
    summary = summarize(builtin)
    assert summary["total"] == 1200 and summary["augmented"] == 400
    assert "augmented 400" in format_summary(summary)
    for prompt in builtin:
        if prompt.augmented:
            assert prompt.origin and prompt.origin != prompt.text
            assert detect_form(prompt.origin) != prompt.form


def test_builtin_set_mixes_sources_and_sensitive_benign_prompts(builtin):
    sources = {p.source for p in builtin}
    assert sources == {
        "advbench",
        "harmbench",
        "donotanswer",
        "pyrit-objectives",
        "rho-contrast",
        "rho-overrefusal",
        "sasa-benign",
        "sasa-overrefusal",
        "sasa-lookalike",
    }
    benign_real = [p for p in builtin if p.label == BENIGN and not p.augmented]
    edgy = [p for p in benign_real if p.source != "sasa-benign" or p.category != "everyday"]
    assert len(edgy) >= 0.5 * len(benign_real)


def test_builtin_set_is_deterministic_and_unique(builtin):
    again = builtin_calibration_set()
    assert [(p.text, p.label, p.source) for p in again] == [(p.text, p.label, p.source) for p in builtin]
    assert len({normalise_text(p.text) for p in builtin}) == len(builtin)


def test_sentence_opening_alone_does_not_predict_the_label(builtin):
    """Guard against the imperative-vs-question shortcut: the first word carries little label signal."""
    from sklearn.feature_extraction.text import CountVectorizer
    from sklearn.linear_model import LogisticRegression
    from sklearn.model_selection import cross_val_score

    first_words = [p.text.split()[0].lower() for p in builtin]
    features = CountVectorizer(token_pattern=r"\S+").fit_transform(first_words)
    labels = np.array([p.label for p in builtin])
    auroc = cross_val_score(LogisticRegression(max_iter=1000), features, labels, cv=5, scoring="roc_auc").mean()
    assert auroc < 0.7, auroc


def test_builtin_set_refuses_impossible_sizes():
    with pytest.raises(ValueError, match="per_cell"):
        builtin_calibration_set(per_cell=5000)
    with pytest.raises(ValueError):
        builtin_calibration_set(augmented_share=1.0)


def test_default_set_adds_real_traffic_and_images_on_both_sides():
    from sasa_patcher.probes.calibration_set import default_calibration_set
    from sasa_patcher.probes.splits import is_heldout
    from sasa_patcher.probes.typographic import CARRIER_PROMPT

    prompts = default_calibration_set(per_cell=40, chatterbot=50, chitchat=40, with_image=10, typographic=6)
    harmful = [p for p in prompts if p.label == 1]
    hand_written = ("sasa-benign", "sasa-overrefusal", "sasa-lookalike", "sasa-text-images")
    real_benign = [p for p in prompts if p.label == 0 and not p.augmented and p.source not in hand_written]
    assert len(real_benign) >= len(harmful)
    counts = Counter((p.label, p.image is not None, is_heldout(p)) for p in prompts)
    assert all(counts[(label, True, side)] > 0 for label in (0, 1) for side in (False, True))
    sources = Counter(p.source.split("/")[-1] for p in prompts if p.image is not None and p.label == 1)
    assert sources == {"with-image": 10, "typographic": 6}
    # the carrier text is on both sides, so it is no cue for harm
    carriers = Counter(p.label for p in prompts if p.text == CARRIER_PROMPT)
    assert carriers == {0: 6, 1: 6}
    texts = {p.text: is_heldout(p) for p in prompts if p.image is None}
    assert all(texts[p.origin] == is_heldout(p) for p in prompts
               if p.image is not None and (p.label == 1 or p.text == CARRIER_PROMPT))
