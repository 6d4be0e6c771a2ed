"""The browser tests' rules where no browser exists: skip with how to get one, or fail under CI=true."""

import pytest

from tests import browser


def test_no_browser_skips_with_how_to_get_one(monkeypatch):
    monkeypatch.delenv("CI", raising=False)
    with pytest.raises(pytest.skip.Exception, match="WORKBOOK_BROWSER=1"):
        browser.no_browser("no chromium executable found")


def test_no_browser_fails_under_ci(monkeypatch):
    monkeypatch.setenv("CI", "true")
    with pytest.raises(pytest.fail.Exception, match="CI=true: a missing browser is a failure"):
        browser.no_browser("no chromium executable found")


def test_a_named_chromium_that_is_missing_counts_as_none(monkeypatch, tmp_path):
    monkeypatch.setenv("WORKBOOK_CHROMIUM", str(tmp_path / "no-such-chrome"))
    assert browser.chromium_path() is None


def test_every_notebook_names_the_kernel_jupyterlab_finds():
    """JupyterLab marks a notebook modified on open when its stored kernelspec differs from the kernel's own."""
    import json

    from jupyter_client.kernelspec import KernelSpecManager

    installed = KernelSpecManager().get_kernel_spec("python3").display_name
    for nb in sorted(browser.ROOT.glob("notebooks/[0-9][0-9]_*.ipynb")):
        assert json.loads(nb.read_text())["metadata"]["kernelspec"]["display_name"] == installed, nb.name
