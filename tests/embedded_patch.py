"""The start of every slow embedded-model export test: the embedded model patched in gate mode."""

from __future__ import annotations

import torch

from sasa_patcher.loading import load_model
from sasa_patcher.modeling_sasa import SasaSettings
from sasa_patcher.patching import default_layers, patch_model


def patched_embedded(name: str, random_probe: bool = False):
    """(patched model, processor) of embedded model `name` at the default layers, gate mode.

    `random_probe`: a seeded random probe scaled to |w . x| ~ 1 over the ~50k projected logits, so
    `unsafe_prob` lies away from 0 and 1 and its parity means something.
    """
    loaded = load_model(name)
    num_layers = loaded.model.config.get_text_config().num_hidden_layers
    settings = SasaSettings(*default_layers(num_layers), mode="gate")
    model = patch_model(loaded.model, settings, loaded.processor.tokenizer)
    if random_probe:
        weight = model.sasa_probe.linear.weight
        weight.data = torch.randn(weight.shape, generator=torch.Generator().manual_seed(0)) * 1e-3
    return model, loaded.processor
