"""Hub upload with huggingface_hub's API mocked: nothing leaves the machine."""

from __future__ import annotations

import json
from unittest import mock

import pytest

import sasa_patcher.export.hub as hub
from sasa_patcher.errors import UserInputError


def fake_artifact(directory):
    directory.mkdir()
    (directory / "config.json").write_text(json.dumps({"sasa": {}, "auto_map": {}}))
    (directory / "modeling_sasa.py").write_text("")
    (directory / "README.md").write_text("card")
    (directory / "model-00001-of-00001.safetensors").write_bytes(b"")
    (directory / "sasa.safetensors").write_bytes(b"")
    weight_map = {"a": "model-00001-of-00001.safetensors", "sasa_probe.threshold": "sasa.safetensors"}
    (directory / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    return directory


@pytest.fixture
def api(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    instance = mock.MagicMock(name="HfApi()")
    instance.create_repo.return_value.repo_id = "me/sasa-model"
    instance.upload_folder.return_value.commit_url = "https://huggingface.co/me/sasa-model/commit/abc"
    factory = mock.MagicMock(name="HfApi", return_value=instance)
    monkeypatch.setattr(hub, "HfApi", factory)
    return factory, instance


def test_push_creates_repo_and_uploads_folder(tmp_path, api):
    factory, instance = api
    artifact = fake_artifact(tmp_path / "artifact")
    url = hub.push_to_hub(artifact, "me/sasa-model", private=True, token="hf_test")
    assert url.endswith("/commit/abc")
    factory.assert_called_once_with(token="hf_test")
    instance.create_repo.assert_called_once_with("me/sasa-model", private=True, exist_ok=True, repo_type="model")
    kwargs = instance.upload_folder.call_args.kwargs
    assert kwargs["repo_id"] == "me/sasa-model" and kwargs["folder_path"] == str(artifact)
    assert kwargs["repo_type"] == "model" and ".*" in kwargs["ignore_patterns"]


def test_public_by_default(tmp_path, api):
    _, instance = api
    hub.push_to_hub(fake_artifact(tmp_path / "artifact"), "me/sasa-model")
    assert instance.create_repo.call_args.kwargs["private"] is False


@pytest.mark.parametrize("breakage", ["no-dir", "no-config", "not-sasa", "no-card", "missing-shard"])
def test_incomplete_artifact_refused_before_any_call(tmp_path, api, breakage):
    factory, _ = api
    artifact = tmp_path / "artifact"
    if breakage != "no-dir":
        fake_artifact(artifact)
    if breakage == "no-config":
        (artifact / "config.json").unlink()
    elif breakage == "not-sasa":
        (artifact / "config.json").write_text("{}")
    elif breakage == "no-card":
        (artifact / "README.md").unlink()
    elif breakage == "missing-shard":
        (artifact / "sasa.safetensors").unlink()
    with pytest.raises(UserInputError):
        hub.push_to_hub(artifact, "me/sasa-model")
    factory.assert_not_called()
