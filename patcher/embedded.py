"""The embedded offline models: real SmolLM2-135M-Instruct language weights in Qwen2-VL and LLaVA bodies.

Why: every command and integration test must run offline on a laptop CPU, yet calibration needs a
language model whose hidden states mean something. SmolLM2-135M-Instruct (`patcher/smollm2.py`) is
grafted into the architectures the patcher supports, next to a small seeded vision tower
(`patcher/embedded_builders.py`), and the result is saved once as an ordinary Hugging Face
checkpoint under the user cache. This module is the registry (names, provenance, builders) and the
cache (build once, stamp, install atomically).

The invariant that makes the graft trustworthy: on text the embedded models compute exactly the GGUF
model's logits over SmolLM2's 49152-token vocabulary (checked at build time and by the tests), so
every text-side figure measured on them is a figure about the real SmolLM2.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import transformers
from transformers import GenerationConfig

from sasa_patcher.cache import user_cache_dir
from sasa_patcher.embedded_builders import build_llava, build_qwen2_5_vl, build_qwen2_vl
from sasa_patcher.errors import UserInputError
from sasa_patcher.smollm2 import (
    SMOLLM2_SOURCE,
    SMOLLM2_VOCAB,
    check_text_parity,
    load_smollm2,
    locate_smollm2_gguf,
)

EMBEDDED_MODELS: tuple[str, ...] = ("smol-qwen-vl", "smol-llava", "smol-qwen2.5-vl")


@dataclass(frozen=True)
class EmbeddedProvenance:
    """What an embedded model's card declares: the licence of its weights and the Hub models they come from.

    Keyed by the exact embedded name, so only these builds (not any model whose name merely starts
    with `smol-`) inherit SmolLM2's licence and source.
    """

    license: str
    source_models: tuple[str, ...]


EMBEDDED_PROVENANCE: dict[str, EmbeddedProvenance] = {
    "smol-qwen-vl": EmbeddedProvenance("apache-2.0", (SMOLLM2_SOURCE,)),
    "smol-llava": EmbeddedProvenance("apache-2.0", (SMOLLM2_SOURCE,)),
    "smol-qwen2.5-vl": EmbeddedProvenance("apache-2.0", (SMOLLM2_SOURCE,)),
}
_BUILDERS = {"smol-qwen-vl": build_qwen2_vl, "smol-llava": build_llava, "smol-qwen2.5-vl": build_qwen2_5_vl}

# Bump whenever the build (here, in embedded_builders.py or in smollm2.py) changes what lands on disk:
# cached builds with another number are rebuilt.
RECIPE_VERSION = 1
STAMP_NAME = "sasa_embedded.json"


def _say(message: str) -> None:
    """Progress on stderr: the first build takes tens of seconds and must not look like a hang."""
    print(f"[sasa-patcher] {message}", file=sys.stderr, flush=True)


def _sha256(path: Path) -> str:
    """Provenance for the stamp: which GGUF this build came from."""
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _build(name: str, gguf: Path, out: Path) -> None:
    """Write the complete checkpoint for `name` into the empty directory `out`, stamp last."""
    start = time.monotonic()
    _say(f"building embedded model {name} into the cache (once, about 30 s) from {gguf.name}")
    tokenizer, source = load_smollm2(gguf)
    model = _BUILDERS[name](tokenizer, source, out).eval()
    added = list(range(SMOLLM2_VOCAB, len(tokenizer)))
    model.generation_config = GenerationConfig(
        bos_token_id=source.config.bos_token_id,
        eos_token_id=source.config.eos_token_id,
        pad_token_id=source.config.pad_token_id,
        suppress_tokens=added,
    )
    difference = check_text_parity(model, source, tokenizer)
    _say(f"text logits match SmolLM2 (max abs diff {difference:.2g}); saving")
    model.save_pretrained(out)
    stamp = {
        "name": name,
        "recipe": RECIPE_VERSION,
        "gguf": gguf.name,
        "gguf_sha256": _sha256(gguf),
        "transformers": transformers.__version__,
        "text_logit_max_abs_diff": difference,
    }
    (out / STAMP_NAME).write_text(json.dumps(stamp, indent=2) + "\n")
    _say(f"built {name} in {time.monotonic() - start:.1f} s")


def _is_current(directory: Path) -> bool:
    """A finished build of the current recipe: the stamp is written last, so it implies the rest."""
    try:
        stamp = json.loads((directory / STAMP_NAME).read_text())
    except (OSError, ValueError):
        return False
    return stamp.get("recipe") == RECIPE_VERSION


def _remove_abandoned_builds(parent: Path, name: str) -> None:
    """A killed build leaves its temporary directory behind; one older than an hour is certainly dead."""
    cutoff = time.time() - 3600
    for path in parent.glob(f".{name}.*"):
        with contextlib.suppress(FileNotFoundError):
            if path.stat().st_mtime < cutoff:
                shutil.rmtree(path, ignore_errors=True)


def _install(built: Path, target: Path, *, replace: bool) -> None:
    """Rename the finished build into place; readers see the old model or the new one, never half of one.

    Two processes may build at once. A rename onto a non-empty directory fails, so the loser keeps
    the winner's identical build. A stale (or, with `replace`, any) old build is first renamed aside.
    """
    graveyard = None
    if target.exists() and (replace or not _is_current(target)):
        graveyard = Path(tempfile.mkdtemp(prefix=f".{target.name}.old-", dir=target.parent))
        with contextlib.suppress(FileNotFoundError):  # another process moved it first
            os.rename(target, graveyard / target.name)
    try:
        os.rename(built, target)
    except OSError:
        if not _is_current(target):
            raise
    finally:
        if graveyard is not None:
            shutil.rmtree(graveyard, ignore_errors=True)


def embedded_model_dir(name: str, *, rebuild: bool = False) -> Path:
    """Directory of the embedded checkpoint `name`, building and caching it on first use.

    The directory is a plain Hugging Face checkpoint: `AutoModelForImageTextToText.from_pretrained`
    loads the model; `load_processor` (or `AutoProcessor` where torchvision is installed) the
    processor. `rebuild=True` builds afresh even when a current build is cached.
    """
    if name not in EMBEDDED_MODELS:
        raise UserInputError(f"unknown embedded model {name!r}: choose one of {', '.join(EMBEDDED_MODELS)}")
    target = user_cache_dir() / "embedded" / name
    if not rebuild and _is_current(target):
        return target
    gguf = locate_smollm2_gguf()
    target.parent.mkdir(parents=True, exist_ok=True)
    _remove_abandoned_builds(target.parent, name)
    built = Path(tempfile.mkdtemp(prefix=f".{name}.tmp-", dir=target.parent))
    try:
        _build(name, gguf, built)
        _install(built, target, replace=rebuild)
    finally:
        shutil.rmtree(built, ignore_errors=True)  # gone already once installed
    return target
