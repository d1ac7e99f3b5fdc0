"""Model resolution, dtype/device options and LoRA merging."""

from __future__ import annotations

import json

import pytest
import torch
from peft import LoraConfig, get_peft_model

from sasa_patcher.errors import UserInputError
from sasa_patcher.loading import ALIASES, check_adapter, merge_lora_adapter, resolve_model, torch_dtype
from tiny_models import build_qwen2_vl, qwen_batch


def test_aliases_name_the_documented_models():
    assert ALIASES == {
        "qwen-vl": "Qwen/Qwen2-VL-2B-Instruct",
        "qwen2.5-vl": "Qwen/Qwen2.5-VL-3B-Instruct",
        "llava": "llava-hf/llava-1.5-7b-hf",
        "gemma3": "google/gemma-3-4b-it",
    }


def test_local_directory_resolves_to_itself(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "qwen2_vl"}))
    assert resolve_model(str(tmp_path)) == tmp_path


@pytest.mark.parametrize(
    "spec,message",
    [
        ("no-such-alias", "unknown model alias"),
        ("/definitely/missing/model", "does not exist"),
        ("./missing-model-dir", "does not exist"),
    ],
)
def test_bad_model_specs_are_user_errors(spec, message):
    with pytest.raises(UserInputError, match=message):
        resolve_model(spec)


def test_hub_id_missing_offline_names_the_embedded_default(monkeypatch, tmp_path):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path))
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(UserInputError, match="smol-qwen-vl"):
        resolve_model("someone/not-cached-model")


def test_hub_id_served_from_cache_when_offline(monkeypatch, tmp_path):
    """A snapshot in the local cache loads with no network."""
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    repo = tmp_path / "models--someone--cached-model"
    snapshot = repo / "snapshots" / ("a" * 40)
    snapshot.mkdir(parents=True)
    (snapshot / "config.json").write_text("{}")
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text("a" * 40)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path))
    assert resolve_model("someone/cached-model") == snapshot


def test_dtype_defaults():
    assert torch_dtype("auto", "cpu") is torch.float32
    assert torch_dtype("auto", "cuda") is torch.bfloat16
    assert torch_dtype("bf16", "cpu") is torch.bfloat16
    with pytest.raises(UserInputError, match="unknown dtype"):
        torch_dtype("int3", "cpu")


def test_unreadable_adapters_are_refused(tmp_path):
    with pytest.raises(UserInputError, match="does not exist"):
        check_adapter(tmp_path / "missing")
    with pytest.raises(UserInputError, match="adapter_config.json"):
        check_adapter(tmp_path)
    (tmp_path / "adapter_config.json").write_text("{")
    (tmp_path / "adapter_model.safetensors").write_bytes(b"")
    with pytest.raises(UserInputError, match="unreadable"):
        check_adapter(tmp_path)


@torch.no_grad()
def test_lora_adapter_is_merged_into_the_base(tmp_path):
    base = build_qwen2_vl()
    config = LoraConfig(r=4, target_modules=["q_proj", "v_proj"], init_lora_weights=False)
    lora = get_peft_model(build_qwen2_vl(), config)
    lora.save_pretrained(tmp_path)
    batch = qwen_batch([7], [True])
    expected = lora(**batch).logits
    merged = merge_lora_adapter(base, tmp_path)
    assert type(merged).__name__ == "Qwen2VLForConditionalGeneration"
    assert (merged(**batch).logits - expected).abs().max().item() <= 1e-5


def test_shape_models_resolve_to_their_cached_build(tmp_path, monkeypatch):
    from sasa_patcher import shapes

    monkeypatch.setenv("SASA_PATCHER_CACHE", str(tmp_path))
    built = tmp_path / "shapes" / "qwen-vl"
    built.mkdir(parents=True)
    (built / "config.json").write_text(json.dumps({"model_type": "qwen2_vl"}))
    (built / shapes.STAMP_NAME).write_text(json.dumps({"recipe": shapes.RECIPE_VERSION}))
    assert resolve_model("shape:qwen-vl") == built


def test_unknown_shape_model_lists_the_known_ones():
    with pytest.raises(UserInputError, match="shape:qwen2.5-vl"):
        resolve_model("shape:nope")


def test_unknown_alias_message_lists_shape_models():
    with pytest.raises(UserInputError, match="shape:llava"):
        resolve_model("no-such-alias")
