"""Turn a loaded base model into its SASA-patched class, in place."""

from __future__ import annotations

import contextlib
import dataclasses
from collections.abc import Iterator

from transformers import PreTrainedModel

from sasa_patcher.errors import UserInputError
from sasa_patcher.modeling_sasa import SASA_CLASSES, SasaMixin, SasaSettings, transformers_base_class


def supported_architectures() -> list[str]:
    return sorted(SASA_CLASSES)


def sasa_class_for(model_type: str) -> type[SasaMixin]:
    """The patched class for a `config.model_type`; the error lists what is supported."""
    try:
        return SASA_CLASSES[model_type]
    except KeyError:
        raise UserInputError(
            f"unsupported architecture {model_type!r}: supported are {', '.join(supported_architectures())}"
        ) from None


def default_layers(num_layers: int) -> tuple[int, int]:
    """Fallback (s, f) when the user gives none and no calibration localises them.

    Two fifths of the depth for s and two layers later for f: the region where the text-only
    measurement on SmolLM2 (docs/design.md) kept the projected probe closest to the unprojected one.
    """
    safety = max(0, min(num_layers - 3, round(0.4 * num_layers)))
    return safety, safety + 2


def parse_layers(text: str) -> tuple[int, int]:
    """Parse `s,f` from the command line."""
    parts = text.split(",")
    try:
        safety, semantic = (int(part) for part in parts)
    except ValueError:
        raise UserInputError(f"--layers must be two integers 's,f' (e.g. 12,14), got {text!r}") from None
    return safety, semantic


def encode_refusal(model: PreTrainedModel, tokenizer, text: str) -> list[int]:
    """The refusal text as token ids ending in end-of-sequence (stored as `SasaSettings.refusal_token_ids`),
    so gate mode can emit it inside generate()."""
    return list(tokenizer(text, add_special_tokens=False)["input_ids"]) + [eos_token_id(model, tokenizer)]


def eos_token_id(model: PreTrainedModel, tokenizer) -> int:
    """The id that ends an assistant turn: the generation config's first, else the tokenizer's."""
    configured = model.generation_config.eos_token_id
    if isinstance(configured, list):
        configured = configured[0] if configured else None
    if configured is None:
        configured = tokenizer.eos_token_id
    if configured is None:
        raise UserInputError("the model defines no end-of-sequence token; set generation_config.eos_token_id")
    return int(configured)


def patch_model(model: PreTrainedModel, settings: SasaSettings, tokenizer=None) -> SasaMixin:
    """Swap the model's class for its SASA subclass and add the fixed modules.

    The patched class only adds modules and overrides forward/generate, so swapping the class
    keeps every base weight where it is: no second copy, which matters for 7B models and for
    accelerate's device map. With a `tokenizer`, the refusal text becomes `settings.refusal_token_ids`
    (gate mode emits those tokens inside generate()).
    """
    patched_class = sasa_class_for(model.config.model_type)
    base_class = transformers_base_class(patched_class)
    if type(model) is not base_class:
        raise UserInputError(
            f"expected a {base_class.__name__} for model_type {model.config.model_type!r}, got {type(model).__name__}"
        )
    num_layers = model.config.get_text_config().num_hidden_layers
    try:
        settings.validate(num_layers)
    except ValueError as error:
        raise UserInputError(f"invalid SASA settings: {error}") from None
    if tokenizer is not None:
        settings.refusal_token_ids = encode_refusal(model, tokenizer, settings.refusal_text)
    model.__class__ = patched_class
    model.init_sasa(settings)
    model.config.architectures = [patched_class.__name__]
    return model


@contextlib.contextmanager
def temporary_settings(model: SasaMixin, **changes) -> Iterator[SasaSettings]:
    """Serve with some SASA settings changed (e.g. `mode="augment"`, `safety_layer=...`), then restore them.

    The one way to change settings for a while (benchmark variants, localisation, reader measurements):
    the original settings come back even when the body raises, so a failed measurement never leaves a
    model patched with the wrong layers or mode. Yields the settings in force inside the block.
    """
    original = model.sasa
    changed = dataclasses.replace(original, **changes)
    model.set_sasa(changed)
    try:
        yield changed
    finally:
        model.set_sasa(original)
