"""Write artifacts into a temporary sibling directory and move them into place only when complete."""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from sasa_patcher.errors import UserInputError


def check_output_dir(out: Path, force: bool) -> None:
    """Refuse to touch an existing output unless --force: checked before any expensive work."""
    if out.exists() and not force:
        raise UserInputError(f"output directory {out} already exists; pass --force to replace it")
    if out.exists() and not out.is_dir():
        raise UserInputError(f"output path {out} exists and is not a directory")


def current_umask() -> int:
    """The process umask (reading it means setting it; restored at once)."""
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _give_plain_modes(staging: Path) -> None:
    """Folders and written files get a plain mkdir's / open()'s mode, so a shared artifact is readable.

    mkdtemp makes the folder private (0700) and safetensors writes its files 0600. Hard-linked files
    (base shards linked from a model cache) are left alone: their mode belongs to the cache's owner.
    """
    mask = current_umask()
    for path in [staging, *staging.rglob("*")]:
        if path.is_symlink():
            continue
        if path.is_dir():
            path.chmod(0o777 & ~mask)
        elif path.stat().st_nlink == 1:
            path.chmod(0o666 & ~mask)


@contextmanager
def atomic_file(path: Path) -> Iterator[Path]:
    """Yield a sibling path to write; on success it replaces `path` with a plain file's mode, else it is removed.

    The temporary name keeps the suffix, so writers that choose the format from it (matplotlib) still work.
    """
    path = Path(path)
    partial = path.with_name(f".{path.stem}.partial{path.suffix}")
    try:
        yield partial
        partial.chmod(0o666 & ~current_umask())  # safetensors writes 0600; these files are meant to be shared
        os.replace(partial, path)
    finally:
        partial.unlink(missing_ok=True)


@contextmanager
def atomic_output_dir(out: Path, force: bool) -> Iterator[Path]:
    """Yield a temporary directory; on success it replaces `out`, on failure it is deleted."""
    out = Path(out)
    check_output_dir(out, force)
    out.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{out.name}.partial-", dir=out.parent))
    try:
        yield staging
        _give_plain_modes(staging)
        if out.exists():
            trash = Path(tempfile.mkdtemp(prefix=f".{out.name}.old-", dir=out.parent))
            out.rename(trash / out.name)
            staging.rename(out)
            shutil.rmtree(trash)
        else:
            staging.rename(out)
    finally:
        if staging.exists():
            shutil.rmtree(staging)
