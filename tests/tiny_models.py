"""Tiny random vision-language models built in memory, with hand-made inputs (no processor).

Each family gets the same shape of helper: a model in eval mode and a function that builds a
batch of prompts (some with one image) as the processor would, left- or right-padded.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from transformers import (
    CLIPVisionConfig,
    Gemma3Config,
    Gemma3ForConditionalGeneration,
    Gemma3TextConfig,
    LlamaConfig,
    LlavaConfig,
    LlavaForConditionalGeneration,
    Qwen2_5_VLConfig,
    Qwen2_5_VLForConditionalGeneration,
    Qwen2VLConfig,
    Qwen2VLForConditionalGeneration,
)

VOCAB = 128
HIDDEN = 64
LAYERS = 6
IMAGE_TOKEN = 120
VISION_START = 121
VISION_END = 122
PAD = 0
EOS = 1


@dataclass
class TinyFamily:
    name: str
    build: Callable[[], torch.nn.Module]
    make_batch: Callable[..., dict]


def _text_config() -> dict:
    return dict(
        vocab_size=VOCAB,
        hidden_size=HIDDEN,
        intermediate_size=128,
        num_hidden_layers=LAYERS,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=512,
        rms_norm_eps=1e-6,
        pad_token_id=PAD,
        eos_token_id=EOS,
        bos_token_id=EOS,
    )


def _prompt_ids(length: int, seed: int) -> list[int]:
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(2, IMAGE_TOKEN, (length,), generator=generator).tolist()


def _pad(rows: list[list[int]], side: str) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(len(row) for row in rows)
    ids = torch.full((len(rows), width), PAD, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for index, row in enumerate(rows):
        span = slice(width - len(row), width) if side == "left" else slice(0, len(row))
        ids[index, span] = torch.tensor(row)
        mask[index, span] = 1
    return ids, mask


# ----- Qwen2-VL / Qwen2.5-VL ---------------------------------------------------------------------
QWEN_GRID = (1, 4, 4)  # t, h, w patches -> 16 patches, 4 merged tokens
QWEN_PATCH_DIM = 3 * 2 * 14 * 14


def _qwen_kwargs() -> dict:
    return dict(
        image_token_id=IMAGE_TOKEN,
        video_token_id=123,
        vision_start_token_id=VISION_START,
        vision_end_token_id=VISION_END,
        tie_word_embeddings=False,
    )


def build_qwen2_vl() -> Qwen2VLForConditionalGeneration:
    torch.manual_seed(0)
    text = dict(_text_config(), rope_parameters={"rope_type": "default", "rope_theta": 10000.0,
                                                 "mrope_section": [2, 3, 3]})
    vision = dict(depth=2, embed_dim=32, hidden_size=HIDDEN, num_heads=2, mlp_ratio=2, in_channels=3,
                  patch_size=14, spatial_merge_size=2, temporal_patch_size=2)
    config = Qwen2VLConfig(text_config=text, vision_config=vision, **_qwen_kwargs())
    return Qwen2VLForConditionalGeneration(config).eval()


def build_qwen2_5_vl() -> Qwen2_5_VLForConditionalGeneration:
    torch.manual_seed(0)
    text = dict(_text_config(), rope_parameters={"rope_type": "default", "rope_theta": 10000.0,
                                                 "mrope_section": [2, 3, 3]})
    vision = dict(depth=2, hidden_size=32, out_hidden_size=HIDDEN, intermediate_size=64, num_heads=2,
                  in_channels=3, patch_size=14, spatial_merge_size=2, temporal_patch_size=2,
                  window_size=56, fullatt_block_indexes=[1])
    config = Qwen2_5_VLConfig(text_config=text, vision_config=vision, **_qwen_kwargs())
    return Qwen2_5_VLForConditionalGeneration(config).eval()


def qwen_batch(lengths: list[int], images: list[bool], side: str = "left", seed: int = 0) -> dict:
    merged = QWEN_GRID[0] * QWEN_GRID[1] * QWEN_GRID[2] // 4
    rows, pixel_rows, grids = [], [], []
    for index, (length, has_image) in enumerate(zip(lengths, images, strict=True)):
        text = _prompt_ids(length, seed + index)
        if has_image:
            text = text[:2] + [VISION_START] + [IMAGE_TOKEN] * merged + [VISION_END] + text[2:]
            generator = torch.Generator().manual_seed(seed + 100 + index)
            pixel_rows.append(torch.randn(QWEN_GRID[1] * QWEN_GRID[2], QWEN_PATCH_DIM, generator=generator))
            grids.append(list(QWEN_GRID))
        rows.append(text)
    input_ids, attention_mask = _pad(rows, side)
    batch = {"input_ids": input_ids, "attention_mask": attention_mask,
             "mm_token_type_ids": (input_ids == IMAGE_TOKEN).int()}
    if pixel_rows:
        batch["pixel_values"] = torch.cat(pixel_rows)
        batch["image_grid_thw"] = torch.tensor(grids)
    return batch


# ----- LLaVA -------------------------------------------------------------------------------------
LLAVA_IMAGE_SIZE = 28  # 2x2 patches of 14 -> 4 image tokens


def build_llava() -> LlavaForConditionalGeneration:
    torch.manual_seed(0)
    vision = CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                              image_size=LLAVA_IMAGE_SIZE, patch_size=14, projection_dim=32)
    config = LlavaConfig(vision_config=vision, text_config=LlamaConfig(**_text_config()),
                         image_token_id=IMAGE_TOKEN, vision_feature_layer=-2,
                         vision_feature_select_strategy="default", tie_word_embeddings=False)
    return LlavaForConditionalGeneration(config).eval()


def llava_batch(lengths: list[int], images: list[bool], side: str = "left", seed: int = 0) -> dict:
    tokens = (LLAVA_IMAGE_SIZE // 14) ** 2
    rows, pixels = [], []
    for index, (length, has_image) in enumerate(zip(lengths, images, strict=True)):
        text = _prompt_ids(length, seed + index)
        if has_image:
            text = text[:2] + [IMAGE_TOKEN] * tokens + text[2:]
            generator = torch.Generator().manual_seed(seed + 100 + index)
            pixels.append(torch.randn(3, LLAVA_IMAGE_SIZE, LLAVA_IMAGE_SIZE, generator=generator))
        rows.append(text)
    input_ids, attention_mask = _pad(rows, side)
    batch = {"input_ids": input_ids, "attention_mask": attention_mask}
    if pixels:
        batch["pixel_values"] = torch.stack(pixels)
    return batch


# ----- Gemma 3 -----------------------------------------------------------------------------------
GEMMA_IMAGE_SIZE = 56  # 4x4 SigLIP patches of 14, average-pooled 2x2 -> 4 image tokens
GEMMA_IMAGE_TOKENS = 4


def build_gemma3() -> Gemma3ForConditionalGeneration:
    """Layers 0-1 and 3-4 local (window of 4 tokens, shorter than the prompts), 2 and 5 global."""
    torch.manual_seed(0)
    text = Gemma3TextConfig(**_text_config(), head_dim=16, sliding_window=4,
                            layer_types=["sliding_attention", "sliding_attention", "full_attention"] * 2)
    vision = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                  image_size=GEMMA_IMAGE_SIZE, patch_size=14)
    config = Gemma3Config(text_config=text.to_dict(), vision_config=vision, mm_tokens_per_image=GEMMA_IMAGE_TOKENS,
                          image_token_index=IMAGE_TOKEN, boi_token_index=VISION_START, eoi_token_index=VISION_END,
                          tie_word_embeddings=False)
    return Gemma3ForConditionalGeneration(config).eval()


def gemma3_batch(lengths: list[int], images: list[bool], side: str = "left", seed: int = 0) -> dict:
    """As Gemma3Processor: `<start_of_image>`, the image tokens, `<end_of_image>`; token_type_ids 1 at image tokens."""
    rows, pixels = [], []
    for index, (length, has_image) in enumerate(zip(lengths, images, strict=True)):
        text = _prompt_ids(length, seed + index)
        if has_image:
            text = text[:2] + [VISION_START] + [IMAGE_TOKEN] * GEMMA_IMAGE_TOKENS + [VISION_END] + text[2:]
            generator = torch.Generator().manual_seed(seed + 100 + index)
            pixels.append(torch.randn(3, GEMMA_IMAGE_SIZE, GEMMA_IMAGE_SIZE, generator=generator))
        rows.append(text)
    input_ids, attention_mask = _pad(rows, side)
    batch = {"input_ids": input_ids, "attention_mask": attention_mask,
             "token_type_ids": (input_ids == IMAGE_TOKEN).long()}
    if pixels:
        batch["pixel_values"] = torch.stack(pixels)
    return batch


FAMILIES = [
    TinyFamily("qwen2_vl", build_qwen2_vl, qwen_batch),
    TinyFamily("qwen2_5_vl", build_qwen2_5_vl, qwen_batch),
    TinyFamily("llava", build_llava, llava_batch),
    TinyFamily("gemma3", build_gemma3, gemma3_batch),
]
