"""nbval settings for the notebooks: stderr (library warnings, progress text) is not compared.

Every value worth checking is printed to stdout or returned by the cell.
"""


def pytest_collectstart(collector):
    if collector.fspath and collector.fspath.ext == ".ipynb":
        collector.skip_compare += ("stderr",)
