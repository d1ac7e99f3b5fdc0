"""Calibration, end to end: split, localise, extract, choose, fit, threshold, evaluate, write into the model.

`calibrate` is the one call the CLI makes. Held-out prompts are used for the figures only: the
layers, the feature, C, the probe weights and the threshold all come from the calibration split.

What ends up in the model:
- `model.sasa_probe`: the folded linear weights and the threshold buffer;
- `model.sasa` / `config.sasa`: `safety_layer`, `semantic_layer`, `probe_features`, `threshold`,
  and `metrics` holding the plain keys `auroc`, `tpr`, `fpr` (held-out, at the threshold),
  `features` (the probe's feature name), `layers` ([s, f]), next to the calibration figures
  (`calibration_digest`, CV AUROC per candidate, leave-one-source-out, counts, ...).
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from sasa_patcher.jsonl import write_jsonl
from sasa_patcher.modeling_sasa import (
    MULTI_LAYER_FEATURES,
    PROBE_FEATURES,
    PROJECTED_FEATURES,
    default_probe_layers,
)
from sasa_patcher.patching import temporary_settings
from sasa_patcher.probes.feature_cache import FeatureCache, has_room_for, sequence_bytes
from sasa_patcher.probes.features import (
    Features,
    ForwardClock,
    batched,
    extract_features,
    image_sha256,
    length_order,
    padded_tokens,
    projected_features,
)
from sasa_patcher.probes.localisation import DEFAULT_MAX_PAIRS, Localisation, localise
from sasa_patcher.probes.probe import (
    DEFAULT_CS,
    DEFAULT_FOLDS,
    DEFAULT_SEED,
    data_digest,
    fit_probe,
    graph_scores,
    operating_point,
    select_feature,
    write_probe,
)
from sasa_patcher.probes.splits import DEFAULT_HELDOUT_FRACTION, group_key, is_heldout
from sasa_patcher.probes.taxonomy import Policy, apply_policy
from sasa_patcher.probes.thresholds import (
    DEFAULT_CONFIDENCE,
    conservative_threshold,
    rate_with_interval,
    unseen_source_threshold,
)
from sasa_patcher.probes.transfer import (
    choose_by_transfer,
    modality,
    modality_rates,
    per_category_rates,
    source_heldout_rates,
    transfer_figures,
)


@dataclass
class CalibrationReport:
    """Every figure of one calibration, and the per-prompt record for the audit file."""

    layers: tuple[int, int]
    feature: str
    threshold: float
    target_fpr: float
    heldout: dict  # auroc, tpr, fpr, counts (held-out split, the shipped probe as the graph computes it)
    calibration: dict  # out-of-fold and in-sample operating points on the calibration split
    candidates: dict  # feature name -> {"cv_auroc", "C", "dim", "loco_mean_auroc", "loso_mean_auroc", "transfer_auroc"}
    C: float
    loso: dict
    digest: str
    metrics: dict  # what was written into the model's settings
    localisation: Localisation | None
    records: list[dict] = field(default_factory=list)
    timings: dict = field(default_factory=dict)

    def to_dict(self, records: bool = False) -> dict:
        """JSON-ready figures (the per-prompt records only when asked)."""
        values = dataclasses.asdict(self)
        values["localisation"] = None if self.localisation is None else self.localisation.to_dict()
        if not records:
            values.pop("records")
        return values

    def write_audit(self, path: str | Path) -> Path:
        """`calibration.jsonl`: one line per prompt (text, label, source, split, image sha256, score)."""
        return write_jsonl(path, self.records)


def _untrained(model):
    """A zero probe on the `hidden` feature (a placeholder while the multi-layer layers change)."""
    from types import SimpleNamespace

    width = model.config.get_text_config().hidden_size
    return SimpleNamespace(weight=np.zeros(width), bias=0.0)


def _check_classes(labels: np.ndarray, where: str) -> None:
    missing = [name for value, name in ((0, "benign"), (1, "harmful")) if not (labels == value).any()]
    if missing:
        raise ValueError(f"the {where} split has no {' and no '.join(missing)} prompts: add more prompts of each class")


def _extract_at(model, processor, prompts, names, chosen_layers, cal_index, cal_groups, timings, *, want_curves,
                batch_size, pairs, max_pairs, seed, progress, log, clock) -> tuple[Features, Localisation | None]:
    """Given (s, f): one forward per prompt for every candidate, then the curves from its layer states."""
    model.set_sasa(dataclasses.replace(model.sasa, safety_layer=chosen_layers[0], semantic_layer=chosen_layers[1]))
    mark = time.perf_counter()
    extracted = extract_features(model, processor, prompts, batch_size=batch_size, candidates=names,
                                 layer_states=want_curves, progress=progress, description="probe features", log=log,
                                 clock=clock)
    timings["features_s"] = time.perf_counter() - mark
    if not want_curves:
        return extracted, None
    mark = time.perf_counter()
    localisation = localise(model, processor, [prompts[i] for i in cal_index], features=extracted.subset(cal_index),
                            groups=cal_groups, pairs=pairs, max_pairs=max_pairs, batch_size=batch_size, seed=seed,
                            progress=progress, choose=False, clock=clock, log=log)
    timings["localisation_s"] = time.perf_counter() - mark
    return extracted, localisation


def _localise_and_extract(model, processor, prompts, names, cal_index, cal_groups, timings, *, batch_size, pairs,
                          max_pairs, seed, progress, cache_dir, log, clock) -> tuple[Features, Localisation]:
    """`--layers auto` with one full forward per prompt.

    The all-layer pass gives the localisation's layer states (calibration split only) and every
    candidate that does not depend on (s, f); it also stores every layer's output at every position,
    from which the projected candidates then run only layers s+1..L-1 at the chosen (s, f). Where the
    disk lacks room for those states, the projected candidates take a second forward instead (said).
    """
    say = log or (lambda message: None)
    projected = [name for name in names if name in PROJECTED_FEATURES]
    unprojected = [name for name in names if name not in PROJECTED_FEATURES]
    cache = FeatureCache.for_run(model, prompts, batch_size=batch_size, candidates=names,
                                 root=Path(cache_dir) if cache_dir else None)
    text = model.config.get_text_config()
    tokens = sum(padded_tokens(processor, prompts, batched(length_order(prompts), batch_size)))
    needed = sequence_bytes(tokens, text.num_hidden_layers, text.hidden_size)
    store_sequences = bool(projected) and has_room_for(cache.directory, needed)
    if projected and not store_sequences:
        say(f"not enough disk under {cache.directory} for the layer states ({needed / 1024**3:.1f} GiB): the "
            "projected candidates take a second forward")
    mark = time.perf_counter()
    with temporary_settings(model, mode="gate"):  # augment would run a projected stream the pass does not read
        extracted = extract_features(model, processor, prompts, batch_size=batch_size, candidates=unprojected,
                                     layer_states=True, progress=progress, description="layer states and features",
                                     cache=cache, sequence_states=store_sequences, log=log, clock=clock)
    timings["features_s"] = time.perf_counter() - mark
    mark = time.perf_counter()
    localisation = localise(model, processor, [prompts[i] for i in cal_index], features=extracted.subset(cal_index),
                            groups=cal_groups, pairs=pairs, max_pairs=max_pairs, batch_size=batch_size, seed=seed,
                            progress=progress, clock=clock, log=log)
    timings["localisation_s"] = time.perf_counter() - mark
    model.set_sasa(dataclasses.replace(model.sasa, safety_layer=localisation.safety_layer,
                                       semantic_layer=localisation.semantic_layer))
    mark = time.perf_counter()
    if store_sequences:
        extracted.candidates.update(projected_features(model, processor, prompts, cache, batch_size=batch_size,
                                                       candidates=projected, progress=progress, log=log,
                                                       clock=clock))
    elif projected:
        extracted.candidates.update(extract_features(model, processor, prompts, batch_size=batch_size,
                                                     candidates=projected, layer_states=False, progress=progress,
                                                     description="projected features", log=log,
                                                     clock=clock).candidates)
    timings["projected_features_s"] = time.perf_counter() - mark
    extracted.candidates = {name: extracted.candidates[name] for name in names}
    cache.remove()
    return extracted, localisation


def calibrate(
    model,
    processor,
    prompts: Sequence,
    *,
    layers: str | tuple[int, int] = "auto",
    features: str = "auto",
    target_fpr: float = 0.05,
    batch_size: int = 8,
    plot_dir: str | Path | None = None,
    heldout_fraction: float = DEFAULT_HELDOUT_FRACTION,
    Cs: Sequence[float] = DEFAULT_CS,
    folds: int = DEFAULT_FOLDS,
    seed: int = DEFAULT_SEED,
    pairs="auto",
    max_pairs: int = DEFAULT_MAX_PAIRS,
    progress: bool = True,
    policy: Policy | None = None,
    confidence: float = DEFAULT_CONFIDENCE,
    probe_layers: Sequence[int] | None = None,
    cache_dir: str | Path | None = None,
    log: Callable[[str], None] | None = None,
    transfer_sets: dict[str, Sequence] | None = None,
) -> CalibrationReport:
    """Calibrate the SASA-patched `model` on `prompts` and write the probe into it.

    layers:   "auto" (localised on the calibration split, see `probes.localisation`) or (s, f).
    features: "auto" (the highest transfer AUROC among `PROBE_FEATURES`: the mean of leave-one-category-out
              and leave-one-source-out AUROC, `probes.transfer`) or one of them.
    target_fpr: false-positive rate the threshold is set for: the true FPR is <= target with probability
              `confidence`, judged on the calibration split's benign prompts each scored by a probe fitted
              without its source (`probes.transfer.leave_one_source_out`, `probes.thresholds`): the rate
              is meant to hold on sources outside the fit, not only on new rows of the fitted ones.
    policy:   which hazards count as harmful (default all); harmful prompts of other hazards are relabelled
              benign before anything is fitted, and the policy is recorded in the metrics.
    probe_layers: the layers of the multi-layer candidate (default `default_probe_layers`).
    plot_dir: where the localisation plot and JSON go (None: not written; with given layers the
              curves are then not computed at all).
    pairs:    image/text pairs for the semantic curve ("auto": up to `max_pairs` typographic
              renderings of calibration prompts, None: no semantic curve).
    transfer_sets: name -> prompts never fitted on (e.g. a published reformulation attack): scored with
              the final probe, their flag rate at the threshold goes into the metrics as a transfer figure.
    cache_dir: where the localised run keeps its per-batch features until it has finished (default: the
              user cache; a stopped run resumes from them). `log` hears time estimates and cache use.
    """
    if features != "auto" and features not in PROBE_FEATURES:
        raise ValueError(f"features must be 'auto' or one of {PROBE_FEATURES}, got {features!r}")
    timings: dict[str, float] = {}
    clock = ForwardClock()
    started = time.perf_counter()

    # 1. policy, then split by stable hash
    policy = policy or Policy()
    prompts = apply_policy(prompts, policy)
    heldout_mask = np.asarray([is_heldout(p, heldout_fraction) for p in prompts], dtype=bool)
    calibration_mask = ~heldout_mask
    labels = np.asarray([int(p.label) for p in prompts], dtype=np.int64)
    _check_classes(labels[calibration_mask], "calibration")
    _check_classes(labels[heldout_mask], "held-out")
    cal_index, held_index = np.flatnonzero(calibration_mask), np.flatnonzero(heldout_mask)
    cal_prompts = [prompts[i] for i in cal_index]
    cal_groups = [group_key(p) for p in cal_prompts]

    if layers != "auto" and (isinstance(layers, str) or len(layers) != 2):
        raise ValueError(f"layers must be 'auto' or (s, f), got {layers!r}")
    num_layers = model.config.get_text_config().num_hidden_layers
    probe_layers = [int(layer) for layer in (probe_layers or default_probe_layers(num_layers))]
    if list(model.sasa.probe_layers) != probe_layers:  # the extraction reads the multi-layer candidate's layers
        if model.sasa.probe_features in MULTI_LAYER_FEATURES:  # another width: the probe is refitted below anyway
            write_probe(model, _untrained(model), feature="hidden", threshold=1.0, layers=None)
        model.set_sasa(dataclasses.replace(model.sasa, probe_layers=probe_layers))
    names = PROBE_FEATURES if features == "auto" else (features,)

    # 2-3. layers and features
    if layers == "auto":
        extracted, localisation = _localise_and_extract(
            model, processor, prompts, names, cal_index, cal_groups, timings, batch_size=batch_size, pairs=pairs,
            max_pairs=max_pairs, seed=seed, progress=progress, cache_dir=cache_dir, log=log, clock=clock)
        chosen_layers = (localisation.safety_layer, localisation.semantic_layer)
    else:
        chosen_layers = (int(layers[0]), int(layers[1]))
        extracted, localisation = _extract_at(model, processor, prompts, names, chosen_layers, cal_index, cal_groups,
                                              timings, want_curves=plot_dir is not None, batch_size=batch_size,
                                              pairs=pairs, max_pairs=max_pairs, seed=seed, progress=progress, log=log,
                                              clock=clock)

    # 4. feature choice and probe fit, calibration split only
    mark = time.perf_counter()
    y_cal, y_held = labels[cal_index], labels[held_index]
    cal_candidates = {name: extracted.candidates[name][cal_index] for name in names}
    choice = select_feature(cal_candidates, y_cal, cal_groups, Cs=Cs, folds=folds, seed=seed)
    timings["cv_s"] = time.perf_counter() - mark
    # every candidate's transfer (leave one category / source out), at its own CV-chosen C
    mark = time.perf_counter()
    transfer = {name: transfer_figures(extracted.candidates[name], prompts, calibration_mask,
                                       C=choice.figures[name]["C"], seed=seed) for name in names}
    # each candidate's prompts scored without their source (the same fits as its leave-one-source-out AUROCs)
    source_held_out = {name: figures["loso"].pop("scores") for name, figures in transfer.items()}
    for name in names:
        choice.figures[name].update(loco_mean_auroc=transfer[name]["loco"]["mean_auroc"],
                                    loso_mean_auroc=transfer[name]["loso"]["mean_auroc"],
                                    transfer_auroc=transfer[name]["transfer_auroc"])
    feature = choose_by_transfer(choice.figures) if features == "auto" else features
    timings["transfer_s"] = time.perf_counter() - mark
    mark = time.perf_counter()
    fit = fit_probe(cal_candidates[feature], y_cal, cal_groups, cv=choice.cvs[feature], seed=seed)
    # every prompt scored by a probe that never saw its source; the threshold is set on the calibration
    # split's (a source whose removal leaves one class, e.g. the only benign one, keeps its out-of-fold score)
    loso_scores = source_held_out[feature]
    rule = unseen_source_threshold(loso_scores[cal_index], fit.oof_scores, y_cal, target_fpr, confidence)
    rows_rule = conservative_threshold(fit.oof_scores, y_cal, target_fpr, confidence)  # for comparison only
    threshold = rule.threshold
    timings["fit_s"] = time.perf_counter() - mark

    # 5. write the probe, then score with the graph's own head
    write_probe(model, fit, feature=feature, threshold=threshold, layers=chosen_layers, probe_layers=probe_layers)
    all_scores = graph_scores(model, extracted.candidates[feature])
    heldout = operating_point(all_scores[held_index], y_held, threshold)
    flagged_held = all_scores[held_index] > threshold
    heldout["tpr_interval"] = rate_with_interval(flagged_held[y_held == 1], confidence)
    heldout["fpr_interval"] = rate_with_interval(flagged_held[y_held == 0], confidence)
    held_prompts = [prompts[i] for i in held_index]
    per_category = per_category_rates(all_scores[held_index], held_prompts, threshold, confidence)
    # sklearn on the same features in float64 (its StandardScaler would otherwise scale float32 in float32)
    sklearn_held = fit.pipeline.predict_proba(extracted.candidates[feature][held_index].double().numpy())[:, 1]
    heldout["graph_vs_sklearn_max_abs"] = float(np.abs(all_scores[held_index] - sklearn_held).max())
    calibration = {
        "out_of_fold": operating_point(fit.oof_scores, y_cal, threshold),
        "in_sample": operating_point(all_scores[cal_index], y_cal, threshold),
    }
    per_modality = modality_rates(all_scores[held_index], held_prompts, threshold, confidence)
    loso_rates = source_heldout_rates(loso_scores, prompts, threshold, confidence)
    transfer_rates = {}
    mark = time.perf_counter()
    for name, transfer_prompts in (transfer_sets or {}).items():
        transfer_x = extract_features(model, processor, list(transfer_prompts), batch_size=batch_size,
                                      candidates=(feature,), layer_states=False, progress=progress,
                                      description=f"transfer: {name}", log=log, clock=clock).candidates[feature]
        transfer_labels = np.asarray([int(p.label) for p in transfer_prompts])
        transfer_scores = graph_scores(model, transfer_x)
        transfer_rates[name] = {
            "flagged": rate_with_interval(transfer_scores[transfer_labels == 1] > threshold, confidence),
            "flagged_at_rows_threshold": rate_with_interval(transfer_scores[transfer_labels == 1]
                                                            > rows_rule.threshold, confidence),
        }
    timings["transfer_sets_s"] = time.perf_counter() - mark
    held_flag_rows = all_scores[held_index] > rows_rule.threshold
    alternative = {
        "rule": "the same bound on out-of-fold scores of rows of the fitted sources (not shipped)",
        "threshold": rows_rule.threshold,
        "heldout_tpr": float(held_flag_rows[y_held == 1].mean()),
        "heldout_fpr": float(held_flag_rows[y_held == 0].mean()),
        "heldout_image": modality_rates(all_scores[held_index], held_prompts, rows_rule.threshold, confidence)["image"],
        "loso_fpr_by_source": source_heldout_rates(loso_scores, prompts, rows_rule.threshold,
                                                   confidence)["fpr_by_source"],
    }

    # 6. the chosen feature's leave-one-out figures, digest
    loso, loco = transfer[feature]["loso"], transfer[feature]["loco"]
    digest = data_digest(cal_prompts)

    metrics = {
        "auroc": heldout["auroc"],
        "tpr": heldout["tpr"],
        "fpr": heldout["fpr"],
        "features": feature,
        "layers": list(chosen_layers),
        "target_fpr": target_fpr,
        "calibration_digest": digest,
        "n_calibration": int(len(cal_index)),
        "n_heldout": int(len(held_index)),
        "heldout_harmful": heldout["n_harmful"],
        "heldout_benign": heldout["n_benign"],
        "heldout_fraction": heldout_fraction,
        "C": fit.C,
        "cv_auroc": fit.cv_auroc,
        "candidates_cv_auroc": {name: figure["cv_auroc"] for name, figure in choice.figures.items()},
        "candidates": {name: {key: figure.get(key) for key in ("cv_auroc", "loco_mean_auroc", "loso_mean_auroc",
                                                                 "transfer_auroc", "C", "dim")}
                       for name, figure in choice.figures.items()},
        "features_chosen_by": "transfer (mean of leave-one-category-out and leave-one-source-out AUROC)"
        if features == "auto" else "user",
        "probe_layers": list(probe_layers) if feature in MULTI_LAYER_FEATURES else None,
        "policy": policy.to_dict(),
        "threshold_rule": {**rule.to_dict(), "rule": "largest k with P(Binomial(n_benign, target) <= k) <= "
                           "1 - confidence on the calibration split's benign scores, each prompt scored by a probe "
                           "fitted without its source (leave-one-source-out)"},
        "threshold_rows_rule": alternative,
        "threshold_benign_source_held_out": int((~np.isnan(loso_scores[cal_index]) & (y_cal == 0)).sum()),
        "heldout_by_modality": per_modality,
        "loso_fpr_by_source": loso_rates["fpr_by_source"],
        "loso_tpr_by_source": loso_rates["tpr_by_source"],
        "loso_fpr_by_modality": loso_rates["fpr_by_modality"],
        "loso_tpr_by_modality": loso_rates["tpr_by_modality"],
        "transfer": transfer_rates,
        "n_calibration_image": int(sum(modality(prompts[i]) == "image" for i in cal_index)),
        "n_heldout_image": int(sum(modality(prompts[i]) == "image" for i in held_index)),
        "tpr_interval": [heldout["tpr_interval"]["low"], heldout["tpr_interval"]["high"]],
        "fpr_interval": [heldout["fpr_interval"]["low"], heldout["fpr_interval"]["high"]],
        "interval_confidence": confidence,
        "per_category_tpr": per_category["tpr"],
        "per_family_fpr": per_category["fpr"],
        "per_source_fpr": per_category["fpr_by_source"],
        "loco_mean_auroc": loco["mean_auroc"],
        "loco_min_auroc": loco["min_auroc"],
        "loco_auroc": {name: record["auroc"] for name, record in loco["per_category"].items()},
        "calibration_oof_tpr": calibration["out_of_fold"]["tpr"],
        "calibration_oof_fpr": calibration["out_of_fold"]["fpr"],
        "loso_mean_auroc": loso["mean_auroc"],
        "loso_min_auroc": loso["min_auroc"],
        "loso_auroc": {name: record["auroc"] for name, record in loso["per_source"].items()},
        "layers_chosen_by": "localisation" if layers == "auto" else "user",
    }
    if layers == "auto" and localisation is not None:
        metrics["localisation_branch"] = localisation.reasons.get("branch")
    model.set_sasa(dataclasses.replace(model.sasa, metrics=metrics))

    # 7. files and the audit record
    if plot_dir is not None and localisation is not None:
        localisation.save(plot_dir)
    records = [
        {
            "text": p.text,
            "label": int(p.label),
            "source": p.source,
            "split": "heldout" if heldout_mask[i] else "calibration",
            "category": getattr(p, "category", None),
            "modality": modality(p),
            "image_sha256": image_sha256(getattr(p, "image", None)),
            "score": float(all_scores[i]),
        }
        for i, p in enumerate(prompts)
    ]
    timings["total_s"] = time.perf_counter() - started
    timings["forward_s"] = clock.seconds
    return CalibrationReport(
        layers=chosen_layers, feature=feature, threshold=threshold, target_fpr=target_fpr, heldout=heldout,
        calibration=calibration, candidates=choice.figures, C=fit.C, loso=loso, digest=digest, metrics=metrics,
        localisation=localisation, records=records, timings=timings,
    )
