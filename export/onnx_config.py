"""`sasa_onnx.json`: everything a runtime needs besides the graphs (names, cache, threshold, template, pixels)."""

from __future__ import annotations

from typing import Any

from sasa_patcher.architectures import ImageLayout, spec_for
from sasa_patcher.export.onnx_graphs import cache_layers, cache_names, gate_state_layer, text_dims
from sasa_patcher.export.onnx_names import (
    DECODER_FILE,
    EMBED_FILE,
    FORMAT_VERSION,
    UNSAFE_PROB_NOT_COMPUTED,
    VISION_FILE,
)


def _token_ids(value) -> list[int]:
    if value is None:
        return []
    return [int(v) for v in (value if isinstance(value, (list, tuple)) else [value])]


def _processor_section(model, processor, layout: ImageLayout, image_size) -> dict[str, Any]:
    """Chat template, tokens, and the image preprocessing constants the numpy runtime replays."""
    section: dict[str, Any] = {}
    tokenizer = getattr(processor, "tokenizer", None)
    image_processor = getattr(processor, "image_processor", None)
    if tokenizer is not None:
        image_prompt = spec_for(model).image_prompt(model, tokenizer)
        section.update(
            image_token=image_prompt["token"],
            image_prompt=image_prompt,
            chat_template=getattr(processor, "chat_template", None) or getattr(tokenizer, "chat_template", None),
            special_tokens={name: str(value) for name, value in tokenizer.special_tokens_map.items()
                            if isinstance(value, str)},
            prompt_format=_prompt_format(processor),
        )
    if image_processor is not None:
        def constant(name, default=None):
            value = getattr(image_processor, name, default)
            return list(value) if isinstance(value, (tuple, list)) else value

        resample = getattr(image_processor, "resample", 3)
        preprocessing = {
            "do_convert_rgb": bool(constant("do_convert_rgb", True)),
            "resample": int(getattr(resample, "value", resample)),
            "do_rescale": bool(constant("do_rescale", True)),
            "rescale_factor": float(constant("rescale_factor", 1 / 255)),
            "do_normalize": bool(constant("do_normalize", True)),
            "image_mean": [float(v) for v in constant("image_mean")],
            "image_std": [float(v) for v in constant("image_std")],
        }
        preprocessing.update(spec_for(model).preprocessing(model, image_processor, image_size))
        section["preprocessing"] = preprocessing
    return section


PROMPT_SENTINEL = "\u2063SASA_PROMPT\u2063"


def render_user_turn(processor, text: str, images: int) -> str | None:
    """The chat template around one user turn with `images` images first; None if the template refuses."""
    content = [{"type": "image"}] * images + [{"type": "text", "text": text}]
    try:
        return processor.apply_chat_template([{"role": "user", "content": content}], add_generation_prompt=True,
                                             tokenize=False)
    except Exception:  # noqa: BLE001 - a template without image support
        return None


def _prompt_format(processor) -> dict[str, list[str]] | None:
    """The chat template rendered around a sentinel: (prefix, suffix) with and without an image.

    A runtime with no jinja2 formats single-turn prompts from these; it matches the template exactly.
    """
    if not hasattr(processor, "apply_chat_template"):
        return None
    formats = {}
    for kind, images in (("text", 0), ("image", 1)):
        rendered = render_user_turn(processor, PROMPT_SENTINEL, images)
        if rendered is not None and rendered.count(PROMPT_SENTINEL) == 1:
            formats[kind] = rendered.split(PROMPT_SENTINEL)
    return formats or None


def build_config(model, processor, layout: ImageLayout, image_size) -> dict[str, Any]:
    settings = model.sasa
    dims = text_dims(model)
    layers = cache_layers(model)
    spec = spec_for(model)
    text_config = model.config.get_text_config()
    eos = _token_ids(model.generation_config.eos_token_id) or _token_ids(text_config.eos_token_id)
    vision_graph = {"file": VISION_FILE, **spec.vision_io(model, layout)}
    config: dict[str, Any] = {
        "format": "sasa-onnx",
        "format_version": FORMAT_VERSION,
        "architecture": spec.name,
        "model_type": model.config.model_type,
        "dtype": "float32",
        # GenAI runs one KV cache: gate-mode artifacts of families GenAI knows get its config too.
        "genai_type": spec.genai_type if settings.mode == "gate" else None,
        "graphs": {
            "vision_encoder": vision_graph,
            "embed_tokens": {
                "file": EMBED_FILE,
                "inputs": {"input_ids": {"dtype": "int64", "shape": ["batch", "sequence_length"]},
                           "image_features": {"dtype": "float32", "shape": ["num_image_tokens", dims["hidden_size"]]}},
                "outputs": {"inputs_embeds": {"dtype": "float32",
                                              "shape": ["batch", "sequence_length", dims["hidden_size"]]}},
                "merge": "the k-th image token of the batch (row-major) takes row k of image_features",
            },
            "decoder": {
                "file": DECODER_FILE,
                "inputs": ["inputs_embeds", "attention_mask", "position_ids", *cache_names(model, "past"),
                           *spec.decoder_extra_inputs],
                "outputs": ["logits", "unsafe_prob", *cache_names(model, "present")],
                "position_ids": spec.position_doc(),
                "position_rows": spec.position_rows,
                # inputs the runtime makes from the prompt: name -> rule (1 at image tokens: the only rule so far)
                "extra_inputs": dict(spec.decoder_extra_inputs),
                "attention_mask": "int64 [batch, past_sequence_length + sequence_length], 1 = token; left padding",
                "logits": "float32 [batch, sequence_length, vocab_size] of the serving stream "
                          "(original in gate mode, projected in augment mode); gate mode: a flagged row's last "
                          "position is 0 at its refusal token and -1e4 elsewhere (greedy decoding refuses)",
                "unsafe_prob": f"float32 [batch]: the probe at the last non-pad token of the chunk when the past is "
                               f"empty or the chunk has several tokens (a prompt or a new user turn); "
                               f"{UNSAFE_PROB_NOT_COMPUTED} on 1-token decode steps",
            },
        },
        "cache": {
            "layout": "[batch, num_key_value_heads, sequence_length, head_dim], float32",
            "past_name": "past.{stream}.{layer}.{key|value}",
            "present_name": "present.{stream}.{layer}.{key|value}",
            "streams": layers,
            "num_key_value_heads": dims["num_key_value_heads"],
            "head_dim": dims["head_dim"],
            # gate mode: the decoder's layers + the gate's state layer (what GenAI's num_hidden_layers counts)
            "num_hidden_layers": dims["num_hidden_layers"] + (gate_state_layer(model) is not None),
            "gate_state_layer": gate_state_layer(model),
        },
        "hidden_size": dims["hidden_size"],
        "num_attention_heads": text_config.num_attention_heads,
        "vocab_size": dims["vocab_size"],
        # Prompt + answer tokens the decoder's positions were trained for; the runtimes refuse longer prompts.
        "context_length": int(text_config.max_position_embeddings),
        "sasa": {
            "mode": settings.mode,
            "safety_layer": settings.safety_layer,
            "semantic_layer": settings.semantic_layer,
            "projection": settings.projection,
            "beta": settings.beta,
            "probe_features": settings.probe_features,
            "threshold": settings.threshold,
            "refusal_text": settings.refusal_text,
            "refusal_token_ids": list(settings.refusal_token_ids),
            "refuse_when": "mode == 'gate' and unsafe_prob > threshold (threshold null: never); the decoder graph "
                           "refuses by itself (logits force refusal_token_ids, state in the cache layer "
                           "cache.gate_state_layer)",
            "metrics": settings.metrics,
        },
        "eos_token_id": eos,
        "bos_token_id": (_token_ids(text_config.bos_token_id) + eos)[0],
        # What generate() pads finished rows with: the generation config's pad id, else the first eos id.
        "pad_token_id": (_token_ids(model.generation_config.pad_token_id) + eos + [0])[0],
        "generation": {
            "decoding": "greedy",
            # The only logits processor the runtime applies: these ids never win (-inf), as in generate().
            "suppress_tokens": _token_ids(getattr(model.generation_config, "suppress_tokens", None)),
        },
        "image": {
            # dynamic: any size (each image's own grid); sizes then holds the size traced and checked at export
            "dynamic": spec.dynamic_image_size,
            "sizes": [list(image_size)],
            "tokens_per_image": None if spec.dynamic_image_size else layout.tokens_per_image,
            "image_token_id": model.config.image_token_id,
            "video_token_id": getattr(model.config, "video_token_id", None),
            "vision_start_token_id": getattr(model.config, "vision_start_token_id", None),
            "grid_thw": None if spec.dynamic_image_size or not layout.grid_thw else list(layout.grid_thw),
            "spatial_merge_size": getattr(model.config.vision_config, "spatial_merge_size", None),
            "resize_rule": spec.resize_rule(),
        },
    }
    if processor is not None:
        config.update(_processor_section(model, processor, layout, image_size))
    return config


