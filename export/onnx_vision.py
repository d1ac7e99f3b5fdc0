"""The Qwen vision towers as one ONNX graph for any image size and any number of images per call.

    pixel_values   float32 [num_patches, C * temporal * patch * patch]  (the processor's rows, images in order)
    image_grid_thw int64 [num_images, 3]                                  ((t, h, w) patches per image)
    image_features float32 [num_patches / merge^2, hidden]               (what replaces the placeholders)

Why a rewrite of the tower's `forward`: transformers computes the rotary coordinates, the windows and
the attention segments with `grid_thw.tolist()` and a Python loop, which freezes one grid into a trace
(TorchScript) or fails outright (dynamo: unbacked symbols). Here every grid-dependent quantity is a
tensor op on `image_grid_thw`, and the variable-length attention (`cu_seqlens`) becomes a block-diagonal
additive mask built from segment ids (one id per frame for full attention, one per window for
Qwen2.5-VL's window attention), so the graph is plain ONNX ops. The tower's own modules (patch
embedding, rotary table, blocks' projections, norms, MLPs, merger) are reused as they are.
Measured on the tiny towers: within 1e-6 of transformers for square, wide, tall and partial-window
grids and for two images of different sizes in one call (tests/test_onnx_export.py).

Cost: the mask is O(n^2) in the patches of one call (4 bytes x n^2 per block, transient); ONNX Runtime
GenAI calls the graph once per image unless all images share one grid, and the project's runtime calls
it per image too. For real-size towers at their largest images olive-recipes' Loop + MultiHeadAttention
surgery would be the next step.
"""

from __future__ import annotations

import torch
from torch import nn


class QwenVisionGraph(nn.Module):
    """Qwen2-VL (full attention per frame) or Qwen2.5-VL (window attention + full blocks) tower."""

    def __init__(self, visual: nn.Module, window_attention: bool):
        super().__init__()
        self.visual = visual
        self.merge = visual.spatial_merge_size
        self.window_attention = window_attention
        if window_attention:
            self.full_blocks = set(visual.fullatt_block_indexes)
            # Window side in merged units, as transformers' get_window_index.
            self.window = visual.window_size // visual.spatial_merge_size // visual.patch_size

    def forward(self, pixel_values: torch.Tensor, image_grid_thw: torch.Tensor) -> torch.Tensor:
        visual, merge = self.visual, self.merge
        unit = merge * merge
        grid = image_grid_thw.long()
        frames, height, width = grid[:, 0], grid[:, 1], grid[:, 2]
        patches = frames * height * width
        ends = patches.cumsum(0)
        starts = ends - patches

        x = visual.patch_embed(pixel_values)
        index = torch.arange(x.shape[0])
        image = (index[:, None] >= ends[None, :]).sum(1)  # which image each patch row belongs to
        local = index - starts[image]
        h, w = height[image], width[image]
        blocks_w, blocks_h = w // merge, h // merge
        # (row, column) of every patch in the processor's order [t][h/merge][w/merge][merge][merge]
        row = ((local // (unit * blocks_w)) % blocks_h) * merge + (local // merge) % merge
        column = ((local // unit) % blocks_w) * merge + local % merge
        cos, sin = visual.rotary_pos_emb(x, torch.stack([row, column], dim=-1))
        # Full attention is per frame (transformers' cu_seqlens): a global frame id per patch.
        frame = (frames.cumsum(0) - frames)[image] + local // (h * w)

        order = None
        if self.window_attention:
            order, window = self._window_order(image[::unit], local[::unit] // unit, frames, height, width)

            def permute(values: torch.Tensor) -> torch.Tensor:
                return values.reshape(-1, unit, values.shape[-1])[order].reshape(-1, values.shape[-1])

            x, cos, sin = permute(x), permute(cos), permute(sin)
            frame = frame.reshape(-1, unit)[order].reshape(-1)
            window_mask = _segment_mask(window.repeat_interleave(unit))
        full_mask = _segment_mask(frame)
        for number, block in enumerate(visual.blocks):
            full = not self.window_attention or number in self.full_blocks
            x = x + _attention(block.attn, block.norm1(x), cos, sin, full_mask if full else window_mask)
            x = x + block.mlp(block.norm2(x))
        features = visual.merger(x)
        return features if order is None else features[torch.argsort(order)]

    def _window_order(self, image, local, frames, height, width) -> tuple[torch.Tensor, torch.Tensor]:
        """transformers' get_window_index as a sort: merged units grouped by (image, frame, window), row-major.

        Returns the permutation of merged units and the global window id of each permuted unit.
        """
        side = self.window
        lh, lw = (height // self.merge), (width // self.merge)
        windows_h, windows_w = (lh + side - 1) // side, (lw + side - 1) // side
        windows = frames * windows_h * windows_w
        uh, uw = lh[image], lw[image]
        frame = local // (uh * uw)
        r, c = (local // uw) % uh, local % uw
        window = (windows.cumsum(0) - windows)[image] + (frame * windows_h[image] + r // side) * windows_w[image] \
            + c // side
        order = torch.argsort(window * side * side + (r % side) * side + c % side)  # unique keys: stable
        return order, window[order]


def _segment_mask(segment: torch.Tensor) -> torch.Tensor:
    """0 where two rows share a segment, the float32 minimum elsewhere (softmax weight exactly 0)."""
    same = segment[None, :] == segment[:, None]
    return torch.zeros(same.shape, dtype=torch.float32).masked_fill(~same, torch.finfo(torch.float32).min)


def _attention(attn: nn.Module, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, mask: torch.Tensor):
    """The vision attention of both towers (fused qkv, rotary on q and k, output projection), masked."""
    length = x.shape[0]
    q, k, v = attn.qkv(x).reshape(length, 3, attn.num_heads, -1).permute(1, 0, 2, 3).unbind(0)
    cos, sin = cos.unsqueeze(-2).float(), sin.unsqueeze(-2).float()

    def rotate(values: torch.Tensor) -> torch.Tensor:
        half = values.shape[-1] // 2
        return torch.cat((-values[..., half:], values[..., :half]), dim=-1)

    q, k = q * cos + rotate(q) * sin, k * cos + rotate(k) * sin
    q, k, v = q.transpose(0, 1), k.transpose(0, 1), v.transpose(0, 1)  # [heads, n, d]
    scores = torch.matmul(q, k.transpose(1, 2)) * q.shape[-1] ** -0.5 + mask
    out = torch.matmul(torch.softmax(scores, dim=-1), v)
    return attn.proj(out.transpose(0, 1).reshape(length, -1))


def trace_grids(patch_dim: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Two images of different grids (wide and tall, partial windows): nothing about one grid is frozen."""
    grid = torch.tensor([[1, 8, 12], [1, 6, 4]])
    pixels = torch.randn(int(grid.prod(-1).sum()), patch_dim, generator=torch.Generator().manual_seed(0))
    return pixels, grid
