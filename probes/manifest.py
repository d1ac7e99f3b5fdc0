"""Users' own calibration sets, as JSONL manifests.

One JSON object per line: {"text": "...", "label": 0 | 1, "image": "optional/path.png"} (and optionally
"category": a hazard of `probes.taxonomy`, or "everyday" for a benign row), where the
image path is relative to the manifest's own folder (so a manifest and its images can be moved or
shared together). Extra keys are allowed and ignored.

Why validate so strictly: a bad line found an hour into feature extraction, or a set with one class
that makes the probe fit nonsense, wastes a user's time. Every problem is reported as a UserInputError
that names the file and the line and says what to write instead.
"""

from __future__ import annotations

import json
from pathlib import Path

from PIL import Image, UnidentifiedImageError

from sasa_patcher.errors import UserInputError
from sasa_patcher.probes.datasets import BENIGN, HARMFUL, Prompt
from sasa_patcher.probes.form_augment import detect_form
from sasa_patcher.probes.taxonomy import check_category


def _check_image(path: Path, where: str) -> None:
    """Open and fully decode the image now, so a broken file fails here and not mid-calibration."""
    if not path.is_file():
        raise UserInputError(
            f"{where}: image {path} does not exist (image paths are relative to the manifest's folder)"
        )
    try:
        with Image.open(path) as image:
            image.load()
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as error:
        raise UserInputError(
            f"{where}: image {path} cannot be read as an image ({error}); replace it with a PNG or JPEG file"
        ) from error


def load_manifest(path: str | Path, source: str | None = None) -> list[Prompt]:
    """Validated prompts from a JSONL manifest; `source` defaults to "manifest:<file stem>".

    Raises UserInputError for: a missing or unreadable file, invalid JSON, a line that is not an
    object, a missing or empty "text", a "label" that is not 0 or 1, an "image" that is not a string
    or not a readable image, an empty manifest, and a manifest with only one class.
    """
    manifest = Path(path)
    source = source or f"manifest:{manifest.stem}"
    try:
        lines = manifest.read_text(encoding="utf-8").splitlines()
    except FileNotFoundError:
        raise UserInputError(f"manifest {manifest} does not exist") from None
    except (OSError, UnicodeDecodeError) as error:
        raise UserInputError(f"manifest {manifest} cannot be read as UTF-8 text: {error}") from error

    prompts: list[Prompt] = []
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        where = f"{manifest} line {number}"
        try:
            row = json.loads(line)
        except json.JSONDecodeError as error:
            raise UserInputError(
                f'{where}: invalid JSON ({error.msg}); each line must be one object like {{"text": "...", "label": 0}}'
            ) from None
        if not isinstance(row, dict):
            raise UserInputError(
                f'{where}: expected a JSON object like {{"text": "...", "label": 0}}, got {line.strip()[:60]}'
            )
        for field in ("text", "label"):
            if field not in row:
                raise UserInputError(
                    f'{where}: missing field "{field}"; each line needs "text" and "label" (0 benign, 1 harmful)'
                )
        text = row["text"]
        if not isinstance(text, str) or not text.strip():
            raise UserInputError(f'{where}: "text" must be a non-empty string, got {text!r}')
        label = row["label"]
        if isinstance(label, bool) or not isinstance(label, int) or label not in (BENIGN, HARMFUL):
            raise UserInputError(f'{where}: "label" must be the number 0 (benign) or 1 (harmful), got {label!r}')
        image: Path | None = None
        if row.get("image") is not None:
            if not isinstance(row["image"], str) or not row["image"].strip():
                raise UserInputError(
                    f'{where}: "image" must be a path string relative to the manifest, got {row["image"]!r}'
                )
            image = (manifest.parent / row["image"]).resolve()
            _check_image(image, where)
        category = row.get("category")
        if category is not None:
            try:
                check_category(category, label)
            except ValueError as error:
                raise UserInputError(f'{where}: "category": {error}') from None
        # The user's text is kept as written (only outer whitespace trimmed): it is their data.
        text = text.strip()
        prompts.append(Prompt(text=text, label=label, source=source, form=detect_form(text), image=image,
                              category=category))

    if not prompts:
        raise UserInputError(f'manifest {manifest} has no prompts; add lines like {{"text": "...", "label": 0}}')
    labels = {p.label for p in prompts}
    if len(labels) < 2:
        only = "benign (0)" if labels == {BENIGN} else "harmful (1)"
        raise UserInputError(
            f"manifest {manifest} has only {only} prompts ({len(prompts)}); a probe needs both classes: "
            "add prompts with the other label, or combine it with the built-in set"
        )
    return prompts
