"""The probe-ceiling measurement: its states against a direct reference, and its figures on features whose
separability is known."""

import numpy as np
import pytest
import torch

import tiny_models as tm
from sasa_patcher.evaluation.probe_ceiling import best_tpr_at, candidates, judge, main, prompt_states
from sasa_patcher.modeling_sasa import SasaSettings
from sasa_patcher.patching import patch_model
from sasa_patcher.probes.datasets import Prompt
from sasa_patcher.probes.features import encode_prompts, extract_features
from sasa_patcher.probes.splits import is_heldout
from tiny_calibration import synthetic_prompts, tiny_processor


@pytest.mark.parametrize("family_name", ["qwen2_vl", "llava"])
def test_states_batched_equal_a_direct_forward_of_each_prompt_alone(family_name, tmp_path):
    family = next(item for item in tm.FAMILIES if item.name == family_name)
    model, processor = family.build().eval(), tiny_processor(family_name)
    prompts = synthetic_prompts(7, seed=3, image_dir=tmp_path)
    assert any(p.image is not None for p in prompts)
    layers = [1, 4]
    states = prompt_states(model, processor, prompts, layers, batch_size=4, progress=False)
    for index, prompt in enumerate(prompts):
        batch = encode_prompts(processor, [prompt])  # one prompt: no padding
        with torch.no_grad():
            output = model(**batch, output_hidden_states=True, use_cache=False)
        text = batch["input_ids"][0] != tm.IMAGE_TOKEN
        for k, layer in enumerate(layers):
            hidden = output.hidden_states[layer + 1][0]
            np.testing.assert_allclose(states["last"][index, k], hidden[-1].numpy(), atol=1e-5)
            np.testing.assert_allclose(states["text_mean"][index, k], hidden[text].mean(0).numpy(), atol=1e-5)
        np.testing.assert_allclose(states["logits"][index], output.logits[0, -1].numpy(), atol=1e-4)
    flat = candidates(states)
    assert flat["multi-layer+text-mean"].shape == (7, 2 * len(layers) * tm.HIDDEN)
    # the graph's own features of the same model, patched: what the ceiling judges is what calibration fits
    patched = patch_model(model, SasaSettings(0, 2, probe_layers=layers))
    graph = extract_features(patched, processor, prompts, candidates=["multi-layer", "multi-layer-pooled"],
                             batch_size=4, progress=False).candidates
    for name in ("multi-layer", "multi-layer-pooled"):
        np.testing.assert_allclose(flat[name], graph[name].numpy(), atol=1e-5)


def test_best_tpr_at_a_false_positive_rate():
    labels = np.array([0] * 20 + [1] * 10)
    scores = np.r_[np.linspace(0, 0.5, 20), np.linspace(0.45, 1.0, 10)]
    # two benign scores (0.47, 0.5) lie above the lowest harmful one (0.45): it is caught only at FPR 0.1
    assert best_tpr_at(scores, labels, 0.0) == pytest.approx(0.9)
    assert best_tpr_at(scores, labels, 0.05) == pytest.approx(0.9)
    assert best_tpr_at(scores, labels, 0.10) == pytest.approx(1.0)


def _prompts(count: int) -> list[Prompt]:
    sources = ("alpha", "beta", "gamma", "delta")
    return [Prompt(text=f"request number {i}", label=i % 2, source=sources[(i // 2) % 4], form="question")
            for i in range(count)]


def test_separable_features_reach_the_ceiling_and_noise_does_not():
    prompts = _prompts(240)
    labels = np.array([p.label for p in prompts])
    rng = np.random.default_rng(0)
    noise = rng.normal(size=(len(prompts), 8))
    separable = noise + 6.0 * labels[:, None]
    transfer = [Prompt(text=f"past {i}", label=1, source="past", form="question") for i in range(10)]
    clear = judge(separable, prompts, transfer, rng.normal(size=(10, 8)) + 6.0)
    assert clear["ceiling_tpr"] == 1.0 and clear["heldout_auroc"] == 1.0
    assert clear["heldout_tpr"]["rate"] == 1.0 and clear["heldout_fpr"]["rate"] == 0.0
    assert clear["transfer_flagged"]["k"] == 10
    heldout = sum(is_heldout(p) for p in prompts)
    assert clear["heldout_tpr"]["n"] + clear["heldout_fpr"]["n"] == heldout
    assert [point["share"] for point in clear["learning_curve"]] == [0.25, 0.5, 0.75, 1.0]
    assert clear["learning_curve"][-1]["ceiling_tpr"] == clear["ceiling_tpr"]
    blind = judge(noise, prompts, curve=False)
    assert blind["ceiling_tpr"] < 0.5 and "learning_curve" not in blind and "transfer_flagged" not in blind


def test_bad_layers_exit_2_and_write_nothing(tmp_path, capsys):
    out = tmp_path / "ceiling"
    assert main(["--model", "smol-qwen-vl", "--layers", "8,x", "--out", str(out)]) == 2
    assert "--layers" in capsys.readouterr().err
    assert main(["--out", str(tmp_path / "missing" / "ceiling")]) == 2
    assert list(tmp_path.iterdir()) == []
