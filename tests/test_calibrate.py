"""End-to-end calibration on a tiny model; the embedded SmolLM2 model with the built-in set (integration)."""

from __future__ import annotations

import dataclasses
import json

import numpy as np
import pytest
import torch

from sasa_patcher.modeling_sasa import PROBE_FEATURES
from sasa_patcher.probes.calibrate import calibrate
from sasa_patcher.probes.features import encode_prompts
from sasa_patcher.probes.splits import split
from tiny_calibration import patched_tiny, synthetic_prompts, tiny_processor

PLAIN_KEYS = ("auroc", "tpr", "fpr", "features", "layers")


@pytest.fixture(autouse=True)
def isolated_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("SASA_PATCHER_CACHE", str(tmp_path / "cache"))


def run(prompts, **options):
    model = patched_tiny("qwen2_vl")
    processor = tiny_processor("qwen2_vl")
    options = {"Cs": [1e-2, 1.0], "folds": 3, "progress": False, "batch_size": 16, **options}
    return model, processor, calibrate(model, processor, prompts, **options)


def test_auto_calibration_writes_everything_into_the_model(tmp_path):
    prompts = synthetic_prompts(64)
    model, processor, report = run(prompts, plot_dir=tmp_path / "plots", target_fpr=0.1, max_pairs=8)
    s, f = report.layers
    assert 0 <= s < f < 6 and (model.sasa.safety_layer, model.sasa.semantic_layer) == (s, f)
    sasa = model.config.sasa
    assert sasa["threshold"] == report.threshold == pytest.approx(model.sasa_probe.threshold.item())
    assert sasa["probe_features"] == report.feature
    for key in PLAIN_KEYS:
        assert key in sasa["metrics"], key
    assert sasa["metrics"]["layers"] == [s, f] and sasa["metrics"]["features"] == report.feature
    assert sasa["metrics"]["auroc"] == report.heldout["auroc"]
    assert set(report.candidates) == set(PROBE_FEATURES)
    assert report.calibration["out_of_fold"]["fpr"] <= 0.1
    assert report.heldout["graph_vs_sklearn_max_abs"] <= 1e-5
    assert report.heldout["auroc"] > 0.8  # the word lists are easy for any model
    assert set(report.loso["per_source"]) == {"set-a", "set-b"}
    json.dumps(sasa)  # the config section must stay JSON
    json.dumps(report.to_dict())
    assert (tmp_path / "plots" / "localisation.png").stat().st_size > 1000
    saved = json.loads((tmp_path / "plots" / "localisation.json").read_text())
    assert (saved["safety_layer"], saved["semantic_layer"]) == (s, f)
    # the patched forward's verdict is the probe's score for that prompt
    with torch.no_grad():
        verdict = model(**encode_prompts(processor, prompts[:3]), use_cache=False).unsafe_prob  # scoring: no gate
    assert np.allclose(verdict.numpy(), [record["score"] for record in report.records[:3]], atol=1e-5)


def test_audit_records_follow_the_hash_split(tmp_path):
    prompts = synthetic_prompts(48)
    _, _, report = run(prompts, layers=(1, 3), features="logits")
    expected = split(prompts)
    heldout_texts = {p.text for p in expected.heldout}
    assert [r["text"] for r in report.records] == [p.text for p in prompts]
    assert all((r["split"] == "heldout") == (r["text"] in heldout_texts) for r in report.records)
    assert report.metrics["n_heldout"] == len(expected.heldout)
    path = report.write_audit(tmp_path / "calibration.jsonl")
    lines = [json.loads(line) for line in path.read_text().splitlines()]
    assert len(lines) == 48 and set(lines[0]) >= {"text", "label", "source", "split", "image_sha256"}


def test_modality_held_out_sources_and_transfer_sets_are_reported(tmp_path):
    prompts = synthetic_prompts(72, image_dir=tmp_path, sources=("set-a", "set-b", "set-c"))
    attack = [dataclasses.replace(p, source="attack") for p in synthetic_prompts(10, seed=5) if p.label == 1]
    model, _, report = run(prompts, layers=(1, 3), features="logits", transfer_sets={"attack": attack})
    metrics = model.config.sasa["metrics"]
    assert metrics["transfer"]["attack"]["flagged"]["n"] == len(attack) == 5
    assert set(metrics["heldout_by_modality"]) >= {"text", "image"}
    images = sum(1 for r in report.records if r["modality"] == "image" and r["split"] == "heldout")
    held = metrics["heldout_by_modality"]["image"]
    assert images == held["tpr"]["n"] + held["fpr"]["n"] == metrics["n_heldout_image"] > 0
    # every benign row of a source is scored by a probe fitted without that source
    assert set(metrics["loso_fpr_by_source"]) == {"set-a", "set-b", "set-c"}
    assert sum(v["n"] for v in metrics["loso_fpr_by_source"].values()) == sum(1 for p in prompts if p.label == 0)
    assert metrics["threshold_benign_source_held_out"] == report.metrics["threshold_rule"]["n_benign"]
    assert 0 <= metrics["threshold_rows_rule"]["threshold"] <= 1
    json.dumps(metrics)


def test_given_layers_and_feature_are_used():
    _, _, report = run(synthetic_prompts(48), layers=(2, 4), features="logits")
    assert report.layers == (2, 4) and report.feature == "logits" and report.localisation is None
    assert set(report.candidates) == {"logits"}


def test_heldout_data_is_used_for_neither_fit_nor_threshold():
    """Flipping every held-out label changes the held-out figures and nothing else."""
    prompts = synthetic_prompts(48)
    heldout = {p.text for p in split(prompts).heldout}
    flipped = [dataclasses.replace(p, label=1 - p.label) if p.text in heldout else p for p in prompts]
    options = {"layers": (1, 3), "features": "projected-logits"}
    model_a, _, first = run(prompts, **options)
    model_b, _, second = run(flipped, **options)
    assert first.threshold == second.threshold and first.C == second.C
    assert torch.equal(model_a.sasa_probe.linear.weight, model_b.sasa_probe.linear.weight)
    assert first.digest == second.digest
    assert first.heldout["auroc"] == pytest.approx(1 - second.heldout["auroc"])


def test_a_split_without_both_classes_is_refused():
    prompts = [p for p in synthetic_prompts(40) if p.label == 1]
    with pytest.raises(ValueError, match="no benign"):
        run(prompts, layers=(1, 3))


@pytest.mark.slow
@pytest.mark.integration
def test_embedded_smol_qwen_vl_with_the_builtin_set(tmp_path):
    """A small slice of the built-in set (both forms, both labels) through the real SmolLM2 weights."""
    from sasa_patcher.loading import load_model
    from sasa_patcher.modeling_sasa import SasaSettings
    from sasa_patcher.patching import default_layers, patch_model
    from sasa_patcher.probes.calibration_set import builtin_calibration_set

    loaded = load_model("smol-qwen-vl", dtype="float32")
    layers = loaded.model.config.get_text_config().num_hidden_layers
    model = patch_model(loaded.model, SasaSettings(*default_layers(layers)))
    prompts = builtin_calibration_set(per_cell=12)
    report = calibrate(model, loaded.processor, prompts, plot_dir=tmp_path, batch_size=16, progress=False,
                       Cs=[1e-3, 1e-2], folds=3, pairs=None)
    s, f = report.layers
    assert 0 <= s < f < layers
    # ~15 held-out prompts: only "better than chance" is stable here; full-set figures are measured separately
    assert report.heldout["auroc"] > 0.5, report.heldout
    assert report.heldout["graph_vs_sklearn_max_abs"] <= 1e-5
    for key in PLAIN_KEYS:
        assert key in model.config.sasa["metrics"]
