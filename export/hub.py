"""Upload a finished safetensors artifact to the Hugging Face Hub with huggingface_hub's documented calls.

    HfApi(token=token).create_repo(repo_id, private=private, exist_ok=True)
    HfApi(token=token).upload_folder(repo_id=..., folder_path=out_dir, ...)

Only a complete artifact is uploaded (config with `sasa` and `auto_map`, weight index, every file the
index names, `modeling_sasa.py`, model card): a half-written or foreign directory is refused before
any network call. Hidden files and the staging leftovers of `export.atomic` are never uploaded.
"""

from __future__ import annotations

import json
from pathlib import Path

from huggingface_hub import HfApi

from sasa_patcher.errors import UserInputError

INDEX_FILE = "model.safetensors.index.json"
IGNORE_PATTERNS = [".*", "**/.*", "*.partial-*", "**/__pycache__/**"]


def check_artifact(out_dir: Path) -> None:
    """Raise UserInputError unless `out_dir` is a complete artifact written by export.checkpoint."""
    out_dir = Path(out_dir)
    if not out_dir.is_dir():
        raise UserInputError(f"artifact directory {out_dir} does not exist")
    config_path = out_dir / "config.json"
    if not config_path.is_file():
        raise UserInputError(f"{out_dir} is not an artifact: it has no config.json")
    config = json.loads(config_path.read_text())
    if "sasa" not in config or "auto_map" not in config:
        raise UserInputError(f"{out_dir} is not a SASA artifact: config.json has no sasa section or auto_map")
    needed = ["modeling_sasa.py", "README.md", INDEX_FILE]
    missing = [name for name in needed if not (out_dir / name).is_file()]
    if not missing:
        weight_map = json.loads((out_dir / INDEX_FILE).read_text())["weight_map"]
        missing = sorted({name for name in weight_map.values() if not (out_dir / name).is_file()})
    if missing:
        raise UserInputError(f"artifact {out_dir} is incomplete: missing {', '.join(missing)}")


def push_to_hub(
    out_dir: Path,
    repo_id: str,
    *,
    private: bool = False,
    token: str | None = None,
    commit_message: str = "Upload SASA-patched model",
) -> str:
    """Create the model repo if needed and upload the artifact folder; returns the commit URL."""
    check_artifact(out_dir)
    api = HfApi(token=token)
    repo = api.create_repo(repo_id, private=private, exist_ok=True, repo_type="model")
    commit = api.upload_folder(
        repo_id=repo.repo_id,
        folder_path=str(out_dir),
        repo_type="model",
        commit_message=commit_message,
        ignore_patterns=IGNORE_PATTERNS,
    )
    return str(getattr(commit, "commit_url", commit))
