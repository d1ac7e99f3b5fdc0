"""Write artifacts into a temporary sibling directory and move them into place only when complete."""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from patcher.errors import UserInputError


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


@contextmanager
def atomic_output_dir(out: Path, force: bool) -> Iterator[Path]:
    """Yield a temporary directory; on success it replaces `out`, on failure it is deleted."""
    out = Path(out)
    check_output_dir(out, force)
    out.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{out.name}.partial-", dir=out.parent))
    try:
        yield staging
        # mkdtemp makes it private (0700); the artifact gets a plain mkdir's mode
        staging.chmod(0o777 & ~current_umask())
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
