"""End to end in a real browser: JupyterLab runs notebooks 00 and 05, and the planner widget draws right.

JupyterLab is started the way ``./workbook.sh lab`` starts it (its defaults: comms over subshells per
comm target, which once made the widget's plot wrong), on 127.0.0.1, with the workbook's kernel, in a
scratch copy of the notebooks (running cells must not touch the committed files, which JupyterLab's
autosave would rewrite), with settings and workspaces of its own (nobody's saved layout). Headless
Chromium (tests/browser.py) opens each notebook, checks that opening alone leaves it unmodified, runs
every cell, and checks there is no error output and every figure is a decoded image. In notebook 05
it changes the planner's controls (format, GPUs, memory, prompt, context and batch) and checks, after
each change, the verdict text against
``plan(...).summary()`` and the drawn image against :func:`helpers.planner_widget.plan_image` for the
same arguments (at most 1% of pixels differing), and that a different plan's image fails that
comparison. Screenshots land in build/browser/lab/.
"""

from __future__ import annotations

import base64
import io
import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import pytest

from helpers.launch import start, stop
from tests.browser import SHOTS

pytestmark = [pytest.mark.browser, pytest.mark.slow]

ROOT = Path(__file__).resolve().parent.parent
NOTEBOOKS = ROOT / "notebooks"
PLANNER = "05_fit-a-model-bigger-than-your-gpu.ipynb"
FIRST = "00_set-up-and-check-your-hardware.ipynb"
MAX_DIFFERING = 0.01  # share of pixels that may differ between the browser's image and the reference
RUN_TIMEOUT_S = 1200  # a whole notebook, run in the browser (notebook 05 loads and times models on the CPU)


def differing_pixels(a: bytes, b: bytes) -> float:
    """Share of pixels (0..1) whose RGB differ between two images (encoded bytes); 1.0 if sizes differ."""
    from PIL import Image

    x, y = (np.asarray(Image.open(io.BytesIO(i)).convert("RGB"), dtype=np.int16) for i in (a, b))
    if x.shape != y.shape:
        return 1.0
    return float(np.any(x != y, axis=-1).mean())


def _size(png: bytes) -> tuple[int, int]:
    from PIL import Image

    return Image.open(io.BytesIO(png)).size


def test_image_comparison_fails_for_a_different_plan():
    """The check below has teeth: two plans one control apart differ in far more than 1% of pixels."""
    from helpers.planner import plan
    from helpers.planner_widget import plan_image

    a = plan_image(plan("llama-2-70b", "nf4", 2, 24))
    assert differing_pixels(a, plan_image(plan("llama-2-70b", "nf4", 2, 24))) == 0.0  # deterministic
    for other in (plan("llama-2-70b", "bf16", 2, 24), plan("llama-2-70b", "nf4", 4, 24),
                  plan("llama-2-70b", "nf4", 2, 80)):
        assert differing_pixels(a, plan_image(other)) > MAX_DIFFERING


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _answer(server: subprocess.Popen, url: str, timeout_s: float = 120) -> bytes | None:
    """The body of ``url`` once the JupyterLab ``server`` answers it; None if the server exits or times out."""
    deadline = time.time() + timeout_s
    while server.poll() is None and time.time() < deadline:
        try:
            with urllib.request.urlopen(url, timeout=2) as r:
                return r.read()
        except OSError:
            time.sleep(0.5)
    return None


@contextmanager
def lab_server(root: Path, work: Path) -> Iterator[tuple[str, str, subprocess.Popen]]:
    """JupyterLab on ``work`` with its settings under ``root``; yields (base URL, token, server process).

    The server starts in a session of its own (``helpers.launch.start``). On leaving the block, also when
    the block raised, it is stopped with every process under it (``helpers.launch.stop``): Jupyter starts
    each kernel in a session of its own, so stopping the server's process group alone could leave kernels.
    """
    settings = root / "settings" / "@jupyterlab" / "apputils-extension"
    settings.mkdir(parents=True)  # only so that no "notified about news?" toast covers the screenshots
    (settings / "notification.jupyterlab-settings").write_text('{"fetchNews": "false"}')
    port, token = _free_port(), "workbook-browser-test"
    env = dict(os.environ, PYTHONPATH=str(ROOT), JUPYTER_CONFIG_DIR=str(root / "config"),
               JUPYTERLAB_SETTINGS_DIR=str(root / "settings"), JUPYTERLAB_WORKSPACES_DIR=str(root / "workspaces"))
    # ./workbook.sh lab's own configuration, plus what the test needs: a port, a token, the app in the page
    cmd = [sys.executable, "-m", "jupyterlab", "--config", str(ROOT / "tools" / "jupyter_lab_config.py"),
           "--no-browser", "--ip=127.0.0.1", f"--port={port}", f"--IdentityProvider.token={token}",
           f"--ServerApp.root_dir={work}", "--LabApp.expose_app_in_browser=True"]
    url = f"http://127.0.0.1:{port}"
    with open(root / "lab.log", "w") as log:
        server = start(cmd, env=env, stdout=log, stderr=subprocess.STDOUT)
        try:
            if _answer(server, f"{url}/api/status?token={token}") is None:
                pytest.fail(f"JupyterLab did not start: {(root / 'lab.log').read_text()[-2000:]}")
            yield url, token, server
        finally:
            stop(server)


@pytest.fixture(scope="module")
def lab(browser, tmp_path_factory):
    """A JupyterLab server on a scratch copy of notebooks 00 and 05; yields (base URL, token, root)."""
    root = tmp_path_factory.mktemp("lab")
    work = root / "notebooks"
    work.mkdir()
    for name in (FIRST, PLANNER):  # each with its jupytext source, as in notebooks/
        for source in (NOTEBOOKS / name, (NOTEBOOKS / name).with_suffix(".py")):
            shutil.copy2(source, work / source.name)
    with lab_server(root, work) as (url, token, _):
        yield url, token, work


def _open(page, lab, name):
    """Open a notebook in JupyterLab and wait until its kernel is idle; return after checking it is unmodified."""
    url, token, _ = lab
    page.goto(f"{url}/lab/tree/{name}?token={token}")
    page.wait_for_function(
        """name => {
            const app = window.jupyterapp, w = app && app.shell.currentWidget;
            return w && w.context && w.context.path.endsWith(name) && w.context.isReady
                && w.sessionContext.session && w.sessionContext.session.kernel
                && w.sessionContext.session.kernel.status === 'idle';
        }""", arg=name, timeout=180_000)
    page.wait_for_timeout(2000)  # what could mark it modified (kernel info, metadata) has arrived
    dirty = page.evaluate("() => window.jupyterapp.shell.currentWidget.context.model.dirty")
    assert not dirty, f"opening {name} marked it modified before anything ran"


STATE = """() => {
    const w = window.jupyterapp.shell.currentWidget;
    const cells = Array.from(w.content.model.cells);
    const code = cells.map((c, i) => [c, i]).filter(([c]) => c.type === 'code');
    return {kernel: w.sessionContext.session.kernel.status,
            waiting: code.filter(([c]) => c.executionCount === null).map(([c, i]) => i),
            errors: code.filter(([c]) => c.outputs.toJSON().some(o => o.output_type === 'error'))
                        .map(([c, i]) => [i, c.outputs.toJSON().filter(o => o.output_type === 'error')
                                                .map(o => o.ename + ': ' + o.evalue).join('; ')])};
}"""


def _run_all(page, name):
    """Run every cell (JupyterLab's Run All); fail at once, with the cell and its error, if a cell fails."""
    page.evaluate("() => window.jupyterapp.commands.execute('notebook:run-all-cells')")
    deadline, idle_since = time.time() + RUN_TIMEOUT_S, None
    while True:
        page.wait_for_timeout(1000)
        state = page.evaluate(STATE)
        assert not state["errors"], f"{name}: cells raised {state['errors']}"
        if not state["waiting"] and state["kernel"] == "idle":
            return
        idle_since = (idle_since or time.time()) if state["kernel"] == "idle" else None
        assert not (idle_since and time.time() - idle_since > 30), (
            f"{name}: the kernel is idle but cells {state['waiting'][:5]}... never ran")
        assert time.time() < deadline, f"{name}: not done after {RUN_TIMEOUT_S} s; cells left {state['waiting']}"


def _check_outputs(page, name):
    """No error output; every figure (a '<Figure size ...>' output) has a PNG that the browser decoded."""
    outputs = page.evaluate(
        """() => Array.from(window.jupyterapp.shell.currentWidget.content.model.cells).map(c =>
              c.type === 'code' ? c.outputs.toJSON() : [])""")
    errors = [(i, o.get("ename"), o.get("evalue")) for i, outs in enumerate(outputs) for o in outs
              if o["output_type"] == "error"]
    assert not errors, f"{name}: error outputs in cells {errors}"
    shown = [(i, o["data"]) for i, outs in enumerate(outputs) for o in outs
             if str(o.get("data", {}).get("text/plain", "")).startswith("<Figure")]
    no_png = [i for i, data in shown if "image/png" not in data]
    assert not no_png, f"{name}: figures without an image in cells {no_png}"
    figures = [i for i, _ in shown]
    for i in sorted(set(figures)):
        page.evaluate("i => window.jupyterapp.shell.currentWidget.content.scrollToItem(i, 'start')", i)
        page.wait_for_function(
            """i => {
                const node = window.jupyterapp.shell.currentWidget.content.widgets[i].node;
                const imgs = node.querySelectorAll('.jp-OutputArea-output img');
                return imgs.length > 0 && Array.from(imgs).every(im => im.complete && im.naturalWidth > 0);
            }""", arg=i, timeout=30_000)
    return outputs, figures


def _shown_image(planner) -> bytes:
    """The planner's image as the browser decoded it, at its natural size, as PNG bytes (waits for it to load)."""
    planner.locator("img").evaluate("im => im.decode()")  # resolves once the current image is decoded
    data_url = planner.locator("img").evaluate(
        """im => { const c = document.createElement('canvas'); c.width = im.naturalWidth; c.height = im.naturalHeight;
                   c.getContext('2d').drawImage(im, 0, 0); return c.toDataURL('image/png'); }""")
    return base64.b64decode(data_url.split(",", 1)[1])


def _plans_drawn(planner) -> int:
    """The count in the status line, "plan N, drawn in ... s" (waits until the line is there)."""
    import re

    status = planner.locator(".workbook-planner-status").filter(has_text=re.compile(r"plan \d+,"))
    status.wait_for(timeout=60_000)
    text = status.inner_text()
    found = re.search(r"plan (\d+),", text) or re.search(r"plan (\d+),", status.text_content() or "")
    assert found, f"the status line reads {text!r}"
    return int(found.group(1))


def _check_planner(planner, args, previous_image, shot):
    """The verdict and the image shown are those of ``plan(**args)``; the previous plan's image is not."""
    from helpers.planner import plan
    from helpers.planner_widget import plan_image

    expected = plan(**args)
    shown_verdict = planner.locator(".workbook-planner-verdict pre")
    shown_verdict.scroll_into_view_if_needed()
    # innerText is empty for a part JupyterLab's windowed notebook does not render at the moment: the DOM's text
    verdict = (shown_verdict.inner_text() or shown_verdict.text_content() or "").strip()
    assert verdict == expected.summary().strip(), f"verdict for {args}:\n{verdict}"
    reference = plan_image(expected)
    for _ in range(20):  # the new image may take a moment to decode after the status line changed
        shown = _shown_image(planner)
        share = differing_pixels(shown, reference)
        if share <= MAX_DIFFERING:
            break
        planner.page.wait_for_timeout(500)
    planner.screenshot(path=str(shot))
    if share > MAX_DIFFERING:  # keep both for a look
        shot.with_name(shot.stem + "-shown.png").write_bytes(shown)
        shot.with_name(shot.stem + "-expected.png").write_bytes(reference)
    assert share <= MAX_DIFFERING, (f"{share:.1%} of pixels differ from the plan's own drawing for {args} "
                                    f"(sizes {_size(shown)} shown, {_size(reference)} expected; {shot})")
    if previous_image is not None:
        assert differing_pixels(shown, previous_image) > MAX_DIFFERING, f"the image did not change for {args}"
    return reference


def test_notebook_00_runs_in_jupyterlab(page, lab):
    _open(page, lab, FIRST)
    listed = page.locator(".jp-DirListing-item .jp-DirListing-itemText").all_inner_texts()
    assert sorted(listed) == sorted([FIRST, PLANNER]), f"the file browser lists each notebook once: {listed}"
    _run_all(page, FIRST)
    _check_outputs(page, FIRST)
    page.screenshot(path=str(SHOTS / "lab" / "00-after-run.png"))


def test_planner_notebook_runs_and_its_widget_draws_right(page, lab):
    (SHOTS / "lab").mkdir(parents=True, exist_ok=True)
    _open(page, lab, PLANNER)
    _run_all(page, PLANNER)
    outputs, _ = _check_outputs(page, PLANNER)
    page.screenshot(path=str(SHOTS / "lab" / "05-after-run.png"))

    widget_cell = next(i for i, outs in enumerate(outputs)
                       if any("application/vnd.jupyter.widget-view+json" in o.get("data", {}) for o in outs))
    page.evaluate("i => window.jupyterapp.shell.currentWidget.content.scrollToItem(i, 'start')", widget_cell)
    planner = page.locator(".workbook-planner")
    planner.wait_for(timeout=30_000)
    planner.locator("img").wait_for(timeout=30_000)
    # the widget cell of notebook 05: planner_widget("llama-3.1-70b", "nf4", n_gpus=1, gib_per_gpu=24, context=4096,
    # batch=1, cpu_gib=64), with the widget's defaults for the rest
    args = dict(model="llama-3.1-70b", fmt="nf4", n_gpus=1, gib_per_gpu=24, strategy="balanced", context=4096,
                batch=1, prompt=None, cpu_gib=64, offload=True)
    assert _plans_drawn(planner) == 1
    image = _check_planner(planner, args, None, SHOTS / "lab" / "planner-0-start.png")

    def settle(after: int):
        planner.page.wait_for_function(
            "n => document.querySelector('.workbook-planner-status').innerText.includes('plan ' + n + ',')",
            arg=after, timeout=60_000)
        planner.page.wait_for_timeout(1500)  # a second redraw, if one were coming, would show by now
        assert _plans_drawn(planner) == after, "one settled change redraws once"

    def choose(description, value):
        box = planner.locator(".widget-dropdown", has=planner.page.locator(f"label:text-is('{description}')"))
        box.locator("select").select_option(str(value))

    drawn = 1
    choose("format", "bf16")
    args["fmt"], drawn = "bf16", drawn + 1
    settle(drawn)
    image = _check_planner(planner, args, image, SHOTS / "lab" / "planner-1-format.png")

    # the GPUs slider, dragged across several values in one gesture: one redraw when it is released
    handle = planner.locator(".widget-slider .noUi-handle")
    track = planner.locator(".widget-slider .noUi-base").bounding_box()
    box = handle.bounding_box()
    planner.page.mouse.move(box["x"] + box["width"] / 2, box["y"] + box["height"] / 2)
    planner.page.mouse.down()
    for k in range(1, 11):
        planner.page.mouse.move(box["x"] + box["width"] / 2 + k * track["width"] * 0.05,
                                box["y"] + box["height"] / 2, steps=2)
    planner.page.mouse.up()
    gpus = int(planner.locator(".widget-slider .widget-readout").inner_text())
    assert gpus >= 3, f"the drag moved the slider from 1 to {gpus}"
    args["n_gpus"], drawn = gpus, drawn + 1
    settle(drawn)
    image = _check_planner(planner, args, image, SHOTS / "lab" / "planner-2-gpus.png")

    choose("GiB / GPU", 80)
    args["gib_per_gpu"], drawn = 80, drawn + 1
    settle(drawn)
    image = _check_planner(planner, args, image, SHOTS / "lab" / "planner-3-memory.png")

    prompt_box = planner.locator(".widget-text", has=planner.page.locator("label:text-is('prompt')"))
    prompt_box.locator("input").fill("1024")
    prompt_box.locator("input").press("Enter")  # the box sends its value when confirmed
    args["prompt"], drawn = 1024, drawn + 1
    settle(drawn)
    # on 80 GiB GPUs a shorter prompt changes a thin hatch and the title only: the verdict text says it
    image = _check_planner(planner, args, None, SHOTS / "lab" / "planner-4-prompt.png")
    assert "prompt 1,024 tokens" in planner.locator(".workbook-planner-verdict pre").text_content()

    choose("context", 131072)
    settle(drawn + 1)
    choose("batch", 16)
    args["context"], args["batch"], drawn = 131072, 16, drawn + 2
    settle(drawn)
    from helpers.planner import plan

    assert not plan(**args).fits, "the KV cache of 16 x 128k tokens does not fit 80 GiB GPUs"
    _check_planner(planner, args, None, SHOTS / "lab" / "planner-5-context-batch.png")


def test_workbook_lab_starts_without_a_new_setup_and_hides_the_sources():
    """``./workbook.sh lab`` itself: as root it says it passes --allow-root, a current set-up is not redone,
    and the file browser's listing holds each notebook once (no jupytext sources). No notebook is opened,
    so nothing committed can be autosaved."""
    import json

    if not (Path(sys.prefix) / ".workbook-setup").is_file():
        pytest.skip(f"{sys.prefix} was not made by ./workbook.sh setup (no set-up stamp)")
    port, token = _free_port(), "workbook-lab-test"
    env = dict(os.environ, WORKBOOK_VENV=sys.prefix, JUPYTER_CONFIG_DIR=str(ROOT / "build" / "lab-test-config"))
    lab = start([ROOT / "workbook.sh", "lab", "--no-browser", "--ip=127.0.0.1", f"--port={port}",
                 f"--IdentityProvider.token={token}"], cwd=ROOT, env=env, stdout=subprocess.PIPE,
                stderr=subprocess.STDOUT, text=True)
    try:
        body = _answer(lab, f"http://127.0.0.1:{port}/api/contents?token={token}")
        assert body is not None, "./workbook.sh lab did not start"
        listing = [item["name"] for item in json.loads(body)["content"]]
    finally:
        stop(lab)  # the shell, JupyterLab and anything under them
        said = lab.communicate(timeout=30)[0]
    assert "set-up is current" in said, said[-2000:]
    if os.getuid() == 0:
        assert "running as root: JupyterLab is started with --allow-root" in said
    notebooks = sorted(p.name for p in NOTEBOOKS.glob("[0-9][0-9]_*.ipynb"))
    assert sorted(n for n in listing if n[:2].isdigit()) == notebooks, listing
