"""The interactive planner: :func:`helpers.planner.show_plan` behind ipywidgets controls (notebook 03).

Why it is built the way it is:

- **No pyplot.** JupyterLab 4.6 (``commsOverSubshells: "perCommTarget"``, its
  default) has ipykernel handle widget messages on a second thread, and after
  each message matplotlib_inline's ``flush_figures`` renders pyplot's current
  figure. A callback drawing with pyplot then races that render (matplotlib is
  not thread-safe): legends cut off, cells out of line, a blank image. Each
  plan is drawn on its own ``matplotlib.figure.Figure``, saved to PNG by
  :func:`plan_image` and shown in an ``ipywidgets.Image``; pyplot never sees it.
- **One redraw per settled change.** The slider and the text box send their
  value when released or confirmed (``continuous_update=False``), and
  traitlets tells observers only of a value that changed. The status line under the
  controls counts the plans drawn ("plan 3, drawn in 0.21 s").
- **A stored copy says what to do.** A notebook saved without widget state
  shows a widget's text form; :class:`PlannerWidget`'s is an instruction to
  run the cell.
"""

from __future__ import annotations

import html
import io
import threading
import time

import ipywidgets as w

from .memory import FORMATS
from .devicemap import STRATEGIES, plot_device_map
from .planner import Plan, plan, plan_stacked, plan_title
from .shapes import SHAPES

DPI = 100  # pixels per inch of the PNG: plot_device_map's FIG_WIDTH of 8.4 inches becomes 840 pixels, shown unscaled
RUN_ME = "Interactive planner: run this cell (Shift+Enter) to show it; a saved copy holds no live widget."


def plan_image(p: Plan, dpi: int = DPI) -> bytes:
    """The PNG bytes of a plan's drawing (:func:`helpers.devicemap.plot_device_map` with :func:`plan_title`).

    Drawn on a ``matplotlib.figure.Figure`` made without pyplot, so it is safe on
    any thread. ``dpi``: pixels per inch. The same bytes for the same plan and
    library versions, which the browser test compares with what JupyterLab shows.
    """
    fig = plot_device_map(p.model, p.device_map, max_memory=p.max_memory, title=plan_title(p),
                          hf_quantizer=p.hf_quantizer, pyplot=False, stacked=plan_stacked(p))
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=dpi)
    return buf.getvalue()


class PlannerWidget(w.VBox):
    """The planner's controls, status line, verdict text and drawing, in one ``VBox``.

    Attributes:
        controls: {argument of :func:`helpers.planner.plan`: its control}.
        plans_drawn: how many plans were drawn (the first on construction).
    """

    def __repr__(self) -> str:  # the text a notebook stores in place of the live widget
        return RUN_ME

    def __init__(self, model: str, fmt: str, n_gpus: int, gib_per_gpu: float, strategy: str, context: int,
                 batch: int) -> None:
        self.controls = dict(
            shape=w.Dropdown(options=list(SHAPES), value=model if model in SHAPES else "llama-2-70b",
                             description="model"),
            typed=w.Text(value="" if model in SHAPES else str(model), placeholder="or a config path / hub id",
                         description="or", continuous_update=False),
            fmt=w.Dropdown(options=list(FORMATS), value=fmt, description="format"),
            n_gpus=w.IntSlider(value=n_gpus, min=1, max=8, description="GPUs", continuous_update=False),
            # GiB as torch reports them: 139 is an H200 (sold as 141 GB)
            gib_per_gpu=w.Dropdown(options=[8, 12, 16, 24, 40, 48, 80, 94, 139], value=gib_per_gpu,
                                   description="GiB / GPU"),
            strategy=w.Dropdown(options=list(STRATEGIES), value=strategy, description="device_map"),
            context=w.Dropdown(options=[1024, 4096, 8192, 32768, 131072], value=context, description="context"),
            batch=w.Dropdown(options=[1, 2, 4, 8, 16, 32, 64], value=batch, description="batch"),
        )
        self.plans_drawn = 0
        self._lock = threading.Lock()
        self._status = w.HTML()
        self._verdict = w.HTML()
        self._image = w.Image(format="png")
        rows = [("shape", "typed"), ("fmt", "strategy"), ("n_gpus", "gib_per_gpu"), ("context", "batch")]
        super().__init__([w.HBox([self.controls[a], self.controls[b]]) for a, b in rows]
                         + [self._status, self._verdict, self._image])
        self.add_class("workbook-planner")  # CSS classes: what a browser test finds the parts by
        self._status.add_class("workbook-planner-status")
        self._verdict.add_class("workbook-planner-verdict")
        for control in self.controls.values():  # traitlets calls it only when the value really changed
            control.observe(lambda _change: self.redraw(), names="value")
        self.redraw()

    def arguments(self) -> dict:
        """The :func:`helpers.planner.plan` arguments the controls now say (the text box wins when not empty)."""
        values = {name: c.value for name, c in self.controls.items()}
        typed, shape = values.pop("typed").strip(), values.pop("shape")
        return dict(model=typed or shape, **values)

    def redraw(self) -> None:
        """Plan what the controls say; show the verdict and the drawing (or the reason a model can't be read)."""
        with self._lock:
            t0 = time.perf_counter()
            args = self.arguments()
            try:
                p = plan(**args)
            except (ValueError, FileNotFoundError) as e:
                self._verdict.value = f"<pre>{html.escape(f'{type(e).__name__}: {e}')}</pre>"
                self._image.value = b""
            else:
                self._verdict.value = f"<pre>{html.escape(p.summary())}</pre>"
                self._image.value = plan_image(p)
            self.plans_drawn += 1
            self._status.value = (f"<i>plan {self.plans_drawn}, drawn in {time.perf_counter() - t0:.2f} s "
                                  "(each change redraws once)</i>")


def planner_widget(model: str = "llama-2-70b", fmt: str = "nf4", n_gpus: int = 2, gib_per_gpu: float = 24,
                   strategy: str = "balanced", context: int = 4096, batch: int = 1) -> PlannerWidget:
    """An ipywidgets planner: pick a model, a format, GPUs, memory, context and batch; the map and verdict update.

    The model is a named shape from the list, or whatever is typed in the text
    box (a local checkpoint directory or a hub id, as :func:`helpers.planner.plan`
    takes; the box wins when it is not empty). Each settled change plans again
    and redraws once; a model that cannot be read shows the reason instead. Its
    output lives in widget state, which nbval does not check: call
    :func:`helpers.planner.show_plan` in a checked cell for the same view.

    Returns:
        A :class:`PlannerWidget` (display it as a cell's last value).

    Raises:
        Nothing for a model that cannot be read or a budget :func:`helpers.planner.plan`
        refuses: the widget shows the reason in place of the plan.

    Notebook 03, section 6.4.
    """
    return PlannerWidget(model, fmt, n_gpus, gib_per_gpu, strategy, context, batch)
