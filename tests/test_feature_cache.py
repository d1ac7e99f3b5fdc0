"""The per-batch feature files: one full forward per prompt with localised layers, resume, content keys."""

from __future__ import annotations

import dataclasses
import time

import pytest
import torch

from sasa_patcher.modeling_sasa import PROJECTED_FEATURES
from sasa_patcher.probes import feature_cache
from sasa_patcher.probes.calibrate import calibrate
from sasa_patcher.probes.feature_cache import FeatureCache, model_digest
from sasa_patcher.probes.features import ForwardClock, extract_features, projected_features
from tiny_calibration import patched_tiny, synthetic_prompts, tiny_processor

BATCH = 8


def count_layer_rows(model) -> dict[str, int]:
    """Rows (prompts) through each decoder layer, summed over calls: counts every layer call by batch size."""
    counts = {"rows": 0}
    layers = model.sasa_text_model().layers

    def hook(module, args, kwargs):
        counts["rows"] += args[0].shape[0] if args else kwargs["hidden_states"].shape[0]

    for layer in layers:
        layer.register_forward_pre_hook(hook, with_kwargs=True)
    return counts


def test_localised_calibration_runs_one_full_forward_per_prompt(tmp_path):
    prompts = synthetic_prompts(48)
    model, processor = patched_tiny("qwen2_vl"), tiny_processor("qwen2_vl")
    num_layers = model.config.get_text_config().num_hidden_layers
    counts = count_layer_rows(model)
    report = calibrate(model, processor, prompts, layers="auto", pairs=None, Cs=[1.0], folds=3, progress=False,
                       batch_size=BATCH, cache_dir=tmp_path / "features")
    s = report.layers[0]
    # every prompt once through all L layers, then the projected candidates through layers s+1..L-1 only
    assert counts["rows"] == len(prompts) * num_layers + len(prompts) * (num_layers - s - 1)
    assert not (tmp_path / "features").exists() or not any((tmp_path / "features").iterdir())
    # the time in those passes is what the calibration's overhead is stated against
    assert 0 < report.timings["forward_s"] < report.timings["total_s"]


def test_projected_features_from_stored_states_equal_a_full_forward(tmp_path):
    prompts = synthetic_prompts(20)
    model, processor = patched_tiny("qwen2_vl"), tiny_processor("qwen2_vl")
    cache = FeatureCache(tmp_path)
    extract_features(model, processor, prompts, batch_size=BATCH, candidates=("logits",), progress=False,
                     cache=cache, sequence_states=True)
    model.set_sasa(dataclasses.replace(model.sasa, safety_layer=1, semantic_layer=3))
    continued = projected_features(model, processor, prompts, cache, batch_size=BATCH, progress=False)
    direct = extract_features(model, processor, prompts, batch_size=BATCH, candidates=PROJECTED_FEATURES,
                              layer_states=False, progress=False).candidates
    for name in PROJECTED_FEATURES:
        assert torch.allclose(continued[name], direct[name], atol=1e-5), name


def test_a_stopped_extraction_resumes_without_recomputing(tmp_path):
    prompts = synthetic_prompts(32)
    model, processor = patched_tiny("qwen2_vl"), tiny_processor("qwen2_vl")
    cache = FeatureCache(tmp_path)
    counts = count_layer_rows(model)
    num_layers = model.config.get_text_config().num_hidden_layers
    original_save = cache.save

    def stop_after_two(kind, index, tensors):
        if cache.count("batch") == 2:
            raise KeyboardInterrupt
        original_save(kind, index, tensors)

    cache.save = stop_after_two
    with pytest.raises(KeyboardInterrupt):
        extract_features(model, processor, prompts, batch_size=BATCH, progress=False, cache=cache)
    assert cache.count("batch") == 2 and not list(tmp_path.glob("*.partial"))
    cache.save = original_save
    counts["rows"] = 0
    messages = []
    resumed = extract_features(model, processor, prompts, batch_size=BATCH, progress=False, cache=cache,
                               log=messages.append)
    s = model.sasa.safety_layer  # every candidate: all L layers, then the projected stream's s+1..L-1
    assert counts["rows"] == (len(prompts) - 2 * BATCH) * (2 * num_layers - s - 1)  # only the two missing batches
    assert any("2 of 4 batches read" in message for message in messages)
    fresh = extract_features(model, processor, prompts, batch_size=BATCH, progress=False)
    for name, value in fresh.candidates.items():
        assert torch.equal(resumed.candidates[name], value), name
    assert torch.equal(resumed.layer_states, fresh.layer_states)


def test_the_cache_key_follows_the_weights_and_the_prompts(tmp_path):
    prompts = synthetic_prompts(16)
    model = patched_tiny("qwen2_vl")
    key = FeatureCache.for_run(model, prompts, batch_size=BATCH, candidates=("logits",), root=tmp_path).directory
    assert key == FeatureCache.for_run(model, prompts, batch_size=BATCH, candidates=("logits",),
                                       root=tmp_path).directory
    assert key != FeatureCache.for_run(model, prompts[::-1], batch_size=BATCH, candidates=("logits",),
                                       root=tmp_path).directory
    before = model_digest(model)
    with torch.no_grad():
        model.lm_head.weight[0, 0] += 1.0
    assert model_digest(model) != before
    assert key != FeatureCache.for_run(model, prompts, batch_size=BATCH, candidates=("logits",),
                                       root=tmp_path).directory


def test_forward_clock_counts_every_prompt_of_every_pass(tmp_path):
    """The all-layer pass and the projected continuation each add their prompts and their model-call time."""
    prompts = synthetic_prompts(20)
    model, processor = patched_tiny("qwen2_vl"), tiny_processor("qwen2_vl")
    clock, cache = ForwardClock(), FeatureCache(tmp_path)
    started = time.perf_counter()
    extract_features(model, processor, prompts, batch_size=BATCH, candidates=("logits",), progress=False,
                     cache=cache, sequence_states=True, clock=clock)
    assert clock.prompts == len(prompts) and clock.seconds > 0
    first = clock.seconds
    projected_features(model, processor, prompts, cache, batch_size=BATCH, progress=False, clock=clock)
    assert clock.prompts == 2 * len(prompts) and first < clock.seconds < time.perf_counter() - started


def test_the_cache_key_follows_the_pooled_window(tmp_path, monkeypatch):
    """The window is a code constant, not a weight: changing it must not serve features pooled over the old one."""
    prompts = synthetic_prompts(8)
    model = patched_tiny("qwen2_vl")
    candidates = ("multi-layer-pooled",)
    key = FeatureCache.for_run(model, prompts, batch_size=BATCH, candidates=candidates, root=tmp_path).directory
    monkeypatch.setattr(feature_cache, "POOLED_TOKENS", feature_cache.POOLED_TOKENS * 2)
    assert key != FeatureCache.for_run(model, prompts, batch_size=BATCH, candidates=candidates,
                                       root=tmp_path).directory
