"""How well a probe transfers: leave one source out, leave one hazard category out, per-category rates,
and the choice of feature by transfer rather than by in-distribution cross-validation.

Why: every feature candidate reaches ~0.98 cross-validated AUROC on the calibration split, yet on public
prompts the project had never seen they ranged from 0.74 to 0.86. In-distribution CV cannot see that a
probe learned one data set's style or one hazard family. Holding out a whole source, or a whole hazard
category, and scoring the probe on it can: that is what the feature is chosen by here.

One implementation for both hold-outs (`leave_one_group_out`): for each group G, fit on calibration-split
prompts outside G (minus any text group shared with G) and score every prompt of G (either split: none
was trained on), plus prompts of the other split that the fit never saw where G lacks a class:
- sources: only a missing class is added (most sources are one-sided);
- hazard categories: G holds the category's harmful prompts and its benign look-alikes; the held-out
  benign prompts of every other family are always added, so each category is scored against the same
  kind of benign traffic plus its own look-alikes.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np
from sklearn.metrics import roc_auc_score

from sasa_patcher.modeling_sasa import PROBE_FEATURES
from sasa_patcher.probes.probe import DEFAULT_SEED, _as_numpy, make_estimator, quiet_fit
from sasa_patcher.probes.splits import group_key, source_family
from sasa_patcher.probes.taxonomy import CATEGORIES, HAZARDS
from sasa_patcher.probes.thresholds import DEFAULT_CONFIDENCE, rate_with_interval

MIN_GROUP_HARMFUL = 5  # a hazard category with fewer harmful prompts is not held out on its own


def leave_one_group_out(
    X, prompts: Sequence, calibration, *, key: Callable, C: float, seed: int = DEFAULT_SEED,
    groups: Sequence[str] | None = None, always_add_heldout_benign: bool = False,
) -> dict:
    """Per group: fit without it, AUROC on it (see the module docstring). Returns per-group records, the mean,
    and `scores`: every prompt of a group scored by its group's fit (NaN where the rest lacks a class).

    Why the scores: per source family, they are how the probe scores a source it has never seen, and
    calibration sets the threshold on them (from these same fits, not a second round of them): held-out rows
    of fitted sources hide a probe that learned each source's style; a threshold chosen on unseen sources'
    scores holds its false-positive rate on sources outside the fit, which is what real traffic is."""
    X = _as_numpy(X)
    labels = np.asarray([int(p.label) for p in prompts])
    names = np.asarray([key(p) or "" for p in prompts], dtype=object)
    keys = np.asarray([group_key(p) for p in prompts], dtype=object)
    calibration = np.asarray(calibration, dtype=bool)
    per_group = {}
    scores = np.full(len(prompts), np.nan)
    for name in groups if groups is not None else sorted(set(names)):
        in_group = names == name
        train = calibration & ~in_group & ~np.isin(keys, keys[in_group])
        test = in_group.copy()
        missing = [value for value in (0, 1) if not (labels[in_group] == value).any()]
        for value in set(missing) | ({0} if always_add_heldout_benign else set()):
            test |= ~calibration & ~in_group & (labels == value)
        record = {
            "n_test_harmful": int((labels[test] == 1).sum()),
            "n_test_benign": int((labels[test] == 0).sum()),
            "complemented_with_heldout": bool(missing) or always_add_heldout_benign,
            "auroc": None,
        }
        if len(np.unique(labels[train])) == 2:
            pipeline = make_estimator(C, seed)
            with quiet_fit():
                pipeline.fit(X[train], labels[train])
            probabilities = pipeline.predict_proba(X[test])[:, 1]
            scores[in_group] = probabilities[in_group[test]]
            if len(np.unique(labels[test])) == 2:
                record["auroc"] = float(roc_auc_score(labels[test], probabilities))
        per_group[name] = record
    scored = [record["auroc"] for record in per_group.values() if record["auroc"] is not None]
    return {
        "per_group": per_group,
        "mean_auroc": float(np.mean(scored)) if scored else None,
        "min_auroc": float(np.min(scored)) if scored else None,
        "scores": scores,
    }


def leave_one_source_out(X, prompts: Sequence, calibration, *, C: float, seed: int = DEFAULT_SEED) -> dict:
    """Hold out each source family (`probes.splits.source_family`) in turn."""
    result = leave_one_group_out(X, prompts, calibration, key=lambda p: source_family(p.source), C=C, seed=seed)
    result["per_source"] = result.pop("per_group")
    return result


def held_out_categories(prompts: Sequence, minimum: int = MIN_GROUP_HARMFUL) -> list[str]:
    """Hazards with at least `minimum` harmful prompts (in either split), in taxonomy order."""
    counts = {c: sum(1 for p in prompts if p.label == 1 and getattr(p, "category", None) == c) for c in HAZARDS}
    return [c for c in HAZARDS if counts[c] >= minimum]


def leave_one_category_out(X, prompts: Sequence, calibration, *, C: float, seed: int = DEFAULT_SEED) -> dict:
    """Hold out each hazard category (its harmful prompts and its benign look-alikes) in turn."""
    result = leave_one_group_out(
        X, prompts, calibration, key=lambda p: getattr(p, "category", None), C=C, seed=seed,
        groups=held_out_categories(prompts), always_add_heldout_benign=True,
    )
    result["per_category"] = result.pop("per_group")
    return result


def transfer_figures(X, prompts: Sequence, calibration, *, C: float, seed: int = DEFAULT_SEED) -> dict:
    """LOSO and LOCO for one feature, and their mean (the transfer score the feature is chosen by)."""
    loso = leave_one_source_out(X, prompts, calibration, C=C, seed=seed)
    loco = leave_one_category_out(X, prompts, calibration, C=C, seed=seed)
    means = [value for value in (loso["mean_auroc"], loco["mean_auroc"]) if value is not None]
    return {"loso": loso, "loco": loco, "transfer_auroc": float(np.mean(means)) if means else None}


def choose_by_transfer(figures: dict[str, dict]) -> str:
    """The candidate with the highest transfer AUROC (falls back to CV AUROC when none has one); ties go to
    the earlier name in `PROBE_FEATURES` (the paper's projected logits first)."""
    order = sorted(figures, key=lambda name: PROBE_FEATURES.index(name) if name in PROBE_FEATURES else 99)

    def score(name: str) -> tuple:
        figure = figures[name]
        value = figure.get("transfer_auroc")
        return (round(value if value is not None else -1.0, 12), round(figure["cv_auroc"], 12), -order.index(name))

    return max(order, key=score)


def per_category_rates(scores, prompts: Sequence, threshold: float, confidence: float = DEFAULT_CONFIDENCE) -> dict:
    """Flag rates at `threshold` with Wilson intervals: TPR per hazard, FPR per benign family and per benign source.

    `prompts` are the ones the figures are about (the held-out split).
    """
    scores = np.asarray(scores, dtype=np.float64)
    flagged = scores > threshold
    labels = np.asarray([int(p.label) for p in prompts])
    categories = np.asarray([getattr(p, "category", None) or "" for p in prompts], dtype=object)
    sources = np.asarray([source_family(p.source) for p in prompts], dtype=object)
    tpr = {c: rate_with_interval(flagged[(labels == 1) & (categories == c)], confidence) for c in HAZARDS}
    fpr = {c: rate_with_interval(flagged[(labels == 0) & (categories == c)], confidence) for c in CATEGORIES}
    by_source = {s: rate_with_interval(flagged[(labels == 0) & (sources == s)], confidence)
                 for s in sorted(set(sources[labels == 0]))}
    return {
        "tpr": {c: v for c, v in tpr.items() if v["n"]},
        "fpr": {c: v for c, v in fpr.items() if v["n"]},
        "fpr_by_source": by_source,
    }


def modality(prompt) -> str:
    """"image" when the prompt carries an image, else "text" (the audit record's and the figures' key)."""
    return "image" if getattr(prompt, "image", None) is not None else "text"


def source_heldout_rates(scores, prompts: Sequence, threshold: float, confidence: float = DEFAULT_CONFIDENCE) -> dict:
    """Flag rates at `threshold` of `leave_one_source_out(...)["scores"]`: FPR per benign source and TPR per
    harmful source (each with its Wilson interval), and both pooled per modality."""
    scores = np.asarray(scores, dtype=np.float64)
    scored = ~np.isnan(scores)
    flagged = scores > threshold
    labels = np.asarray([int(p.label) for p in prompts])
    names = np.asarray([p.source for p in prompts], dtype=object)
    kinds = np.asarray([modality(p) for p in prompts], dtype=object)

    def rates(mask) -> dict:
        return rate_with_interval(flagged[mask & scored], confidence)

    return {
        "fpr_by_source": {s: rates((names == s) & (labels == 0)) for s in sorted(set(names[labels == 0]))},
        "tpr_by_source": {s: rates((names == s) & (labels == 1)) for s in sorted(set(names[labels == 1]))},
        "fpr_by_modality": {m: rates((kinds == m) & (labels == 0)) for m in ("text", "image")},
        "tpr_by_modality": {m: rates((kinds == m) & (labels == 1)) for m in ("text", "image")},
    }


def modality_rates(scores, prompts: Sequence, threshold: float, confidence: float = DEFAULT_CONFIDENCE) -> dict:
    """Per modality, and per kind of harmful image prompt ("with-image": intent in the text; "typographic":
    intent in the image), the TPR / FPR / AUROC of `scores` at `threshold` (held-out split figures)."""
    scores = np.asarray(scores, dtype=np.float64)
    labels = np.asarray([int(p.label) for p in prompts])
    kinds = np.asarray([modality(p) for p in prompts], dtype=object)
    variants = np.asarray([p.source.split("/", 1)[1] if "/" in p.source else "" for p in prompts], dtype=object)
    flagged = scores > threshold
    result: dict = {}
    for kind in ("text", "image"):
        mask = kinds == kind
        both = len(np.unique(labels[mask])) == 2
        result[kind] = {
            "auroc": float(roc_auc_score(labels[mask], scores[mask])) if both else None,
            "tpr": rate_with_interval(flagged[mask & (labels == 1)], confidence),
            "fpr": rate_with_interval(flagged[mask & (labels == 0)], confidence),
        }
    result["harmful_image_by_variant"] = {
        variant: rate_with_interval(flagged[(kinds == "image") & (labels == 1) & (variants == variant)], confidence)
        for variant in sorted(set(variants[(kinds == "image") & (labels == 1)]))
    }
    return result
