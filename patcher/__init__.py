"""sasa_patcher: bake Self-Aware Safety Augmentation into a vision-language model and export it.

The package's API, in the order a patch runs:

    from sasa_patcher import PatchOptions, run_patch
    result = run_patch(PatchOptions(model="smol-qwen-vl", out=Path("patched")))

or step by step: `load_model` -> `patch_model(model, SasaSettings(s, f), tokenizer)` -> calibration
(`sasa_patcher.probes.calibrate.calibrate`) -> `write_safetensors_artifact` / `export_onnx`.

Names resolve lazily (PEP 562): `import sasa_patcher` loads no torch, so the ONNX Runtime path
(`sasa_patcher.cli.generate_onnx`, `sasa_patcher.export.onnx_runtime`) stays torch-free.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

# public name -> the module that defines it
_API: dict[str, str] = {
    "PatchOptions": "sasa_patcher.pipeline",
    "PatchResult": "sasa_patcher.pipeline",
    "run_patch": "sasa_patcher.pipeline",
    "load_model": "sasa_patcher.loading",
    "resolve_model": "sasa_patcher.loading",
    "patch_model": "sasa_patcher.patching",
    "temporary_settings": "sasa_patcher.patching",
    "SasaSettings": "sasa_patcher.modeling_sasa",
    "write_safetensors_artifact": "sasa_patcher.export.checkpoint",
    "export_onnx": "sasa_patcher.export.onnx_export",
    "OnnxVlm": "sasa_patcher.export.onnx_runtime",
    "UserInputError": "sasa_patcher.errors",
}

__all__ = [
    "OnnxVlm", "PatchOptions", "PatchResult", "SasaSettings", "UserInputError", "export_onnx", "load_model",
    "patch_model", "resolve_model", "run_patch", "temporary_settings", "write_safetensors_artifact",
]

if TYPE_CHECKING:
    from sasa_patcher.errors import UserInputError
    from sasa_patcher.export.checkpoint import write_safetensors_artifact
    from sasa_patcher.export.onnx_export import export_onnx
    from sasa_patcher.export.onnx_runtime import OnnxVlm
    from sasa_patcher.loading import load_model, resolve_model
    from sasa_patcher.modeling_sasa import SasaSettings
    from sasa_patcher.patching import patch_model, temporary_settings
    from sasa_patcher.pipeline import PatchOptions, PatchResult, run_patch


def __getattr__(name: str) -> Any:
    """Import the defining module on first use of a public name."""
    module = _API.get(name)
    if module is None:
        raise AttributeError(f"module 'sasa_patcher' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted([*globals(), *_API])
