"""Tiny real processors and synthetic labelled prompts for the calibration tests.

The tiny processors are the real transformers processor classes (Qwen2-VL's, LLaVA's) around a
character-level tokenizer whose special tokens have the tiny models' ids, so the chat template, image
placeholder expansion, padding and image preprocessing are the library's own code paths.
"""

from __future__ import annotations

import string

import numpy as np
from PIL import Image
from tokenizers import Regex, Tokenizer, models, normalizers, pre_tokenizers
from transformers import (
    CLIPImageProcessorPil,
    Gemma3ImageProcessorPil,
    Gemma3Processor,
    LlavaProcessor,
    PreTrainedTokenizerFast,
    Qwen2VLImageProcessorPil,
    Qwen2VLProcessor,
)

import tiny_models as tm
from sasa_patcher.modeling_sasa import SasaSettings
from sasa_patcher.patching import patch_model
from sasa_patcher.probes.datasets import Prompt
from sasa_patcher.processors import image_only

CHAT_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n"
    "{% if m['content'] is string %}{{ m['content'] }}{% else %}{% for c in m['content'] %}"
    "{% if c['type'] == 'image' %}IMAGE{% elif c['type'] == 'text' %}{{ c['text'] }}{% endif %}"
    "{% endfor %}{% endif %}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def char_tokenizer(image_tokens: dict[str, int], named: dict[str, str] | None = None) -> PreTrainedTokenizerFast:
    """Lower-cased characters as tokens; pad 0 and end-of-turn 1 as in tiny_models; image tokens at given ids;
    `named`: special tokens the processor reads as tokenizer attributes (Gemma 3's `boi_token`, ...)."""
    vocab = {"<pad>": tm.PAD, "<|im_end|>": tm.EOS, "<|im_start|>": 2, "<unk>": 3}
    for char in string.ascii_lowercase + string.digits + " \n.,?!'-:;":
        vocab[char] = len(vocab)
    vocab.update(image_tokens)
    assert max(vocab.values()) < tm.VOCAB
    model = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    model.normalizer = normalizers.Lowercase()
    model.pre_tokenizer = pre_tokenizers.Split(Regex("."), behavior="isolated")
    return PreTrainedTokenizerFast(
        tokenizer_object=model, pad_token="<pad>", eos_token="<|im_end|>", unk_token="<unk>",
        additional_special_tokens=["<|im_start|>", *image_tokens], **({"extra_special_tokens": named} if named else {}),
    )


def tiny_processor(family: str):
    """A real processor for the tiny model of `family` (images resized to the tiny towers' input)."""
    if family in ("qwen2_vl", "qwen2_5_vl"):
        tokenizer = char_tokenizer({"<|image_pad|>": tm.IMAGE_TOKEN, "<|vision_start|>": tm.VISION_START,
                                    "<|vision_end|>": tm.VISION_END, "<|video_pad|>": 123})
        side = 14 * tm.QWEN_GRID[1]
        images = Qwen2VLImageProcessorPil(min_pixels=side * side, max_pixels=side * side, patch_size=14,
                                          merge_size=2, temporal_patch_size=2)
        template = CHAT_TEMPLATE.replace("IMAGE", "<|vision_start|><|image_pad|><|vision_end|>")
        return image_only(Qwen2VLProcessor)(image_processor=images, tokenizer=tokenizer, chat_template=template)
    if family == "llava":
        tokenizer = char_tokenizer({"<image>": tm.IMAGE_TOKEN})
        size = tm.LLAVA_IMAGE_SIZE
        images = CLIPImageProcessorPil(size={"shortest_edge": size}, crop_size={"height": size, "width": size})
        return LlavaProcessor(image_processor=images, tokenizer=tokenizer, patch_size=14,
                              vision_feature_select_strategy="default", num_additional_image_tokens=1,
                              chat_template=CHAT_TEMPLATE.replace("IMAGE", "<image>"))
    if family == "gemma3":
        named = {"boi_token": "<start_of_image>", "eoi_token": "<end_of_image>", "image_token": "<image_soft_token>"}
        tokenizer = char_tokenizer({"<start_of_image>": tm.VISION_START, "<end_of_image>": tm.VISION_END,
                                    "<image_soft_token>": tm.IMAGE_TOKEN}, named)
        side = tm.GEMMA_IMAGE_SIZE
        images = Gemma3ImageProcessorPil(size={"height": side, "width": side}, do_pan_and_scan=False)
        return Gemma3Processor(image_processor=images, tokenizer=tokenizer, image_seq_length=tm.GEMMA_IMAGE_TOKENS,
                               chat_template=CHAT_TEMPLATE.replace("IMAGE", "<start_of_image>"))
    raise ValueError(family)


def write_image(path, seed: int):
    """A small random RGB PNG."""
    pixels = np.random.default_rng(seed).integers(0, 256, size=(40, 48, 3), dtype=np.uint8)
    Image.fromarray(pixels).save(path)
    return path


def synthetic_prompts(count: int, seed: int = 0, image_dir=None, sources=("set-a", "set-b")) -> list[Prompt]:
    """Harmful prompts use one word list, benign another: a random tiny model can tell them apart."""
    rng = np.random.default_rng(seed)
    harmful = ["bomb", "poison", "steal", "hack", "attack", "weapon", "kill", "fraud"]
    benign = ["garden", "recipe", "poem", "music", "travel", "school", "coffee", "yoga"]
    filler = ["how", "do", "i", "the", "a", "make", "with", "my", "best", "for"]
    prompts = []
    for index in range(count):
        label = index % 2
        words = list(rng.choice(filler, size=int(rng.integers(2, 6))))
        words += list(rng.choice(harmful if label else benign, size=2))
        rng.shuffle(words)
        text = " ".join(words) + f" {index}?"
        image = None
        if image_dir is not None and index % 3 == 0:
            image = write_image(image_dir / f"img{index}.png", seed * 1000 + index)
        source = sources[index % len(sources)]
        prompts.append(Prompt(text=text, label=label, source=source, form="question", image=image))
    return prompts


def patched_tiny(family_name: str, s: int = 1, f: int = 3):
    family = next(item for item in tm.FAMILIES if item.name == family_name)
    return patch_model(family.build(), SasaSettings(s, f))
