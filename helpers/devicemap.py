"""Device maps: their vocabulary, and a table and a plot of a map.

A *device map* sends module-name prefixes to devices, as accelerate and
``from_pretrained`` take it: ``{"model.embed_tokens": 0, "model.layers": "cpu",
"lm_head": "disk"}``. A device is a GPU id (``0``, ``1``, ... or ``"cuda:N"``),
``"cpu"`` or ``"disk"``. A tensor goes where its longest matching prefix says
(the key ``""`` covers the whole model). Notebook 02 introduces maps; this
module is used by notebooks 02, 03, 04 and 06, by :mod:`helpers.preflight`
and :mod:`helpers.planner`.

Sizes are bytes of parameters and persistent buffers only (no activations, no
KV cache, no CUDA context), counted by accelerate's ``compute_module_sizes``
(or transformers' with a quantizer); a tied parameter counts once.
"""

from __future__ import annotations

import re

import torch
from accelerate.utils import compute_module_sizes

from .units import GiB, MiB, format_size

_ORDER = {"cpu": 1, "disk": 2}


STRATEGIES = ("auto", "balanced", "balanced_low_0", "sequential")
"""The string values of ``device_map`` that make transformers plan ("auto" is "balanced"). Notebook 03."""

ACCELERATORS = ("xpu", "npu", "mlu", "musa", "sdaa", "hpu")
"""Accelerator types besides CUDA that accelerate 1.15 moves weights to by name ("xpu:0", ...)."""


def canonical_device(value):
    """Canonical form of a map value, as accelerate 1.15 takes it; None if not a place to load weights.

    GPU ids stay ints; ``"cuda:1"`` and ``torch.device("cuda", 1)`` become
    ``1``; ``"cpu"`` and ``"disk"`` stay; ``"mps"`` (and ``"mps:0"``) become
    ``"mps"``; ``"xpu"``, ``"xpu:1"``, ``"npu:0"``, ... (the types in
    :data:`ACCELERATORS`) become ``"<type>:<index>"``, a bare type meaning
    index 0. Booleans, negative ids, "meta" and anything else give None. Never
    builds a torch.device from an int (that needs CUDA). Notebook 03 lists the
    devices a map may use; notebook 06 the findings of a bad one.
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


def device_label(dev) -> str:
    """``"GPU 0"`` for a GPU id, else the device's name (``"cpu"``, ``"disk"``). Notebook 02 introduces device maps."""
    return f"GPU {dev}" if isinstance(dev, int) else str(dev)


def device_order(dev):
    """Sort key of devices: GPUs by id, then cpu, then disk, then anything else (None last). Notebook 02 introduces device maps."""
    if dev is None:
        return (9, 0, "")
    return (0, dev, "") if isinstance(dev, int) else (_ORDER.get(dev, 3), 0, str(dev))


def owner_key(name: str, device_map: dict):
    """The map key that covers a tensor or module name (longest prefix; ``""`` covers all), or None. Notebook 02 explains the longest-prefix rule."""
    parts = name.split(".")
    for i in range(len(parts), 0, -1):
        key = ".".join(parts[:i])
        if key in device_map:
            return key
    return "" if "" in device_map else None


def device_of(name: str, device_map: dict):
    """The canonical device of the map entry that covers ``name``, or None when no entry does. Notebook 02 explains the longest-prefix rule."""
    key = owner_key(name, device_map)
    return None if key is None else canonical_device(device_map[key])


def tensor_sizes(model, dtype=None, hf_quantizer=None) -> dict[str, int]:
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


def bytes_per_device(model, device_map: dict, sizes: dict[str, float]) -> dict:
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


def placement(model, device_map: dict) -> dict:
    """Which parts of the model each device holds: {device: "embed_tokens, layers 0-14, norm"}.

    Devices are canonical (GPU ids as ints, "cpu", "disk"; None for tensors the
    map misses), sorted; ``{"": 1}`` gives one entry, GPU 1 with every module. The
    readable column of :func:`map_table`; notebooks 04 and 05 print it.
    """
    return {r["device"]: r["modules"] for r in _rows(model, device_map, {})}


def map_table(model, device_map: dict, dtype=None, hf_quantizer=None):
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
    import matplotlib.pyplot as plt

    if dev is None:
        return "white"
    if isinstance(dev, int):  # tab10 without its grey (index 7), which reads as the CPU's
        return plt.get_cmap("tab10")([0, 1, 2, 3, 4, 5, 6, 8, 9][dev % 9])
    return {"cpu": "0.6", "disk": "saddlebrown"}.get(dev, "black")


def plot_device_map(model, device_map: dict, max_memory: dict | None = None, title: str | None = None, ax=None,
                    dtype=None, hf_quantizer=None):
    """Draw which parts of the model sit on which device, and bytes per device against its budget.

    Top panel: a horizontal strip, one cell per unit in model order
    (embedding, decoder layers 0..N-1, norm, head), coloured by device; a cell
    split across devices is striped and hatched. Bottom panel: bytes per
    device (GiB, or MiB below 1 GiB) with its ``max_memory`` budget as a
    black outline (red bar when over budget).

    Args:
        ax: None (a new figure with both panels), a pair of Axes (strip, bars),
            or one Axes (strip only; the legend then states bytes and budgets).
        dtype, hf_quantizer: as in :func:`preflight`.

    Returns:
        The matplotlib Figure. Call ``plt.show()`` after it. Explained in notebook 02.
    """
    import matplotlib.pyplot as plt
    from matplotlib.patches import Patch

    from .preflight import parse_budget

    budget = parse_budget(max_memory)
    table = map_table(model, device_map, dtype, hf_quantizer)
    devices = [None if d == "(none)" else d for d in table["device"]]
    used = dict(zip(devices, table["bytes"]))
    if ax is None:
        fig, (ax_strip, ax_bar) = plt.subplots(2, 1, figsize=(10, 4.2), gridspec_kw={"height_ratios": [1, 2]})
    elif isinstance(ax, (list, tuple)):
        ax_strip, ax_bar = ax
        fig = ax_strip.figure
    else:
        ax_strip, ax_bar, fig = ax, None, ax.figure

    units = list(_units(model, device_map).items())
    labels = []
    for x, ((prefix, idx), members) in enumerate(units):
        devs = sorted({d for _, d in members}, key=device_order)
        h = 1 / len(devs)
        for j, dev in enumerate(devs):
            ax_strip.bar(x, h, bottom=j * h, width=1.0, color=_color(dev), edgecolor="black", linewidth=0.3,
                         hatch="//" if len(devs) > 1 else None)
        labels.append(str(idx) if idx is not None else _short(prefix))
    step = max(1, len(units) // 24)
    ticks = [i for i in range(len(units)) if units[i][0][1] is None or i % step == 0]
    ax_strip.set_xticks(ticks, [labels[i] for i in ticks], rotation=90, fontsize=7)
    ax_strip.set_yticks([])
    ax_strip.set_xlim(-0.5, len(units) - 0.5)
    ax_strip.set_xlabel("module, in model order (numbers: decoder layers; hatched: cut across devices)")
    ax_strip.set_title(title or "Device map: where each part of the model sits")

    def legend_label(d):
        s = f"{device_label(d) if d is not None else 'no device'}: {format_size(used.get(d, 0))}"
        return s + (f" / {format_size(budget[d])}" if d in budget else "")

    listed = devices + [d for d in budget if isinstance(d, int) and d not in devices]  # empty GPUs too
    ax_strip.legend(handles=[Patch(facecolor=_color(d), edgecolor="black", label=legend_label(d)) for d in listed],
                    loc="center left", bbox_to_anchor=(1.01, 0.5), fontsize=8, frameon=False,
                    title="device: weights" + (" / budget" if budget else ""), title_fontsize=8)
    if ax_bar is not None:
        # devices that hold weights, plus budgeted GPUs left empty (an unused cpu/disk budget is not drawn)
        shown = [d for d in devices if d is not None] + [d for d in budget if d not in devices and isinstance(d, int)]
        big = max([used.get(d, 0) for d in shown] + [budget.get(d, 0) for d in shown] + [1])
        unit, uname = (GiB, "GiB") if big >= GiB else (MiB, "MiB")
        xs = range(len(shown))
        ax_bar.bar(xs, [used.get(d, 0) / unit for d in shown], width=0.6,
                   color=["red" if d in budget and used.get(d, 0) > budget[d] else _color(d) for d in shown])
        ax_bar.bar([x for x, d in zip(xs, shown) if d in budget], [budget[d] / unit for d in shown if d in budget],
                   width=0.6, fill=False, edgecolor="black", linewidth=1.2, label="budget (max_memory)")
        ax_bar.set_xticks(list(xs), [device_label(d) for d in shown])
        ax_bar.set_ylabel(f"weights ({uname})")
        ax_bar.set_xlabel("device")
        ax_bar.set_title("Bytes of weights per device" + (" against its budget (red: over)" if budget else ""))
        if budget:
            ax_bar.legend(fontsize=8)
    fig.tight_layout()
    return fig


def device_map_of(model) -> dict:
    """The map a loaded model was dispatched with: ``model.hf_device_map`` when set.

    transformers sets ``hf_device_map`` only when the map spans several
    devices or offloads; a model loaded whole onto one device has none
    (``AttributeError``). Then this returns ``{"": device}`` with the device
    of its parameters (e.g. ``{"": "cpu"}``). Explained in notebook 02; case 5 of notebook 06.
    """
    dm = getattr(model, "hf_device_map", None)
    if dm is not None:
        return dict(dm)
    p = next(model.parameters(), None)
    if p is None:
        return {"": "cpu"}
    return {"": p.device.index if p.device.type == "cuda" else p.device.type}
