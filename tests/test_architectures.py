"""One spec per architecture, under the same names as the adapters; facts checked on the tiny families."""

from __future__ import annotations

import pytest
import torch

from sasa_patcher.architectures import ARCHITECTURES, spec_for
from sasa_patcher.modeling_sasa import SASA_CLASSES, SasaSettings
from sasa_patcher.patching import patch_model


def test_every_adapter_has_a_spec_and_every_spec_an_adapter():
    assert set(ARCHITECTURES) == set(SASA_CLASSES)
    for name, spec in ARCHITECTURES.items():
        assert spec.name == name


def test_unknown_architecture_names_the_supported_ones():
    with pytest.raises(ValueError, match="llava"):
        spec_for("mllama")


def test_spec_matches_the_patched_model(family):
    model = patch_model(family.build(), SasaSettings(1, 2))
    spec = spec_for(model)
    assert spec.name == model._sasa_architecture
    size = spec.default_image_size(model)
    layout = spec.image_layout(model, size)
    assert layout.tokens_per_image > 0
    # The trace example has the rank the decoder graph declares.
    positions = spec.trace_positions(torch.zeros(2, 3, dtype=torch.long))
    assert positions.shape == ((2, 3) if spec.position_rows == 1 else (spec.position_rows, 2, 3))


def test_gemma3_refuses_pan_and_scan_with_the_fix():
    """Pan-and-scan crops are more images than the prompt shows: refused before any export work."""
    from tiny_calibration import tiny_processor
    from tiny_models import build_gemma3

    model = patch_model(build_gemma3(), SasaSettings(1, 2))
    processor = tiny_processor("gemma3")
    spec = spec_for(model)
    spec.check_image_size(model, processor, spec.default_image_size(model))
    processor.image_processor.do_pan_and_scan = True
    with pytest.raises(ValueError, match="do_pan_and_scan"):
        spec.check_image_size(model, processor, spec.default_image_size(model))
