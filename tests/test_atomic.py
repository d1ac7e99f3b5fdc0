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


def _leftover(tmp_path, name: str, age: float) -> os.PathLike:
    import time

    leftover = tmp_path / name
    (leftover / "onnx").mkdir(parents=True)
    (leftover / "onnx" / "weights.data").write_bytes(b"x" * 4096)
    old = time.time() - age
    for path in (leftover / "onnx" / "weights.data", leftover / "onnx", leftover):
        os.utime(path, (old, old))
    return leftover


def test_stale_staging_of_a_killed_run_is_removed_by_the_next_run(tmp_path):
    stale = _leftover(tmp_path, ".artifact.partial-abc123", age=2 * 3600)
    messages = []
    with atomic_output_dir(tmp_path / "artifact", force=False, log=messages.append) as staging:
        (staging / "a.txt").write_text("a")
    assert not stale.exists()
    assert "removed a stale staging directory" in messages[0] and "abc123" in messages[0]


def test_recent_staging_is_reported_with_its_size_not_removed(tmp_path):
    from sasa_patcher.export.atomic import remove_stale_staging

    young = _leftover(tmp_path, ".artifact.partial-live", age=60)
    other = _leftover(tmp_path, ".other.partial-old", age=2 * 3600)  # another output's: not ours to judge
    messages = []
    assert remove_stale_staging(tmp_path / "artifact", log=messages.append) == []
    assert young.exists() and other.exists()
    assert "GiB" in messages[0] and "left alone" in messages[0]


def test_free_disk_is_checked_before_anything_is_written(tmp_path):
    from sasa_patcher.export.atomic import check_free_disk

    with pytest.raises(UserInputError, match="needs about"):
        with atomic_output_dir(tmp_path / "artifact", force=False, needed_bytes=1 << 60):
            pass
    assert list(tmp_path.iterdir()) == []
    assert check_free_disk(tmp_path / "not" / "yet", 1, "x") > 0


def test_disk_needed_counts_the_onnx_weights_once(tmp_path):
    import torch
    from safetensors.torch import save_file

    from sasa_patcher.export.atomic import disk_needed

    model = tmp_path / "model"
    model.mkdir()
    save_file({"w": torch.zeros(1024, 1024)}, str(model / "model.safetensors"))
    (model / "config.json").write_text("{}")
    onnx = disk_needed(model, tmp_path / "out", ("onnx",))
    assert onnx >= 4 * 1024**2 * 1.05
    assert disk_needed(model, tmp_path / "out", ("safetensors",)) < onnx  # same file system: hard links


def test_staging_of_a_dead_process_is_removed_at_once_and_a_live_ones_kept(tmp_path):
    import subprocess
    import sys

    from sasa_patcher.export.atomic import remove_stale_staging

    finished = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True,
                              text=True, check=True)
    dead = _leftover(tmp_path, f".artifact.partial-{finished.stdout.strip()}-x1", age=60)
    live = _leftover(tmp_path, f".artifact.partial-{os.getppid()}-x2", age=60)  # a running process: the parent
    messages = []
    removed = remove_stale_staging(tmp_path / "artifact", log=messages.append)
    assert [path for path, _ in removed] == [dead] and not dead.exists() and live.exists()
    assert any("left alone" in message and live.name in message for message in messages)


def test_staging_names_carry_the_writer_process_id(tmp_path):
    with atomic_output_dir(tmp_path / "artifact", force=False) as staging:
        assert staging.name.startswith(f".artifact.partial-{os.getpid()}-")
