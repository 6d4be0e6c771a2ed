"""Shared fixtures of the unit tests."""

import pytest

from helpers.quiet import quiet_planning


@pytest.fixture
def quiet_accelerate():
    """Planning for absent GPUs logs "Device 0 is not available": expected in these tests (helpers.quiet)."""
    with quiet_planning():
        yield


from tests.browser import browser, page  # noqa: E402,F401  (the browser tests' fixtures)
from tests.site_pages import site  # noqa: E402,F401  (the course site, rendered once a session)

BROWSER_FIXTURES = {"browser", "page"}


def pytest_collection_modifyitems(config, items):
    """A test that drives Chromium is a browser test, marked or not: ``pytest -m "not browser"`` never starts one."""
    for item in items:
        if BROWSER_FIXTURES & set(getattr(item, "fixturenames", ())) and not item.get_closest_marker("browser"):
            item.add_marker(pytest.mark.browser)
