"""Feature extraction on disk, one file per prompt batch: a stopped calibration resumes where it stopped.

Why on disk: at 2B a calibration is an hour of CPU forwards; a killed run must not start again from
zero. The files of one run live in a folder named by the content hash of what they depend on (the
model's weights and SASA settings that the features read, the prompts in order, the batch size,
the candidates, the pooled window's length), so a changed model or prompt set can never be served stale features.

With localised layers (`--layers auto`) the folder also holds every layer's output at every prompt
position (`sequence-*.safetensors`): once localisation has chosen (s, f), the projected candidates
continue from the stored layer-s and layer-f outputs (layers s+1..L-1) instead of a second full
forward. Those files are large (tokens x layers x width x 4 bytes: `sequence_bytes`), so their disk
space is checked first, and the whole folder is removed when the calibration has finished.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from collections.abc import Sequence
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from sasa_patcher.cache import user_cache_dir
from sasa_patcher.modeling_sasa import POOLED_TOKENS
from sasa_patcher.probes.features import image_sha256

FORMAT_VERSION = 1
DISK_MARGIN_BYTES = 1024**3  # left free beyond the estimate


def model_digest(model) -> str:
    """Hash of every parameter and buffer (names, shapes, dtypes, bytes): the model the features came from."""
    digest = hashlib.blake2b(digest_size=16)
    for name, tensor in sorted({**dict(model.named_parameters()), **dict(model.named_buffers())}.items()):
        value = tensor.detach().to("cpu").contiguous().reshape(-1)
        digest.update(f"{name}:{tuple(tensor.shape)}:{value.dtype}\n".encode())
        digest.update(memoryview(value.view(torch.uint8).numpy()))
    return digest.hexdigest()


def prompts_digest(prompts: Sequence) -> str:
    """Hash of the prompts in order (text, label, image bytes): batch files are stored by position."""
    digest = hashlib.sha256()
    for prompt in prompts:
        record = [prompt.text, int(prompt.label), image_sha256(getattr(prompt, "image", None))]
        digest.update(json.dumps(record, ensure_ascii=False).encode("utf-8") + b"\n")
    return digest.hexdigest()


class FeatureCache:
    """The per-batch files of one extraction; writes are atomic (a killed run leaves no half file)."""

    def __init__(self, directory: Path):
        self.directory = Path(directory)
        self.directory.mkdir(parents=True, exist_ok=True)

    @classmethod
    def for_run(cls, model, prompts: Sequence, *, batch_size: int, candidates: Sequence[str],
                root: Path | None = None) -> FeatureCache:
        """The folder of this model, these prompts and settings under `root` (default: the user cache)."""
        sasa = model.sasa
        key = {
            "version": FORMAT_VERSION,
            "model": model_digest(model),
            "probe_layers": list(sasa.probe_layers),
            "prompts": prompts_digest(prompts),
            "batch_size": batch_size,
            "candidates": sorted(candidates),
            # Code constants the features depend on but the weights do not carry.
            "pooled_tokens": POOLED_TOKENS,
        }
        name = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:24]
        return cls((root or user_cache_dir() / "features") / name)

    def _path(self, kind: str, index: int) -> Path:
        return self.directory / f"{kind}-{index:06d}.safetensors"

    def has(self, kind: str, index: int) -> bool:
        return self._path(kind, index).is_file()

    def save(self, kind: str, index: int, tensors: dict[str, torch.Tensor]) -> None:
        path = self._path(kind, index)
        partial = path.with_suffix(".partial")
        save_file({name: value.detach().to("cpu").contiguous() for name, value in tensors.items()}, str(partial))
        os.replace(partial, path)

    def load(self, kind: str, index: int, names: Sequence[str] | None = None) -> dict[str, torch.Tensor]:
        """The batch's tensors (only `names` when given: layer files are read one tensor at a time)."""
        with safe_open(str(self._path(kind, index)), framework="pt") as handle:
            return {name: handle.get_tensor(name) for name in (names or handle.keys())}

    def count(self, kind: str) -> int:
        return len(list(self.directory.glob(f"{kind}-*.safetensors")))

    def remove(self) -> None:
        shutil.rmtree(self.directory, ignore_errors=True)


def sequence_bytes(padded_tokens: int, num_layers: int, hidden_size: int) -> int:
    """Disk the stored layer outputs take: every (padded) prompt position of every layer in float32."""
    return padded_tokens * num_layers * hidden_size * 4


def free_bytes(directory: Path) -> int:
    """Free disk space where `directory` is (or would be) created."""
    probe = Path(directory)
    while not probe.exists():
        probe = probe.parent
    return shutil.disk_usage(probe).free


def has_room_for(directory: Path, needed: int) -> bool:
    return free_bytes(directory) >= needed + DISK_MARGIN_BYTES
