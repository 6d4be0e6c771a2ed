"""Plan a device map for GPUs you don't have: the plain-function view of notebook 03's planner.

:func:`plan` takes a model shape (a name from :data:`helpers.shapes.SHAPES`),
a storage format, a number of GPUs and their memory, and returns the map
``from_pretrained(..., device_map=strategy, max_memory=...)`` would compute,
with a verdict (does everything land on the GPUs?) and the bytes per device.
:func:`show_plan` prints and draws it; :func:`planner_widget` wraps it in
ipywidgets for live exploration.

Everything happens on the meta device (no weight bytes are allocated; a
70B plan takes well under a second) and never touches a GPU, so it runs on
a machine without one.

The steps are transformers' own (5.24, ``from_pretrained`` ->
``transformers.integrations.accelerate._get_device_map``), not a global
multiplier:

1. The model is built on the meta device in the compute dtype; for a
   quantized format transformers' quantizer (``AutoHfQuantizer``) replaces the
   Linear layers inside the blocks with bitsandbytes layers exactly as
   ``from_pretrained`` does (``preprocess_model``); embeddings, norms and the
   output head keep the compute dtype.
2. ``get_balanced_memory`` (strategies "auto"/"balanced"/"balanced_low_0")
   or ``get_max_memory`` ("sequential") turns the budget into per-GPU caps.
3. The quantizer's ``adjust_max_memory`` cuts each cap to 90% (bitsandbytes:
   room for buffers made while quantizing).
4. ``infer_auto_device_map`` places the modules, never splitting the
   model's ``_no_split_modules`` (its decoder layers).

The one step skipped is the bitsandbytes quantizer's ``validate_environment``,
which would raise ("Some modules are dispatched on the CPU or the disk")
instead of returning a plan that does not fit; the verdict reports it instead.

Where transformers' accounting differs from the bytes a load really takes:
it counts 0.5 byte per 4-bit weight and 1 byte per 8-bit weight, without the
quantization scales (NF4: one float32 absmax per 64 weights, +0.0625 byte;
int8: one float32 scale per output row). :attr:`Plan.true_bytes_per_device`
adds them back (the formulas of :mod:`helpers.memory`). Activations, the KV
cache and the CUDA context are in neither figure.
"""

from __future__ import annotations

import contextlib
import functools
import logging
from dataclasses import dataclass, field

import torch

from .devicemap import _owner as _owner_key
from .devicemap import _ranges
from .memory import GiB, linear_bytes_per_weight
from .shapes import SHAPES, shape_config

FORMATS = ("bf16", "fp16", "fp32", "int8", "nf4", "nf4-dq")
"""Storage formats :func:`plan` knows: bf16/fp16/fp32 unquantized; int8 (LLM.int8),
nf4, nf4-dq (NF4 with double quantization) through bitsandbytes, with a bf16
compute dtype for the parts that stay unquantized."""

STRATEGIES = ("auto", "balanced", "balanced_low_0", "sequential")
"""The string values of ``device_map`` that make transformers plan ("auto" is "balanced")."""

# Loggers that speak while planning for devices that are not here. Their messages are known and
# expected on a machine without those GPUs; the plan's verdict carries what matters.
_PLANNING_LOGGERS = (
    "accelerate.utils.modeling",  # "Device 0 is not available, available devices are []"
    "transformers.integrations.accelerate",  # "Current model requires N bytes of buffer for offloaded layers"
)


@contextlib.contextmanager
def quiet_planning():
    """Silence the known warnings of planning for absent GPUs, and restore the levels afterwards."""
    loggers = [logging.getLogger(name) for name in _PLANNING_LOGGERS]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(logging.ERROR)
    try:
        yield
    finally:
        for lg, level in zip(loggers, levels):
            lg.setLevel(level)


def quantization_config(fmt: str):
    """The ``BitsAndBytesConfig`` that ``from_pretrained`` would get for ``fmt``, or None (unquantized).

    Raises:
        ValueError: unknown format (the message lists :data:`FORMATS`).
    """
    from transformers import BitsAndBytesConfig

    if fmt not in FORMATS:
        raise ValueError(f"unknown format {fmt!r}; choose one of {', '.join(FORMATS)}")
    if fmt == "int8":
        return BitsAndBytesConfig(load_in_8bit=True)
    if fmt in ("nf4", "nf4-dq"):
        return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4",
                                  bnb_4bit_use_double_quant=(fmt == "nf4-dq"),
                                  bnb_4bit_compute_dtype=torch.bfloat16)
    return None


def compute_dtype(fmt: str) -> torch.dtype:
    """The dtype of the parts that are not quantized (and of everything for bf16/fp16/fp32)."""
    return {"fp32": torch.float32, "fp16": torch.float16}.get(fmt, torch.bfloat16)


@functools.lru_cache(maxsize=16)
def prepared_model(shape: str, fmt: str):
    """Build ``shape`` on the meta device as ``from_pretrained`` would for ``fmt``.

    Returns:
        ``(model, hf_quantizer)``: a transformers causal LM whose tensors are
        all on the meta device (no bytes allocated), and the transformers
        quantizer that prepared it (None for bf16/fp16/fp32). The quantizer is
        also set as ``model.hf_quantizer``, as after ``from_pretrained``, so
        :mod:`helpers.devicemap` sizes the model with it. Cached: do not modify
        the returned model.

    Raises:
        ValueError: unknown shape or format.
        ImportError: a quantized format without bitsandbytes installed.
    """
    from transformers import AutoModelForCausalLM
    from transformers.quantizers import AutoHfQuantizer

    qconfig = quantization_config(fmt)
    config = shape_config(shape)
    dtype = compute_dtype(fmt)
    with torch.device("meta"):  # ties declared by the config are applied by post_init
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    quantizer = None
    if qconfig is not None:
        # As from_pretrained (modeling_utils.py, 5.24): from_config on the quantizer, then
        # preprocess_model on the meta model. pre_quantized=False: the checkpoint holds bf16
        # weights that are quantized while loading.
        quantizer = AutoHfQuantizer.from_config(qconfig, pre_quantized=False)
        quantizer.preprocess_model(model=model, dtype=dtype, device_map="auto", checkpoint_files=None,
                                   use_kernels=False)
        model.hf_quantizer = quantizer
    return model.eval(), quantizer


@dataclass
class Plan:
    """One planned device map and its verdict (all sizes in bytes; GPU ids are ints).

    Attributes:
        shape, fmt, n_gpus, gib_per_gpu, strategy: the question asked.
        device_map: {module name: device} as ``infer_auto_device_map`` returns
            it: GPU ids, and "cpu"/"disk" for what did not fit.
        max_memory: the budget given, {GPU id: bytes} (plus "cpu" if given).
        effective_memory: the caps the placement really used, after
            balancing and (quantized formats) the quantizer's 90% cut.
        bytes_per_device: {device: bytes} in transformers' accounting (what
            the placement used).
        true_bytes_per_device: {device: bytes} with the quantization scales
            added (equal to ``bytes_per_device`` when unquantized).
        fits: True when every module landed on a GPU.
        model, hf_quantizer: the meta model planned and its quantizer (None
            when unquantized), for drawing and checking.
    """

    shape: str
    fmt: str
    n_gpus: int
    gib_per_gpu: float
    strategy: str
    device_map: dict
    max_memory: dict
    effective_memory: dict
    bytes_per_device: dict
    true_bytes_per_device: dict
    fits: bool
    model: torch.nn.Module = field(repr=False)
    hf_quantizer: object = field(repr=False, default=None)

    @property
    def total_bytes(self) -> int:
        """All weights in transformers' accounting (bytes)."""
        return sum(self.bytes_per_device.values())

    @property
    def total_true_bytes(self) -> int:
        """All weights with the quantization scales (bytes)."""
        return sum(self.true_bytes_per_device.values())

    def layers_on(self, device) -> list[int]:
        """Indices of the decoder layers (the no-split blocks) placed on ``device``."""
        keep = set(getattr(self.model, "_no_split_modules", None) or [])
        return sorted(int(name.rsplit(".", 1)[-1]) for name, m in self.model.named_modules()
                      if type(m).__name__ in keep and name.rsplit(".", 1)[-1].isdigit()
                      and _owner(name, self.device_map) == device)

    def others_on(self, device) -> list[str]:
        """Short names of the modules outside the decoder layers with weights on ``device`` (e.g. "embed_tokens")."""
        keep = set(getattr(self.model, "_no_split_modules", None) or [])
        blocks = tuple(name + "." for name, m in self.model.named_modules() if type(m).__name__ in keep)
        out = []
        for name, _ in self.model.named_parameters():
            if name.startswith(blocks) or _owner(name, self.device_map) != device:
                continue
            short = name.rsplit(".", 2)[-2] if "." in name else name
            if short not in out:
                out.append(short)
        return out

    def summary(self) -> str:
        """A few lines: the question, the verdict, and each device's layers and bytes (GiB)."""
        verdict = "FITS on the GPUs" if self.fits else "DOES NOT FIT: " + ", ".join(
            f"{_count(self.device_map, d)} module(s) on {d}" for d in ("cpu", "disk") if d in self.device_map.values())
        lines = [f"{self.shape}, {self.fmt}, {self.n_gpus} x {self.gib_per_gpu:g} GiB GPUs, "
                 f"device_map={self.strategy!r}: {verdict}"]
        if self.hf_quantizer is not None:
            lines.append(f"  bitsandbytes cuts each budget to 90%: {self.gib_per_gpu:g} GiB -> "
                         f"{0.9 * self.gib_per_gpu:.2f} GiB usable per GPU")
        for dev in sorted(self.bytes_per_device, key=_order):
            layers = self.layers_on(dev)
            what = ", ".join(([f"layers {_ranges(layers)}"] if layers else []) + self.others_on(dev))
            extra = ""
            if self.true_bytes_per_device.get(dev, 0) != self.bytes_per_device[dev]:
                extra = f" ({self.true_bytes_per_device[dev] / GiB:.2f} GiB with the quantization scales)"
            name = f"GPU {dev}" if isinstance(dev, int) else dev
            lines.append(f"  {name:>6}: {self.bytes_per_device[dev] / GiB:6.2f} GiB{extra}: {what}")
        return "\n".join(lines)


def _order(dev):
    return (0, dev) if isinstance(dev, int) else ({"cpu": 1, "disk": 2}.get(dev, 3), 0)


def _count(device_map: dict, device) -> int:
    return sum(1 for d in device_map.values() if d == device)


def _owner(name: str, device_map: dict):
    """The device of the map entry that covers ``name`` (longest prefix), or None."""
    key = _owner_key(name, device_map)
    return None if key is None else device_map[key]


def bytes_per_device(model, device_map: dict, hf_quantizer=None, fmt: str | None = None) -> tuple[dict, dict]:
    """Bytes of weights per device of a map: transformers' accounting, and with quantization scales.

    Args:
        model: the (meta) model the map was planned for.
        device_map: {module or parameter name: device}.
        hf_quantizer: the quantizer that prepared the model, or None.
        fmt: the format (for the scales: "int8", "nf4", "nf4-dq"); ignored
            without a quantizer.

    Returns:
        ``(planned, true)``: two {device: bytes} dicts. ``planned`` uses
        transformers' ``compute_module_sizes`` (0.5 byte per 4-bit weight,
        1 per 8-bit weight, tied parameters once); ``true`` charges each
        quantized weight :func:`helpers.memory.linear_bytes_per_weight`
        (scales included).
    """
    from transformers.integrations.accelerate import compute_module_sizes

    sizes, _ = compute_module_sizes(model, hf_quantizer, only_modules=False)
    tied = set(getattr(model, "all_tied_weights_keys", {}) or {})
    planned, true = {}, {}
    tensors = list(model.named_parameters()) + list(model.named_buffers())
    for name, t in tensors:
        if name in tied or name not in sizes:
            continue
        dev = _owner(name, device_map)
        planned[dev] = planned.get(dev, 0) + int(sizes[name])
        if hf_quantizer is not None and fmt in ("int8", "nf4", "nf4-dq") and \
                hf_quantizer.param_needs_quantization(model, name):
            n = t.numel() * linear_bytes_per_weight(fmt, t.shape[-1])
        else:
            n = sizes[name]
        true[dev] = true.get(dev, 0) + int(round(n))
    return planned, true


def plan(shape: str, fmt: str = "bf16", n_gpus: int = 1, gib_per_gpu: float = 24, strategy: str = "balanced",
         cpu_gib: float | None = None) -> Plan:
    """Plan a device map for ``n_gpus`` GPUs of ``gib_per_gpu`` GiB each, as ``from_pretrained`` would.

    Args:
        shape: a model shape name from :data:`helpers.shapes.SHAPES`
            (e.g. "bloom-1b7", "llama-2-7b", "llama-2-70b").
        fmt: one of :data:`FORMATS`.
        n_gpus: number of GPUs (1 to 64); they need not exist here.
        gib_per_gpu: memory per GPU for weights, in GiB (2**30 bytes).
        strategy: one of :data:`STRATEGIES` (the string you would pass as
            ``device_map``).
        cpu_gib: RAM allowed for CPU offload (GiB); None (default) allows
            none, so what does not fit on the GPUs goes to "disk".

    Returns:
        A :class:`Plan`. ``plan.fits`` is False when any module lands on
        "cpu" or "disk" (a bitsandbytes model would then be refused by
        ``from_pretrained``; a bf16 one would load, slowly, with offload).

    Raises:
        ValueError: unknown shape, format or strategy, ``n_gpus`` outside
            1..64, or a non-positive ``gib_per_gpu``/``cpu_gib``.
        ImportError: a quantized format without bitsandbytes installed.
    """
    from transformers.integrations.accelerate import get_balanced_memory, get_max_memory, infer_auto_device_map

    if shape not in SHAPES:
        raise ValueError(f"unknown model shape {shape!r}; known shapes: {', '.join(SHAPES)}")
    if strategy not in STRATEGIES:
        raise ValueError(f"unknown strategy {strategy!r}; choose one of {', '.join(STRATEGIES)}")
    if not isinstance(n_gpus, int) or not 1 <= n_gpus <= 64:
        raise ValueError(f"n_gpus must be an integer from 1 to 64, not {n_gpus!r}")
    if not gib_per_gpu > 0:
        raise ValueError(f"gib_per_gpu must be a positive number of GiB, not {gib_per_gpu!r}")
    if cpu_gib is not None and not cpu_gib > 0:
        raise ValueError(f"cpu_gib must be a positive number of GiB or None (no CPU offload), not {cpu_gib!r}")
    model, quantizer = prepared_model(shape, fmt)
    budget = {i: int(gib_per_gpu * GiB) for i in range(n_gpus)}
    if cpu_gib is not None:
        budget["cpu"] = int(cpu_gib * GiB)
    no_split = model._no_split_modules
    with quiet_planning():
        # transformers.integrations.accelerate._get_device_map, minus validate_environment
        if strategy != "sequential":
            effective = get_balanced_memory(model, max_memory=dict(budget), no_split_module_classes=no_split,
                                            hf_quantizer=quantizer, low_zero=(strategy == "balanced_low_0"))
        else:
            effective = get_max_memory(dict(budget))
        if quantizer is not None:
            effective = quantizer.adjust_max_memory(effective)
        device_map = infer_auto_device_map(model, max_memory=effective, no_split_module_classes=no_split,
                                           hf_quantizer=quantizer,
                                           no_placement_params=getattr(model, "_no_placement_params", None))
    planned, true = bytes_per_device(model, device_map, quantizer, fmt)
    fits = all(isinstance(d, int) for d in device_map.values())
    return Plan(shape=shape, fmt=fmt, n_gpus=n_gpus, gib_per_gpu=gib_per_gpu, strategy=strategy,
                device_map=dict(device_map), max_memory=budget,
                effective_memory={k: int(v) for k, v in effective.items()},
                bytes_per_device=dict(sorted(planned.items(), key=lambda kv: _order(kv[0]))),
                true_bytes_per_device=dict(sorted(true.items(), key=lambda kv: _order(kv[0]))),
                fits=fits, model=model, hf_quantizer=quantizer)


def show_plan(shape: str, fmt: str = "bf16", n_gpus: int = 1, gib_per_gpu: float = 24,
              strategy: str = "balanced", cpu_gib: float | None = None, ax=None, draw: bool = True) -> Plan:
    """Plan (see :func:`plan`), print :meth:`Plan.summary` and draw the map.

    The drawing is :func:`helpers.devicemap.plot_device_map`: which layers
    sit on which device, and bytes per device (transformers' accounting)
    against the budget given (before the 90% cut). It is not shown here:
    call ``plt.show()`` after (a notebook shows it at the end of the cell).

    Args:
        ax: passed to ``plot_device_map`` (None: a new figure).
        draw: False to print only.

    Returns:
        The :class:`Plan`. Raises as :func:`plan`.
    """
    from .devicemap import plot_device_map

    p = plan(shape, fmt, n_gpus, gib_per_gpu, strategy, cpu_gib)
    print(p.summary())
    if draw:
        verdict = "fits" if p.fits else "does not fit"
        title = f"{shape} {fmt} on {n_gpus} x {gib_per_gpu:g} GiB ({strategy}): {verdict}"
        plot_device_map(p.model, p.device_map, max_memory=p.max_memory, title=title, ax=ax,
                        hf_quantizer=p.hf_quantizer)
    return p


def planner_widget(shape: str = "llama-2-70b", fmt: str = "nf4", n_gpus: int = 2, gib_per_gpu: float = 24,
                   strategy: str = "balanced"):
    """An ipywidgets planner: pick a shape, a format, GPUs and memory; the map and verdict update live.

    Each change calls :func:`show_plan` and redraws. Its output lives in
    widget state, which nbval does not check: call :func:`show_plan` in a
    checked cell for the same view.

    Returns:
        An ``ipywidgets.VBox`` (display it as a cell's last value).

    Raises:
        ImportError: ipywidgets is not installed (``pip install ipywidgets``).
    """
    import ipywidgets as w
    import matplotlib.pyplot as plt

    controls = dict(
        shape=w.Dropdown(options=list(SHAPES), value=shape, description="model"),
        fmt=w.Dropdown(options=list(FORMATS), value=fmt, description="format"),
        n_gpus=w.IntSlider(value=n_gpus, min=1, max=8, description="GPUs"),
        gib_per_gpu=w.Dropdown(options=[8, 12, 16, 24, 40, 48, 80, 94, 141], value=gib_per_gpu,
                               description="GiB / GPU"),
        strategy=w.Dropdown(options=list(STRATEGIES), value=strategy, description="device_map"),
    )

    def draw(**kw):
        show_plan(**kw)
        plt.show()

    out = w.interactive_output(draw, controls)
    return w.VBox([w.HBox([controls["shape"], controls["fmt"], controls["strategy"]]),
                   w.HBox([controls["n_gpus"], controls["gib_per_gpu"]]), out])
