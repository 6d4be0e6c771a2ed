"""nbval settings for checking a GPU machine against the GPU reference (the executed copies in this folder).

Run from the repository root on a machine with two CUDA GPUs (see README.md here):

    CUDA_VISIBLE_DEVICES=0,1 python -m pytest -q gpu-reference --nbval --nbval-current-env \\
        --nbval-sanitize-with tests/nbval_sanitize.cfg

- stderr is not compared (as in notebooks/conftest.py);
- cells whose output depends on the GPU model, its kernels, torch's allocator or timing are run but not
  compared: those listed in not-compared.txt (notebook | first line of the cell | reason), and any cell
  holding a line ``# GPU_VARIES`` (a comment notebook authors can add; it does nothing on the CPU).
  Their self-check cells (asserts) still run and must pass.
"""

from pathlib import Path

HERE = Path(__file__).resolve().parent


def _not_compared() -> dict[str, list[str]]:
    rules: dict[str, list[str]] = {}
    for line in (HERE / "not-compared.txt").read_text().splitlines():
        if not line.strip() or line.startswith("#"):
            continue
        notebook, prefix, _reason = (part.strip() for part in line.split("|", 2))
        rules.setdefault(notebook, []).append(prefix)
    return rules


RULES = _not_compared()


def pytest_collectstart(collector):
    if collector.fspath and collector.fspath.ext == ".ipynb":
        collector.skip_compare += ("stderr",)


def pytest_collection_modifyitems(session, config, items):
    for item in items:
        cell = getattr(item, "cell", None)
        if cell is None or not hasattr(item, "options"):
            continue
        source = cell.source if isinstance(cell.source, str) else "".join(cell.source)
        lines = [l.strip() for l in source.splitlines()]
        first = next((l for l in lines if l and not l.startswith("# NBVAL")), "")
        prefixes = RULES.get(Path(str(item.fspath)).name, [])
        if "# GPU_VARIES" in lines or any(first.startswith(p) for p in prefixes):
            item.options["check"] = False
