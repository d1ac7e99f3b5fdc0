"""Find the user's model (alias, embedded, local directory, Hub id) and load it with its processor."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch
from transformers import AutoModelForImageTextToText, PreTrainedModel

from sasa_patcher.errors import UserInputError
from sasa_patcher.patching import sasa_class_for
from sasa_patcher.processors import load_processor

ALIASES: dict[str, str] = {
    "qwen-vl": "Qwen/Qwen2-VL-2B-Instruct",
    "qwen2.5-vl": "Qwen/Qwen2.5-VL-3B-Instruct",
    "llava": "llava-hf/llava-1.5-7b-hf",
    "gemma3": "google/gemma-3-4b-it",
}
DEFAULT_MODEL = "smol-qwen-vl"
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
DTYPE_ALIASES = {"fp32": "float32", "bf16": "bfloat16", "fp16": "float16"}
DEVICES = ("cpu", "cuda", "auto")


@dataclass
class LoadedModel:
    model: PreTrainedModel
    processor: object
    source: Path
    name: str


def _embedded_names() -> tuple[str, ...]:
    from sasa_patcher.embedded import EMBEDDED_MODELS

    return EMBEDDED_MODELS


def _looks_like_path(spec: str) -> bool:
    """Hub ids are `owner/name`; anything else with a separator is meant as a directory."""
    return spec.startswith((".", "/", "~")) or spec.count("/") > 1 or "\\" in spec


def _from_hub(repo_id: str) -> Path:
    """A Hub snapshot: the local cache first (works offline), then the network if allowed."""
    from huggingface_hub import snapshot_download

    try:
        return Path(snapshot_download(repo_id, local_files_only=True))
    except Exception:  # noqa: BLE001 - any cache miss falls through to the network attempt
        pass
    try:
        return Path(snapshot_download(repo_id))
    except Exception as error:  # noqa: BLE001 - offline, unknown repo, auth: one message for all
        raise UserInputError(
            f"cannot load {repo_id!r}: not in the local Hugging Face cache and the Hub is unreachable "
            f"({type(error).__name__}). Download it once with network access, or use the offline embedded "
            f"model: --model {DEFAULT_MODEL}"
        ) from None


def resolve_model(spec: str) -> Path:
    """Turn `--model` into a local checkpoint directory (shape-true `shape:NAME` models are built once)."""
    from sasa_patcher.shapes import is_shape, shape_model_dir

    if is_shape(spec):
        return shape_model_dir(spec)
    if spec in _embedded_names():
        from sasa_patcher.embedded import embedded_model_dir

        return embedded_model_dir(spec)
    spec = ALIASES.get(spec, spec)
    path = Path(spec).expanduser()
    if path.exists():
        if not (path / "config.json").is_file():
            raise UserInputError(f"{path} is not a model directory: it has no config.json")
        return path
    if _looks_like_path(spec):
        raise UserInputError(f"model directory {spec} does not exist; pass an existing directory, alias or Hub id")
    if "/" not in spec:
        from sasa_patcher.shapes import SHAPE_NAMES

        known = ", ".join([*ALIASES, *_embedded_names(), *SHAPE_NAMES])
        raise UserInputError(f"unknown model alias {spec!r}: known aliases are {known}, or pass a directory")
    return _from_hub(spec)


def torch_dtype(name: str, device: str) -> torch.dtype:
    """`auto` is float32 on CPU (exact comparisons) and bfloat16 on GPUs."""
    if name == "auto":
        return torch.float32 if device == "cpu" else torch.bfloat16
    name = DTYPE_ALIASES.get(name, name)
    if name not in DTYPES:
        raise UserInputError(f"unknown dtype {name!r}: choose auto, {', '.join(DTYPES)} (or fp32, bf16, fp16)")
    return DTYPES[name]


def check_device(device: str) -> None:
    if device not in DEVICES:
        raise UserInputError(f"unknown device {device!r}: choose one of {', '.join(DEVICES)}")
    if device in ("cuda", "auto") and not torch.cuda.is_available():
        raise UserInputError(f"--device {device} needs a CUDA GPU and none is visible; use --device cpu")


def check_architecture(directory: Path) -> None:
    """Fail before loading gigabytes of weights when the architecture is not supported."""
    model_type = json.loads((directory / "config.json").read_text()).get("model_type", "<missing>")
    sasa_class_for(model_type)


def check_adapter(adapter: Path) -> Path:
    """Validate a LoRA adapter directory before any weights are loaded."""
    adapter = Path(adapter).expanduser()
    if not adapter.is_dir():
        raise UserInputError(f"adapter directory {adapter} does not exist")
    if not (adapter / "adapter_config.json").is_file():
        raise UserInputError(f"adapter {adapter} is unreadable: expected a PEFT directory with adapter_config.json")
    if not (adapter / "adapter_model.safetensors").is_file():
        raise UserInputError(
            f"adapter {adapter} has no adapter_model.safetensors; only safetensors adapters are loaded "
            "(pickled .bin files are never unpickled)"
        )
    try:
        json.loads((adapter / "adapter_config.json").read_text())
    except (OSError, ValueError) as error:
        raise UserInputError(f"adapter {adapter} is unreadable: bad adapter_config.json ({error})") from None
    return adapter


def merge_lora_adapter(model: PreTrainedModel, adapter: Path) -> PreTrainedModel:
    """Fold a PEFT LoRA adapter into the base weights, so the patch sees one plain model."""
    from peft import PeftModel

    adapter = check_adapter(adapter)
    try:
        return PeftModel.from_pretrained(model, str(adapter)).merge_and_unload()
    except Exception as error:  # noqa: BLE001 - peft raises many types for a bad adapter
        raise UserInputError(f"adapter {adapter} could not be applied: {error}".splitlines()[0]) from None


def load_model(
    spec: str = DEFAULT_MODEL,
    *,
    dtype: str = "auto",
    device: str = "cpu",
    adapter: Path | None = None,
    directory: Path | None = None,
) -> LoadedModel:
    """Load base model and processor, merging a LoRA adapter if given.

    `directory` is `resolve_model(spec)` when the caller has resolved it already (the pipeline does,
    to read the layer count first): resolving twice would repeat the Hub lookup or embedded check.
    """
    check_device(device)
    resolved_dtype = torch_dtype(dtype, device)
    if adapter is not None:
        check_adapter(adapter)
    if directory is None:
        directory = resolve_model(spec)
    check_architecture(directory)
    model = AutoModelForImageTextToText.from_pretrained(
        directory, dtype=resolved_dtype, device_map="auto" if device == "auto" else None
    )
    if device == "cuda":
        model = model.to("cuda")
    if adapter is not None:
        model = merge_lora_adapter(model, Path(adapter))
    model.eval()
    processor = load_processor(directory)
    return LoadedModel(model=model, processor=processor, source=directory, name=spec)
