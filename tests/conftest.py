"""Shared fixtures: the tiny model families."""


import pytest

from tiny_models import FAMILIES


@pytest.fixture(params=FAMILIES, ids=lambda family: family.name)
def family(request):
    return request.param
