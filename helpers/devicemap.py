"""Device maps: their vocabulary, and a table and a plot of a map.

A *device map* sends module-name prefixes to devices, as accelerate and
``from_pretrained`` take it: ``{"model.embed_tokens": 0, "model.layers": "cpu",
"lm_head": "disk"}``. A device is a GPU id (``0``, ``1``, ... or ``"cuda:N"``),
``"cpu"`` or ``"disk"``. A tensor goes where its longest matching prefix says
(the key ``""`` covers the whole model). Notebook 02 introduces maps; this
module is used by notebooks 03, 06 and 08, by :mod:`helpers.budgets`,
:mod:`helpers.preflight` and :mod:`helpers.planner`; it imports none of them.

Sizes are bytes of parameters and persistent buffers only (no activations, no
KV cache, no CUDA context), counted by accelerate's ``compute_module_sizes``
(or transformers' with a quantizer); a tied parameter counts once.
"""

from __future__ import annotations

import re
import textwrap
from typing import TYPE_CHECKING

import torch
from accelerate.utils import compute_module_sizes, convert_file_size_to_int

from .units import GiB, MiB, format_size

if TYPE_CHECKING:
    import pandas as pd
    from matplotlib.axes import Axes
    from matplotlib.figure import Figure
    from transformers.quantizers import HfQuantizer

_ORDER = {"cpu": 1, "disk": 2}


STRATEGIES = ("auto", "balanced", "balanced_low_0", "sequential")
"""The string values of ``device_map`` that make transformers plan ("auto" is "balanced"). Notebook 03."""

ACCELERATORS = ("xpu", "npu", "mlu", "musa", "sdaa", "hpu")
"""Accelerator types besides CUDA that accelerate 1.15 moves weights to by name ("xpu:0", ...)."""


def canonical_device(value: object) -> int | str | None:
    """Canonical form of a map value, as accelerate 1.15 takes it; None if not a place to load weights.

    GPU ids stay ints; ``"cuda:1"`` and ``torch.device("cuda", 1)`` become
    ``1``; ``"cpu"`` and ``"disk"`` stay; ``"mps"`` (and ``"mps:0"``) become
    ``"mps"``; ``"xpu"``, ``"xpu:1"``, ``"npu:0"``, ... (the types in
    :data:`ACCELERATORS`) become ``"<type>:<index>"``, a bare type meaning
    index 0. Booleans, negative ids, "meta" and anything else give None. Never
    builds a torch.device from an int (that needs CUDA). Notebook 03 lists the
    devices a map may use; notebook 08 the findings of a bad one.
    """
    if isinstance(value, torch.device):
        value = str(value)
    if isinstance(value, bool):
        return None
    if isinstance(value, int):
        return value if value >= 0 else None
    if not isinstance(value, str):
        return None
    v = value.strip().lower()
    if v in ("cpu", "disk"):
        return v
    m = re.fullmatch(r"([a-z]+)(?::(\d+))?", v)
    if m is None:
        return None
    kind, index = m.group(1), int(m.group(2) or 0)
    if kind == "cuda":
        return index
    if kind == "mps":
        return "mps" if index == 0 else None
    return f"{kind}:{index}" if kind in ACCELERATORS else None


def device_label(dev: int | str | None) -> str:
    """``"GPU 0"`` for a GPU id, else the device's name (``"cpu"``, ``"disk"``). Notebook 02 introduces device maps."""
    return f"GPU {dev}" if isinstance(dev, int) else str(dev)


def device_order(dev: int | str | None) -> tuple[int, int, str]:
    """Sort key of devices: GPUs by id, then cpu, then disk, then anything else (None last).

    Notebook 02 introduces device maps.
    """
    if dev is None:
        return (9, 0, "")
    return (0, dev, "") if isinstance(dev, int) else (_ORDER.get(dev, 3), 0, str(dev))


def owner_key(name: str, device_map: dict) -> str | None:
    """The map key that covers a tensor or module name (longest prefix; ``""`` covers all), or None.

    Notebook 02 explains the longest-prefix rule.
    """
    parts = name.split(".")
    for i in range(len(parts), 0, -1):
        key = ".".join(parts[:i])
        if key in device_map:
            return key
    return "" if "" in device_map else None


def device_of(name: str, device_map: dict) -> int | str | None:
    """The canonical device of the map entry that covers ``name``, or None when no entry does.

    Notebook 02 explains the longest-prefix rule.
    """
    key = owner_key(name, device_map)
    return None if key is None else canonical_device(device_map[key])


def tensor_sizes(model: torch.nn.Module, dtype: torch.dtype | None = None,
                 hf_quantizer: HfQuantizer | None = None) -> dict[str, int]:
    """Bytes of each parameter and buffer, by full name (tied parameters once).

    With ``dtype``, floating-point tensors count in that dtype; with a
    transformers quantizer, as transformers counts them (0.5 byte per 4-bit
    weight, 1 per 8-bit weight, without the block scales).

    Notebooks 02 and 03 size maps with it.
    """
    names = [n for n, _ in model.named_parameters()] + [n for n, _ in model.named_buffers()]
    if hf_quantizer is not None:
        from transformers.integrations.accelerate import compute_module_sizes as hf_sizes

        sizes, _ = hf_sizes(model, hf_quantizer, only_modules=False)
    else:
        sizes = compute_module_sizes(model, dtype=dtype)
    return {n: int(sizes[n]) for n in names if n in sizes}


def bytes_per_device(model: torch.nn.Module, device_map: dict, sizes: dict[str, float]) -> dict:
    """Sum ``sizes`` ({tensor name: bytes}, e.g. :func:`tensor_sizes`) by the device each tensor is mapped to.

    Tensors the map does not place are left out. Returns {device: bytes}
    (ints), sorted GPUs, cpu, disk.

    Notebooks 02 and 03.
    """
    out: dict = {}
    for name, n in sizes.items():
        dev = device_of(name, device_map)
        if dev is not None:
            out[dev] = out.get(dev, 0) + n
    return {d: int(round(b)) for d, b in sorted(out.items(), key=lambda kv: device_order(kv[0]))}


def _layer_ranges(nums) -> str:
    """``[0, 1, 2, 5]`` -> ``"0-2, 5"``."""
    nums, out = sorted(nums), []
    for n in nums:
        if out and n == out[-1][1] + 1:
            out[-1][1] = n
        else:
            out.append([n, n])
    return ", ".join(f"{a}-{b}" if a != b else f"{a}" for a, b in out)


# --------------------------------------------------------------------------
# which parts sit where: the table and the plot


def _units(model, device_map):
    """Ordered units of the model: (label, list_prefix or None, index or None, [(tensor, device)])."""
    units = {}  # a tied parameter appears under each of its names (its bytes count once, under the first)
    for name, _ in list(model.named_parameters(remove_duplicate=False)) + list(model.named_buffers()):
        parts = name.split(".")
        idx = next((i for i, p in enumerate(parts[:-1]) if p.isdigit()), None)
        if idx is not None:
            uid = (".".join(parts[:idx]), int(parts[idx]))
        else:
            key = owner_key(name, device_map)
            uid = (key if key else ".".join(parts[:-1]) or name, None)
        units.setdefault(uid, []).append((name, device_of(name, device_map)))
    return units


def _short(prefix: str) -> str:
    return prefix.rsplit(".", 1)[-1] if prefix else "(whole model)"


def _rows(model, device_map: dict, sizes: dict) -> list[dict]:
    """One dict per device (sorted): device, modules (a readable list), parameters, bytes."""
    numel = {n: p.numel() for n, p in model.named_parameters()}
    rows = {}
    for (prefix, idx), members in _units(model, device_map).items():
        devs = {d for _, d in members}
        for dev in devs:
            r = rows.setdefault(dev, {"names": {}, "parameters": 0, "bytes": 0})
            mine = [n for n, d in members if d == dev]
            r["parameters"] += sum(numel.get(n, 0) for n in mine)
            r["bytes"] += sum(sizes.get(n, 0) for n in mine)
            if idx is None:
                r["names"][_short(prefix) + (" (part)" if len(devs) > 1 else "")] = None
            elif len(devs) > 1:
                r["names"][f"{_short(prefix)} {idx} (part)"] = None
            else:  # whole layers of one list collapse into ranges ("layers 0-14")
                r["names"].setdefault(prefix, []).append(idx)
    out = []
    for dev in sorted(rows, key=device_order):
        r = rows[dev]
        names = [k if ix is None else f"{_short(k)} {_layer_ranges(ix)}" for k, ix in r["names"].items()]
        out.append({"device": dev, "modules": ", ".join(names), "parameters": r["parameters"], "bytes": r["bytes"]})
    return out


def placement(model: torch.nn.Module, device_map: dict) -> dict:
    """Which parts of the model each device holds: {device: "embed_tokens, layers 0-14, norm"}.

    Devices are canonical (GPU ids as ints, "cpu", "disk"; None for tensors the
    map misses), sorted; ``{"": 1}`` gives one entry, GPU 1 with every module. The
    readable column of :func:`map_table`; notebooks 06 and 07 print it.
    """
    return {r["device"]: r["modules"] for r in _rows(model, device_map, {})}


def map_table(model: torch.nn.Module, device_map: dict, dtype: torch.dtype | None = None,
              hf_quantizer: HfQuantizer | None = None) -> pd.DataFrame:
    """A pandas DataFrame with one row per device of a map (notebook 02).

    Columns: ``device`` (GPU id, "cpu", "disk", or "(none)" for tensors the map
    misses), ``modules`` (e.g. "embed_tokens, layers 0-14, layers 15 (part)"),
    ``parameters`` (count of parameter elements, tied ones once), ``bytes``
    (parameters + persistent buffers, in ``dtype`` if given) and ``GiB``
    (bytes / 2**30, rounded to 3 places). Rows are sorted GPUs, cpu, disk.
    """
    import pandas as pd

    rows = _rows(model, device_map, tensor_sizes(model, dtype, hf_quantizer))
    for r in rows:
        r["device"] = "(none)" if r["device"] is None else r["device"]
        r["GiB"] = round(r["bytes"] / GiB, 3)
    return pd.DataFrame(rows, columns=["device", "modules", "parameters", "bytes", "GiB"])


def _color(dev):
    import matplotlib

    if dev is None:
        return "white"
    if isinstance(dev, int):  # tab10 without its grey (index 7), which reads as the CPU's
        return matplotlib.colormaps["tab10"]([0, 1, 2, 3, 4, 5, 6, 8, 9][dev % 9])
    return {"cpu": "0.6", "disk": "saddlebrown"}.get(dev, "black")


FIG_WIDTH = 8.4
"""Width in inches of the figures :func:`plot_device_map` makes: 840 px at matplotlib's 100 dpi, within the
848 px of JupyterLab 4.6's output area (:mod:`helpers.text`), so the image is shown unscaled. Notebook 02."""

_TEXT_PT = 8  # points: the strip's labels and the legend (11 px at 100 dpi)
_ROW_PT = 11  # points: one row of module names under the strip
_NUMBERS_PT = 17  # points: the strip's tick marks and layer numbers, above the first row of names


def _text_inches(s: str) -> float:
    """A generous width in inches of ``s`` in matplotlib's default font at ``_TEXT_PT`` points."""
    return 0.62 * _TEXT_PT / 72 * len(s)


def _label_strip(ax, units) -> int:
    """Label the strip: decoder-layer numbers as ticks, other modules by name on rows under it.

    The numbers are horizontal and thinned (every 1, 2, 5, 10, ... layers) so they never touch;
    each other module (embedding, norm, head, ...) is named in full, horizontally, on the first
    row where it touches no other name, joined to its cell by a thin line. Names in the left half
    hang to the right of their cell, the others to the left; placing them from the middle outward
    keeps every joining line clear of the names on the rows above. Returns the number of rows.
    """
    n = len(units)
    cell = ax.get_position().width * ax.figure.get_figwidth() / max(n, 1)  # inches per cell
    layers = [i for i, ((_, idx), _) in enumerate(units) if idx is not None]
    digits = max((len(str(units[i][0][1])) for i in layers), default=1)
    step = next(s for s in (1, 2, 5, 10, 20, 50, 100, 200, 500) if s * cell >= _text_inches("0" * digits) + 0.05)
    ticks = [i for i in layers if units[i][0][1] % step == 0]
    ax.set_xticks(ticks, [str(units[i][0][1]) for i in ticks], fontsize=_TEXT_PT)
    named = [i for i in range(n) if units[i][0][1] is None]
    texts, lines = {}, {}  # row -> [(left, right)] of names (inches); row -> [x] of lines crossing it
    for i in [i for i in reversed(named) if i < n / 2] + [i for i in named if i >= n / 2]:
        x, w, left = (i + 0.5) * cell, _text_inches(_short(units[i][0][0])), i < n / 2
        a, b = (x, x + w) if left else (x - w, x)
        row = 0
        while (any(a < right + 0.06 and left_ - 0.06 < b for left_, right in texts.get(row, []))
               or any(a <= v <= b for v in lines.get(row, []))
               or any(left_ <= x <= right for k in range(row) for left_, right in texts.get(k, []))):
            row += 1
        texts.setdefault(row, []).append((a, b))
        for k in range(row):
            lines.setdefault(k, []).append(x)
        ax.annotate(_short(units[i][0][0]), xy=(i, 0), xycoords=("data", "axes fraction"),
                    xytext=(0, -(_NUMBERS_PT + row * _ROW_PT)), textcoords="offset points",
                    ha="left" if left else "right", va="top", fontsize=_TEXT_PT,
                    arrowprops=dict(arrowstyle="-", color="0.35", lw=0.6, shrinkA=0, shrinkB=0,
                                    relpos=(0 if left else 1, 1)))
    return len(texts)


def plot_device_map(model: torch.nn.Module, device_map: dict, max_memory: dict | None = None, title: str | None = None,
                    ax: Axes | tuple[Axes, Axes] | list[Axes] | None = None, dtype: torch.dtype | None = None,
                    hf_quantizer: HfQuantizer | None = None, pyplot: bool = True,
                    stacked: dict | None = None) -> Figure:
    """Draw which parts of the model sit on which device, and bytes per device against its budget.

    Top panel: a horizontal strip, one cell per unit in model order
    (embedding, decoder layers 0..N-1, norm, head), coloured by device; a cell
    split across devices is striped and hatched. Layers are numbered under it
    (every few layers when they are many); every other module is named in
    full under it, joined to its cell by a line. Bottom panel: bytes per
    device (GiB, or MiB below 1 GiB) with its ``max_memory`` budget as a
    black outline (red bar when over budget). Legends sit outside the axes,
    so they never cover a cell, a bar or an outline (budgeted GPUs left empty
    share one entry). A figure made here is
    :data:`FIG_WIDTH` inches wide (JupyterLab shows it unscaled), and its
    height grows with the rows of names, so the strip keeps its height.

    Args:
        ax: None (a new figure with both panels), a pair of Axes (strip, bars),
            or one Axes (strip only; the legend then states bytes and budgets).
        max_memory: the budget drawn as each device's outline, read as accelerate
            reads it (bytes, or size strings such as "35GiB"); drawn, not
            checked: check it with :func:`helpers.preflight.preflight`.
        dtype, hf_quantizer: as in :func:`helpers.preflight.preflight`.
        pyplot: with ``ax=None``, True makes the figure with pyplot (shown by
            ``plt.show()``); False makes a bare ``matplotlib.figure.Figure``,
            safe to draw on another thread (a widget callback), shown by
            displaying it or saving it (``helpers.planner_widget``).
        stacked: {label: {device: bytes}} drawn on top of each device's
            weights, hatched (the planner passes the KV cache and the
            reserve); a bar is red when its total is over the budget.

    Returns:
        The matplotlib Figure. Call ``plt.show()`` after it. Explained in notebook 02.
    """
    import matplotlib.pyplot as plt
    from matplotlib.patches import Patch

    # the budget as accelerate reads it; it is drawn, not checked (helpers.budgets.parse_budget checks it)
    budget = {canonical_device(k): int(v) if isinstance(v, (int, float)) else convert_file_size_to_int(v)
              for k, v in (max_memory or {}).items()}
    table = map_table(model, device_map, dtype, hf_quantizer)
    devices = [None if d == "(none)" else d for d in table["device"]]
    used = dict(zip(devices, table["bytes"]))
    if ax is None:
        from matplotlib.figure import Figure

        fig = plt.figure(figsize=(FIG_WIDTH, 3.6)) if pyplot else Figure(figsize=(FIG_WIDTH, 3.6))
        ax_strip, ax_bar = fig.subplots(2, 1, gridspec_kw={"height_ratios": [1, 3]})
    elif isinstance(ax, (list, tuple)):
        ax_strip, ax_bar = ax
        fig = ax_strip.figure
    else:
        ax_strip, ax_bar, fig = ax, None, ax.figure

    units = list(_units(model, device_map).items())
    for x, ((prefix, idx), members) in enumerate(units):
        devs = sorted({d for _, d in members}, key=device_order)
        h = 1 / len(devs)
        for j, dev in enumerate(devs):
            ax_strip.bar(x, h, bottom=j * h, width=1.0, color=_color(dev), edgecolor="black", linewidth=0.3,
                         hatch="//" if len(devs) > 1 else None)
    ax_strip.set_yticks([])
    ax_strip.set_xlim(-0.5, len(units) - 0.5)
    cut = any(len({d for _, d in members}) > 1 for _, members in units)
    ax_strip.set_xlabel("modules in model order (numbers: decoder layers"
                        + ("; hatched: cut across devices)" if cut else ")"),
                        fontsize=9)
    title = textwrap.fill(title or "Device map: where each part of the model sits", 64)  # a long title: two lines
    ax_strip.set_title(title)

    def legend_label(d):
        s = f"{device_label(d) if d is not None else 'no device'}: {format_size(used.get(d, 0))}"
        return s + (f" / {format_size(budget[d])}" if d in budget else "")

    handles = [Patch(facecolor=_color(d), edgecolor="black", label=legend_label(d)) for d in devices]
    empty = [d for d in budget if isinstance(d, int) and d not in devices]  # budgeted GPUs left empty: one entry a size
    for size in dict.fromkeys(budget[d] for d in empty):
        ids = [d for d in empty if budget[d] == size]
        handles.append(Patch(fill=False, edgecolor="black", linewidth=0.5,
                             label=f"GPU{'s' * (len(ids) > 1)} {_layer_ranges(ids)}: empty / {format_size(size)}"
                                   + (" each" if len(ids) > 1 else "")))
    legend = dict(loc="upper left", bbox_to_anchor=(1.01, 1.0), fontsize=_TEXT_PT, frameon=False,
                  title="device: weights" + (" / budget" if budget else ""), title_fontsize=_TEXT_PT)
    if ax_bar is None:  # beside the strip
        ax_strip.legend(handles=handles, **legend)
    if ax_bar is not None:
        # devices that hold weights, plus budgeted GPUs left empty (an unused cpu/disk budget is not drawn)
        shown = [d for d in devices if d is not None] + [d for d in budget if d not in devices and isinstance(d, int)]
        stacked = stacked or {}
        total = {d: used.get(d, 0) + sum(part.get(d, 0) for part in stacked.values()) for d in shown}
        big = max([total[d] for d in shown] + [budget.get(d, 0) for d in shown] + [1])
        unit, uname = (GiB, "GiB") if big >= GiB else (MiB, "MiB")
        xs = range(len(shown))
        over = {d: d in budget and total[d] > budget[d] for d in shown}
        ax_bar.bar(xs, [used.get(d, 0) / unit for d in shown], width=0.6,
                   color=["red" if over[d] else _color(d) for d in shown])
        bottom = [used.get(d, 0) / unit for d in shown]
        for (label, part), hatch in zip(stacked.items(), ("..", "xx", "++", "--")):
            heights = [part.get(d, 0) / unit for d in shown]
            ax_bar.bar(xs, heights, bottom=bottom, width=0.6, color="white", edgecolor="0.35", linewidth=0.5,
                       hatch=hatch)
            bottom = [b + h for b, h in zip(bottom, heights)]
        ax_bar.bar([x for x, d in zip(xs, shown) if d in budget], [budget[d] / unit for d in shown if d in budget],
                   width=0.6, fill=False, edgecolor="black", linewidth=1.2)
        ax_bar.set_xticks(list(xs), [device_label(d) for d in shown])
        what = " + ".join(["weights"] + list(stacked))
        ax_bar.set_ylabel(f"{'bytes' if stacked else 'weights'} ({uname})")
        ax_bar.set_xlabel("device")
        ax_bar.set_title(f"{what[0].upper()}{what[1:]} per device"
                         + (" against its budget (red: over)" if budget else ""))
        outline = [Patch(fill=False, edgecolor="black", linewidth=1.2, label="budget (max_memory)")] if budget else []
        parts = [Patch(facecolor="white", edgecolor="0.35", hatch=hatch, label=label)
                 for label, hatch in zip(stacked, ("..", "xx", "++", "--"))]
        ax_bar.legend(handles=handles + parts + outline, **legend)  # beside the bars, never over them
    fig.tight_layout()  # first the axes' final widths, then the labels that depend on them
    rows = _label_strip(ax_strip, units)
    ax_strip.xaxis.labelpad = rows * _ROW_PT + 4
    if ax is None:  # the rows of names take room of their own, not the strip's
        fig.set_size_inches(FIG_WIDTH, fig.get_figheight() + (rows * _ROW_PT + 14 * title.count("\n")) / 72)
    fig.tight_layout()
    return fig


def device_map_of(model: torch.nn.Module) -> dict:
    """The map a loaded model was dispatched with: ``model.hf_device_map`` when set.

    transformers sets ``hf_device_map`` only when the map spans several
    devices or offloads; a model loaded whole onto one device has none
    (``AttributeError``). Then this returns ``{"": device}`` with the device
    of its parameters (e.g. ``{"": "cpu"}``). Explained in notebook 02; case 5 of notebook 08.
    """
    dm = getattr(model, "hf_device_map", None)
    if dm is not None:
        return dict(dm)
    p = next(model.parameters(), None)
    if p is None:
        return {"": "cpu"}
    return {"": p.device.index if p.device.type == "cuda" else p.device.type}
