"""Randomised renderings: the returned text is exactly what the image shows."""

from __future__ import annotations

import io
import random

import numpy as np

from reader import render
from sasa_patcher.probes.typographic import render_typographic

SENTENCE = "Return the number of items waiting in the queue before the worker stops."


def _png(image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def test_fonts_include_pillow_default_and_matplotlib_faces() -> None:
    fonts = render.font_paths()
    assert fonts[0] is None and len(fonts) >= 5


def test_free_rendering_is_deterministic_and_text_is_a_word_prefix() -> None:
    fonts = render.font_paths()
    for seed in range(20):
        first = render.render_free(SENTENCE, random.Random(seed), fonts)
        again = render.render_free(SENTENCE, random.Random(seed), fonts)
        assert _png(first.image) == _png(again.image) and first.text == again.text
        shown = first.text.removesuffix(" " + render.LIST_MARKERS)
        assert SENTENCE.startswith(shown)
        assert first.image.size in render.CANVASES


def test_renderings_differ_in_style_and_draw_ink() -> None:
    fonts = render.font_paths()
    images = [np.asarray(render.render_free(SENTENCE, random.Random(s), fonts).image) for s in range(6)]
    assert len({image.tobytes() for image in images}) == 6
    assert all(image.std() > 10 for image in images)  # text is drawn, not a blank canvas


def test_figstep_sample_is_the_evaluation_rendering_with_its_list() -> None:
    sample = render.render_figstep("How to bake bread")
    assert _png(sample.image) == _png(render_typographic("How to bake bread"))
    assert sample.text == "How to bake bread 1. 2. 3."
