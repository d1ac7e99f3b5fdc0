"""The base checkpoint's safetensors weights: where they are, what they hold, and whether the in-memory
model still holds exactly that.

Base weights are never re-serialised when the in-memory weights are what the base files hold:
`compare_with_base` checks every tensor the model would save (tied duplicates removed, names mapped
back to the checkpoint's with transformers' own `revert_weight_conversion`) against the base file by
shape, dtype and bytes, streaming the file in 16 MiB chunks with ordinary reads (the file side never
becomes resident; the model side is the model's own single copy, which transformers 5 maps from the
same file). A lossless upcast (bf16/fp16 on disk, fp32 in memory: what `--dtype auto` does on CPU)
still counts as pristine by default: the base files hold exactly those values and stay the Hub-sized
original. `export.checkpoint` then links the base files into the artifact; otherwise it saves the
weights from memory.

A single-file base is named `model-00001-of-00001.safetensors` in the artifact (`SINGLE_AS_SHARD`,
why: `export.checkpoint`'s docstring); a sharded base keeps its shard names.
"""

from __future__ import annotations

import json
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

SASA_FILE = "sasa.safetensors"
INDEX_FILE = "model.safetensors.index.json"
SINGLE_FILE = "model.safetensors"
SINGLE_AS_SHARD = "model-00001-of-00001.safetensors"
SASA_PREFIXES = ("sasa_semantic_map.", "sasa_probe.")
CHUNK_BYTES = 16 * 1024 * 1024

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
