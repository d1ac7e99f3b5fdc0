"""Feature extraction through real processors (tiny character-level tokenizer) on tiny models."""

from __future__ import annotations

import pytest
import torch

import tiny_models as tm
from sasa_patcher.modeling_sasa import PROBE_FEATURES
from sasa_patcher.probes.features import encode_prompts, extract_features
from tiny_calibration import patched_tiny, synthetic_prompts, tiny_processor


def test_encode_is_left_padded_chat_with_generation_prompt(family, tmp_path):
    processor = tiny_processor(family.name)
    prompts = synthetic_prompts(4, image_dir=tmp_path)
    batch = encode_prompts(processor, prompts)
    mask = batch["attention_mask"]
    assert (mask[:, -1] == 1).all(), "left padding: every row ends with a real token"
    assert (mask[:, 0] == 0).any()
    assert batch["pixel_values"].shape[0] > 0
    ends = processor.tokenizer("<|im_start|>assistant\n", add_special_tokens=False)["input_ids"]
    assert batch["input_ids"][0, -len(ends):].tolist() == ends


@pytest.mark.parametrize("family_name", [f.name for f in tm.FAMILIES])
def test_batched_equals_one_by_one(family_name, tmp_path):
    model = patched_tiny(family_name)
    processor = tiny_processor(family_name)
    prompts = synthetic_prompts(7, image_dir=tmp_path)
    batched = extract_features(model, processor, prompts, batch_size=4, progress=False)
    single = extract_features(model, processor, prompts, batch_size=1, progress=False)
    assert set(batched.candidates) == set(PROBE_FEATURES)
    assert batched.layer_states.shape == (7, tm.LAYERS, tm.HIDDEN)
    assert batched.candidates["logits"].shape == (7, tm.VOCAB)
    assert batched.labels.tolist() == [p.label for p in prompts]
    for name in PROBE_FEATURES:
        assert batched.candidates[name].dtype == torch.float32
        diff = (batched.candidates[name] - single.candidates[name]).abs().max().item()
        assert diff <= 1e-5, f"{name}: {diff}"
    assert (batched.layer_states - single.layer_states).abs().max().item() <= 1e-5


def test_features_match_a_direct_forward_in_input_order(tmp_path):
    """Length-sorted batching must hand back rows in the prompts' order."""
    model = patched_tiny("qwen2_vl")
    processor = tiny_processor("qwen2_vl")
    prompts = synthetic_prompts(5, image_dir=tmp_path)
    extracted = extract_features(model, processor, prompts, batch_size=3, candidates=("logits",),
                                 layer_states=False, progress=False)
    assert extracted.layer_states is None and set(extracted.candidates) == {"logits"}
    with torch.no_grad():
        for index in (0, 3, 4):
            batch = encode_prompts(processor, [prompts[index]])
            direct = model(**batch, output_sasa_features=True).sasa_features["logits"][0]
            assert (extracted.candidates["logits"][index] - direct).abs().max().item() <= 1e-4
