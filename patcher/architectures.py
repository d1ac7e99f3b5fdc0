"""One spec per architecture: what export and serving need to know about a model family.

The patched forward's per-family code (image merge, rotary positions, masks) lives in the adapters of
the self-contained modeling file, because artifacts carry that file. Everything else a family needs
outside the forward lives here, registered under the adapter's own name (`_sasa_architecture`):
the processor to load (and write) on a machine without torchvision, the image layout, the vision
graph's contract (module, example inputs, input shapes and dynamic axes), the default image size, the
position-id rows and extra inputs of the decoder graph, how an image appears in the prompt text, the
preprocessing facts the torch-free runtime replays, and ONNX Runtime GenAI's type and image processor.
Exporter, parity check, runtimes and GenAI writer read these; none of them branches on a family.
Adding an architecture = an adapter, a spec, a tiny test family.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import torch
from torch import nn
from transformers import Qwen2_5_VLProcessor, Qwen2VLProcessor

# The rule for the decoder's extra inputs the runtimes make from the prompt: int64 [batch, sequence_length],
# 1 where input_ids holds the image token, else 0 (0 on decode steps: generated tokens are text).
IMAGE_TOKEN_TYPES = "1 at image tokens (input_ids == image_token_id), else 0; int64 [batch, sequence_length]"


@dataclass(frozen=True)
class ImageLayout:
    """How one image enters the vision encoder and how many placeholder tokens it fills."""

    pixel_shape: tuple[int, ...]
    tokens_per_image: int
    grid_thw: tuple[int, int, int] | None  # Qwen: patches (t, h, w) before merging


def _fixed_size_vision_io(layout: ImageLayout, hidden: int) -> dict[str, Any]:
    return {"inputs": {"pixel_values": {"dtype": "float32", "shape": list(layout.pixel_shape)}},
            "outputs": {"image_features": {"dtype": "float32", "shape": [layout.tokens_per_image, hidden]}},
            "images_per_call": 1}


def save_processor_without_torchvision(processor_class: str, image_processor: dict, out: Path) -> None:
    """`processor_config.json` as the processor's own `save_pretrained` writes it, with its video processor.

    Written by hand because processors with a video processor (Qwen2-VL's) cannot be built without
    torchvision (see `processors.image_only`); `AutoProcessor` loads this file, video processor included,
    wherever torchvision is installed.
    """
    video = {key: image_processor[key] for key in ("size", "patch_size", "temporal_patch_size", "merge_size")}
    config = {"processor_class": processor_class, "image_processor": image_processor,
              "video_processor": {"video_processor_type": "Qwen2VLVideoProcessor", **video}}
    (Path(out) / "processor_config.json").write_text(json.dumps(config, indent=2) + "\n")


class ArchitectureSpec:
    """The interface every family implements; the class attributes are the facts, the methods the rules."""

    name: ClassVar[str]
    # Rows of `position_ids` the decoder graph takes: 1 -> [batch, seq]; 3 -> [3, batch, seq] (the
    # temporal, height and width M-RoPE rows: ONNX Runtime GenAI's contract; the decoder derives the
    # text positions from the attention mask, as transformers does when given three rows).
    position_rows: ClassVar[int]
    # The vision graph takes any image size (pixel rows + `image_grid_thw`, several images per call);
    # False: one fixed size per artifact.
    dynamic_image_size: ClassVar[bool] = False
    # ONNX Runtime GenAI's `model.type` that runs this family's graphs, or None (GenAI cannot run them).
    genai_type: ClassVar[str | None] = None
    # Decoder inputs beyond inputs_embeds, attention_mask, position_ids and the cache, made by the runtimes
    # with the rule `IMAGE_TOKEN_TYPES` (the one rule so far): name -> rule.
    decoder_extra_inputs: ClassVar[dict[str, str]] = {}
    # Window attention in the vision tower (Qwen2.5-VL): the dynamic vision graph builds window segments.
    window_attention: bool = False
    # The transformers processor class that cannot be built without torchvision (its video processor
    # needs it), or None; `patcher/processors.py` loads an image-only subclass of it on such machines.
    processor_needing_torchvision: type | None = None

    def default_image_size(self, model, processor=None) -> tuple[int, int]:
        raise NotImplementedError

    def check_image_size(self, model, processor, image_size: tuple[int, int]) -> None:
        """Raise ValueError when the processor would not keep an image of this size as it is."""

    def image_layout(self, model, image_size: tuple[int, int]) -> ImageLayout:
        raise NotImplementedError

    def vision_inputs(self, pixel_values: torch.Tensor, grid_thw=None) -> dict[str, Any]:
        """The `multimodal` dict the adapter's `sasa_image_features` takes for one image (of grid `grid_thw`)."""
        return {"pixel_values": pixel_values}

    def vision_io(self, model, layout: ImageLayout) -> dict[str, Any]:
        """The vision graph's contract for `sasa_onnx.json`: inputs and outputs (dtype, shape; a named axis is
        dynamic) and how many images one call takes."""
        return _fixed_size_vision_io(layout, model.config.get_text_config().hidden_size)

    def vision_graph(self, model, layout: ImageLayout) -> tuple[nn.Module, tuple]:
        """The module exported as the vision graph and its example inputs (in `vision_io`'s input order)."""
        from sasa_patcher.export.onnx_graphs import VisionEncoderGraph

        example = torch.randn(*layout.pixel_shape, generator=torch.Generator().manual_seed(0))
        return VisionEncoderGraph(model, layout), (example,)

    def image_prompt(self, model, tokenizer) -> dict[str, str]:
        """How the processor expands one image in the templated text: `marker` (what the chat template writes)
        becomes `before` + `token` x (the image's feature count) + `after`."""
        token = tokenizer.convert_ids_to_tokens(model.config.image_token_id)
        return {"marker": token, "before": "", "token": token, "after": ""}

    def genai_sections(self, model, preprocessing: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
        """GenAI's `model.vision` keys beyond the file names and its image processor definition (families
        with a `genai_type` only)."""
        raise NotImplementedError(f"{self.name} has no ONNX Runtime GenAI type")

    def preprocessing(self, model, image_processor, image_size: tuple[int, int]) -> dict[str, Any]:
        """Resize and layout facts the numpy runtime replays (the shared constants are added by the caller)."""
        raise NotImplementedError

    def resize_rule(self) -> str:
        raise NotImplementedError

    def trace_positions(self, positions: torch.Tensor) -> torch.Tensor:
        """Example `position_ids` for tracing the decoder, from 1-D text positions [batch, seq]."""
        if self.position_rows == 1:
            return positions
        return positions[None].expand(self.position_rows, -1, -1).contiguous()

    def position_axes(self, dynamic) -> dict[int, Any]:
        """Dynamic axes of `position_ids` (batch, sequence) for torch.export."""
        return {0: dynamic, 1: dynamic} if self.position_rows == 1 else {1: dynamic, 2: dynamic}

    def position_doc(self) -> str:
        if self.position_rows == 1:
            return "int64 [batch, sequence_length]: cumsum of the attention mask - 1"
        return (f"int64 [{self.position_rows}, batch, sequence_length]: the M-RoPE (temporal, height, width) "
                "positions (transformers' get_rope_index); text positions come from the attention mask")


def _pixel_range(processor) -> tuple[int | None, int | None]:
    size = getattr(getattr(processor, "image_processor", None), "size", None) or {}
    return size.get("shortest_edge"), size.get("longest_edge")


class QwenVLSpec(ArchitectureSpec):
    """Qwen2-VL and Qwen2.5-VL: patch-flattened pixels with a (t, h, w) grid, M-RoPE positions.

    Both run under GenAI's `qwen2_5_vl` type: GenAI never looks inside the vision graph, and the two
    families share the processor (patching, normalisation) and the image M-RoPE positions.
    """

    position_rows = 3
    dynamic_image_size = True
    genai_type = "qwen2_5_vl"
    # 448x448 = 256 image tokens after the 2x2 merge: readable text at a modest prefill cost.
    default_size: ClassVar[tuple[int, int]] = (448, 448)

    def __init__(self, name: str, processor_class: type, window_attention: bool):
        self.name = name
        self.processor_needing_torchvision = processor_class
        self.window_attention = window_attention

    def default_image_size(self, model, processor=None) -> tuple[int, int]:
        """448x448, clipped to the processor's pixel range."""
        vision = model.config.vision_config
        factor = vision.patch_size * vision.spatial_merge_size
        height, width = self.default_size
        min_pixels, max_pixels = _pixel_range(processor)
        if max_pixels and height * width > max_pixels:
            side = int(math.sqrt(max_pixels) // factor) * factor
            height = width = max(factor, side)
        if min_pixels and height * width < min_pixels:
            side = math.ceil(math.sqrt(min_pixels) / factor) * factor
            height = width = side
        return (height, width)

    def check_image_size(self, model, processor, image_size: tuple[int, int]) -> None:
        min_pixels, max_pixels = _pixel_range(processor)
        pixels = image_size[0] * image_size[1]
        if min_pixels and max_pixels and not min_pixels <= pixels <= max_pixels:
            raise ValueError(f"image size {image_size[0]}x{image_size[1]} is outside the processor's pixel range "
                             f"[{min_pixels}, {max_pixels}]: it would resize such images to another grid")

    def image_layout(self, model, image_size: tuple[int, int]) -> ImageLayout:
        vision = model.config.vision_config
        height, width = image_size
        factor = vision.patch_size * vision.spatial_merge_size
        if height % factor or width % factor:
            raise ValueError(f"Qwen image sizes must be multiples of {factor} (patch x merge), got {height}x{width}")
        grid = (1, height // vision.patch_size, width // vision.patch_size)
        patch_dim = vision.in_channels * vision.temporal_patch_size * vision.patch_size**2
        tokens = grid[0] * grid[1] * grid[2] // vision.spatial_merge_size**2
        return ImageLayout((grid[0] * grid[1] * grid[2], patch_dim), tokens, grid)

    def vision_inputs(self, pixel_values: torch.Tensor, grid_thw=None) -> dict[str, Any]:
        return {"pixel_values": pixel_values, "image_grid_thw": torch.tensor([grid_thw], device=pixel_values.device)}

    def vision_io(self, model, layout: ImageLayout) -> dict[str, Any]:
        hidden = model.config.get_text_config().hidden_size
        return {"inputs": {"pixel_values": {"dtype": "float32", "shape": ["num_patches", layout.pixel_shape[1]]},
                           "image_grid_thw": {"dtype": "int64", "shape": ["num_images", 3]}},
                "outputs": {"image_features": {"dtype": "float32", "shape": ["num_image_tokens", hidden]}},
                "images_per_call": "any (rows of all images in order, one grid row per image)"}

    def vision_graph(self, model, layout: ImageLayout) -> tuple[nn.Module, tuple]:
        """The tower through its tensor-only rewrite, traced with two images of different grids."""
        from sasa_patcher.export.onnx_vision import QwenVisionGraph, trace_grids

        return QwenVisionGraph(model.model.visual, self.window_attention), trace_grids(layout.pixel_shape[1])

    def genai_sections(self, model, preprocessing: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
        """GenAI's Qwen vision keys, and its Qwen image processor with the model's own constants.

        `smart_resize: 1` makes the Resize step ignore its width/height and resize each image from its own
        size as transformers does; measured equal to `Qwen2VLImageProcessorPil` within 5e-7.
        """
        vision = model.config.vision_config
        keys = {"spatial_merge_size": vision.spatial_merge_size,
                "tokens_per_second": float(getattr(vision, "tokens_per_second", None) or 2.0),
                "patch_size": vision.patch_size,
                "inputs": {"pixel_values": "pixel_values", "image_grid_thw": "image_grid_thw"}}
        patch, merge = preprocessing["patch_size"], preprocessing["merge_size"]
        transforms = [
            ("decode_image", "DecodeImage", {"color_space": "RGB"}),
            ("convert_to_rgb", "ConvertRGB", None),
            ("resize", "Resize", {"width": 540, "height": 360, "smart_resize": 1,
                                  "min_pixels": preprocessing["min_pixels"], "max_pixels": preprocessing["max_pixels"],
                                  "patch_size": patch, "merge_size": merge}),
            ("rescale", "Rescale", {"rescale_factor": preprocessing["rescale_factor"]}),
            ("normalize", "Normalize", {"mean": preprocessing["image_mean"], "std": preprocessing["image_std"],
                                        "qwen2_5_vl": 1}),
            ("patch_image", "PatchImage", {"patch_size": patch,
                                           "temporal_patch_size": preprocessing["temporal_patch_size"],
                                           "merge_size": merge}),
        ]
        operations = [{"operation": {"name": name, "type": kind, **({"attrs": attrs} if attrs else {})}}
                      for name, kind, attrs in transforms]
        return keys, {"processor": {"name": "qwen2_5_image_processor", "transforms": operations}}

    def preprocessing(self, model, image_processor, image_size: tuple[int, int]) -> dict[str, Any]:
        vision = model.config.vision_config
        size = getattr(image_processor, "size", None) or {}
        min_pixels = size.get("shortest_edge") or getattr(image_processor, "min_pixels", None) or 56 * 56
        max_pixels = size.get("longest_edge") or getattr(image_processor, "max_pixels", None) or 28 * 28 * 1280
        return {"resize": "smart", "min_pixels": int(min_pixels), "max_pixels": int(max_pixels),
                "patch_size": vision.patch_size, "temporal_patch_size": vision.temporal_patch_size,
                "merge_size": vision.spatial_merge_size}

    def resize_rule(self) -> str:
        return ("each image keeps its aspect ratio: transformers' smart_resize to multiples of patch x merge "
                "within [min_pixels, max_pixels] (bicubic), as the transformers processor")


class LlavaSpec(ArchitectureSpec):
    """LLaVA: one CLIP image size, [1, C, H, W] pixels, 1-D rotary positions."""

    name = "llava"
    position_rows = 1

    def default_image_size(self, model, processor=None) -> tuple[int, int]:
        side = model.config.vision_config.image_size
        return (side, side)

    def image_layout(self, model, image_size: tuple[int, int]) -> ImageLayout:
        vision = model.config.vision_config
        height, width = image_size
        if (height, width) != (vision.image_size, vision.image_size):
            side = vision.image_size
            raise ValueError(f"LLaVA's vision tower takes {side}x{side} images, got {height}x{width}")
        patches = (vision.image_size // vision.patch_size) ** 2
        tokens = patches + (1 if model.config.vision_feature_select_strategy == "full" else 0)
        return ImageLayout((1, vision.num_channels, height, width), tokens, None)

    def preprocessing(self, model, image_processor, image_size: tuple[int, int]) -> dict[str, Any]:
        size = dict(getattr(image_processor, "size", None) or {})
        crop = dict(getattr(image_processor, "crop_size", None) or {})
        return {
            "resize": "shortest_edge_center_crop" if size.get("shortest_edge") else "exact",
            "shortest_edge": size.get("shortest_edge"),
            "do_center_crop": bool(getattr(image_processor, "do_center_crop", False)),
            "crop_size": [crop.get("height", image_size[0]), crop.get("width", image_size[1])],
        }

    def resize_rule(self) -> str:
        return "shortest edge to the crop size, then center crop, as the transformers processor"


class Gemma3Spec(ArchitectureSpec):
    """Gemma 3: one SigLIP image size (896 at 4B/12B/27B), [1, C, H, W] pixels, 1-D rotary positions,
    `token_type_ids` as an extra decoder input (bidirectional attention inside each image).

    Not served by ONNX Runtime GenAI (`genai_type` None, so no `genai_config.json` is written): its
    `gemma3` type binds the decoder's inputs_embeds, attention_mask, position_ids and cache only; the
    name `token_type_ids` occurs nowhere in onnxruntime-genai 0.18.0's library (checked in its strings),
    so the graph's required `token_type_ids` input would stay unfed and ONNX Runtime refuses such a run.
    Dropping the input would make an image's tokens attend causally only: not the model. The project's
    runtime (`export/onnx_runtime.py`) serves these artifacts.
    Pan-and-scan crops (`do_pan_and_scan`) are refused: one image is one fixed-size crop here.
    """

    name = "gemma3"
    position_rows = 1
    decoder_extra_inputs = {"token_type_ids": IMAGE_TOKEN_TYPES}

    def default_image_size(self, model, processor=None) -> tuple[int, int]:
        side = model.config.vision_config.image_size
        return (side, side)

    def check_image_size(self, model, processor, image_size: tuple[int, int]) -> None:
        if getattr(getattr(processor, "image_processor", None), "do_pan_and_scan", False):
            raise ValueError("Gemma 3 pan-and-scan crops (do_pan_and_scan=True) are not supported: the artifact "
                             "takes one fixed-size image per image; set do_pan_and_scan false in the processor "
                             "config (preprocessor_config.json)")

    def image_layout(self, model, image_size: tuple[int, int]) -> ImageLayout:
        vision = model.config.vision_config
        if tuple(image_size) != (vision.image_size, vision.image_size):
            side = vision.image_size
            raise ValueError(f"Gemma 3's vision tower takes {side}x{side} images, got {image_size[0]}x{image_size[1]}")
        return ImageLayout((1, vision.num_channels, vision.image_size, vision.image_size),
                           model.config.mm_tokens_per_image, None)

    def image_prompt(self, model, tokenizer) -> dict[str, str]:
        """The template writes `<start_of_image>`; Gemma3Processor makes it a blank line, the image, a blank line."""
        config = model.config
        start, image, end = tokenizer.convert_ids_to_tokens([config.boi_token_index, config.image_token_id,
                                                             config.eoi_token_index])
        return {"marker": start, "before": f"\n\n{start}", "token": image, "after": f"{end}\n\n"}

    def preprocessing(self, model, image_processor, image_size: tuple[int, int]) -> dict[str, Any]:
        return {"resize": "exact"}

    def resize_rule(self) -> str:
        return "every image resized to the tower's size, aspect ratio not kept (no pan-and-scan), as the processor"


ARCHITECTURES: dict[str, ArchitectureSpec] = {
    spec.name: spec for spec in (
        QwenVLSpec("qwen2_vl", Qwen2VLProcessor, window_attention=False),
        QwenVLSpec("qwen2_5_vl", Qwen2_5_VLProcessor, window_attention=True),
        LlavaSpec(),
        Gemma3Spec(),
    )
}


def spec_for(model_or_name) -> ArchitectureSpec:
    """The spec of a patched model (by its adapter's name) or of a `config.model_type`."""
    name = model_or_name if isinstance(model_or_name, str) else getattr(model_or_name, "_sasa_architecture", "")
    try:
        return ARCHITECTURES[name]
    except KeyError:
        raise ValueError(f"no architecture spec for {name!r}: supported are {', '.join(sorted(ARCHITECTURES))}") \
            from None
