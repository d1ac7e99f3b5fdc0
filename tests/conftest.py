"""Shared fixtures: the tiny model families, and a tiny checkpoint directory the CLIs load with `--model DIR`."""


import pytest

from tiny_calibration import tiny_processor
from tiny_models import FAMILIES, build_qwen2_vl


@pytest.fixture(scope="session")
def tiny_dir(tmp_path_factory):
    """A tiny Qwen2-VL checkpoint with its processor, as `--model DIR` loads it (read-only: tests must not write
    into it)."""
    directory = tmp_path_factory.mktemp("tiny-qwen2-vl")
    build_qwen2_vl().save_pretrained(directory)
    tiny_processor("qwen2_vl").save_pretrained(directory)
    return directory


@pytest.fixture(params=FAMILIES, ids=lambda family: family.name)
def family(request):
    return request.param
