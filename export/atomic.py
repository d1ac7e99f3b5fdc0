"""Write artifacts into a temporary sibling directory and move them into place only when complete."""

from __future__ import annotations

import os
import shutil
import sys
import tempfile
import time
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


GIB = 1024**3
# A staging directory untouched this long belongs to a dead run (a live export writes every few minutes).
STALE_AFTER_SECONDS = 3600


def _say(message: str) -> None:
    print(f"[sasa-patcher] {message}", file=sys.stderr, flush=True)


def tree_bytes(path: Path) -> int:
    """Bytes of the files under `path` (what a leftover directory costs on disk)."""
    total = 0
    for item in Path(path).rglob("*"):
        try:
            if item.is_file() and not item.is_symlink():
                total += item.stat().st_size
        except OSError:
            pass
    return total


def _last_write(path: Path) -> float:
    times = [path.stat().st_mtime]
    for item in path.rglob("*"):
        try:
            times.append(item.stat().st_mtime)
        except OSError:
            pass
    return max(times)


def _writer_is_gone(staging: Path) -> bool:
    """True when the staging name's process id (`.OUT.partial-PID-xxxx`) names no running process."""
    pid = staging.name.rsplit(".partial-", 1)[-1].split("-", 1)[0]
    if not pid.isdigit() or int(pid) == os.getpid():
        return False
    try:
        os.kill(int(pid), 0)
    except ProcessLookupError:
        return True
    except PermissionError:  # someone else's live process
        return False
    return False


def remove_stale_staging(out: Path, *, max_age: float = STALE_AFTER_SECONDS, log=_say) -> list[tuple[Path, int]]:
    """Remove the `.OUT.partial-*` / `.OUT.old-*` directories a killed run left next to `out`.

    A run killed by the kernel (out of memory) cannot clean up after itself; its staging directory
    can hold a whole model. A staging name carries its writer's process id: one whose process is
    gone is removed at once; others (a live writer, or an older name without the id) when untouched
    for `max_age` seconds, else reported with their size. Returns what was removed.
    """
    out = Path(out)
    removed = []
    if not out.parent.is_dir():
        return removed
    now = time.time()
    for pattern in (f".{out.name}.partial-*", f".{out.name}.old-*"):
        for path in sorted(out.parent.glob(pattern)):
            if not path.is_dir():
                continue
            size = tree_bytes(path)
            if _writer_is_gone(path) or now - _last_write(path) >= max_age:
                shutil.rmtree(path, ignore_errors=True)
                removed.append((path, size))
                log(f"removed a stale staging directory from a run that died: {path} ({size / GIB:.1f} GiB)")
            else:
                log(f"another run may be writing {path} ({size / GIB:.1f} GiB, changed in the last hour); "
                    "left alone: remove it by hand if no run is going on")
    return removed


def check_free_disk(directory: Path, needed: int, what: str) -> int:
    """Raise `UserInputError` when the file system of `directory` has less than `needed` bytes free."""
    probe = Path(directory)
    while not probe.exists() and probe != probe.parent:
        probe = probe.parent
    free = shutil.disk_usage(probe).free
    if free < needed:
        raise UserInputError(f"{what} needs about {needed / GIB:.1f} GiB of disk and {probe} has "
                             f"{free / GIB:.1f} GiB free: free some space or write elsewhere")
    return free


def disk_needed(model_dir: Path, out: Path, formats) -> int:
    """Bytes an artifact takes: the ONNX graphs hold the weights once more in float32 (external data); the
    safetensors artifact hard-links the base shards on the same file system (nearly free), else copies them."""
    from sasa_patcher.memory import weight_bytes

    weights = weight_bytes(Path(model_dir)) or 0
    needed = 64 * 1024**2
    if "onnx" in formats:
        needed += int(weights * 1.05)
    if "safetensors" in formats:
        probe = Path(out).parent
        while not probe.exists() and probe != probe.parent:
            probe = probe.parent
        if Path(model_dir).stat().st_dev != probe.stat().st_dev:
            needed += weights
    return needed


@contextmanager
def atomic_output_dir(out: Path, force: bool, needed_bytes: int | None = None, log=_say) -> Iterator[Path]:
    """Yield a temporary directory; on success it replaces `out`, on failure it is deleted.

    Stale staging directories of dead runs are removed first; `needed_bytes` (what the artifact will
    take) is checked against the free disk before anything is written.
    """
    out = Path(out)
    check_output_dir(out, force)
    out.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_staging(out, log=log)
    if needed_bytes:
        check_free_disk(out.parent, needed_bytes, f"writing {out}")
    staging = Path(tempfile.mkdtemp(prefix=f".{out.name}.partial-{os.getpid()}-", dir=out.parent))
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
