"""Execute the workbook's notebooks top to bottom, each in a fresh kernel.

Used by ``./workbook.sh run`` (into ``build/``, with a browsable HTML rendering:
``build/index.html``, the course map with each notebook's status and seconds, and a page per
notebook, made by ``tools/site.py``) and by ``./workbook.sh outputs`` (maintainers: rebuild each
notebook from its jupytext source ``notebooks/NN_*.py``, execute it and store
it as the committed ``notebooks/NN_*.ipynb``). Both use nbclient with the same
environment (set by workbook.sh), so the main job and the committed outputs
come from one executor.

Prints a summary (notebook, status, seconds); exits 1 if any cell failed that
was not expected to (nbclient honours the ``raises-exception`` cell tag).
"""

from __future__ import annotations

import argparse
import re
import sys
import time
from pathlib import Path

import nbformat
from nbclient import NotebookClient
from nbclient.exceptions import CellExecutionError, CellTimeoutError, DeadKernelError

ROOT = Path(__file__).resolve().parent.parent
NOTEBOOKS = ROOT / "notebooks"
WIDGET_VIEW = "application/vnd.jupyter.widget-view+json"


def notebook_paths(names: list[str]) -> list[Path]:
    if names:
        return [Path(n).resolve() for n in names]
    return sorted(NOTEBOOKS.glob("[0-9][0-9]_*.ipynb"))


def from_source(ipynb: Path) -> nbformat.NotebookNode:
    """Read the notebook's jupytext source (``.py`` beside it) as a fresh notebook."""
    import jupytext

    nb = jupytext.read(ipynb.with_suffix(".py"))
    nb.metadata.pop("jupytext", None)
    # ipykernel's own kernelspec, as JupyterLab reads it: any other display name marks a notebook modified on open
    nb.metadata["kernelspec"] = {"display_name": "Python 3 (ipykernel)", "language": "python", "name": "python3"}
    nb.metadata["language_info"] = {"name": "python"}
    return nb


def strip_noise(nb: nbformat.NotebookNode) -> None:
    """Drop widget state, timings and widget views; keep outputs and execution counts."""
    nb.metadata.pop("widgets", None)
    nb.metadata.pop("papermill", None)
    for cell in nb.cells:
        cell.metadata.pop("execution", None)
        cell.metadata.pop("papermill", None)
        if cell.cell_type != "code":
            continue
        kept = []
        for out in cell.outputs:
            data = out.get("data")
            if data and WIDGET_VIEW in data:
                data.pop(WIDGET_VIEW)
                if not data:
                    continue
            kept.append(out)
        cell.outputs = kept


def parameterize(path: Path, parameters: dict[str, str]) -> nbformat.NotebookNode:
    """Read a notebook and inject ``parameters`` after its ``parameters`` cell (papermill's convention).

    papermill's loader gives every cell a ``tags`` list and the notebook a ``papermill`` entry, which
    ``parameterize_notebook`` needs; values are passed as strings (a path, a hub id).
    """
    from papermill.iorw import load_notebook_node
    from papermill.parameterize import parameterize_notebook

    return parameterize_notebook(load_notebook_node(str(path)), dict(parameters))


def execute(nb: nbformat.NotebookNode, cwd: Path, timeout: int = 1800) -> tuple[str, str]:
    """Run ``nb`` in a fresh kernel; return ``("ok", "")`` or ``("FAILED", why)``, never raise for the notebook's
    own failure: a failing cell, a cell past ``timeout`` seconds, a kernel that died or did not start.
    Whatever happens, the caller still writes the summary and the course site."""
    client = NotebookClient(
        nb, timeout=timeout, kernel_name="python3", startup_timeout=300,
        resources={"metadata": {"path": str(cwd)}},
    )
    try:
        client.execute()
    except CellExecutionError as e:
        last = str(e).strip().splitlines()[-1] if str(e).strip() else type(e).__name__
        return "FAILED", re.sub(r"\x1b\[[0-9;]*m", "", last)  # no terminal colour codes in the summary
    except CellTimeoutError:
        return "FAILED", f"a cell ran past {timeout} s (CellTimeoutError)"
    except DeadKernelError as e:
        return "FAILED", f"the kernel died (DeadKernelError: {str(e).strip()[:200]})"
    except RuntimeError as e:  # e.g. the kernel did not start in time
        return "FAILED", f"{type(e).__name__}: {str(e).strip()[:200]}"
    return "ok", ""


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("notebooks", nargs="*", help="notebooks to run (default: every notebooks/NN_*.ipynb)")
    ap.add_argument("--out", default="build", help="output folder for the main job (default: build)")
    ap.add_argument("--in-place", action="store_true", help="maintainers: rebuild from .py sources and store outputs")
    ap.add_argument("--cell-timeout", type=int, default=1800, help="seconds a cell may run (default 1800)")
    ap.add_argument("-p", "--parameter", nargs=2, action="append", default=[], metavar=("NAME", "VALUE"),
                    help="set a value of the notebooks' parameters cell, e.g. -p MODEL /path/to/checkpoint")
    args = ap.parse_args()
    if args.in_place and args.parameter:
        ap.error("stored outputs are made with the default parameters only")

    out = (ROOT / args.out) if not Path(args.out).is_absolute() else Path(args.out)
    if not args.in_place:
        out.mkdir(parents=True, exist_ok=True)
    rows = []
    for path in notebook_paths(args.notebooks):
        if args.in_place:
            nb = from_source(path)
        elif args.parameter:
            nb = parameterize(path, dict(args.parameter))
        else:
            nb = nbformat.read(path, as_version=4)
        print(f"-- {path.name} ...", flush=True)
        t0 = time.perf_counter()
        status, why = execute(nb, path.parent, args.cell_timeout)
        seconds = time.perf_counter() - t0
        strip_noise(nb)
        if args.in_place:
            if status == "ok":
                nbformat.write(nb, path)
            else:  # keep the failed run for inspection; the committed notebook stays as it was
                (ROOT / "build").mkdir(exist_ok=True)
                nbformat.write(nb, ROOT / "build" / f"failed-{path.name}")
        else:
            nbformat.write(nb, out / path.name)
        rows.append((path.name, status, seconds, why))
    if not args.in_place:  # the browsable course: index.html and a page per notebook, beside them
        sys.path.insert(0, str(ROOT))  # tools.site importable however this script was started
        from tools.site import render_site

        try:
            render_site([out / name for name, *_ in rows], out, {name: (status, s) for name, status, s, _ in rows})
        except Exception as e:  # the summary below is still printed, and the run fails
            print(f"the course site was not written: {type(e).__name__}: {e}")
            rows.append(("course site", "FAILED", 0.0, str(e)))

    width = max([len(r[0]) for r in rows] + [8])
    print(f"\n{'notebook':<{width}}  status  seconds")
    for name, status, seconds, why in rows:
        print(f"{name:<{width}}  {status:<6}  {seconds:7.1f}" + (f"  {why}" if why else ""))
    where = "notebooks/ (committed outputs)" if args.in_place else f"{out}/ (.ipynb and .html; open {out}/index.html)"
    print(f"written to {where}")
    return 0 if all(r[1] == "ok" for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
