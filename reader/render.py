"""Randomised renderings of text for training and measuring the reader.

Why the variety: a reader trained on one font at one place reads only that. Fonts are the DejaVu and
STIX faces that matplotlib ships (present wherever this package is installed) plus Pillow's bundled
default, which is also the FigStep renderer's font; a share of samples goes through the FigStep
renderer itself, so the evaluation's typographic images are in-distribution. Every sample returns the
text exactly as rendered (words dropped when they did not fit), because that is the training target.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from pathlib import Path

import matplotlib
from PIL import Image, ImageDraw, ImageFont

from sasa_patcher.probes.typographic import render_typographic

CANVASES: tuple[tuple[int, int], ...] = ((448, 448), (448, 448), (448, 336), (336, 448), (392, 392), (448, 280))
FIGSTEP_SHARE = 0.3
LIST_SHARE = 0.15
LIST_MARKERS = "1. 2. 3."
_FONT_FILES = (
    "DejaVuSans.ttf",
    "DejaVuSans-Bold.ttf",
    "DejaVuSans-Oblique.ttf",
    "DejaVuSerif.ttf",
    "DejaVuSerif-Bold.ttf",
    "DejaVuSerif-Italic.ttf",
    "DejaVuSansMono.ttf",
    "STIXGeneral.ttf",
)
# Smallest glyph size, in pixels of the image the model sees (the processor shrinks to <= 224x224).
MIN_SEEN_FONT_PX = 12
MAX_SEEN_FONT_PX = 24
SEEN_PIXELS = 224 * 224


@dataclass(frozen=True)
class Sample:
    image: Image.Image
    text: str  # what the image shows, words separated by single spaces


def font_paths() -> list[Path | None]:
    """None stands for Pillow's bundled default face."""
    folder = Path(matplotlib.get_data_path()) / "fonts" / "ttf"
    return [None, *(folder / name for name in _FONT_FILES if (folder / name).exists())]


def _font(path: Path | None, size: int) -> ImageFont.FreeTypeFont:
    return ImageFont.load_default(size=size) if path is None else ImageFont.truetype(str(path), size)


def _wrap(words: list[str], font: ImageFont.FreeTypeFont, width: float) -> list[list[str]]:
    lines: list[list[str]] = []
    for word in words:
        if lines and font.getlength(" ".join([*lines[-1], word])) <= width:
            lines[-1].append(word)
        else:
            lines.append([word])
    return lines


def _colours(rng: random.Random) -> tuple[tuple[int, int, int], tuple[int, int, int]]:
    """(background, ink) with at least half the luminance range between them."""
    while True:
        background = (255, 255, 255) if rng.random() < 0.5 else tuple(rng.randint(0, 255) for _ in range(3))
        ink = (0, 0, 0) if rng.random() < 0.5 else tuple(rng.randint(0, 255) for _ in range(3))
        if rng.random() < 0.15:
            background, ink = ink, background
        luminance = [0.299 * c[0] + 0.587 * c[1] + 0.114 * c[2] for c in (background, ink)]
        if abs(luminance[0] - luminance[1]) >= 128:
            return background, ink


def render_free(text: str, rng: random.Random, fonts: list[Path | None]) -> Sample:
    """Random font, size, colours, wrap width, line spacing and position; drops words that do not fit."""
    width, height = rng.choice(CANVASES)
    scale = min(1.0, (SEEN_PIXELS / (width * height)) ** 0.5)
    face = rng.choice(fonts)
    size = round(rng.uniform(MIN_SEEN_FONT_PX, MAX_SEEN_FONT_PX) / scale)
    font = _font(face, size)
    spacing = rng.uniform(1.15, 1.6)
    margin = rng.randint(4, 30)
    words = text.split()
    lines = _wrap(words, font, rng.uniform(0.5, 1.0) * (width - 2 * margin))
    with_list = rng.random() < LIST_SHARE
    line_px = round(size * spacing)
    rows = len(lines) + (4 if with_list else 0)
    if with_list and rows * line_px > height - 2 * margin:
        with_list, rows = False, len(lines)
    while rows * line_px > height - 2 * margin and len(lines) > 1:
        lines.pop()
        rows -= 1
    background, ink = _colours(rng)
    image = Image.new("RGB", (width, height), background)
    draw = ImageDraw.Draw(image)
    text_width = max(font.getlength(" ".join(line)) for line in lines)
    x = margin + rng.uniform(0, max(0.0, width - 2 * margin - text_width))
    y = margin + rng.uniform(0, max(0.0, height - 2 * margin - rows * line_px))
    for line in lines:
        draw.text((x, y), " ".join(line), fill=ink, font=font)
        y += line_px
    shown = " ".join(" ".join(line) for line in lines)
    if with_list:
        y += line_px
        for marker in LIST_MARKERS.split():
            draw.text((x, y), marker, fill=ink, font=font)
            y += 2 * line_px
        shown = f"{shown} {LIST_MARKERS}"
    return Sample(image, shown)


def render_figstep(text: str) -> Sample:
    """The evaluation's own FigStep rendering: heading plus an empty list 1, 2, 3."""
    return Sample(render_typographic(text), f"{' '.join(text.split())} {LIST_MARKERS}")


def render_sample(text: str, rng: random.Random, fonts: list[Path | None]) -> Sample:
    return render_figstep(text) if rng.random() < FIGSTEP_SHARE else render_free(text, rng, fonts)
