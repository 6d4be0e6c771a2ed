"""Shared fixtures of the unit tests."""

import logging

import pytest


@pytest.fixture
def quiet_accelerate():
    """Planning for absent GPUs logs "Device 0 is not available": expected in these tests; restored after each."""
    logger = logging.getLogger("accelerate")
    level = logger.level
    logger.setLevel(logging.ERROR)
    yield
    logger.setLevel(level)
