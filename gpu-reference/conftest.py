"""nbval settings for checking a GPU machine against a tier of the GPU reference (one folder per tier).

``./workbook.sh test-gpu`` picks the tier and runs nbval over its executed copies (see README.md here).

- stderr is not compared (as in notebooks/conftest.py);
- cells whose output depends on the GPU model, its kernels, torch's allocator or timing are run but not
  compared: those listed in the tier's not-compared.txt (notebook | first line of the cell | reason), and any cell
  holding a line ``# GPU_VARIES`` (a comment notebook authors can add; it does nothing on the CPU).
  Their self-check cells (asserts) still run and must pass.
"""

from pathlib import Path

import functools


@functools.cache
def _not_compared(tier: Path) -> dict[str, list[str]]:
    rules: dict[str, list[str]] = {}
    listed = tier / "not-compared.txt"
    for line in (listed.read_text().splitlines() if listed.is_file() else []):
        if not line.strip() or line.startswith("#"):
            continue
        notebook, prefix, _reason = (part.strip() for part in line.split("|", 2))
        rules.setdefault(notebook, []).append(prefix)
    return rules



def pytest_collectstart(collector):
    if collector.fspath and collector.fspath.ext == ".ipynb":
        collector.skip_compare += ("stderr",)


def pytest_collection_modifyitems(session, config, items):
    for item in items:
        cell = getattr(item, "cell", None)
        if cell is None or not hasattr(item, "options"):
            continue
        source = cell.source if isinstance(cell.source, str) else "".join(cell.source)
        lines = [line.strip() for line in source.splitlines()]
        first = next((line for line in lines if line and not line.startswith("# NBVAL")), "")
        where = Path(str(item.fspath))
        prefixes = _not_compared(where.parent).get(where.name, [])
        if "# GPU_VARIES" in lines or any(first.startswith(p) for p in prefixes):
            item.options["check"] = False
