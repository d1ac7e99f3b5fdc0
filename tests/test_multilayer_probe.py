"""The multi-layer probes (several layers' last-position states, concatenated; and the same with each layer's
mean over the prompt's last POOLED_TOKENS positions) and the deployment policy: the features equal a direct
reference, batched equals one by one, the head in the graph equals its sklearn fit, the ONNX export matches
PyTorch, the policy relabels and is recorded."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch

from sasa_patcher.modeling_sasa import POOLED_TOKENS, SasaSettings, default_probe_layers, transformers_base_class
from sasa_patcher.patching import patch_model
from sasa_patcher.probes.calibrate import calibrate
from sasa_patcher.probes.features import encode_prompts, extract_features
from sasa_patcher.probes.probe import fit_probe, graph_scores, write_probe
from sasa_patcher.probes.taxonomy import parse_policy
from tiny_calibration import patched_tiny, synthetic_prompts, tiny_processor
from tiny_models import FAMILIES


@pytest.fixture(autouse=True)
def isolated_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("SASA_PATCHER_CACHE", str(tmp_path / "cache"))


def test_default_probe_layers():
    assert default_probe_layers(30) == [8, 12, 16, 20]
    assert default_probe_layers(6) == [2, 3, 4]
    with pytest.raises(ValueError, match="probe_layers"):
        SasaSettings(1, 3, probe_features="multi-layer").validate(6)
    with pytest.raises(ValueError, match="probe_layers"):
        SasaSettings(1, 3, probe_features="multi-layer", probe_layers=[2, 9]).validate(6)
    with pytest.raises(ValueError, match="multi-layer-pooled probe needs probe_layers"):
        SasaSettings(1, 3, probe_features="multi-layer-pooled").validate(6)


@pytest.mark.parametrize("family_name", ["qwen2_vl", "llava"])
def test_pooled_feature_equals_a_direct_reference_batched_and_alone(family_name, tmp_path):
    """Per layer: the last prompt position's state, then the mean of the last POOLED_TOKENS positions, from the
    base model's own hidden states of each prompt alone (no padding); prompts shorter and longer than the window,
    with and without an image, batched with left padding."""
    model, processor = patched_tiny(family_name), tiny_processor(family_name)
    layers = [0, 2, 4]  # not the last layer: transformers' last hidden state is after the final norm
    model.set_sasa(dataclasses.replace(model.sasa, probe_layers=layers))
    prompts = synthetic_prompts(6, seed=5, image_dir=tmp_path)
    prompts[1] = dataclasses.replace(prompts[1], text="hi")  # fewer text tokens than the window
    assert any(p.image is not None for p in prompts)
    batched = extract_features(model, processor, prompts, candidates=["multi-layer-pooled"], batch_size=6,
                               progress=False).candidates["multi-layer-pooled"]
    hidden = model.config.get_text_config().hidden_size
    assert batched.shape == (6, 2 * len(layers) * hidden)
    base = transformers_base_class(type(model))  # the unpatched forward
    for index, prompt in enumerate(prompts):
        inputs = encode_prompts(processor, [prompt])
        with torch.no_grad():
            states = base.forward(model, **inputs, output_hidden_states=True, use_cache=False).hidden_states
        lasts = [states[layer + 1][0, -1] for layer in layers]
        means = [states[layer + 1][0, -POOLED_TOKENS:].mean(0) for layer in layers]
        expected = torch.cat(lasts + means)
        assert (batched[index] - expected).abs().max() <= 1e-4, (index, prompt.text)


def test_multi_layer_head_equals_its_sklearn_fit():
    model, processor = patched_tiny("qwen2_vl"), tiny_processor("qwen2_vl")
    prompts = synthetic_prompts(40)
    model.set_sasa(dataclasses.replace(model.sasa, probe_layers=[0, 2, 5]))
    features = extract_features(model, processor, prompts, candidates=["multi-layer"], progress=False)
    X = features.candidates["multi-layer"]
    hidden = model.config.get_text_config().hidden_size
    states = extract_features(model, processor, prompts, candidates=["hidden"], progress=False).layer_states
    assert X.shape == (40, 3 * hidden)
    assert torch.equal(X, torch.cat([states[:, 0], states[:, 2], states[:, 5]], dim=-1))
    fit = fit_probe(X, features.labels, Cs=[0.1, 1.0], folds=3)
    write_probe(model, fit, feature="multi-layer", threshold=0.5)
    assert model.sasa.probe_layers == [0, 2, 5] and model.sasa_probe.linear.weight.shape == (1, 3 * hidden)
    expected = fit.pipeline.predict_proba(X.double().numpy())[:, 1]
    assert np.abs(graph_scores(model, X) - expected).max() <= 1e-5
    with torch.no_grad():  # the patched forward's own verdict
        verdict = model(**encode_prompts(processor, prompts[:4]), use_cache=False).unsafe_prob  # scoring: no gate
    assert np.abs(verdict.numpy() - expected[:4]).max() <= 1e-5


def test_policy_changes_labels_and_is_recorded():
    prompts = synthetic_prompts(64)
    categories = ["hate", "sexual_content"]
    prompts = [dataclasses.replace(p, category=categories[i % 4 // 2] if p.label else "everyday")
               for i, p in enumerate(prompts)]
    model, processor = patched_tiny("qwen2_vl"), tiny_processor("qwen2_vl")
    options = {"layers": (1, 3), "features": "multi-layer", "Cs": [1.0], "folds": 3, "progress": False,
               "target_fpr": 0.1}
    report = calibrate(model, processor, prompts, policy=parse_policy("all,-sexual_content"), **options)
    metrics = model.config.sasa["metrics"]
    assert metrics["policy"]["allowed"] == ["sexual_content"] and "hate" in metrics["policy"]["harmful"]
    assert set(metrics["per_category_tpr"]) == {"hate"}  # sexual content now counts as benign
    assert "sexual_content" in metrics["per_family_fpr"]
    records = {r["text"]: r for r in report.records}
    assert all(records[p.text]["label"] == 0 for p in prompts if p.category == "sexual_content")
    assert report.heldout["graph_vs_sklearn_max_abs"] <= 1e-5
    assert model.sasa.probe_features == "multi-layer" and metrics["probe_layers"] == model.sasa.probe_layers
    assert metrics["threshold_rule"]["target_fpr"] == 0.1 and len(metrics["fpr_interval"]) == 2
    assert set(metrics["candidates"]["multi-layer"]) >= {"cv_auroc", "loco_mean_auroc", "loso_mean_auroc"}


@pytest.mark.parametrize("feature", ["multi-layer", "multi-layer-pooled"])
def test_multi_layer_probe_onnx_matches_pytorch(tmp_path, feature):
    from sasa_patcher.export.onnx_export import export_onnx

    family = next(item for item in FAMILIES if item.name == "qwen2_vl")
    settings = SasaSettings(1, 3, probe_features=feature, probe_layers=[0, 2, 5], refusal_token_ids=[7, 8, 9, 1])
    model = patch_model(family.build(), settings)
    weight = model.sasa_probe.linear.weight
    weight.data = torch.randn(weight.shape, generator=torch.Generator().manual_seed(0)) * 0.3
    cases = [{"name": "text-batch1", **family.make_batch([9], [False])},
             {"name": "mixed-batch3-left-padded", **family.make_batch([5, 12, 8], [True, False, True], side="left")},
             {"name": "longer-than-the-window", **family.make_batch([30, 21], [False, True], side="left")}]
    summary = export_onnx(model, None, tmp_path, image_size=(56, 56), parity_cases=cases)
    parity = summary["parity"]
    assert parity["passed"], parity["worst"]
    probabilities = [p for case in parity["cases"] for p in case["unsafe_prob"]]
    assert len(set(np.round(probabilities, 4))) > 1  # the probe is not constant


def test_tail_window_leaves_out_pads_on_either_side_and_stops_at_the_last_token():
    from sasa_patcher.modeling_sasa import last_token_index, tail_mean, tail_weights

    mask = torch.tensor([[0, 0, 0, 1, 1, 1],    # left-padded, shorter than the window
                         [1, 1, 1, 1, 1, 1],    # longer than the window
                         [1, 1, 0, 0, 0, 0]])   # right-padded
    last = last_token_index(mask, 6, 3, "cpu")
    weights = tail_weights(mask, 6, last, tokens=4)
    assert weights.tolist() == [[0, 0, 0, 1, 1, 1], [0, 0, 1, 1, 1, 1], [1, 1, 0, 0, 0, 0]]
    states = torch.arange(18.0).reshape(3, 6, 1)
    assert tail_mean(states, weights)[:, 0].tolist() == [4.0, 9.5, 12.5]
