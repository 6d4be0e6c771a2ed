"""Plan a device map for GPUs you don't have, as ``from_pretrained`` would (notebook 03).

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
multiplier; they live in :func:`prepare_meta_model` (step 1) and
:func:`plan_device_map` (steps 2 to 4), which notebook 03 prints and checks
against transformers:

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

import functools
from dataclasses import dataclass, field

import torch

from .devicemap import bytes_per_device, placement, tensor_sizes
from .memory import FORMATS, QUANTIZED, linear_bytes_per_weight
from .quiet import quiet_planning
from .shapes import SHAPES, shape_config
from .units import GiB

STRATEGIES = ("auto", "balanced", "balanced_low_0", "sequential")
"""The string values of ``device_map`` that make transformers plan ("auto" is "balanced")."""


def _quantization_config(fmt: str):
    """The ``BitsAndBytesConfig`` that ``from_pretrained`` would get for ``fmt`` (bf16 compute), or None."""
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


def prepare_meta_model(config, quantization_config=None, dtype: torch.dtype = torch.bfloat16):
    """Build ``config``'s causal LM on the meta device and prepare it as ``from_pretrained`` would.

    With a quantization config, transformers' quantizer replaces the Linear
    layers inside the blocks with bitsandbytes layers (``preprocess_model``),
    exactly as ``from_pretrained`` does before it plans; embeddings, norms and
    the output head keep ``dtype``. Notebook 03 prints this function.

    Returns:
        ``(model, hf_quantizer)``: every tensor on the meta device; the
        quantizer is None without a quantization config, and is also set as
        ``model.hf_quantizer``, as after ``from_pretrained``.

    Raises:
        ImportError: a bitsandbytes config without bitsandbytes installed.
    """
    from transformers import AutoModelForCausalLM
    from transformers.quantizers import AutoHfQuantizer

    with torch.device("meta"):  # ties declared by the config are applied by post_init
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    quantizer = None
    if quantization_config is not None:
        # pre_quantized=False: the checkpoint holds bf16 weights, quantized while loading
        quantizer = AutoHfQuantizer.from_config(quantization_config, pre_quantized=False)
        quantizer.preprocess_model(model=model, dtype=dtype, device_map="auto", checkpoint_files=None,
                                   use_kernels=False)
        model.hf_quantizer = quantizer
    return model.eval(), quantizer


def plan_device_map(model, quantizer, max_memory: dict, strategy: str = "auto") -> tuple[dict, dict]:
    """The map ``from_pretrained(device_map=strategy, max_memory=...)`` computes, without its final check.

    The steps of ``transformers.integrations.accelerate._get_device_map``
    (5.24): balance the budget (or take it whole for "sequential"), let the
    quantizer cut it (bitsandbytes: to 90%), place the modules without
    splitting ``model._no_split_modules``. ``max_memory`` is not changed.
    Notebook 03 prints this function and checks it against transformers.

    Returns:
        ``(device_map, caps)``: the map, and the per-device caps (bytes) the placement used.
    """
    from transformers.integrations.accelerate import get_balanced_memory, get_max_memory, infer_auto_device_map

    no_split = model._no_split_modules
    with quiet_planning():
        if strategy == "sequential":
            caps = get_max_memory(dict(max_memory))
        else:
            caps = get_balanced_memory(model, max_memory=dict(max_memory), no_split_module_classes=no_split,
                                       hf_quantizer=quantizer, low_zero=(strategy == "balanced_low_0"))
        if quantizer is not None:
            caps = quantizer.adjust_max_memory(caps)
        device_map = infer_auto_device_map(model, max_memory=caps, no_split_module_classes=no_split,
                                           hf_quantizer=quantizer,
                                           no_placement_params=getattr(model, "_no_placement_params", None))
    return dict(device_map), {k: int(v) for k, v in caps.items()}


@functools.lru_cache(maxsize=16)
def prepared_model(shape: str, fmt: str):
    """:func:`prepare_meta_model` for a named shape and format, cached (do not modify the returned model).

    Raises:
        ValueError: unknown shape or format.
        ImportError: a quantized format without bitsandbytes installed.
    """
    qconfig = _quantization_config(fmt)
    dtype = {"fp32": torch.float32, "fp16": torch.float16}.get(fmt, torch.bfloat16)
    return prepare_meta_model(shape_config(shape), qconfig, dtype)


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

    def summary(self) -> str:
        """A few lines: the question, the verdict, and each device's modules and bytes (GiB)."""
        spilled = [d for d in ("cpu", "disk") if d in self.device_map.values()]
        verdict = "FITS on the GPUs" if self.fits else "DOES NOT FIT: " + ", ".join(
            f"{sum(1 for v in self.device_map.values() if v == d)} module(s) on {d}" for d in spilled)
        lines = [f"{self.shape}, {self.fmt}, {self.n_gpus} x {self.gib_per_gpu:g} GiB GPUs, "
                 f"device_map={self.strategy!r}: {verdict}"]
        if self.hf_quantizer is not None:
            lines.append(f"  bitsandbytes cuts each budget to 90%: {self.gib_per_gpu:g} GiB -> "
                         f"{0.9 * self.gib_per_gpu:.2f} GiB usable per GPU")
        where = placement(self.model, self.device_map)
        for dev, n in self.bytes_per_device.items():
            extra = ""
            if self.true_bytes_per_device.get(dev, 0) != n:
                extra = f" ({self.true_bytes_per_device[dev] / GiB:.2f} GiB with the quantization scales)"
            name = f"GPU {dev}" if isinstance(dev, int) else dev
            lines.append(f"  {name:>6}: {n / GiB:6.2f} GiB{extra}: {where.get(dev, '')}")
        return "\n".join(lines)


def _true_sizes(model, quantizer, fmt: str, sizes: dict) -> dict:
    """``sizes`` with each quantized weight charged :func:`helpers.memory.linear_bytes_per_weight` (scales included)."""
    if quantizer is None or fmt not in QUANTIZED:
        return sizes
    out = dict(sizes)
    for name, t in model.named_parameters():
        if name in out and quantizer.param_needs_quantization(model, name):
            out[name] = t.numel() * linear_bytes_per_weight(fmt, t.shape[-1])
    return out


def plan(shape: str, fmt: str = "bf16", n_gpus: int = 1, gib_per_gpu: float = 24, strategy: str = "balanced",
         cpu_gib: float | None = None) -> Plan:
    """Plan a device map for ``n_gpus`` GPUs of ``gib_per_gpu`` GiB each, as ``from_pretrained`` would.

    Args:
        shape: a model shape name from :data:`helpers.shapes.SHAPES`
            (e.g. "bloom-1b7", "llama-2-7b", "llama-2-70b").
        fmt: one of :data:`helpers.memory.FORMATS`.
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

    Notebook 03, section 4.
    """
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
    device_map, caps = plan_device_map(model, quantizer, budget, strategy)
    sizes = tensor_sizes(model, hf_quantizer=quantizer)
    return Plan(shape=shape, fmt=fmt, n_gpus=n_gpus, gib_per_gpu=gib_per_gpu, strategy=strategy,
                device_map=device_map, max_memory=budget, effective_memory=caps,
                bytes_per_device=bytes_per_device(model, device_map, sizes),
                true_bytes_per_device=bytes_per_device(model, device_map, _true_sizes(model, quantizer, fmt, sizes)),
                fits=all(isinstance(d, int) for d in device_map.values()), model=model, hf_quantizer=quantizer)


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
        The :class:`Plan`. Raises as :func:`plan`. Notebook 03, section 6.
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

    Notebook 03, section 6.
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
