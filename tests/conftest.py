"""Shared fixtures of the unit tests."""

import pytest

from helpers.quiet import quiet_planning


@pytest.fixture
def quiet_accelerate():
    """Planning for absent GPUs logs "Device 0 is not available": expected in these tests (helpers.quiet)."""
    with quiet_planning():
        yield
