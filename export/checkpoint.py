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

Base weights are never re-serialised when the in-memory weights are what the base files hold: every
tensor the model would save (tied duplicates removed, names mapped back to the checkpoint's with
transformers' own `revert_weight_conversion`) is compared with the base file by shape, dtype and
bytes, streaming the file in 16 MiB chunks with ordinary reads (the file side never becomes resident;
the model side is the model's own single copy, which transformers 5 maps from the same file). A
lossless upcast (bf16/fp16 on disk, fp32 in memory: what `--dtype auto` does on CPU) still counts as
pristine by default: the base files hold exactly those values and stay the Hub-sized original. When
the weights differ (LoRA merged, lossy cast, missing tensors) the base tensors are saved from memory
with transformers' `save_pretrained` (tied weights handled, checkpoint key names restored), still with
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
import struct
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file

from sasa_patcher.export.model_card import CardInfo, write_model_card

SASA_FILE = "sasa.safetensors"
INDEX_FILE = "model.safetensors.index.json"
SINGLE_FILE = "model.safetensors"
SINGLE_AS_SHARD = "model-00001-of-00001.safetensors"
SASA_PREFIXES = ("sasa_semantic_map.", "sasa_probe.")
SASA_TENSORS = (
    "sasa_semantic_map.weight", "sasa_probe.linear.weight", "sasa_probe.linear.bias", "sasa_probe.threshold",
)
AUTO_CLASSES = ("AutoModelForImageTextToText", "AutoModel")
CHUNK_BYTES = 16 * 1024 * 1024
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

ST_DTYPES = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
    "BOOL": torch.bool, "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2,
}
LOSSLESS_UPCASTS = {
    (torch.bfloat16, torch.float32), (torch.float16, torch.float32), (torch.bfloat16, torch.float64),
    (torch.float16, torch.float64), (torch.float32, torch.float64),
}


# ----- safetensors headers -------------------------------------------------------------------------
def read_safetensors_header(path: Path) -> tuple[int, dict[str, dict]]:
    """(offset of the data section, {tensor name: {dtype, shape, data_offsets}}), metadata dropped."""
    with open(path, "rb") as handle:
        (length,) = struct.unpack("<Q", handle.read(8))
        header = json.loads(handle.read(length))
    header.pop("__metadata__", None)
    return 8 + length, header


def tensor_digests(path: Path) -> dict[str, str]:
    """sha256 of every tensor's raw bytes in a safetensors file, streamed (for byte-identity checks)."""
    import hashlib

    start, header = read_safetensors_header(path)
    digests = {}
    with open(path, "rb") as handle:
        for name, entry in sorted(header.items(), key=lambda item: item[1]["data_offsets"][0]):
            begin, end = entry["data_offsets"]
            handle.seek(start + begin)
            digest, remaining = hashlib.sha256(), end - begin
            while remaining:
                block = handle.read(min(CHUNK_BYTES, remaining))
                digest.update(block)
                remaining -= len(block)
            digests[name] = digest.hexdigest()
    return digests


@dataclass
class BaseWeights:
    """The base checkpoint's safetensors files as the artifact will name them, and their tensors."""

    files: dict[str, Path]  # name in the artifact -> file in the base directory
    tensors: dict[str, tuple[str, dict]]  # tensor name -> (name in the artifact, header entry)
    data_start: dict[str, int]  # name in the artifact -> offset of its data section
    metadata: dict[str, Any]  # the base index's metadata (empty for a single file)


def base_weight_files(base_dir: Path) -> BaseWeights | None:
    """The base's safetensors weights in the loader's order (single file before index); None if it has none."""
    base_dir = Path(base_dir)
    metadata: dict[str, Any] = {}
    if (base_dir / SINGLE_FILE).is_file():
        files = {SINGLE_AS_SHARD: base_dir / SINGLE_FILE}
    elif (base_dir / INDEX_FILE).is_file():
        index = json.loads((base_dir / INDEX_FILE).read_text())
        metadata = dict(index.get("metadata") or {})
        files = {name: base_dir / name for name in sorted(set(index["weight_map"].values()))}
        missing = [name for name, path in files.items() if not path.is_file()]
        if missing:
            raise FileNotFoundError(f"base checkpoint {base_dir} lacks shards named in its index: {missing}")
        if SASA_FILE in files:
            raise ValueError(f"base checkpoint {base_dir} already has a {SASA_FILE}: patch the original base instead")
    else:
        return None
    tensors, data_start = {}, {}
    for name, path in files.items():
        data_start[name], header = read_safetensors_header(path)
        for tensor, entry in header.items():
            tensors[tensor] = (name, entry)
    return BaseWeights(files=files, tensors=tensors, data_start=data_start, metadata=metadata)


# ----- is the in-memory model what the base files hold? --------------------------------------------
def checkpoint_state_dict(model) -> dict[str, torch.Tensor]:
    """Base tensors as `save_pretrained` would name them: SASA tensors and tied duplicates removed,
    transformers' load-time key renaming reverted. References, never copies (for renamings)."""
    from transformers.core_model_loading import revert_weight_conversion
    from transformers.modeling_utils import remove_tied_weights_from_state_dict

    state = {name: tensor for name, tensor in model.state_dict().items() if not name.startswith(SASA_PREFIXES)}
    state = remove_tied_weights_from_state_dict(state, model)
    return revert_weight_conversion(model, state)


def _raw_state_dict(model) -> dict[str, torch.Tensor]:
    from transformers.modeling_utils import remove_tied_weights_from_state_dict

    state = {name: tensor for name, tensor in model.state_dict().items() if not name.startswith(SASA_PREFIXES)}
    return remove_tied_weights_from_state_dict(state, model)


def compare_with_base(model, base: BaseWeights, *, allow_upcast: bool = True, check_bytes: bool = True) -> dict:
    """Whether every tensor the model would save is in the base files unchanged.

    Returns {"pristine": bool, "reason": str | None, "verified": n, "unverified": n (meta tensors),
    "upcast": n}. Extra tensors in the base files (unused by the model) are allowed: the loader
    ignores them as it did when the base was loaded.
    """
    result = {"pristine": False, "reason": None, "verified": 0, "unverified": 0, "upcast": 0}
    named = checkpoint_state_dict(model)
    if not set(named) <= set(base.tensors):
        raw = _raw_state_dict(model)  # a base saved without the original-format renaming
        if set(raw) <= set(base.tensors):
            named = raw
        else:
            missing = sorted(set(named) - set(base.tensors))
            result["reason"] = (f"{len(missing)} model tensors are not in the base checkpoint under their "
                                f"checkpoint names (e.g. {missing[0]})")
            return result
    checks = []
    for name, tensor in named.items():
        file_name, entry = base.tensors[name]
        disk_dtype = ST_DTYPES.get(entry["dtype"])
        if list(tensor.shape) != list(entry["shape"]):
            result["reason"] = f"{name} has shape {list(tensor.shape)} in memory, {entry['shape']} in the base"
            return result
        if disk_dtype is None:
            result["reason"] = f"{name} has dtype {entry['dtype']} in the base, which this writer does not compare"
            return result
        if tensor.dtype != disk_dtype:
            if not (allow_upcast and (disk_dtype, tensor.dtype) in LOSSLESS_UPCASTS):
                result["reason"] = (f"dtype cast: {name} is {str(tensor.dtype).removeprefix('torch.')} in memory, "
                                    f"{entry['dtype']} in the base")
                return result
            result["upcast"] += 1
        checks.append((file_name, entry, disk_dtype, name, tensor))
    if check_bytes:
        for file_name in base.files:
            in_file = sorted((c for c in checks if c[0] == file_name), key=lambda c: c[1]["data_offsets"][0])
            with open(base.files[file_name], "rb", buffering=0) as handle:
                for _, entry, disk_dtype, name, tensor in in_file:
                    if tensor.device.type == "meta":
                        result["unverified"] += 1
                        continue
                    start = base.data_start[file_name] + entry["data_offsets"][0]
                    if not _same_values(handle, start, disk_dtype, tensor):
                        result["reason"] = f"{name} differs from the base checkpoint (adapter merged or edited weights)"
                        return result
                    result["verified"] += 1
    result["pristine"] = True
    return result


def _same_values(handle, start: int, disk_dtype: torch.dtype, tensor: torch.Tensor) -> bool:
    """Compare a tensor with its bytes in the file, chunk by chunk, without a second resident copy."""
    flat = tensor.detach().reshape(-1)
    if disk_dtype == flat.dtype:
        flat = flat.view(torch.uint8) if flat.dtype != torch.bool else flat.to(torch.uint8)
        unit, decode = 1, None
    else:
        unit, decode = torch.empty((), dtype=disk_dtype).element_size(), disk_dtype
    total = flat.numel()
    step = CHUNK_BYTES // unit
    buffer = bytearray(min(CHUNK_BYTES, max(total * unit, 1)))
    handle.seek(start)
    for begin in range(0, total, step):
        count = min(step, total - begin)
        view = memoryview(buffer)[: count * unit]
        if handle.readinto(view) != count * unit:
            return False
        disk = torch.frombuffer(buffer, dtype=torch.uint8, count=count * unit)
        memory = flat[begin : begin + count].cpu()
        if decode is not None:
            disk = disk.view(decode).to(memory.dtype)
        if not torch.equal(disk, memory):
            return False
    return True


# ----- writing ---------------------------------------------------------------------------------------
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

