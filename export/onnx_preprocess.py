"""Image preprocessing and M-RoPE positions in numpy: the transformers processor replayed without torch.

Imports numpy and Pillow only (Pillow lazily). The constants come from `sasa_onnx.json`
`preprocessing` (written at export from the model's own image processor):
- Qwen (`resize: "smart"`): every image keeps its own size up to transformers' `smart_resize`
  (multiples of patch x merge, pixel count within [min_pixels, max_pixels]), bicubic; the vision
  graph takes any grid, so a typographic prompt's text is seen at the resolution the model would see.
- LLaVA (`resize: "shortest_edge_center_crop"` or `"exact"`): the one size of its CLIP tower.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np


class ImageError(ValueError):
    """An image the runtime cannot use (unreadable file, not an image, extreme aspect ratio)."""


@dataclass(frozen=True)
class PreparedImage:
    """One image as the vision graph takes it: pixel rows (Qwen) or [1, C, H, W] (LLaVA), and its grid."""

    pixel_values: np.ndarray
    grid_thw: tuple[int, int, int] | None = None


def open_image(image):
    """A PIL image from a path or an image; undecodable files raise ImageError (one clear line)."""
    from PIL import Image, UnidentifiedImageError

    if isinstance(image, Image.Image):
        return image
    try:
        opened = Image.open(image)
        opened.load()
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as error:
        raise ImageError(f"cannot read image {image}: {error}") from None
    return opened


def _to_rgb(image):
    from PIL import Image

    if "A" in image.getbands() or image.info.get("transparency") is not None:
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    return image.convert("RGB")


def _rescale_normalize(pixels: np.ndarray, settings: dict) -> np.ndarray:
    """CHW uint8 -> float32, in the processor's order and precision (float64 rescale, float32 normalize)."""
    image = pixels
    if settings.get("do_rescale", True):
        image = (image.astype(np.float64) * settings["rescale_factor"]).astype(np.float32)
    else:
        image = image.astype(np.float32)
    if settings.get("do_normalize", True):
        mean = np.array(settings["image_mean"], dtype=image.dtype)
        std = np.array(settings["image_std"], dtype=image.dtype)
        image = ((image.T - mean) / std).T
    return image


def smart_resize(height: int, width: int, factor: int, min_pixels: int, max_pixels: int) -> tuple[int, int]:
    """transformers' Qwen2-VL `smart_resize`: the size (H, W) the processor resizes an image to."""
    if max(height, width) / min(height, width) > 200:
        raise ImageError(f"image aspect ratio {max(height, width) / min(height, width):.0f} is above 200: "
                         "the Qwen processor refuses such images")
    h_bar = round(height / factor) * factor
    w_bar = round(width / factor) * factor
    if h_bar * w_bar > max_pixels:
        beta = math.sqrt((height * width) / max_pixels)
        h_bar = max(factor, math.floor(height / beta / factor) * factor)
        w_bar = max(factor, math.floor(width / beta / factor) * factor)
    elif h_bar * w_bar < min_pixels:
        beta = math.sqrt(min_pixels / (height * width))
        h_bar = math.ceil(height * beta / factor) * factor
        w_bar = math.ceil(width * beta / factor) * factor
    return h_bar, w_bar


def preprocess_image(image, config: dict) -> PreparedImage:
    """A PIL image (or path) -> the vision graph's input for one image, as the transformers processor."""
    image = open_image(image)
    settings = config["preprocessing"]
    if settings.get("do_convert_rgb", True):
        image = _to_rgb(image)
    resample = settings.get("resample", 3)
    resize = settings["resize"]
    if resize == "smart":
        factor = settings["patch_size"] * settings["merge_size"]
        height, width = smart_resize(image.height, image.width, factor, settings["min_pixels"],
                                     settings["max_pixels"])
        if image.size != (width, height):
            image = image.resize((width, height), resample=resample)
    elif resize == "exact":
        height, width = config["image"]["sizes"][0]
        if image.size != (width, height):
            image = image.resize((width, height), resample=resample)
    else:
        short = settings["shortest_edge"]
        w, h = image.size
        new_w, new_h = (short, int(short * h / w)) if w <= h else (int(short * w / h), short)
        if (new_w, new_h) != image.size:
            image = image.resize((new_w, new_h), resample=resample)
    pixels = np.asarray(image)
    pixels = pixels[..., None] if pixels.ndim == 2 else pixels
    pixels = np.moveaxis(pixels, -1, 0)
    if settings.get("do_center_crop"):
        crop_h, crop_w = settings["crop_size"]
        top, left = (pixels.shape[1] - crop_h) // 2, (pixels.shape[2] - crop_w) // 2
        if top < 0 or left < 0:
            raise ImageError(f"image {pixels.shape[1:]} smaller than the crop {crop_h}x{crop_w}")
        pixels = pixels[:, top:top + crop_h, left:left + crop_w]
    image_array = _rescale_normalize(pixels, settings)
    if "patch_size" not in settings:
        return PreparedImage(image_array[None].astype(np.float32))
    patch = settings["patch_size"]
    grid = (1, image_array.shape[1] // patch, image_array.shape[2] // patch)
    return PreparedImage(patchify(image_array, patch, settings["merge_size"], settings["temporal_patch_size"]), grid)


def patchify(image: np.ndarray, patch: int, merge: int, temporal: int) -> np.ndarray:
    """Qwen2-VL patch layout: (gh, gw, mh, mw) blocks, each C x temporal x patch x patch, flattened."""
    channels, height, width = image.shape
    grid_h, grid_w = height // patch, width // patch
    patches = image.reshape(channels, grid_h // merge, merge, patch, grid_w // merge, merge, patch)
    patches = patches.transpose(1, 4, 2, 5, 0, 3, 6)
    patches = np.broadcast_to(patches[:, :, :, :, :, None], (*patches.shape[:5], temporal, *patches.shape[5:]))
    return np.ascontiguousarray(patches.reshape(grid_h * grid_w, channels * temporal * patch * patch), np.float32)


def image_tokens(grid_thw, merge: int) -> int:
    """Placeholder tokens one image of this grid fills (after the merge)."""
    return int(np.prod(grid_thw)) // (merge * merge)


# ----- positions -----------------------------------------------------------------------------------
def text_positions(attention_mask: np.ndarray) -> np.ndarray:
    """1-D positions that skip padding (0 at pad positions), as the patched model makes them."""
    positions = np.cumsum(attention_mask, axis=-1) - 1
    return np.where(attention_mask == 0, 0, positions).astype(np.int64)


def mrope_positions(input_ids: np.ndarray, attention_mask: np.ndarray, image_token_id: int,
                    grids: list, merge: int) -> tuple[np.ndarray, np.ndarray]:
    """Qwen2-VL `get_rope_index` for images: [3, B, T] positions and per-row deltas [B, 1].

    `grids`: the (t, h, w) patch grid of every image of the batch, in placeholder order (row-major);
    one grid for all images is also accepted. Each image fills a run of t*h*w/merge^2 placeholders.
    """
    batch, length = input_ids.shape
    grids = [tuple(grids)] if len(grids) == 3 and np.isscalar(grids[0]) else [tuple(g) for g in grids]
    shared = len(grids) == 1
    positions = np.zeros((3, batch, length), dtype=np.int64)
    deltas = np.zeros((batch, 1), dtype=np.int64)
    next_image = 0
    for row in range(batch):
        valid = attention_mask[row].astype(bool)
        ids = input_ids[row][valid]
        is_image = ids == image_token_id
        pieces, current, start = [], 0, 0
        while start < len(ids):
            end = start
            while end < len(ids) and is_image[end] == is_image[start]:
                end += 1
            if not is_image[start]:
                pieces.append(np.broadcast_to(np.arange(end - start) + current, (3, end - start)))
                current += end - start
            else:
                remaining = end - start
                while remaining > 0:
                    grid_t, grid_h, grid_w = grids[0 if shared else next_image]
                    next_image += 1
                    grid_h, grid_w = grid_h // merge, grid_w // merge
                    t, h, w = np.meshgrid(np.arange(grid_t), np.arange(grid_h), np.arange(grid_w), indexing="ij")
                    pieces.append(np.stack([t.ravel() + current, h.ravel() + current, w.ravel() + current]))
                    current += max(grid_h, grid_w)
                    remaining -= grid_t * grid_h * grid_w
            start = end
        row_positions = np.concatenate(pieces, axis=1) if pieces else np.zeros((3, 0), np.int64)
        positions[:, row, valid] = row_positions[:, :valid.sum()]
        deltas[row, 0] = (row_positions.max() + 1 - len(ids)) if len(ids) else 0
    return positions, deltas
