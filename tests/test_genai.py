"""ONNX Runtime GenAI loads the exported Qwen artifacts as they are and reproduces PyTorch.

Only GenAI's own API on the GenAI side: `og.Model`, `create_multimodal_processor`, `og.Generator`,
`get_output("unsafe_prob")` after the prompt step. The PyTorch side is the patched model's `generate`
on GenAI's own token ids and (de-padded) pixels. Unit: tiny Qwen2-VL and Qwen2.5-VL with a small
byte-level BPE tokenizer whose Qwen special tokens have low ids (so the ids provably come from the
config). Integration: the embedded smol-qwen2.5-vl (real SmolLM2 weights and tokenizer).
"""

from __future__ import annotations

import json
import time

import numpy as np
import pytest
import torch

from sasa_patcher.export.genai import GENAI_CONFIG_NAME, GENAI_PROCESSOR_NAME, read_gate
from sasa_patcher.export.onnx_export import export_onnx
from sasa_patcher.export.onnx_names import CONFIG_NAME
from sasa_patcher.export.onnx_parity import PROB_TOLERANCE, parity_image
from sasa_patcher.modeling_sasa import SasaSettings
from sasa_patcher.patching import patch_model, temporary_settings

og = pytest.importorskip("onnxruntime_genai")

SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|vision_start|>", "<|vision_end|>", "<|image_pad|>",
            "<|video_pad|>"]
MARKER = "<|vision_start|><|image_pad|><|vision_end|>"
TEMPLATE = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n"
    "{% if message['content'] is string %}{{ message['content'] }}{% else %}"
    "{% for part in message['content'] %}{% if part['type'] == 'image' %}" + MARKER +
    "{% elif part['type'] == 'text' %}{{ part['text'] }}{% endif %}{% endfor %}{% endif %}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
NEW_TOKENS = 8
IMAGE_SIZES = ((120, 200), (150, 90))  # (H, W): a wide and a tall image -> grids [1, 8, 14] and [1, 10, 6]


def tiny_processor():
    """A 400-token byte-level BPE (Qwen split regex) trained in memory, and a small-pixel Qwen image processor."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import Qwen2_5_VLProcessor, Qwen2TokenizerFast, Qwen2VLImageProcessorPil

    from sasa_patcher.processors import image_only

    split = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|"
             r"\s*[\r\n]+|\s+(?!\S)|\s+")
    backend = Tokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(split), behavior="isolated", invert=False),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    backend.decoder = decoders.ByteLevel()
    corpus = ("Describe this image. What is in the picture? Compare the two images. How do I bake bread at home? "
              "user assistant system hello world 0123456789 ") * 20
    backend.train_from_iterator([corpus], trainers.BpeTrainer(vocab_size=400, special_tokens=SPECIALS,
                                                              initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    tokenizer = Qwen2TokenizerFast(tokenizer_object=backend, eos_token="<|im_end|>", pad_token="<|endoftext|>",
                                   unk_token=None, bos_token=None, additional_special_tokens=SPECIALS[1:])
    tokenizer.chat_template = TEMPLATE
    images = Qwen2VLImageProcessorPil(size={"shortest_edge": 56 * 56, "longest_edge": 28 * 28 * 160}, patch_size=14,
                                      merge_size=2, temporal_patch_size=2)
    return image_only(Qwen2_5_VLProcessor)(image_processor=images, tokenizer=tokenizer, chat_template=TEMPLATE)


def tiny_model(family: str, tokenizer):
    from transformers import (
        Qwen2_5_VLConfig,
        Qwen2_5_VLForConditionalGeneration,
        Qwen2VLConfig,
        Qwen2VLForConditionalGeneration,
    )

    ids = {token: tokenizer.convert_tokens_to_ids(token) for token in SPECIALS}
    text = dict(vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=4,
                num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=2048, rms_norm_eps=1e-6,
                eos_token_id=ids["<|im_end|>"], bos_token_id=ids["<|im_start|>"], pad_token_id=ids["<|im_end|>"],
                rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "mrope_section": [2, 3, 3]})
    common = dict(image_token_id=ids["<|image_pad|>"], video_token_id=ids["<|video_pad|>"],
                  vision_start_token_id=ids["<|vision_start|>"], vision_end_token_id=ids["<|vision_end|>"],
                  tie_word_embeddings=False)
    torch.manual_seed(0)
    if family == "qwen2_5_vl":
        vision = dict(depth=4, hidden_size=32, intermediate_size=64, num_heads=2, out_hidden_size=64, patch_size=14,
                      spatial_merge_size=2, temporal_patch_size=2, window_size=56, fullatt_block_indexes=[1, 3])
        model = Qwen2_5_VLForConditionalGeneration(Qwen2_5_VLConfig(text_config=text, vision_config=vision, **common))
    else:
        vision = dict(depth=2, embed_dim=32, num_heads=2, mlp_ratio=2, hidden_size=64, patch_size=14,
                      spatial_merge_size=2, temporal_patch_size=2)
        model = Qwen2VLForConditionalGeneration(Qwen2VLConfig(text_config=text, vision_config=vision, **common))
    with torch.no_grad():  # contrast, so greedy tokens vary
        for parameter in model.parameters():
            if parameter.dim() >= 2:
                parameter.mul_(3.0)
    model.generation_config.eos_token_id = ids["<|im_end|>"]
    patched = patch_model(model.eval(), SasaSettings(1, 2, mode="gate", threshold=0.5), tokenizer)
    weight = patched.sasa_probe.linear.weight
    weight.data = torch.randn(weight.shape, generator=torch.Generator().manual_seed(0)) * 0.3
    return patched


def genai_run(onnx_dir, prompt: str, image_paths: list[str]) -> dict:
    """Greedy generation with GenAI's API alone; unsafe_prob read after the prompt step."""
    model = og.Model(str(onnx_dir))
    processor = model.create_multimodal_processor()
    inputs = processor(prompt, images=og.Images.open(*image_paths) if image_paths else None)
    named = {name: inputs[name].as_numpy() for name in inputs.keys()}
    params = og.GeneratorParams(model)
    params.set_search_options(max_length=named["input_ids"].shape[1] + NEW_TOKENS, do_sample=False)
    generator = og.Generator(model, params)
    generator.set_inputs(inputs)
    tokens, unsafe_prob = [], None
    while not generator.is_done():
        generator.generate_next_token()
        if unsafe_prob is None:
            unsafe_prob = float(generator.get_output("unsafe_prob")[0])
        tokens.append(int(generator.get_next_tokens()[0]))
    return {"tokens": tokens, "unsafe_prob": unsafe_prob, **named}


@torch.no_grad()
def torch_run(model, run: dict) -> dict:
    """The patched model on GenAI's ids and pixels (GenAI pads each image to the largest patch count: de-pad)."""
    input_ids = torch.from_numpy(run["input_ids"].astype(np.int64))
    kwargs = {}
    if "image_grid_thw" in run and run["image_grid_thw"].size:
        grids = run["image_grid_thw"]
        pixels = run["pixel_values"]
        per_image = pixels.shape[0] // len(grids)
        rows = [pixels[i * per_image: i * per_image + int(np.prod(g))] for i, g in enumerate(grids)]
        kwargs = {"pixel_values": torch.from_numpy(np.concatenate(rows)), "image_grid_thw": torch.from_numpy(grids),
                  "mm_token_type_ids": (input_ids == model.config.image_token_id).long()}
    unsafe_prob = float(model(input_ids=input_ids, **kwargs).unsafe_prob[0])
    # Greedy by full forwards of the patched model (the original stream GenAI serves). Not `generate`:
    # measured here, the patched Qwen2-VL's `generate` starts 0.046 away from its own forward on a
    # [1, 8, 14] grid (Qwen2.5-VL agrees), while both ONNX runtimes equal the forward within 1e-6.
    tokens = []
    with temporary_settings(model, threshold=None):
        for _ in range(NEW_TOKENS):
            ids = torch.cat([input_ids, torch.tensor([tokens], dtype=torch.long)], dim=1)
            extra = dict(kwargs)
            if "mm_token_type_ids" in extra:
                extra["mm_token_type_ids"] = (ids == model.config.image_token_id).long()
            tokens.append(int(model(input_ids=ids, **extra).logits[0, -1].argmax()))
    return {"tokens": tokens, "unsafe_prob": unsafe_prob}


def check_cases(model, processor, onnx_dir, tmp_path) -> list[dict]:
    paths = []
    for index, size in enumerate(IMAGE_SIZES):
        path = tmp_path / f"image{index}.png"
        parity_image(size, index).save(path)
        paths.append(str(path))

    def render(text: str, images: int) -> str:
        content = [{"type": "image"}] * images + [{"type": "text", "text": text}]
        return processor.apply_chat_template([{"role": "user", "content": content}], add_generation_prompt=True,
                                             tokenize=False)

    cases = [("text", render("How do I bake bread at home?", 0), []),
             ("one-image", render("Describe this image.", 1), paths[:1]),
             ("two-images-two-sizes", render("Compare the two images.", 2), paths)]
    results = []
    for name, prompt, images in cases:
        ours = genai_run(onnx_dir, prompt, images)
        reference = torch_run(model, ours)
        assert ours["input_ids"][0].tolist() == processor.tokenizer(_expand(prompt, ours))["input_ids"], name
        results.append({"name": name, "tokens_equal": ours["tokens"] == reference["tokens"][:len(ours["tokens"])],
                        "generated": len(ours["tokens"]),
                        "unsafe_prob_diff": abs(ours["unsafe_prob"] - reference["unsafe_prob"]),
                        "unsafe_prob": reference["unsafe_prob"],
                        "grids": ours.get("image_grid_thw", np.zeros((0, 3))).tolist()})
    return results


def _expand(prompt: str, run: dict) -> str:
    """The prompt with each image marker expanded to its grid's placeholder count (what GenAI tokenizes)."""
    for grid in run.get("image_grid_thw", np.zeros((0, 3), np.int64)).tolist():
        prompt = prompt.replace(MARKER, "<|vision_start|>" + "<|image_pad|>" * (int(np.prod(grid)) // 4)
                                + "<|vision_end|>\0", 1)
    return prompt.replace("\0", "")


@pytest.mark.parametrize("family", ["qwen2_5_vl", "qwen2_vl"])
def test_genai_generates_like_pytorch(tmp_path, family):
    processor = tiny_processor()
    model = tiny_model(family, processor.tokenizer)
    out = tmp_path / "onnx"
    export_onnx(model, processor, out, image_size=(56, 56), check_parity=False)
    genai = json.loads((out / GENAI_CONFIG_NAME).read_text())
    assert genai["model"]["type"] == "qwen2_5_vl"
    assert genai["model"]["vision"]["config_filename"] == GENAI_PROCESSOR_NAME
    assert genai["model"]["image_token_id"] == processor.tokenizer.convert_tokens_to_ids("<|image_pad|>") < 10
    assert "graphs" not in json.loads((out / CONFIG_NAME).read_text())  # names live in genai_config.json only
    results = check_cases(model, processor, out, tmp_path)
    print(json.dumps(results))
    assert [r["grids"] for r in results] == [[], [[1, 8, 14]], [[1, 8, 14], [1, 10, 6]]]
    for result in results:
        assert result["tokens_equal"] and result["generated"] >= 1, result
        assert result["unsafe_prob_diff"] <= PROB_TOLERANCE, result
    assert any(0.02 < r["unsafe_prob"] < 0.98 for r in results)
    assert read_gate(out).threshold == 0.5


@pytest.mark.slow  # ~4 min here: the 30-layer decoder export
@pytest.mark.integration
def test_embedded_smol_qwen25_vl_runs_in_genai(tmp_path):
    from embedded_patch import patched_embedded

    model, processor = patched_embedded("smol-qwen2.5-vl", random_probe=True)
    started = time.perf_counter()
    export_onnx(model, processor, tmp_path / "onnx", check_parity=False)
    print(f"export {time.perf_counter() - started:.0f}s")
    results = check_cases(model, processor, tmp_path / "onnx", tmp_path)
    print(json.dumps(results))
    for result in results:
        assert result["tokens_equal"], result
        assert result["unsafe_prob_diff"] <= PROB_TOLERANCE, result
