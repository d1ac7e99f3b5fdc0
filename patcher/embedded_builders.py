"""The bodies of the embedded offline models: SmolLM2's decoder in a Qwen2-VL, Qwen2.5-VL or LLaVA model.

One builder per family. Each takes SmolLM2's tokenizer and source model (`patcher/smollm2.py`), adds
the family's image tokens and chat template, builds the family's model around a small seeded vision
tower, grafts SmolLM2's decoder in, and writes the tokenizer and processor files into the build
directory. Which name uses which builder, and the cache, are in `patcher/embedded.py`; a change
here that alters what lands on disk needs its `RECIPE_VERSION` bumped.
"""

from __future__ import annotations

from pathlib import Path

import torch
from transformers import (
    CLIPImageProcessorPil,
    CLIPVisionConfig,
    LlamaConfig,
    LlamaForCausalLM,
    LlavaConfig,
    LlavaForConditionalGeneration,
    LlavaProcessor,
    PreTrainedModel,
    PreTrainedTokenizerBase,
    Qwen2_5_VLConfig,
    Qwen2_5_VLForConditionalGeneration,
    Qwen2VLConfig,
    Qwen2VLForConditionalGeneration,
    Qwen2VLImageProcessorPil,
)

from sasa_patcher.architectures import save_processor_without_torchvision
from sasa_patcher.smollm2 import chat_template, graft_language_model, smollm2_text_fields

SEED = 0
QWEN_SPECIAL_TOKENS = ("<|vision_start|>", "<|vision_end|>", "<|image_pad|>", "<|video_pad|>")
QWEN_IMAGE_MARKER = "<|vision_start|><|image_pad|><|vision_end|>"
# M-RoPE splits the 32 rotary frequency pairs of a 64-wide head into (temporal, height, width) sections.
# On text all three position rows are equal, so any split reproduces SmolLM2's plain RoPE exactly.
QWEN_MROPE_SECTION = [8, 12, 12]
# Pixel bounds keep an image at 4..64 merged tokens: cheap on CPU and in exported graphs.
QWEN_MIN_PIXELS = 56 * 56
QWEN_MAX_PIXELS = 224 * 224
LLAVA_IMAGE_TOKEN = "<image>"
LLAVA_IMAGE_SIZE = 224
PATCH_SIZE = 14

# Qwen2.5-VL's tower: window attention (112 px windows = 4x4 merged tokens, so a 224x224 image has 4
# windows) with full attention in blocks 1 and 3, RMSNorm and a gated MLP, as the real tower; small.
QWEN25_VISION = {"depth": 4, "hidden_size": 128, "intermediate_size": 256, "num_heads": 4, "window_size": 112,
                 "fullatt_block_indexes": [1, 3]}


def seeded_body(model_class: type[PreTrainedModel], config, source: LlamaForCausalLM) -> PreTrainedModel:
    """The family's model with seeded random non-text weights and SmolLM2's language model grafted in."""
    torch.manual_seed(SEED)
    model = model_class(config)
    graft_language_model(model.model.language_model, source)
    return model


def build_qwen2_5_vl(tokenizer: PreTrainedTokenizerBase, source: LlamaForCausalLM, out: Path) -> PreTrainedModel:
    """Qwen2.5-VL body (window-attention tower): same text graft, tokens and processor as smol-qwen-vl."""
    vision = {"patch_size": PATCH_SIZE, "spatial_merge_size": 2, "temporal_patch_size": 2, **QWEN25_VISION,
              "out_hidden_size": source.config.hidden_size}
    return _build_qwen(tokenizer, source, out, vision,
                       (Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration, "Qwen2_5_VLProcessor"))


def build_qwen2_vl(tokenizer: PreTrainedTokenizerBase, source: LlamaForCausalLM, out: Path) -> PreTrainedModel:
    """Qwen2-VL body; writes the tokenizer, chat template and processor config into `out`."""
    vision = {"depth": 2, "embed_dim": 128, "num_heads": 4, "mlp_ratio": 4, "hidden_size": source.config.hidden_size,
              "patch_size": PATCH_SIZE, "spatial_merge_size": 2, "temporal_patch_size": 2}
    return _build_qwen(tokenizer, source, out, vision,
                       (Qwen2VLConfig, Qwen2VLForConditionalGeneration, "Qwen2VLProcessor"))


def _build_qwen(tokenizer: PreTrainedTokenizerBase, source: LlamaForCausalLM, out: Path, vision: dict,
                classes: tuple[type, type, str]) -> PreTrainedModel:
    """A Qwen-VL body around SmolLM2's decoder: (config class, model class, processor class name) and its tower."""
    config_class, model_class, processor_class = classes
    tokenizer.add_special_tokens({"additional_special_tokens": list(QWEN_SPECIAL_TOKENS)})
    tokenizer.chat_template = chat_template(QWEN_IMAGE_MARKER)
    ids = {token: tokenizer.convert_tokens_to_ids(token) for token in QWEN_SPECIAL_TOKENS}
    head_dim = source.config.hidden_size // source.config.num_attention_heads
    if head_dim != source.config.head_dim or sum(QWEN_MROPE_SECTION) != head_dim // 2:
        raise RuntimeError(f"SmolLM2 head_dim {source.config.head_dim} does not fit the Qwen2-VL attention")
    text = smollm2_text_fields(source.config, len(tokenizer))
    text["rope_parameters"] = {
        "rope_type": "default",
        "rope_theta": source.config.rope_parameters["rope_theta"],
        "mrope_section": QWEN_MROPE_SECTION,
    }
    config = config_class(
        text_config=text,
        vision_config=vision,
        image_token_id=ids["<|image_pad|>"],
        video_token_id=ids["<|video_pad|>"],
        vision_start_token_id=ids["<|vision_start|>"],
        vision_end_token_id=ids["<|vision_end|>"],
        tie_word_embeddings=True,
        dtype="float32",
    )
    model = seeded_body(model_class, config, source)

    image_processor = Qwen2VLImageProcessorPil(
        size={"shortest_edge": QWEN_MIN_PIXELS, "longest_edge": QWEN_MAX_PIXELS},
        patch_size=PATCH_SIZE,
        merge_size=vision["spatial_merge_size"],
        temporal_patch_size=vision["temporal_patch_size"],
    )
    tokenizer.save_pretrained(out)  # tokenizer files and chat_template.jinja
    save_processor_without_torchvision(processor_class, image_processor.to_dict(), out)
    return model


def build_llava(tokenizer: PreTrainedTokenizerBase, source: LlamaForCausalLM, out: Path) -> PreTrainedModel:
    """LLaVA body (CLIP tower + projector); writes the processor, tokenizer and template into `out`."""
    tokenizer.add_special_tokens({"additional_special_tokens": [LLAVA_IMAGE_TOKEN]})
    template = chat_template(LLAVA_IMAGE_TOKEN)
    tokenizer.chat_template = template
    text = LlamaConfig(
        **smollm2_text_fields(source.config, len(tokenizer)),
        head_dim=source.config.head_dim,
        rope_parameters=dict(source.config.rope_parameters),
        attention_bias=False,
        mlp_bias=False,
        tie_word_embeddings=True,
    )
    vision = CLIPVisionConfig(
        hidden_size=128,
        intermediate_size=512,
        num_hidden_layers=2,
        num_attention_heads=4,
        image_size=LLAVA_IMAGE_SIZE,
        patch_size=PATCH_SIZE,
    )
    config = LlavaConfig(
        text_config=text,
        vision_config=vision,
        image_token_id=tokenizer.convert_tokens_to_ids(LLAVA_IMAGE_TOKEN),
        image_seq_length=(LLAVA_IMAGE_SIZE // PATCH_SIZE) ** 2,
        vision_feature_select_strategy="default",
        tie_word_embeddings=True,
        dtype="float32",
    )
    model = seeded_body(LlavaForConditionalGeneration, config, source)

    image_processor = CLIPImageProcessorPil(
        size={"shortest_edge": LLAVA_IMAGE_SIZE},
        crop_size={"height": LLAVA_IMAGE_SIZE, "width": LLAVA_IMAGE_SIZE},
    )
    processor = LlavaProcessor(
        image_processor=image_processor,
        tokenizer=tokenizer,
        patch_size=PATCH_SIZE,
        vision_feature_select_strategy="default",
        num_additional_image_tokens=1,  # CLIP's CLS token, dropped by the "default" strategy
        image_token=LLAVA_IMAGE_TOKEN,
        chat_template=template,
    )
    processor.save_pretrained(out)
    return model
