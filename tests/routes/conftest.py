"""Fixtures of more than one route module (tests/conftest.py's are everyone's)."""

import pytest

from support.refusals import built_targets


@pytest.fixture
def targets(client):
    """Jobs in the statuses a body could act on (support.refusals.built_targets): {status: id}."""
    return built_targets(client)
