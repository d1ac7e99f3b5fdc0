"""The model card's calibration figures: `sasa.metrics` as `probes.calibrate` writes it, as markdown.

Why apart from the card: the card (`export.model_card`) states what the artifact is and how to run
it; this module owns how every calibration figure is shown (held-out table, per-hazard table with its
text bar chart, policy, feature candidates, anything else verbatim) and which keys it reads. It never
computes figures: `export/` does not reach back into calibration.

`sasa.metrics` is read as `probes.calibrate` writes it (every key optional):

    auroc, tpr, fpr                      held-out figures at the threshold
    heldout_harmful, heldout_benign      held-out counts (n_heldout, target_fpr alongside)
    calibration_digest                   sha256 of the calibration prompts
    n_calibration, cv_auroc, C, features, layers, layers_chosen_by, calibration_oof_tpr/fpr,
    loso_mean_auroc, loso_min_auroc      calibration figures
    candidates_cv_auroc, loso_auroc      {name: AUROC} tables
    per_category_tpr, per_family_fpr     {category: {rate, low, high, k, n}}: the per-hazard table and bar chart
    loco_auroc, candidates, policy       leave-one-category-out AUROC, every feature's CV / LOCO / LOSO AUROC,
    tpr_interval, fpr_interval           the deployment policy, Wilson intervals of the held-out rates
    heldout_by_modality                  {text|image: {auroc, tpr, fpr}, harmful_image_by_variant: {variant: rate}}
    loso_fpr_by_source, loso_tpr_by_source, loso_fpr_by_modality, loso_tpr_by_modality
                                         {name: rate}: each source scored by a probe fitted without it
    transfer                             {attack family: {flagged, flagged_at_rows_threshold}}: never fitted
    threshold_rows_rule                  the out-of-fold-rows threshold and its figures, for comparison

Any other scalar entry is listed verbatim, any other {name: value} entry as its own table. With no held-out AUROC and no
finite threshold the card says "untrained probe".
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

from sasa_patcher.tables import markdown_table

# (label, metrics key) for the held-out table, keys as `probes.calibrate` writes them; the threshold
# comes from the settings.
HELD_OUT_ROWS = [
    ("AUROC", "auroc"),
    ("TPR (harmful prompts flagged)", "tpr"),
    ("FPR (benign prompts flagged)", "fpr"),
    ("target FPR used to set the threshold", "target_fpr"),
    ("held-out harmful prompts", "heldout_harmful"),
    ("held-out benign prompts", "heldout_benign"),
    ("held-out prompts", "n_heldout"),
]
CALIBRATION_ROWS = [
    ("calibration prompts", "n_calibration"),
    ("probe features", "features"),
    ("layers (s, f)", "layers"),
    ("layers chosen by", "layers_chosen_by"),
    ("localisation branch", "localisation_branch"),
    ("cross-validated AUROC", "cv_auroc"),
    ("regularisation C", "C"),
    ("out-of-fold TPR at the threshold", "calibration_oof_tpr"),
    ("out-of-fold FPR at the threshold", "calibration_oof_fpr"),
    ("leave-one-source-out AUROC, mean", "loso_mean_auroc"),
    ("leave-one-source-out AUROC, min", "loso_min_auroc"),
]
TABLES = {
    "candidates_cv_auroc": ("Probe-feature candidates (cross-validated AUROC on the calibration split)", "features"),
    "candidates": ("Probe-feature candidates (cross-validated AUROC on the calibration split)", "features"),
    "loso_auroc": ("Leave-one-source-out AUROC (probe fitted without that source, scored on it)", "held-out source"),
}
DIGEST_KEY = "calibration_digest"



def format_number(value: Any) -> str:
    if isinstance(value, bool) or not isinstance(value, float):
        return str(value)
    if math.isinf(value):
        return "+inf" if value > 0 else "-inf"
    return f"{value:.4f}".rstrip("0").rstrip(".") or "0"


def finite_threshold(sasa: dict[str, Any]) -> float | None:
    threshold = sasa.get("threshold")
    if threshold is None or not math.isfinite(float(threshold)):
        return None
    return float(threshold)


def is_trained(sasa: dict[str, Any]) -> bool:
    """A probe counts as trained when it has a finite threshold or a held-out AUROC."""
    metrics = sasa.get("metrics") or {}
    return finite_threshold(sasa) is not None or metrics.get("auroc") is not None


def _table(rows: list[tuple[str, Any]], header: tuple[str, str]) -> list[str]:
    return [*markdown_table([list(header), *([str(label), format_number(value)] for label, value in rows)]), ""]


def calibration_section(sasa: dict[str, Any], calibration_data: Sequence[str] = ()) -> list[str]:
    """The card's calibration section: untrained-probe warning, data and digest, held-out table, per-hazard
    figures, calibration split, then every other metric (scalars in one table, each {name: value} as its own)."""
    metrics = dict(sasa.get("metrics") or {})
    used: set[str] = set()
    lines: list[str] = []
    if not is_trained(sasa):
        lines += [
            "**untrained probe**: zero weights and threshold +inf, so no prompt is flagged and `unsafe_prob` "
            "is 0.5 for every prompt. Calibrate it (real offline prompt sets or your own JSONL manifest) "
            "before relying on it.",
            "",
        ]
    if calibration_data:
        lines += ["Calibration data:", ""] + [f"- {item}" for item in calibration_data] + [""]
    if metrics.get(DIGEST_KEY):
        lines += [f"Calibration data digest (sha256): `{metrics[DIGEST_KEY]}`", ""]
    used.add(DIGEST_KEY)

    def rows_for(spec):
        rows = []
        for label, key in spec:
            value = metrics.get(key)
            used.add(key)
            if value is not None:
                rows.append((label, value))
        return rows

    held_out = rows_for(HELD_OUT_ROWS)
    if held_out:
        threshold = finite_threshold(sasa)
        if threshold is not None:
            held_out.insert(3, ("threshold on unsafe_prob", threshold))
        lines += ["Held-out figures (prompts never used for fitting, layer choice or threshold):", ""]
        lines += _table(held_out, ("figure", "value"))
    lines += hazard_section(metrics, used)
    lines += traffic_section(metrics, used)
    calibration = rows_for(CALIBRATION_ROWS)
    if calibration:
        lines += ["Calibration split:", ""] + _table(calibration, ("figure", "value"))
    other = [(key, value) for key, value in metrics.items()
             if key not in used and key not in TABLES and value is not None and not isinstance(value, dict)]
    if other:
        lines += ["Other calibration figures:", ""] + _table(other, ("name", "value"))
    for key, value in metrics.items():
        if isinstance(value, dict) and value and key not in used:
            title, column = TABLES.get(key, (key, "name"))
            if key == "candidates" and "candidates_cv_auroc" in metrics:
                continue
            lines += [f"{title}:", ""] + _table(list(value.items()), (column, "value"))
    return lines


def _bar(rate: float | None, width: int = 10) -> str:
    """A text bar for a rate in [0, 1] (the card's chart needs no image)."""
    if rate is None:
        return ""
    filled = int(round(rate * width))
    return "█" * filled + "░" * (width - filled)


def _rate(value: dict | None) -> str:
    if not value or value.get("rate") is None:
        return "-"
    interval = f" [{value['low']:.2f}, {value['high']:.2f}]" if value.get("low") is not None else ""
    return f"{value['rate']:.2f} ({value['k']}/{value['n']}){interval}"


def hazard_section(metrics: dict[str, Any], used: set[str]) -> list[str]:
    """Per-hazard rows (held-out TPR with its chart, look-alike FPR, leave-one-category-out AUROC), the policy,
    and every feature candidate's in-distribution and transfer AUROC."""
    keys = ("per_category_tpr", "per_family_fpr", "per_source_fpr", "loco_auroc", "candidates", "policy",
            "tpr_interval", "fpr_interval", "interval_confidence", "threshold_rule", "probe_layers")
    used.update(keys)
    lines: list[str] = []
    for name, key in (("TPR", "tpr_interval"), ("FPR", "fpr_interval")):
        if metrics.get(key) and None not in metrics[key]:
            low, high = metrics[key]
            confidence = metrics.get("interval_confidence", 0.95)
            lines.append(f"Held-out {name} {confidence:.0%} interval (Wilson): [{low:.3f}, {high:.3f}]")
    rule = metrics.get("threshold_rule") or {}
    if rule:
        lines.append(f"Threshold rule: the true FPR is <= {format_number(rule.get('target_fpr'))} with probability "
                     f">= {format_number(rule.get('confidence'))} "
                     f"({rule.get('rule', 'on out-of-fold calibration scores')}; "
                     f"{rule.get('allowed')} of {rule.get('n_benign')} benign scores above it)"
                     + ("" if rule.get("guaranteed", True) else "; too few benign prompts for that guarantee"))
    policy = metrics.get("policy") or {}
    if policy:
        allowed = policy.get("allowed") or []
        lines.append("Policy: every hazard counts as harmful" if not allowed
                     else "Policy: not counted as harmful (relabelled benign): " + ", ".join(allowed))
    if lines:
        lines.append("")
    tpr, fpr, loco = metrics.get("per_category_tpr") or {}, metrics.get("per_family_fpr") or {}, metrics.get(
        "loco_auroc") or {}
    names = list(dict.fromkeys([*tpr, *loco, *fpr]))
    if names:
        rows = [["hazard (AILuminate)", "held-out TPR (k/n) [interval]", "chart", "look-alike FPR (k/n)",
                 "leave-one-category-out AUROC"]]
        for name in names:
            rate = (tpr.get(name) or {}).get("rate")
            auroc = loco.get(name)
            rows.append([name, _rate(tpr.get(name)), _bar(rate), _rate(fpr.get(name)),
                         "-" if auroc is None else format_number(auroc)])
        lines += ["Per hazard category, at the shipped threshold (held-out split; `everyday` is the benign family "
                  "that looks like no hazard):", "", *markdown_table(rows), ""]
    candidates = metrics.get("candidates") or {}
    if candidates:
        rows = [["feature", "cross-validated AUROC", "leave-one-category-out AUROC", "leave-one-source-out AUROC",
                 "chosen"]]
        for name, figure in candidates.items():
            figures = [format_number(figure.get(key)) for key in ("cv_auroc", "loco_mean_auroc", "loso_mean_auroc")]
            rows.append([name, *figures, "yes" if name == metrics.get("features") else ""])
        lines += [f"Probe-feature candidates (chosen by {metrics.get('features_chosen_by', 'the user')}):", "",
                  *markdown_table(rows), ""]
        used.update(("candidates_cv_auroc", "features_chosen_by"))
    return lines


def traffic_section(metrics: dict[str, Any], used: set[str]) -> list[str]:
    """What real traffic meets: held-out rates per modality and per kind of harmful image prompt, every source's
    rate when it is held out of the fit (with a chart), the never-fitted attack families, and the figures the
    out-of-fold-rows threshold would have given."""
    keys = ("heldout_by_modality", "loso_fpr_by_source", "loso_tpr_by_source", "loso_fpr_by_modality",
            "loso_tpr_by_modality", "transfer", "threshold_rows_rule")
    used.update(keys)
    lines: list[str] = []
    by_modality = metrics.get("heldout_by_modality") or {}
    if by_modality:
        rows = [["modality", "held-out AUROC", "TPR (k/n) [interval]", "FPR (k/n) [interval]",
                 "leave-one-source-out FPR", "leave-one-source-out TPR"]]
        for kind in ("text", "image"):
            figures = by_modality.get(kind) or {}
            auroc = figures.get("auroc")
            rows.append([kind, "-" if auroc is None else format_number(auroc), _rate(figures.get("tpr")),
                         _rate(figures.get("fpr")), _rate((metrics.get("loso_fpr_by_modality") or {}).get(kind)),
                         _rate((metrics.get("loso_tpr_by_modality") or {}).get(kind))])
        lines += ["Per modality, at the shipped threshold:", "", *markdown_table(rows), ""]
        variants = by_modality.get("harmful_image_by_variant") or {}
        if variants:
            lines += ["Held-out harmful image prompts flagged, by kind (`with-image`: the request is in the text, "
                      "the image unrelated; `typographic`: the request is only in the image, which the embedded "
                      "model's seeded vision tower cannot read):", "",
                      *markdown_table([["kind", "flagged (k/n) [interval]"],
                                       *([name, _rate(value)] for name, value in variants.items())]), ""]
    for key, title in (("loso_fpr_by_source", "Benign sources held out of the fit: share refused at the shipped "
                                              "threshold (the source's prompts scored by a probe fitted without it)"),
                       ("loso_tpr_by_source", "Harmful sources held out of the fit: share flagged")):
        table = metrics.get(key) or {}
        if table:
            rows = [["source", "rate (k/n) [interval]", "chart"]]
            rows += [[name, _rate(value), _bar((value or {}).get("rate"))] for name, value in table.items()]
            lines += [f"{title}:", "", *markdown_table(rows), ""]
    transfer = metrics.get("transfer") or {}
    if transfer:
        rows = [["attack family (never fitted)", "flagged at the shipped threshold", "flagged at the rows threshold"]]
        rows += [[name, _rate(value.get("flagged")), _rate(value.get("flagged_at_rows_threshold"))]
                 for name, value in transfer.items()]
        lines += ["Transfer to a published reformulation attack:", "", *markdown_table(rows), ""]
    alternative = metrics.get("threshold_rows_rule") or {}
    if alternative:
        lines += [f"Not shipped, for comparison: the same bound on out-of-fold rows of the fitted sources gives "
                  f"threshold {format_number(alternative.get('threshold'))}, held-out TPR "
                  f"{format_number(alternative.get('heldout_tpr'))} at FPR "
                  f"{format_number(alternative.get('heldout_fpr'))}.", ""]
    return lines
