"""One spec per architecture: what export and serving need to know about a model family.

The patched forward's per-family code (image merge, rotary positions) lives in the adapters of the
self-contained modeling file, because artifacts carry that file. Everything else a family needs
outside the forward lives here, registered under the adapter's own name (`_sasa_architecture`):
the processor to load on a machine without torchvision, the image layout the vision graph takes,
the default image size, the position-id rows the decoder graph takes, and the preprocessing facts
the torch-free runtime replays. Adding an architecture = an adapter, a spec, a tiny test family;
nothing else branches on an architecture name.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from transformers import Qwen2_5_VLProcessor, Qwen2VLProcessor


@dataclass(frozen=True)
class ImageLayout:
    """How one image enters the vision encoder and how many placeholder tokens it fills."""

    pixel_shape: tuple[int, ...]
    tokens_per_image: int
    grid_thw: tuple[int, int, int] | None  # Qwen: patches (t, h, w) before merging


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
    # ONNX Runtime GenAI's `model.type` that runs this family's graphs, or None (GenAI has no such type).
    genai_type: ClassVar[str | None] = None
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

    def vision_inputs(self, pixel_values: torch.Tensor, layout: ImageLayout) -> dict[str, Any]:
        """The `multimodal` dict the adapter's `sasa_image_features` takes for one image of `layout`."""
        return {"pixel_values": pixel_values}

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

    def vision_inputs(self, pixel_values: torch.Tensor, layout: ImageLayout) -> dict[str, Any]:
        return {"pixel_values": pixel_values,
                "image_grid_thw": torch.tensor([layout.grid_thw], device=pixel_values.device)}

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


ARCHITECTURES: dict[str, ArchitectureSpec] = {
    spec.name: spec for spec in (
        QwenVLSpec("qwen2_vl", Qwen2VLProcessor, window_attention=False),
        QwenVLSpec("qwen2_5_vl", Qwen2_5_VLProcessor, window_attention=True),
        LlavaSpec(),
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
