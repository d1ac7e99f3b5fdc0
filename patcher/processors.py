"""Processors for the supported families, loadable on machines without torchvision."""

from __future__ import annotations

import functools
import json
from pathlib import Path

from transformers import AutoProcessor, ProcessorMixin
from transformers.utils import is_torchvision_available

from sasa_patcher.architectures import spec_for
from sasa_patcher.errors import UserInputError


@functools.cache
def image_only(processor_class: type[ProcessorMixin]) -> type[ProcessorMixin]:
    """`processor_class` without its video processor, for machines without torchvision.

    Why: in transformers 5 every video processor requires torchvision, and the Qwen2-VL and
    Qwen2.5-VL processors cannot even be constructed without one (`AutoProcessor` raises).
    torchvision has no CPU build here, and images need only the PIL image processor and the
    tokenizer. Dropping `video_processor` from the `__init__` signature removes it from the
    processor's attributes; everything else, including `mm_token_type_ids` (needed by M-RoPE when
    images are passed), is the upstream code.
    """

    def __init__(self, image_processor=None, tokenizer=None, chat_template=None, **kwargs):
        processor_class.__init__(self, image_processor, tokenizer, None, chat_template=chat_template)

    return type(f"ImageOnly{processor_class.__name__}", (processor_class,),
                {"__init__": __init__, "__module__": __name__,
                 "__doc__": f"{processor_class.__name__} without its video processor (see `image_only`)."})


def load_processor(directory: str | Path) -> ProcessorMixin:
    """The checkpoint's processor: `AutoProcessor`, or its image-only class where torchvision is missing.

    The saved files are the standard ones (`AutoProcessor` loads them where torchvision is
    installed); only the class that reads them differs here. Any failure is a one-line user error.
    """
    model_type = json.loads((Path(directory) / "config.json").read_text()).get("model_type", "<missing>")
    try:
        needs_torchvision = spec_for(model_type).processor_needing_torchvision
    except ValueError as error:
        raise UserInputError(str(error)) from None
    try:
        if needs_torchvision is not None and not is_torchvision_available():
            return image_only(needs_torchvision).from_pretrained(directory)
        return AutoProcessor.from_pretrained(directory)
    except (OSError, ValueError, ImportError, KeyError, TypeError) as error:
        first_line = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise UserInputError(f"cannot load the processor of {directory}: {first_line}") from None
