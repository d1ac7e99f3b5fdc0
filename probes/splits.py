"""Deterministic calibration / held-out splits, and the source family a prompt belongs to.

Why hash-based: the split must be the same on every machine, in every process and on every run, with no
seed to record, and a prompt must never be on both sides. Each prompt's group key (its normalised text,
or the real prompt it was derived from) is hashed with sha256 (Python's hash() is salted per process)
and the hash alone decides its side. Identical texts, and a prompt and its form twins or typographic
renderings, therefore always land together. Adding or removing other prompts never moves a prompt.

Why source families: a probe can learn a data set's style instead of harm. Holding out a whole
source shows whether it generalises to a set it has never seen; the hold-out itself (on features, with
the calibration mask) is `probes.transfer.leave_one_group_out`, the one implementation for sources and
hazard categories alike.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from dataclasses import dataclass

from sasa_patcher.probes.datasets import Prompt, normalise_text

DEFAULT_HELDOUT_FRACTION = 0.3


def group_key(prompt: Prompt) -> str:
    """What must stay together: the real prompt a derived one came from, else the prompt itself.

    A user's image prompt with no origin is keyed on its text plus the image file's bytes, so two
    different images under the same carrier text can fall on different sides.
    """
    if prompt.origin:
        return normalise_text(prompt.origin)
    key = normalise_text(prompt.text)
    if prompt.image is not None:
        key += "\x00image:" + hashlib.sha256(prompt.image.read_bytes()).hexdigest()
    return key


def unit_hash(key: str, salt: str = "") -> float:
    """A key's position in [0, 1), uniform and stable across processes and platforms."""
    digest = hashlib.sha256((salt + "\x00" + key).encode("utf-8")).digest()
    return int.from_bytes(digest[:8], "big") / 2**64


def is_heldout(prompt: Prompt, heldout_fraction: float = DEFAULT_HELDOUT_FRACTION, salt: str = "") -> bool:
    """True if the prompt belongs to the held-out side."""
    return unit_hash(group_key(prompt), salt) < heldout_fraction


@dataclass(frozen=True)
class Split:
    """The two sides of a split, each in the input order."""

    calibration: list[Prompt]
    heldout: list[Prompt]


def split(prompts: Sequence[Prompt], heldout_fraction: float = DEFAULT_HELDOUT_FRACTION, salt: str = "") -> Split:
    """Split prompts into calibration and held-out by group hash (about `heldout_fraction` held out).

    `salt` gives an independent split with the same guarantees (e.g. for repeated evaluation).
    """
    if not 0.0 < heldout_fraction < 1.0:
        raise ValueError(f"heldout_fraction must be strictly between 0 and 1, got {heldout_fraction}")
    calibration: list[Prompt] = []
    heldout: list[Prompt] = []
    for prompt in prompts:
        (heldout if is_heldout(prompt, heldout_fraction, salt) else calibration).append(prompt)
    return Split(calibration=calibration, heldout=heldout)


def source_family(source: str) -> str:
    """The data set a source belongs to: "advbench/typographic" -> "advbench"."""
    return source.split("/", 1)[0]


def sources(prompts: Sequence[Prompt]) -> list[str]:
    """Sorted source families present in the prompts."""
    return sorted({source_family(p.source) for p in prompts})
