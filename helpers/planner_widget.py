"""The interactive planner: :func:`helpers.planner.plan` behind ipywidgets controls (notebook 05).

It shows the verdict text (:meth:`helpers.planner.Plan.summary`), a headline with the binding term and the
predicted seconds per token, and a drawing: where each module sits (the strip of
:func:`helpers.devicemap.plot_device_map`) and one bar per GPU, for the CPU (RAM) and for the disk, each GPU's
weights with their scales, KV cache, reserve and prefill activations stacked against its budget, its load peak
marked.

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
import textwrap
import threading
import time

import ipywidgets as w

from .memory import FORMATS, QUANTIZED
from .devicemap import STRATEGIES, _color, device_label, plot_device_map
from .planner import Plan, plan, plan_title, weights_label
from .shapes import SHAPES
from .units import GiB

DPI = 100  # pixels per inch of the PNG: plot_device_map's FIG_WIDTH of 8.4 inches becomes 840 pixels, shown unscaled
RUN_ME = "Interactive planner: run this cell (Shift+Enter) to show it; a saved copy holds no live widget."
CPU_CHOICES = [("none", None), ("16", 16), ("32", 32), ("64", 64), ("128", 128), ("256", 256)]
"""The widget's RAM budgets (GiB) for offload; "none": what does not fit the GPUs goes to disk."""


def headline(p: Plan) -> str:
    """One line: the verdict's gist, the binding term and the predicted seconds per token (batch 1)."""
    s = p.seconds_per_token.get("seconds_per_token")
    state = "fits on the GPUs" if p.fits else "runs with offload" if p.runs else "does not fit"
    return (f"{state}; binding: {p.binding}; "
            + (f"predicted {s:.3g} s per token ({1 / s:.3g} tokens/s) at batch 1" if s else "no rates to predict with"))


def _bars(ax, p: Plan) -> None:
    """One bar per GPU (weights with scales + KV cache + reserve + prefill, load peak marked), the CPU (RAM the
    offloaded part needs) and the disk, with each budget outlined (red: over)."""
    from matplotlib.lines import Line2D
    from matplotlib.patches import Patch

    gpus = list(range(p.n_gpus))
    shown = gpus + [d for d in ("cpu", "disk") if (p.cpu_bytes if d == "cpu" else p.disk_bytes)
                    or (d == "cpu" and "cpu" in p.max_memory)]
    weights = {d: p.true_bytes_per_device.get(d, 0) for d in shown}
    weights["cpu"] = p.ram_needed_bytes if "cpu" in shown else 0
    parts = {"KV cache": p.kv_bytes_per_device, "reserve": {d: p.reserve_bytes for d in gpus},
             "prefill": p.prefill_bytes_per_device}
    total = {d: weights[d] + sum(part.get(d, 0) for part in parts.values()) for d in shown}
    peak = max([total[d] for d in shown] + [p.load_peak_bytes.get(d, 0) for d in gpus]
               + [p.max_memory.get(d, 0) for d in shown] + [1])
    unit, uname = (GiB, "GiB") if peak >= GiB else (2**20, "MiB")
    over = {d: d in p.max_memory and max(total[d], p.load_peak_bytes.get(d, 0) if d in gpus else 0) > p.max_memory[d]
            for d in shown}
    xs = list(range(len(shown)))
    ax.bar(xs, [weights[d] / unit for d in shown], width=0.6, color=["red" if over[d] else _color(d) for d in shown])
    bottom = [weights[d] / unit for d in shown]
    hatches = ("..", "xx", "++")
    for (label, part), hatch in zip(parts.items(), hatches):
        h = [part.get(d, 0) / unit for d in shown]
        ax.bar(xs, h, bottom=bottom, width=0.6, color="white", edgecolor="0.35", linewidth=0.5, hatch=hatch)
        bottom = [b + x for b, x in zip(bottom, h)]
    budgeted = [(x, d) for x, d in zip(xs, shown) if d in p.max_memory]
    ax.bar([x for x, _ in budgeted], [p.max_memory[d] / unit for _, d in budgeted], width=0.6, fill=False,
           edgecolor="black", linewidth=1.2)
    for x, d in zip(xs, gpus):
        ax.plot([x - 0.3, x + 0.3], [p.load_peak_bytes.get(d, 0) / unit] * 2, color="black", linestyle="--",
                linewidth=1)
    names = {"cpu": "CPU (RAM needed)", "disk": "disk"}
    ax.set_xticks(xs, [names.get(d, device_label(d)) for d in shown])
    ax.set_ylabel(f"bytes ({uname})")
    ax.set_title("bytes per device against its budget", fontsize=9)
    offloaded = ("offloaded weights unquantized, in the load dtype" if p.fmt in QUANTIZED
                 else "offloaded weights")
    handles = ([Patch(facecolor=_color(0), label=weights_label(p.fmt) + " (GPUs)")]
               + ([Patch(facecolor=_color("cpu"), label=f"{offloaded} + load peak (RAM)")] if "cpu" in shown else [])
               + ([Patch(facecolor=_color("disk"), label=f"{offloaded} (disk)")] if "disk" in shown else [])
               + [Patch(facecolor="white", edgecolor="0.35", hatch=h, label=label) for label, h in zip(parts, hatches)]
               + [Line2D([], [], color="black", linestyle="--", label="load peak"),
                  Patch(fill=False, edgecolor="black", linewidth=1.2, label="budget (red: over)")])
    ax.legend(handles=handles, loc="upper left", bbox_to_anchor=(1.01, 1.0), fontsize=8, frameon=False)


def plan_image(p: Plan, dpi: int = DPI) -> bytes:
    """The PNG bytes of a plan's drawing: the map's strip (:func:`helpers.devicemap.plot_device_map`) over the
    GPU, CPU and disk bars, titled :func:`helpers.planner.plan_title` and :func:`headline`.

    Drawn on a ``matplotlib.figure.Figure`` made without pyplot, so it is safe on any thread. ``dpi``: pixels
    per inch. The same bytes for the same plan and library versions, which the browser test compares with what
    JupyterLab shows.
    """
    from matplotlib.figure import Figure

    from .devicemap import FIG_WIDTH

    fig = Figure(figsize=(FIG_WIDTH, 4.8))
    ax_strip, ax_bar = fig.subplots(2, 1, gridspec_kw={"height_ratios": [1, 3]})
    plot_device_map(p.model, p.device_map, ax=ax_strip, hf_quantizer=p.hf_quantizer)
    legend = ax_strip.get_legend()
    if legend is not None:  # its sizes are transformers' count: the bars below carry the labelled figures
        legend.remove()
    ax_strip.set_title("")
    fig.suptitle(textwrap.fill(plan_title(p), 110) + "\n" + textwrap.fill(headline(p), 110), fontsize=9)
    _bars(ax_bar, p)
    fig.tight_layout()
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
                 batch: int, prompt: int | None = None, cpu_gib: float | None = None, offload: bool = True) -> None:
        contexts = sorted({1024, 4096, 8192, 32768, 131072, context})
        self.controls = dict(
            shape=w.Dropdown(options=list(SHAPES), value=model if model in SHAPES else "llama-2-70b",
                             description="model"),
            typed=w.Text(value="" if model in SHAPES else str(model), placeholder="or a config path / hub id",
                         description="or", continuous_update=False),
            fmt=w.Dropdown(options=list(FORMATS), value=fmt, description="format"),
            n_gpus=w.IntSlider(value=n_gpus, min=1, max=8, description="GPUs", continuous_update=False),
            # GiB as torch reports them: 139 is an H200 (sold as 141 GB)
            gib_per_gpu=w.Dropdown(options=sorted({8, 12, 16, 24, 40, 48, 80, 94, 139, gib_per_gpu}),
                                   value=gib_per_gpu, description="GiB / GPU"),
            strategy=w.Dropdown(options=list(STRATEGIES), value=strategy, description="device_map"),
            context=w.Dropdown(options=contexts, value=context, description="context"),
            batch=w.Dropdown(options=[1, 2, 4, 8, 16, 32, 64], value=batch, description="batch"),
            prompt=w.Text(value="" if prompt is None else str(prompt), placeholder="auto: min(context, 4096)",
                          description="prompt", continuous_update=False),
            cpu_gib=w.Dropdown(options=CPU_CHOICES + ([(f"{cpu_gib:g}", cpu_gib)] if cpu_gib not in
                                                      dict(CPU_CHOICES).values() else []),
                               value=cpu_gib, description="RAM GiB"),
            offload=w.Checkbox(value=offload, description="allow offload", indent=False),
        )
        self.plans_drawn = 0
        self._lock = threading.Lock()
        self._status = w.HTML()
        self._headline = w.HTML()
        self._verdict = w.HTML()
        self._image = w.Image(format="png")
        rows = [("shape", "typed"), ("fmt", "strategy"), ("n_gpus", "gib_per_gpu"), ("context", "batch"),
                ("prompt", "cpu_gib")]
        super().__init__([w.HBox([self.controls[a], self.controls[b]]) for a, b in rows]
                         + [self.controls["offload"], self._status, self._headline, self._verdict, self._image])
        self.add_class("workbook-planner")  # CSS classes: what a browser test finds the parts by
        self._status.add_class("workbook-planner-status")
        self._headline.add_class("workbook-planner-headline")
        self._verdict.add_class("workbook-planner-verdict")
        for control in self.controls.values():  # traitlets calls it only when the value really changed
            control.observe(lambda _change: self.redraw(), names="value")
        self.redraw()

    def arguments(self) -> dict:
        """The :func:`helpers.planner.plan` arguments the controls now say (the text box wins when not empty)."""
        values = {name: c.value for name, c in self.controls.items()}
        typed, shape = values.pop("typed").strip(), values.pop("shape")
        prompt = values.pop("prompt").strip().replace(",", "").replace("_", "")
        values["prompt"] = int(prompt) if prompt.isdigit() else None if not prompt else prompt
        return dict(model=typed or shape, **values)

    def redraw(self) -> None:
        """Plan what the controls say; show the verdict and the drawing (or the reason a model can't be read)."""
        with self._lock:
            t0 = time.perf_counter()
            args = self.arguments()
            try:
                p = plan(**args)
            except (ValueError, FileNotFoundError) as e:
                self._headline.value = "<b>cannot plan this</b>"
                self._verdict.value = f"<pre>{html.escape(f'{type(e).__name__}: {e}')}</pre>"
                self._image.value = b""
            else:
                self._headline.value = f"<b>{html.escape(headline(p))}</b>"
                self._verdict.value = f"<pre>{html.escape(p.summary())}</pre>"
                self._image.value = plan_image(p)
            self.plans_drawn += 1
            self._status.value = (f"<i>plan {self.plans_drawn}, drawn in {time.perf_counter() - t0:.2f} s "
                                  "(each change redraws once)</i>")


def planner_widget(model: str = "llama-2-70b", fmt: str = "nf4", n_gpus: int = 2, gib_per_gpu: float = 24,
                   strategy: str = "balanced", context: int = 4096, batch: int = 1, prompt: int | None = None,
                   cpu_gib: float | None = None, offload: bool = True) -> PlannerWidget:
    """An ipywidgets planner: pick a model, a format, GPUs, memory, context, batch, prompt and RAM; the map, the
    GPU, CPU and disk bars, the binding term and the predicted seconds per token update.

    The model is a named shape from the list, or whatever is typed in the text
    box (a local checkpoint directory or a hub id, as :func:`helpers.planner.plan`
    takes; the box wins when it is not empty). The prompt box takes a number
    of tokens (empty: ``min(context, 4096)``). "allow offload" is
    :func:`helpers.planner.plan`'s ``offload=``. Each settled change plans again
    and redraws once; a model or prompt that cannot be planned shows the reason
    instead. Its output lives in widget state, which nbval does not check: call
    :func:`helpers.planner.show_plan` in a checked cell for the same verdict.

    Returns:
        A :class:`PlannerWidget` (display it as a cell's last value).

    Raises:
        Nothing for a model that cannot be read or a budget :func:`helpers.planner.plan`
        refuses: the widget shows the reason in place of the plan.

    Notebook 05.
    """
    return PlannerWidget(model, fmt, n_gpus, gib_per_gpu, strategy, context, batch, prompt, cpu_gib, offload)
