"""The Hub-ready safetensors artifact: the base checkpoint's own files plus the SASA tensors and remote code.

Layout written by `write_safetensors_artifact` (into an existing, normally empty, directory: the
CLI passes the staging directory of `export.atomic.atomic_output_dir`):

    config.json                      base config.json + `sasa` section + `auto_map` + `architectures`
    modeling_sasa.py                 the self-contained patched classes (imports torch, transformers)
    model.safetensors.index.json     weight map: every base tensor and every SASA tensor
    model-0000k-of-0000n.safetensors base weights (hard links or copies of the base files, or saved)
    sasa.safetensors                 sasa_semantic_map.weight, sasa_probe.linear.{weight,bias},
                                     sasa_probe.threshold
    tokenizer / processor / chat template / generation config files of the base, README.md card

Why the single-file base is renamed: transformers 5.23 (`modeling_utils._get_resolved_checkpoint_files`)
looks in a local directory for `transformers_weights` from the config first, then `model.safetensors`,
and only when that file is absent for `model.safetensors.index.json` (the Hub code path does the same:
the index is tried only when `model.safetensors` is missing). A `model.safetensors` next to the index
would therefore be loaded alone and the SASA tensors silently left at their initial values (identity
map, zero probe). So a single-file base is linked under the shard name `model-00001-of-00001.safetensors`
(same bytes, new name) and no file called `model.safetensors` is ever written; a sharded base keeps its
shard names. `transformers_weights` is dropped from the config for the same reason (and because
`PretrainedConfig.save_pretrained` drops it too).

Base weights are linked, never re-serialised, when `export.base_weights.compare_with_base` finds
the in-memory weights identical to the base files (a lossless upcast included). When the weights
differ (LoRA merged, lossy cast, missing tensors) the base tensors are saved from memory with
transformers' `save_pretrained` (tied weights handled, checkpoint key names restored), still with
the SASA tensors in their own file.

Key names: the files keep the checkpoint's own names (e.g. Qwen2-VL `model.layers.*`), which
transformers 5 renames on load (`model.language_model.layers.*`). transformers skips that renaming
for classes defined outside the library unless the class name is registered with
`transformers.conversion_mapping.register_checkpoint_conversion_mapping`, so `modeling_sasa.py` must
register each patched class with its base class's mapping; without it the language model of the
loaded artifact is silently left at random initialisation (tests/test_checkpoint.py catches this).
"""

from __future__ import annotations

import json
import os
import shutil
import sys
import tempfile
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file

from sasa_patcher.export.base_weights import (
    INDEX_FILE,
    SASA_FILE,
    SASA_PREFIXES,
    SINGLE_AS_SHARD,
    SINGLE_FILE,
    base_weight_files,
    compare_with_base,
    read_safetensors_header,
)
from sasa_patcher.export.model_card import CardInfo, write_model_card

SASA_TENSORS = (
    "sasa_semantic_map.weight", "sasa_probe.linear.weight", "sasa_probe.linear.bias", "sasa_probe.threshold",
)
AUTO_CLASSES = ("AutoModelForImageTextToText", "AutoModel")
DEFAULT_SHARD_SIZE = "5GB"

# Files of the base directory that are not carried over as they are.
WEIGHT_SUFFIXES = (
    ".safetensors", ".safetensors.index.json", ".bin", ".bin.index.json", ".pt", ".pth", ".ckpt", ".gguf",
    ".h5", ".msgpack", ".onnx", ".onnx_data", ".ot", ".npz",
)
REWRITTEN = {"config.json", "README.md", "modeling_sasa.py"}
PROCESSOR_FILES = (
    "tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json",
    "preprocessor_config.json", "processor_config.json",
)


def _link_or_copy(source: Path, target: Path, link: bool) -> str:
    """Hard link when the filesystem allows it (no bytes written), else a kernel-side copy."""
    source = source.resolve()  # Hub snapshots are symlinks into blobs/: link the blob itself
    if link:
        try:
            os.link(source, target)
            return "linked"
        except OSError:  # EXDEV across filesystems, EPERM, filesystems without hard links
            pass
    shutil.copyfile(source, target)
    return "copied"


def _save_from_memory(model, out_dir: Path, max_shard_size: int | str) -> list[str]:
    """Base tensors (no SASA tensors) through transformers' `save_pretrained`: tied weights and checkpoint
    key names handled the way transformers itself does. Returns the shard names written into `out_dir`."""
    state = {name: tensor for name, tensor in model.state_dict().items() if not name.startswith(SASA_PREFIXES)}
    scratch = Path(tempfile.mkdtemp(prefix=".save-", dir=out_dir))
    architectures = model.config.architectures
    try:
        model.save_pretrained(scratch, state_dict=state, max_shard_size=max_shard_size)
        model.config.architectures = architectures
        if (scratch / SINGLE_FILE).is_file():
            shards = {SINGLE_FILE: SINGLE_AS_SHARD}
        else:
            weight_map = json.loads((scratch / INDEX_FILE).read_text())["weight_map"]
            shards = {name: name for name in sorted(set(weight_map.values()))}
        for source, target in shards.items():
            (scratch / source).rename(out_dir / target)
        return sorted(shards.values())
    finally:
        shutil.rmtree(scratch, ignore_errors=True)


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def artifact_config(model, base_dir: Path, class_path: str, saved_dtype: torch.dtype | None) -> dict[str, Any]:
    """The base `config.json` as it is, plus `sasa`, `auto_map` and `architectures` (and the dtype when
    the weights were saved from memory in another dtype)."""
    config = json.loads((Path(base_dir) / "config.json").read_text())
    config.pop("transformers_weights", None)
    config["architectures"] = [type(model).__name__]
    config["auto_map"] = {**(config.get("auto_map") or {}), **{name: class_path for name in AUTO_CLASSES}}
    config["sasa"] = model.sasa.to_dict()
    if saved_dtype is not None:
        name = _dtype_name(saved_dtype)
        config["dtype"] = name
        if "torch_dtype" in config:
            config["torch_dtype"] = name
        for value in config.values():
            if isinstance(value, dict):
                for key in ("dtype", "torch_dtype"):
                    if key in value:
                        value[key] = name
    return config


def _modeling_file(model) -> Path:
    """The file that defines the patched class (this package's, or the remote-code copy it was loaded from)."""
    module = sys.modules[type(model).__module__]
    path = Path(module.__file__)
    if path.stem != "modeling_sasa":
        raise ValueError(f"{type(model).__name__} is not defined in a modeling_sasa.py file: is the model patched?")
    return path


def _copy_base_files(base_dir: Path, out_dir: Path) -> list[str]:
    """Top-level regular files of the base that are not weights and not rewritten here (tokenizer,
    processor, chat template, generation config, license, ...). Subfolders and hidden files stay out."""
    copied = []
    for path in sorted(Path(base_dir).iterdir()):
        name = path.name
        if name.startswith(".") or not path.is_file() or name in REWRITTEN or name.endswith(WEIGHT_SUFFIXES):
            continue
        if (out_dir / name).exists():
            continue
        shutil.copyfile(path, out_dir / name)
        copied.append(name)
    return copied


def _save_processor(processor, base_dir: Path, out_dir: Path) -> str:
    """The base's processor files win; the in-memory processor is saved only when the base has none."""
    if any((Path(base_dir) / name).is_file() for name in PROCESSOR_FILES):
        return "base"
    if processor is None:
        return "none"
    scratch = Path(tempfile.mkdtemp(prefix=".processor-", dir=out_dir))
    try:
        processor.save_pretrained(scratch)
        for path in scratch.iterdir():
            if path.is_file() and not (out_dir / path.name).exists():
                path.rename(out_dir / path.name)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    return "saved"


def _write_index(out_dir: Path, files: list[str], metadata: dict[str, Any]) -> dict[str, str]:
    weight_map, total_size = {}, 0
    for name in files:
        _, header = read_safetensors_header(out_dir / name)
        for tensor, entry in header.items():
            if tensor in weight_map:
                raise ValueError(f"tensor {tensor} is in both {weight_map[tensor]} and {name}")
            weight_map[tensor] = name
            total_size += entry["data_offsets"][1] - entry["data_offsets"][0]
    metadata = {key: value for key, value in metadata.items() if key not in ("total_size", "total_parameters")}
    index = {"metadata": {**metadata, "total_size": total_size}, "weight_map": dict(sorted(weight_map.items()))}
    (out_dir / INDEX_FILE).write_text(json.dumps(index, indent=2) + "\n")
    return weight_map


def default_base_name(base_dir: Path) -> str:
    """`owner/name` for a Hugging Face cache snapshot (models--owner--name/snapshots/<hash>), else the folder name."""
    base_dir = Path(base_dir)
    repo_folder = base_dir.parent.parent.name
    if base_dir.parent.name == "snapshots" and repo_folder.startswith("models--"):
        return repo_folder.removeprefix("models--").replace("--", "/")
    return base_dir.name


def write_safetensors_artifact(
    model,
    processor,
    base_dir: Path,
    out_dir: Path,
    *,
    card_info: CardInfo | None = None,
    weights_modified: bool | None = None,
    link: bool = True,
    allow_upcast: bool = True,
    max_shard_size: int | str = DEFAULT_SHARD_SIZE,
) -> dict[str, Any]:
    """Write the Hub-ready artifact of a SASA-patched `model` into `out_dir` (created if needed).

    `base_dir` is the checkpoint directory the model was loaded from (`LoadedModel.source`).
    `weights_modified`: None checks the in-memory weights against the base files (names, shapes,
    dtypes and bytes); True skips the check and saves from memory (e.g. a LoRA adapter was merged);
    False trusts names, shapes and dtypes without reading the bytes (fast path for huge models).
    `link`: hard-link base shards (falls back to copying across filesystems); False always copies.
    `allow_upcast`: a lossless upcast (bf16 on disk, fp32 in memory) still links the base files.

    Returns a summary: base_weights ("linked" / "copied" / "linked+copied" / "saved"), reason (why
    saved), weight_files, sasa_tensors, verified (tensors compared byte for byte), processor
    ("base" / "saved" / "none"), files (everything written).
    """
    out_dir, base_dir = Path(out_dir), Path(base_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    if not (base_dir / "config.json").is_file():
        raise FileNotFoundError(f"base checkpoint directory {base_dir} has no config.json")
    if not hasattr(model, "sasa"):
        raise ValueError(f"{type(model).__name__} is not SASA-patched: call patcher.patching.patch_model first")
    modeling_file = _modeling_file(model)
    state = model.state_dict()
    sasa_state = {name: state[name].detach().cpu().contiguous() for name in state if name.startswith(SASA_PREFIXES)}
    del state
    if sorted(sasa_state) != sorted(SASA_TENSORS):
        raise ValueError(f"expected the SASA tensors {list(SASA_TENSORS)}, found {sorted(sasa_state)}")

    summary: dict[str, Any] = {"reason": None, "verified": 0, "unverified": 0, "upcast": 0}
    base = base_weight_files(base_dir)
    if weights_modified:
        summary["reason"] = "weights modified in memory (adapter merged)"
    elif base is None:
        summary["reason"] = "the base checkpoint has no safetensors weights"
    else:
        comparison = compare_with_base(model, base, allow_upcast=allow_upcast, check_bytes=weights_modified is None)
        summary.update({key: comparison[key] for key in ("reason", "verified", "unverified", "upcast")})

    saved_dtype = None
    if summary["reason"] is None:
        methods = {_link_or_copy(path, out_dir / name, link) for name, path in base.files.items()}
        summary["base_weights"] = "+".join(sorted(methods))
        weight_files, metadata = sorted(base.files), base.metadata
    else:
        weight_files, metadata = _save_from_memory(model, out_dir, max_shard_size), {}
        summary["base_weights"] = "saved"
        saved_dtype = model.dtype
    save_file(sasa_state, str(out_dir / SASA_FILE), metadata={"format": "pt"})
    weight_map = _write_index(out_dir, [*weight_files, SASA_FILE], metadata)

    class_path = f"{modeling_file.stem}.{type(model).__name__}"
    config = artifact_config(model, base_dir, class_path, saved_dtype)
    (out_dir / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    shutil.copyfile(modeling_file, out_dir / modeling_file.name)
    summary["base_files"] = _copy_base_files(base_dir, out_dir)
    summary["processor"] = _save_processor(processor, base_dir, out_dir)
    if not (out_dir / "generation_config.json").exists() and model.can_generate():
        model.generation_config.save_pretrained(out_dir)

    info = card_info or CardInfo(base_model=default_base_name(base_dir))
    write_model_card(out_dir, config, info, base_dir=base_dir, weights=summary)
    summary.update(
        weight_files=weight_files,
        sasa_tensors=sorted(sasa_state),
        tensors=len(weight_map),
        files=sorted(path.name for path in out_dir.iterdir()),
    )
    if (out_dir / SINGLE_FILE).exists():  # would shadow the index: see the module docstring
        raise RuntimeError(f"{SINGLE_FILE} must not exist next to {INDEX_FILE}")
    return summary

