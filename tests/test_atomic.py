"""Artifacts appear whole or not at all, with the permissions a plain mkdir would give."""

from __future__ import annotations

import os

import pytest

from sasa_patcher.errors import UserInputError
from sasa_patcher.export.atomic import atomic_file, atomic_output_dir, current_umask


def test_output_appears_complete_with_mkdir_permissions(tmp_path):
    out = tmp_path / "artifact"
    with atomic_output_dir(out, force=False) as staging:
        (staging / "a.txt").write_text("a")
        assert not out.exists()
    reference = tmp_path / "plain"
    reference.mkdir()
    assert (out / "a.txt").read_text() == "a"
    assert out.stat().st_mode == reference.stat().st_mode
    assert sorted(os.listdir(tmp_path)) == ["artifact", "plain"]


def test_private_files_get_a_plain_mode_but_hard_links_keep_theirs(tmp_path):
    """safetensors writes 0600; a shared artifact must be readable. A linked cache shard is not ours to change."""
    shard = tmp_path / "cache-shard"
    shard.write_text("weights")
    shard.chmod(0o600)
    out = tmp_path / "artifact"
    with atomic_output_dir(out, force=False) as staging:
        (staging / "sub").mkdir(mode=0o700)
        (staging / "sub" / "sasa.safetensors").write_text("probe")
        (staging / "sub" / "sasa.safetensors").chmod(0o600)
        os.link(shard, staging / "model.safetensors")
    plain = tmp_path / "plain.txt"
    plain.write_text("")
    assert (out / "sub" / "sasa.safetensors").stat().st_mode == plain.stat().st_mode
    assert (out / "sub").stat().st_mode == out.stat().st_mode
    assert shard.stat().st_mode & 0o777 == 0o600


def test_failure_leaves_the_old_output_untouched(tmp_path):
    out = tmp_path / "artifact"
    out.mkdir()
    (out / "old.txt").write_text("old")
    with pytest.raises(RuntimeError), atomic_output_dir(out, force=True) as staging:
        (staging / "new.txt").write_text("new")
        raise RuntimeError("export failed")
    assert os.listdir(out) == ["old.txt"] and os.listdir(tmp_path) == ["artifact"]


def test_existing_output_needs_force(tmp_path):
    (tmp_path / "artifact").mkdir()
    with pytest.raises(UserInputError, match="--force"), atomic_output_dir(tmp_path / "artifact", force=False):
        pass


def test_atomic_file_replaces_whole_or_leaves_the_old_file(tmp_path) -> None:
    target = tmp_path / "chart.png"
    target.write_text("old")
    with pytest.raises(RuntimeError):
        with atomic_file(target) as partial:
            assert partial.suffix == ".png" and partial.parent == tmp_path
            partial.write_text("half")
            raise RuntimeError("writer failed")
    assert target.read_text() == "old"
    with atomic_file(target) as partial:
        partial.write_text("new")
        partial.chmod(0o600)
    assert target.read_text() == "new"
    assert target.stat().st_mode & 0o777 == 0o666 & ~current_umask()
    assert sorted(path.name for path in tmp_path.iterdir()) == ["chart.png"]
