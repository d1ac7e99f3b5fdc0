"""The SASA-patched model as three ONNX graphs plus the JSON config a runtime needs (`onnx/`).

    vision_encoder.onnx       one image's pixel values -> its image features, as the decoder consumes
                              them (one image per call; the image size is fixed, see below)
    embed_tokens.onnx         input_ids + the features of every image in the batch -> inputs_embeds;
                              the image features replace the image placeholder tokens, in row-major
                              order (what the model's `masked_scatter` does)
    decoder_model_merged.onnx inputs_embeds, attention_mask, position_ids and both KV caches ->
                              logits, unsafe_prob, present.* (one graph for prefill and decode)
    sasa_onnx.json            names, cache layout, threshold, refusal, chat template, preprocessing
    parity.json               ONNX Runtime vs PyTorch figures, measured at export time

Exporter choices, measured here (torch 2.13, onnxruntime 1.32):
- decoder: `torch.export.export(strict=False)` with every varying axis `Dim.DYNAMIC` (batch, chunk,
  past), then the dynamo ONNX translation; traced with a past and a chunk of >= 2 tokens so neither
  is specialised (a 1-token prefill and 1-token decode steps are tested). The prompt-only probe pass
  is a `torch.cond` on "past length == 0", i.e. an ONNX `If`: decode steps skip it. The TorchScript
  exporter cannot express that branch; named `Dim`s fail the non-strict export (see export_decoder).
- vision encoder: the TorchScript exporter (`dynamo=False`) with the image grid fixed at trace time.
  Dynamo fails on the Qwen2-VL and Qwen2.5-VL towers even for a fixed grid (`grid_thw.tolist()`
  becomes an unbacked symbol: "Could not guard on data-dependent expression Eq(u0, 0)"); the
  TorchScript trace exports in < 1 s with features equal to PyTorch within 1e-7 (tiny) / 5e-7
  (embedded). One image per call, one image size per artifact (`sasa_onnx.json` `image.sizes`).
- embed_tokens: the TorchScript exporter (dynamic batch, length and number of image tokens).

The decoder wrapper builds a `SasaCache` from the flat cache tensors and calls the patched model's
own methods (`sasa_positions`, `_masks`, `sasa_serving_streams`, `sasa_probe_features`,
`sasa_probe`): the two-pass logic exists once, in `patcher/modeling_sasa.py`.
"""

from __future__ import annotations

import json
import math
import re
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import onnx
import torch
from torch import nn

from sasa_patcher.modeling_sasa import SasaCache, last_token_index

ONNX_DIRNAME = "onnx"
CONFIG_NAME = "sasa_onnx.json"
PARITY_NAME = "parity.json"
VISION_FILE = "vision_encoder.onnx"
EMBED_FILE = "embed_tokens.onnx"
DECODER_FILE = "decoder_model_merged.onnx"
TOKENIZER_FILE = "tokenizer.json"
FORMAT_VERSION = 1
OPSET = 18
# Initialisers above this many bytes go to `<graph>.onnx.data` next to the graph.
EXTERNAL_DATA_THRESHOLD = 1024
# The decode branch of the probe `If` returns this: "not computed on this step".
UNSAFE_PROB_NOT_COMPUTED = -1.0
DEFAULT_QWEN_IMAGE_SIZE = (448, 448)


# ----- per-architecture facts the graphs and the runtime need ------------------------------------
@dataclass(frozen=True)
class ImageLayout:
    """How one image enters the vision encoder and how many placeholder tokens it fills."""

    pixel_shape: tuple[int, ...]
    tokens_per_image: int
    grid_thw: tuple[int, int, int] | None  # Qwen: patches (t, h, w) before merging


def _architecture(model) -> str:
    name = getattr(model, "_sasa_architecture", "")
    if name not in ("qwen2_vl", "qwen2_5_vl", "llava"):
        raise ValueError(f"ONNX export supports the SASA-patched qwen2_vl, qwen2_5_vl and llava models, got {name!r}")
    return name


def _is_qwen(model) -> bool:
    return _architecture(model) in ("qwen2_vl", "qwen2_5_vl")


def default_image_size(model, processor=None) -> tuple[int, int]:
    """LLaVA: the CLIP tower's size. Qwen: 448x448 (256 image tokens), clipped to the processor's pixel range."""
    vision = model.config.vision_config
    if not _is_qwen(model):
        return (vision.image_size, vision.image_size)
    factor = vision.patch_size * vision.spatial_merge_size
    height, width = DEFAULT_QWEN_IMAGE_SIZE
    image_processor = getattr(processor, "image_processor", None)
    size = getattr(image_processor, "size", None) or {}
    min_pixels, max_pixels = size.get("shortest_edge"), size.get("longest_edge")
    if max_pixels and height * width > max_pixels:
        side = int(math.sqrt(max_pixels) // factor) * factor
        height = width = max(factor, side)
    if min_pixels and height * width < min_pixels:
        side = math.ceil(math.sqrt(min_pixels) / factor) * factor
        height = width = side
    return (height, width)


def check_image_size(model, processor, image_size: tuple[int, int]) -> None:
    """Qwen: the processor must keep an image of this size as it is, or its pixels would not be the graph's."""
    size = getattr(getattr(processor, "image_processor", None), "size", None) or {}
    min_pixels, max_pixels = size.get("shortest_edge"), size.get("longest_edge")
    pixels = image_size[0] * image_size[1]
    if _is_qwen(model) and min_pixels and max_pixels and not min_pixels <= pixels <= max_pixels:
        raise ValueError(f"image size {image_size[0]}x{image_size[1]} is outside the processor's pixel range "
                         f"[{min_pixels}, {max_pixels}]: it would resize such images to another grid")


def image_layout(model, image_size: tuple[int, int]) -> ImageLayout:
    vision = model.config.vision_config
    height, width = image_size
    if _is_qwen(model):
        factor = vision.patch_size * vision.spatial_merge_size
        if height % factor or width % factor:
            raise ValueError(f"Qwen image sizes must be multiples of {factor} (patch x merge), got {height}x{width}")
        grid = (1, height // vision.patch_size, width // vision.patch_size)
        patch_dim = vision.in_channels * vision.temporal_patch_size * vision.patch_size**2
        tokens = grid[0] * grid[1] * grid[2] // vision.spatial_merge_size**2
        return ImageLayout((grid[0] * grid[1] * grid[2], patch_dim), tokens, grid)
    if (height, width) != (vision.image_size, vision.image_size):
        side = vision.image_size
        raise ValueError(f"LLaVA's vision tower takes {side}x{side} images, got {height}x{width}")
    patches = (vision.image_size // vision.patch_size) ** 2
    tokens = patches + (1 if model.config.vision_feature_select_strategy == "full" else 0)
    return ImageLayout((1, vision.num_channels, height, width), tokens, None)


# ----- the three graphs as modules --------------------------------------------------------------
class VisionEncoderGraph(nn.Module):
    """One image's pixel values (the processor's layout) -> [tokens_per_image, hidden]."""

    def __init__(self, model, layout: ImageLayout):
        super().__init__()
        self.model = model
        self.layout = layout

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        inner = self.model.model
        if self.layout.grid_thw is not None:
            grid = torch.tensor([self.layout.grid_thw], device=pixel_values.device)
            features = inner.get_image_features(pixel_values, grid, return_dict=True).pooler_output
        else:
            config = self.model.config
            features = inner.get_image_features(
                pixel_values=pixel_values,
                vision_feature_layer=config.vision_feature_layer,
                vision_feature_select_strategy=config.vision_feature_select_strategy,
                return_dict=True,
            ).pooler_output
        return torch.cat(list(features), dim=0)


class EmbedTokensGraph(nn.Module):
    """input_ids [B, T] + image_features [N, H] -> inputs_embeds [B, T, H].

    The k-th image placeholder token of the batch (row-major) takes the k-th feature row, as
    `masked_scatter` does in the model. Placeholders beyond the N rows keep their token embedding, as
    in the model when no image is passed: decode steps pass N = 0.
    """

    def __init__(self, embed_tokens: nn.Module, image_token_id: int):
        super().__init__()
        self.embed_tokens = embed_tokens
        self.image_token_id = image_token_id

    def forward(self, input_ids: torch.Tensor, image_features: torch.Tensor) -> torch.Tensor:
        embeds = self.embed_tokens(input_ids)
        count = image_features.shape[0]
        is_image = (input_ids == self.image_token_id).reshape(-1)
        index = torch.cumsum(is_image.long(), 0) - 1
        take = is_image & (index < count)
        index = torch.where(take, index, torch.full_like(index, count))
        padded = torch.cat([image_features.to(embeds.dtype), embeds.new_zeros(1, embeds.shape[-1])], dim=0)
        gathered = padded.index_select(0, index).reshape(embeds.shape)
        return torch.where(take.reshape(input_ids.shape).unsqueeze(-1), gathered, embeds)


def cache_layers(model) -> dict[str, list[int]]:
    """Which decoder layers each KV stream holds: gate keeps only the original stream."""
    settings = model.sasa
    num_layers = model.config.get_text_config().num_hidden_layers
    if settings.mode == "augment":
        return {
            "original": list(range(settings.semantic_layer + 1)),
            "projected": list(range(settings.safety_layer + 1, num_layers)),
        }
    return {"original": list(range(num_layers)), "projected": []}


def cache_names(model, prefix: str) -> list[str]:
    """Flat cache tensor names in graph order: `{prefix}.{stream}.{layer}.{key|value}`."""
    return [
        f"{prefix}.{stream}.{layer}.{kind}"
        for stream, layers in cache_layers(model).items()
        for layer in layers
        for kind in ("key", "value")
    ]


class DecoderGraph(nn.Module):
    """Flat tensors in, flat tensors out, the patched model's own code in between.

    Inputs: inputs_embeds [B, T, H], attention_mask [B, P+T] (1 = token, left padding),
    position_ids (Qwen: [4, B, T], the text row then the 3 M-RoPE rows; LLaVA: [B, T]), then the past
    keys/values of `cache_names(model, "past")` as [B, kv_heads, P, head_dim].
    Outputs: logits [B, T, V], unsafe_prob [B], then `present.*` as [B, kv_heads, P+T, head_dim].
    `unsafe_prob` is the probe on the chunk's last non-pad token when P == 0 (the prompt), else -1.

    `probe=False` (gate mode only) leaves the probe out: `unsafe_prob` is always -1 and the graph serves
    the original stream alone, i.e. it computes exactly the unpatched model's decoder. It is the
    baseline `scripts/bench.py` times the patched graphs against, through the same exporter.
    """

    def __init__(self, model, probe: bool = True):
        super().__init__()
        if not probe and model.sasa.mode != "gate":
            raise ValueError("probe=False exports the unpatched decoder, which needs gate mode "
                             f"(mode {model.sasa.mode!r} serves the projected stream)")
        self.model = model
        self.probe = probe
        self.layers = cache_layers(model)

    def forward(self, inputs_embeds, attention_mask, position_ids, past: list[torch.Tensor]):
        model = self.model
        text_model = model.sasa_text_model()
        cache = SasaCache(model.config)
        flat = iter(past)
        for stream, layers in self.layers.items():
            target = cache if stream == "original" else cache.projected
            for layer in layers:
                target.layers[layer].update(next(flat), next(flat))
        batch, seq_len = inputs_embeds.shape[:2]
        past_length = past[0].shape[2]
        text_pos, rope_pos = model.sasa_positions(position_ids, None, attention_mask, past_length, inputs_embeds,
                                                  cache, {})
        masks = model._masks(text_model, inputs_embeds, attention_mask, cache, text_pos)
        rotary = text_model.rotary_emb(inputs_embeds, rope_pos)
        original, projected, per_layer = model.sasa_serving_streams(
            text_model, inputs_embeds, masks, rotary, text_pos, cache
        )
        serving = projected if model.sasa.mode == "augment" else original
        logits = model.lm_head(text_model.norm(serving))

        s, f = model.sasa.safety_layer, model.sasa.semantic_layer
        rows = torch.arange(batch, device=inputs_embeds.device)
        last = last_token_index(attention_mask, seq_len, batch, inputs_embeds.device)

        def prompt_probe(h_s, h_f):
            # Traced for every shape: the uncached passes see only the chunk's own keys.
            own = {name: (mask[..., -seq_len:] if mask is not None else None) for name, mask in masks.items()}
            features = model.sasa_probe_features(text_model, {s: h_s, f: h_f}, original, projected, own, rotary,
                                                 text_pos, rows, last)
            return model.sasa_probe(features[model.sasa.probe_features])

        def not_computed(h_s, h_f):
            return torch.full((h_s.shape[0],), UNSAFE_PROB_NOT_COMPUTED, dtype=torch.float32, device=h_s.device)

        if self.probe:
            unsafe_prob = torch.cond(past_length == 0, prompt_probe, not_computed, (per_layer[s], per_layer[f]))
        else:
            unsafe_prob = not_computed(per_layer[s], per_layer[f])
        presents = []
        for stream, layers in self.layers.items():
            source = cache if stream == "original" else cache.projected
            for layer in layers:
                presents += [source.layers[layer].keys, source.layers[layer].values]
        return (logits, unsafe_prob, *presents)


# ----- export -----------------------------------------------------------------------------------
def _save(proto: onnx.ModelProto, path: Path, threshold: int) -> None:
    """One graph file plus `<file>.data` holding every initialiser above `threshold` bytes."""
    data = path.name + ".data"
    for stale in (path, path.with_name(data)):
        stale.unlink(missing_ok=True)
    onnx.save_model(proto, str(path), save_as_external_data=True, all_tensors_to_one_file=True,
                    location=data, size_threshold=threshold)


def _export_torchscript(module, args, path: Path, input_names, output_names, dynamic_axes, threshold) -> None:
    with tempfile.TemporaryDirectory() as scratch:
        staged = Path(scratch) / path.name
        with torch.no_grad():
            torch.onnx.export(module, args, str(staged), dynamo=False, opset_version=OPSET,
                              input_names=input_names, output_names=output_names, dynamic_axes=dynamic_axes)
        _save(onnx.load(str(staged)), path, threshold)


def _text_dims(model) -> dict[str, int]:
    text = model.config.get_text_config()
    head_dim = getattr(text, "head_dim", None) or text.hidden_size // text.num_attention_heads
    return {"hidden_size": text.hidden_size, "num_key_value_heads": text.num_key_value_heads, "head_dim": head_dim,
            "num_hidden_layers": text.num_hidden_layers, "vocab_size": model.get_output_embeddings().weight.shape[0]}


def decoder_example(model, batch: int = 2, past: int = 3, chunk: int = 4) -> tuple:
    """Trace inputs: past and chunk >= 2 and distinct, so no dimension is specialised or unified."""
    dims = _text_dims(model)
    generator = torch.Generator().manual_seed(0)
    embeds = torch.randn(batch, chunk, dims["hidden_size"], generator=generator)
    mask = torch.ones(batch, past + chunk, dtype=torch.long)
    positions = torch.arange(past, past + chunk).expand(batch, chunk)
    if _is_qwen(model):
        positions = positions[None].expand(4, -1, -1)
    cache = [torch.randn(batch, dims["num_key_value_heads"], past, dims["head_dim"], generator=generator)
             for _ in cache_names(model, "past")]
    return embeds, mask, positions.contiguous(), cache


def export_decoder(model, path: Path, threshold: int = EXTERNAL_DATA_THRESHOLD, probe: bool = True) -> None:
    """torch.export (non-strict, every varying axis `Dim.DYNAMIC`), then the dynamo ONNX translation.

    `probe=False`: the unpatched model's decoder with the same interface (see `DecoderGraph`).

    Named `Dim`s (or axis-name strings given to torch.onnx.export) fail the non-strict export: the
    guard "mask length >= chunk length" is not expressible, so the axes get their names afterwards.
    """
    dynamic = torch.export.Dim.DYNAMIC
    example = decoder_example(model)
    past_names = cache_names(model, "past")
    dynamic_shapes = {
        "inputs_embeds": {0: dynamic, 1: dynamic},
        "attention_mask": {0: dynamic, 1: dynamic},
        "position_ids": {1: dynamic, 2: dynamic} if _is_qwen(model) else {0: dynamic, 1: dynamic},
        "past": [{0: dynamic, 2: dynamic} for _ in past_names],
    }
    wrapper = DecoderGraph(model, probe=probe).eval()
    with torch.no_grad():
        program = torch.export.export(wrapper, example, dynamic_shapes=dynamic_shapes, strict=False)
        onnx_program = torch.onnx.export(
            program, example, dynamo=True, optimize=True, verify=False,
            input_names=["inputs_embeds", "attention_mask", "position_ids", *past_names],
            output_names=["logits", "unsafe_prob", *cache_names(model, "present")],
        )
    proto = onnx_program.model_proto
    _strip_metadata(proto.graph)
    _name_axes(proto, {("inputs_embeds", 0): "batch", ("inputs_embeds", 1): "sequence_length",
                       ("attention_mask", 1): "total_sequence_length", (past_names[0], 2): "past_sequence_length"})
    _save(proto, path, threshold)


def _subgraphs(graph: onnx.GraphProto):
    yield graph
    for node in graph.node:
        for attribute in node.attribute:
            if attribute.type == onnx.AttributeProto.GRAPH:
                yield from _subgraphs(attribute.g)


def _strip_metadata(graph: onnx.GraphProto) -> None:
    """Drop the exporter's per-node stack traces and FX names: most of a small graph's bytes."""
    for sub in _subgraphs(graph):
        for node in sub.node:
            del node.metadata_props[:]


def _name_axes(proto: onnx.ModelProto, names: dict[tuple[str, int], str]) -> None:
    """Give the exporter's symbolic axes (s10, s22 + s69, ...) readable names everywhere they appear."""
    inputs = {value.name: value for value in proto.graph.input}
    symbols = {}
    for (name, axis), readable in names.items():
        symbol = inputs[name].type.tensor_type.shape.dim[axis].dim_param
        if symbol:
            symbols[symbol] = readable
    if not symbols:
        return
    pattern = re.compile(r"\b(" + "|".join(re.escape(symbol) for symbol in symbols) + r")\b")
    for graph in _subgraphs(proto.graph):
        for value in (*graph.input, *graph.output, *graph.value_info):
            for dim in value.type.tensor_type.shape.dim:
                if dim.dim_param:
                    dim.dim_param = pattern.sub(lambda match: symbols[match.group(1)], dim.dim_param)


def export_vision(model, layout: ImageLayout, path: Path, threshold: int = EXTERNAL_DATA_THRESHOLD) -> None:
    example = torch.randn(*layout.pixel_shape, generator=torch.Generator().manual_seed(0))
    _export_torchscript(VisionEncoderGraph(model, layout).eval(), (example,), path, ["pixel_values"],
                        ["image_features"], None, threshold)


def export_embed(model, path: Path, threshold: int = EXTERNAL_DATA_THRESHOLD) -> None:
    hidden = _text_dims(model)["hidden_size"]
    ids = torch.tensor([[5, model.config.image_token_id, model.config.image_token_id, 6]])
    features = torch.randn(2, hidden)
    wrapper = EmbedTokensGraph(model.get_input_embeddings(), model.config.image_token_id).eval()
    axes = {"input_ids": {0: "batch", 1: "sequence_length"}, "image_features": {0: "num_image_tokens"},
            "inputs_embeds": {0: "batch", 1: "sequence_length"}}
    _export_torchscript(wrapper, (ids, features), path, ["input_ids", "image_features"], ["inputs_embeds"], axes,
                        threshold)


# ----- the runtime config -----------------------------------------------------------------------
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
        image_token = tokenizer.convert_ids_to_tokens(model.config.image_token_id)
        section.update(
            image_token=image_token,
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
        if layout.grid_thw is not None:
            vision = model.config.vision_config
            preprocessing.update(
                resize="exact",
                patch_size=vision.patch_size,
                temporal_patch_size=vision.temporal_patch_size,
                merge_size=vision.spatial_merge_size,
            )
        else:
            size = dict(getattr(image_processor, "size", None) or {})
            crop = dict(getattr(image_processor, "crop_size", None) or {})
            preprocessing.update(
                resize="shortest_edge_center_crop" if size.get("shortest_edge") else "exact",
                shortest_edge=size.get("shortest_edge"),
                do_center_crop=bool(getattr(image_processor, "do_center_crop", False)),
                crop_size=[crop.get("height", image_size[0]), crop.get("width", image_size[1])],
            )
        section["preprocessing"] = preprocessing
    return section


PROMPT_SENTINEL = "\u2063SASA_PROMPT\u2063"


def _prompt_format(processor) -> dict[str, list[str]] | None:
    """The chat template rendered around a sentinel: (prefix, suffix) with and without an image.

    A runtime with no jinja2 formats single-turn prompts from these; it matches the template exactly.
    """
    if not hasattr(processor, "apply_chat_template"):
        return None
    formats = {}
    for kind, content in (
        ("text", [{"type": "text", "text": PROMPT_SENTINEL}]),
        ("image", [{"type": "image"}, {"type": "text", "text": PROMPT_SENTINEL}]),
    ):
        try:
            rendered = processor.apply_chat_template([{"role": "user", "content": content}],
                                                     add_generation_prompt=True, tokenize=False)
        except Exception:  # noqa: BLE001 - a template without image support: no image format
            continue
        if rendered.count(PROMPT_SENTINEL) == 1:
            formats[kind] = rendered.split(PROMPT_SENTINEL)
    return formats or None


def build_config(model, processor, layout: ImageLayout, image_size) -> dict[str, Any]:
    settings = model.sasa
    dims = _text_dims(model)
    layers = cache_layers(model)
    qwen = _is_qwen(model)
    eos = _token_ids(model.generation_config.eos_token_id) or _token_ids(model.config.get_text_config().eos_token_id)
    position_doc = ("int64 [4, batch, sequence_length]: row 0 the 1-D text position (cumsum of the attention "
                    "mask - 1), rows 1-3 the M-RoPE (temporal, height, width) positions") if qwen else \
        "int64 [batch, sequence_length]: cumsum of the attention mask - 1"
    config: dict[str, Any] = {
        "format": "sasa-onnx",
        "format_version": FORMAT_VERSION,
        "architecture": _architecture(model),
        "model_type": model.config.model_type,
        "dtype": "float32",
        "graphs": {
            "vision_encoder": {
                "file": VISION_FILE,
                "inputs": {"pixel_values": {"dtype": "float32", "shape": list(layout.pixel_shape)}},
                "outputs": {"image_features": {"dtype": "float32",
                                               "shape": [layout.tokens_per_image, dims["hidden_size"]]}},
                "images_per_call": 1,
            },
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
                "inputs": ["inputs_embeds", "attention_mask", "position_ids", *cache_names(model, "past")],
                "outputs": ["logits", "unsafe_prob", *cache_names(model, "present")],
                "position_ids": position_doc,
                "attention_mask": "int64 [batch, past_sequence_length + sequence_length], 1 = token; left padding",
                "logits": "float32 [batch, sequence_length, vocab_size] of the serving stream "
                          "(original in gate mode, projected in augment mode)",
                "unsafe_prob": f"float32 [batch]: the probe at the last non-pad token of the chunk when the past is "
                               f"empty (prefill of the whole prompt); {UNSAFE_PROB_NOT_COMPUTED} on decode steps",
            },
        },
        "cache": {
            "layout": "[batch, num_key_value_heads, sequence_length, head_dim], float32",
            "past_name": "past.{stream}.{layer}.{key|value}",
            "present_name": "present.{stream}.{layer}.{key|value}",
            "streams": layers,
            "num_key_value_heads": dims["num_key_value_heads"],
            "head_dim": dims["head_dim"],
            "num_hidden_layers": dims["num_hidden_layers"],
        },
        "hidden_size": dims["hidden_size"],
        "vocab_size": dims["vocab_size"],
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
            "refuse_when": "mode == 'gate' and unsafe_prob > threshold (threshold null: never)",
            "metrics": settings.metrics,
        },
        "eos_token_id": eos,
        # What generate() pads finished rows with: the generation config's pad id, else the first eos id.
        "pad_token_id": (_token_ids(model.generation_config.pad_token_id) + eos + [0])[0],
        "generation": {
            "decoding": "greedy",
            # The only logits processor the runtime applies: these ids never win (-inf), as in generate().
            "suppress_tokens": _token_ids(getattr(model.generation_config, "suppress_tokens", None)),
        },
        "image": {
            "sizes": [list(image_size)],
            "tokens_per_image": layout.tokens_per_image,
            "image_token_id": model.config.image_token_id,
            "grid_thw": list(layout.grid_thw) if layout.grid_thw else None,
            "spatial_merge_size": model.config.vision_config.spatial_merge_size if qwen else None,
            "resize_rule": ("every image is resized to the supported size (bicubic, aspect ratio not kept); "
                            "for an image of that size the pixels equal the transformers processor's")
            if qwen else "shortest edge to the crop size, then center crop, as the transformers processor",
        },
    }
    if processor is not None:
        config.update(_processor_section(model, processor, layout, image_size))
    return config


# ----- entry point ------------------------------------------------------------------------------
def _file_sizes(directory: Path) -> dict[str, int]:
    return {path.name: path.stat().st_size for path in sorted(directory.iterdir())
            if path.is_file() and path.name != PARITY_NAME}


def export_onnx(
    model,
    processor,
    out_dir: Path,
    *,
    image_size: tuple[int, int] | None = None,
    parity_cases: list[dict] | None = None,
    check_parity: bool = True,
    external_data_threshold: int = EXTERNAL_DATA_THRESHOLD,
    log=None,
) -> dict[str, Any]:
    """Write the three graphs, `sasa_onnx.json`, the tokenizer and `parity.json` into `out_dir`.

    `model`: a SASA-patched model in float32 (its `sasa.mode` is baked into the decoder).
    `processor`: its transformers processor (chat template, tokenizer, image constants), or None.
    `parity_cases`: batches as the processor makes them (`input_ids`, `attention_mask`, and the
    image inputs); default: built from the processor. Returns the summary that `parity.json` holds.
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    log = log or (lambda message: None)
    if model.dtype != torch.float32:
        raise ValueError(f"ONNX export runs in float32; the model is {model.dtype} (load it with dtype=float32)")
    model.eval()
    image_size = tuple(image_size or default_image_size(model, processor))
    layout = image_layout(model, image_size)
    check_image_size(model, processor, image_size)
    timings = {}
    for name, job in (
        (VISION_FILE, lambda path: export_vision(model, layout, path, external_data_threshold)),
        (EMBED_FILE, lambda path: export_embed(model, path, external_data_threshold)),
        (DECODER_FILE, lambda path: export_decoder(model, path, external_data_threshold)),
    ):
        started = time.perf_counter()
        job(out_dir / name)
        timings[name] = round(time.perf_counter() - started, 2)
        log(f"exported {name} in {timings[name]:.1f}s")

    config = build_config(model, processor, layout, image_size)
    tokenizer = getattr(processor, "tokenizer", None)
    if tokenizer is not None and getattr(tokenizer, "backend_tokenizer", None) is not None:
        tokenizer.backend_tokenizer.save(str(out_dir / TOKENIZER_FILE))
        config["tokenizer_file"] = TOKENIZER_FILE
    (out_dir / CONFIG_NAME).write_text(json.dumps(config, indent=2, ensure_ascii=False) + "\n")

    import onnxruntime
    import transformers

    summary: dict[str, Any] = {
        "export_seconds": timings,
        "image_size": list(image_size),
        "versions": {"torch": torch.__version__, "transformers": transformers.__version__, "onnx": onnx.__version__,
                     "onnxruntime": onnxruntime.__version__},
    }
    if check_parity:
        from sasa_patcher.export.onnx_parity import default_parity_cases, measure_parity

        cases = parity_cases if parity_cases is not None else default_parity_cases(model, processor, image_size)
        if cases:
            started = time.perf_counter()
            summary["parity"] = measure_parity(model, out_dir, cases)
            summary["parity_seconds"] = round(time.perf_counter() - started, 2)
            log(f"parity: {json.dumps(summary['parity']['worst'])}")
    summary["file_bytes"] = _file_sizes(out_dir)
    (out_dir / PARITY_NAME).write_text(json.dumps(summary, indent=2) + "\n")
    return summary


__all__ = [
    "CONFIG_NAME",
    "DecoderGraph",
    "EmbedTokensGraph",
    "ONNX_DIRNAME",
    "VisionEncoderGraph",
    "build_config",
    "cache_layers",
    "cache_names",
    "default_image_size",
    "export_onnx",
    "image_layout",
]
