"""Layer localisation: the rule for (s, f) on made-up curves, the curves and files on a tiny model."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from sasa_patcher.probes.localisation import choose_layers, localise, semantic_curve
from tiny_calibration import patched_tiny, synthetic_prompts, tiny_processor

L = 12


def semantic(gap, z=10.0):
    return {"gap": list(gap), "gap_z": [z] * len(gap)}


def test_s_is_where_safety_separability_emerges():
    safety = [0.5, 0.6, 0.8, 0.96, 0.97, 0.99, 0.99, 1.0, 1.0, 1.0, 1.0, 1.0]
    s, f, reasons = choose_layers(safety, None, None, L)
    assert s == 3  # first layer with AUROC - 0.5 >= 0.9 * 0.5
    assert f == 5 and reasons["branch"].startswith("fallback")


def test_f_is_the_start_of_the_semantic_plateau_after_s():
    safety = [0.5, 0.99] + [1.0] * 10
    gap = [0.0, 0.0, 0.1, 0.2, 0.5, 0.8, 0.97, 1.0, 0.99, 0.6, 0.3, 0.2]
    s, f, reasons = choose_layers(safety, semantic(gap), None, L)
    assert (s, f) == (1, 6) and reasons["branch"] == "semantic plateau"


def test_f_stays_before_the_expression_onset():
    safety = [0.5, 0.99] + [1.0] * 10
    gap = [0.0] * 5 + [0.5, 0.6, 0.7, 0.8, 0.9, 1.0, 1.0]
    expression = {"harmful_mass": [0.0] * 8 + [0.4, 0.5, 0.6, 0.7], "benign_mass": [0.0] * 12}
    s, f, reasons = choose_layers(safety, semantic(gap), expression, L)
    assert reasons["expression_onset"] == 8 and reasons["semantic_range"] == [2, 7]
    assert (s, f) == (1, 7)


def test_an_insignificant_semantic_gap_falls_back():
    safety = [0.5, 0.99] + [1.0] * 10
    s, f, reasons = choose_layers(safety, semantic(np.linspace(0, 1, L), z=1.0), None, L)
    assert (s, f) == (1, 3) and "not significant" in reasons["branch"]


@pytest.mark.parametrize("seed", range(20))
def test_the_rule_always_gives_valid_layers(seed):
    rng = np.random.default_rng(seed)
    layers = int(rng.integers(2, 40))
    safety = rng.uniform(0.3, 1.0, layers)
    gap = rng.normal(size=layers)
    expression = {"harmful_mass": rng.uniform(size=layers).tolist(), "benign_mass": rng.uniform(size=layers).tolist()}
    s, f, _ = choose_layers(safety, {"gap": gap, "gap_z": rng.normal(0, 5, layers)}, expression, layers)
    assert 0 <= s < f <= layers - 1


def test_semantic_curve_separates_matched_pairs_from_noise():
    generator = torch.Generator().manual_seed(0)
    text = torch.randn(16, 3, 8, generator=generator)
    image = text.clone()
    image[:, 0] = torch.randn(16, 8, generator=generator)  # layer 0: unrelated; layers 1, 2: the same
    curve = semantic_curve(image, text + 5.0 * torch.ones(8) * 0)
    assert curve["gap"][0] < 0.3 and curve["gap"][1] > 0.9 and curve["gap_z"][2] > 3
    assert curve["raw_cosine"][2] == pytest.approx(1.0)
    assert curve["pairs"] == 16


@pytest.mark.parametrize("family_name", ["qwen2_vl", "llava"])
def test_localise_on_a_tiny_model_writes_plot_and_json(family_name, tmp_path, monkeypatch):
    monkeypatch.setenv("SASA_PATCHER_CACHE", str(tmp_path / "cache"))
    model = patched_tiny(family_name)
    processor = tiny_processor(family_name)
    prompts = synthetic_prompts(40)
    before = model.sasa
    result = localise(model, processor, prompts, batch_size=8, progress=False, max_pairs=8)
    assert model.sasa == before, "localisation must leave the model's settings as they were"
    assert 0 <= result.safety_layer < result.semantic_layer < result.num_layers == 6
    assert len(result.safety_auroc) == 6 and result.semantic["pairs"] == 8
    assert len(result.expression["harmful_mass"]) == 6
    paths = result.save(tmp_path / "plots")
    assert paths["png"].stat().st_size > 1000
    assert paths["png"].read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    saved = json.loads(paths["json"].read_text())
    for key in ("safety_auroc", "semantic", "expression", "reasons", "safety_layer", "semantic_layer"):
        assert key in saved
    assert len(saved["semantic"]["gap"]) == 6 and saved["safety_layer"] == result.safety_layer
