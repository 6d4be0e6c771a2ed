"""Plan a device map for GPUs you don't have, as ``from_pretrained`` would (notebook 03).

:func:`plan` takes a model (a shape name from :data:`helpers.shapes.SHAPES`,
any transformers config, a local checkpoint directory, or a hub id), a storage
format, a number of GPUs and their memory, a context length and a batch, and
returns the map ``from_pretrained(..., device_map=strategy, max_memory=...)``
would compute, with the bytes per device and a verdict that counts weights,
the KV cache and a per-GPU reserve (CUDA context and activations, measured on
a GPU: ``gpu-reference/one-gpu/reserve.json``), and the longest context that
fits at that batch.
:func:`show_plan` prints and draws it; :mod:`helpers.planner_widget` wraps it in
ipywidgets for live exploration.

Everything happens on the meta device (no weight bytes are allocated; a
70B plan takes well under a second) and never touches a GPU, so it runs on
a machine without one.

The steps are transformers' own (5.24, ``from_pretrained`` ->
``transformers.integrations.accelerate._get_device_map``), not a global
multiplier; they live in :func:`_prepare_meta_model` (step 1) and
:func:`_plan_device_map` (steps 2 to 4), which notebook 03 writes out in its own
cells (``prepare`` and ``place``) and checks against transformers:

1. The model is built on the meta device in the load dtype (bf16 unless the
   format is fp32 or fp16); for a quantized format transformers' quantizer
   (``AutoHfQuantizer``) replaces the Linear (and GPT-2 ``Conv1D``) layers
   inside the blocks with bitsandbytes layers exactly as ``from_pretrained``
   does (``preprocess_model``); embeddings, norms and the output head keep the
   load dtype (not a 4-bit layer's compute dtype).
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
adds them back (the formulas of :mod:`helpers.memory`). Neither figure holds
activations, the KV cache or the CUDA context: the verdict adds those.

:func:`predict_footprint` (notebooks 00 and 01) asks the same prepared meta
model and the same quantizer which weights a format quantizes, so the
footprint it predicts and a plan's ``total_true_bytes`` are one answer: there
is no second list of "quantizable" layers anywhere in the workbook.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from .devicemap import STRATEGIES, bytes_per_device, device_of, placement, tensor_sizes
from .memory import FORMATS, QUANTIZED, kv_cache_layers, linear_bytes_per_weight
from .quiet import quiet_planning
from .shapes import SHAPES, as_config
from .text import wrap
from .units import GiB

if TYPE_CHECKING:
    from matplotlib.axes import Axes
    from transformers import PretrainedConfig, PreTrainedModel
    from transformers.quantizers import HfQuantizer
    from transformers.utils.quantization_config import QuantizationConfigMixin


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


def _prepare_meta_model(config: PretrainedConfig, quantization_config: QuantizationConfigMixin | None = None,
                        dtype: torch.dtype = torch.bfloat16) -> tuple[PreTrainedModel, HfQuantizer | None]:
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


def _plan_device_map(model: PreTrainedModel, quantizer: HfQuantizer | None, max_memory: dict,
                     strategy: str = "auto") -> tuple[dict, dict]:
    """The map ``from_pretrained(device_map=strategy, max_memory=...)`` computes, without its final check.

    The steps of ``transformers.integrations.accelerate._get_device_map``
    (5.24): balance the budget (or take it whole for "sequential"), let the
    quantizer cut it (bitsandbytes: to 90%), place the modules without
    splitting ``model._no_split_modules``. ``max_memory`` is not changed.
    Notebook 03 prints this function and checks it against transformers.

    Returns:
        ``(device_map, caps)``: the map, and the per-device caps (bytes) the placement used.
    """
    from transformers.integrations.accelerate import (get_balanced_memory, get_max_memory,
                                                      infer_auto_device_map)

    no_split = model._no_split_modules
    with quiet_planning():
        if strategy == "sequential":
            caps = get_max_memory(dict(max_memory))
        else:
            caps = get_balanced_memory(model, max_memory=dict(max_memory),
                                       no_split_module_classes=no_split, hf_quantizer=quantizer,
                                       low_zero=(strategy == "balanced_low_0"))
        if quantizer is not None:
            caps = quantizer.adjust_max_memory(caps)
        no_placement = getattr(model, "_no_placement_params", None)
        device_map = infer_auto_device_map(model, max_memory=caps, no_split_module_classes=no_split,
                                           hf_quantizer=quantizer, no_placement_params=no_placement)
    return dict(device_map), {k: int(v) for k, v in caps.items()}


def _load_config(model):
    """The config behind a planner question, and a short label for it.

    Args:
        model: a shape name of :data:`helpers.shapes.SHAPES`, a transformers
            config object, a local checkpoint directory (only its
            ``config.json`` is read), or a hub id (only its config is fetched,
            which needs internet and ``HF_HUB_OFFLINE=0``).

    Returns:
        ``(label, config)``.

    Raises:
        ValueError: a directory without ``config.json``, a hub id while
            offline or unknown, or anything else; the message says what to
            pass instead. Notebook 03 explains it.
    """
    from transformers import AutoConfig, PretrainedConfig

    accepted = (f"a shape name ({', '.join(SHAPES)}), a transformers config object (e.g. MistralConfig(...)), "
                f"or a local checkpoint directory holding config.json")
    if isinstance(model, PretrainedConfig):
        return f"{type(model).__name__}({model.model_type})", model
    if not isinstance(model, (str, os.PathLike)):
        raise ValueError(f"cannot plan {type(model).__name__} {model!r}: pass {accepted}")
    text = os.fspath(model)
    if text in SHAPES:
        return text, as_config(text)
    path = Path(text).expanduser()
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise ValueError(f"{path} has no config.json: pass {accepted}")
        return path.name, AutoConfig.from_pretrained(path)
    try:
        return text, AutoConfig.from_pretrained(text)
    except (OSError, ValueError) as e:
        offline = os.environ.get("HF_HUB_OFFLINE", "0") not in ("0", "", "false", "False")
        why = "the hub is off (HF_HUB_OFFLINE is set)" if offline else f"it could not be read ({type(e).__name__})"
        raise ValueError(f"{text!r} is not a shape name or a local folder, and as a hub id {why}: pass {accepted}, "
                         f"or set HF_HUB_OFFLINE=0 on a machine with internet") from None


_PREPARED: dict = {}


def _default_dtype(fmt: str) -> torch.dtype:
    """The load dtype a format implies: fp32 and fp16 their own, everything else bf16."""
    return {"fp32": torch.float32, "fp16": torch.float16}.get(fmt, torch.bfloat16)


def _prepared_model(model, fmt: str, dtype: torch.dtype | None = None):
    """:func:`_prepare_meta_model` for a planner question's model and format, cached (do not modify the result).

    ``model`` is anything :func:`_load_config` takes; ``dtype`` the load dtype
    (None: :func:`_default_dtype`). Returns ``(model, hf_quantizer)`` with every
    tensor on the meta device.

    Raises:
        ValueError: unknown format, a ``dtype`` that contradicts an unquantized
            format, or a model :func:`_load_config` refuses.
        ImportError: a quantized format without bitsandbytes installed.
    """
    qconfig = _quantization_config(fmt)
    if dtype is None:
        dtype = _default_dtype(fmt)
    elif qconfig is None and dtype != _default_dtype(fmt):
        raise ValueError(f"format {fmt!r} is itself a dtype; dtype={dtype} contradicts it (pass dtype only with "
                         f"int8, nf4 or nf4-dq: the dtype of the modules they leave unquantized)")
    _, config = _load_config(model)
    key = (config.to_json_string(use_diff=False), fmt, str(dtype))
    if key not in _PREPARED:
        if len(_PREPARED) >= 16:
            _PREPARED.pop(next(iter(_PREPARED)))
        _PREPARED[key] = _prepare_meta_model(config, qconfig, dtype)
    return _PREPARED[key]


def _quantized_bytes(model, quantizer, fmt: str) -> dict[str, float]:
    """{weight name: bytes with its scales} of every weight ``quantizer`` quantizes in a prepared meta model.

    The quantizer decides (``param_needs_quantization``, after ``preprocess_model``
    replaced the layers); each such weight costs
    :func:`helpers.memory.linear_bytes_per_weight` of its input size (the
    replaced layer's weight is ``(out_features, in_features)``). Empty for an
    unquantized format. The one answer behind :func:`plan` and :func:`predict_footprint`.
    """
    if quantizer is None or fmt not in QUANTIZED:
        return {}
    return {name: t.numel() * linear_bytes_per_weight(fmt, t.shape[-1]) for name, t in model.named_parameters()
            if quantizer.param_needs_quantization(model, name)}


def predict_footprint(model: torch.nn.Module | PretrainedConfig | str | os.PathLike, fmt: str,
                      dtype: torch.dtype | None = None) -> int:
    """Predict the weight bytes of ``model`` loaded by ``from_pretrained`` in ``fmt`` (scales included).

    The weights transformers' own quantizer quantizes (asked on a meta copy
    prepared as ``from_pretrained`` prepares it: :func:`_prepare_meta_model`,
    the same question :func:`plan` asks) cost
    :func:`helpers.memory.linear_bytes_per_weight` each, scales included;
    every other parameter (embeddings, norms, the head, biases, ...) keeps
    the load dtype ``dtype``. Tied parameters count once; buffers are left
    out (``get_memory_footprint()`` adds them). Nothing is allocated.

    Args:
        model: a loaded model (its ``config`` is used), or anything
            :func:`plan` takes (a shape name, a config, a checkpoint directory).
        fmt: one of :data:`helpers.memory.FORMATS`.
        dtype: the load dtype (``from_pretrained(..., dtype=)``); None: the
            format's own for fp32/fp16/bf16, bf16 for the quantized formats.

    Returns:
        Bytes (int).

    Raises:
        ValueError: an unknown format, a ``dtype`` that contradicts an
            unquantized format, or a model :func:`plan` would refuse.

    Explained in notebook 00 (predicted against measured); used again in notebook 01.
    """
    config = model.config if isinstance(model, torch.nn.Module) else model
    meta, quantizer = _prepared_model(config, fmt, dtype)
    quantized = _quantized_bytes(meta, quantizer, fmt)
    total = sum(quantized.get(n, p.numel() * p.element_size()) for n, p in meta.named_parameters())
    return int(round(total))


RESERVE_FILE = Path(__file__).resolve().parent.parent / "gpu-reference" / "one-gpu" / "reserve.json"
"""The per-GPU reserve measured on a GPU by ``gpu-reference/tools/measure_reserve.py``."""


def _measured_reserve() -> tuple[int, str]:
    """The per-GPU reserve in bytes and a sentence naming where it was measured.

    Raises:
        FileNotFoundError: no measurement committed; the message says how to make one.
    """
    if not RESERVE_FILE.is_file():
        raise FileNotFoundError(f"no measured reserve at {RESERVE_FILE}: run gpu-reference/tools/measure_reserve.py "
                                f"on a GPU, or pass reserve_gib=")
    r = json.loads(RESERVE_FILE.read_text())
    source = (f"measured on {r['gpu']} (torch {r['hardware']['torch']}): {r['context_bytes'] / GiB:.2f} GiB CUDA "
              f"context + {r['activation_bytes'] / GiB:.2f} GiB activations, gpu-reference/one-gpu/reserve.json")
    return int(r["reserve_bytes"]), source


def _layer_names(model) -> list[str]:
    """The decoder layers (no-split blocks in a numbered list), in order: e.g. ``model.layers.0``, ..."""
    keep = set(getattr(model, "_no_split_modules", None) or [])
    return [n for n, m in model.named_modules() if type(m).__name__ in keep and n.rsplit(".", 1)[-1].isdigit()]


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
        context, batch: tokens of context (prompt plus generated) and
            sequences in flight the verdict makes room for.
        kv_bytes_per_device: {GPU id: bytes} of KV cache, each layer's beside
            it (:func:`helpers.memory.kv_cache_layers`, bf16 cache).
        reserve_bytes, reserve_source: the per-GPU reserve (CUDA context and
            activations) and where that figure comes from.
        needed_bytes_per_device: {GPU id: weights with scales + KV cache + reserve}.
        on_gpus: True when every module landed on a GPU.
        fits: ``on_gpus`` and every GPU's needed bytes within its budget.
        max_context: the longest context (tokens) that fits at ``batch`` with
            this map (0 when the weights alone do not fit), at most the
            model's ``max_position_embeddings``; ``max_context_capped`` says
            whether that cap, not memory, set it.
        model, hf_quantizer: the meta model planned and its quantizer (None
            when unquantized), for drawing and checking.

    Notebook 03.
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
    context: int
    batch: int
    kv_bytes_per_device: dict
    reserve_bytes: int
    reserve_source: str
    needed_bytes_per_device: dict
    on_gpus: bool
    fits: bool
    max_context: int
    max_context_capped: bool
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
        """A few lines: the question, the verdict, each device's modules and bytes (GiB), the longest context.

        Lines are wrapped at words to :data:`helpers.text.LINE_WIDTH` characters. Notebook 03, section 6.
        """
        spilled = [d for d in ("cpu", "disk") if d in self.device_map.values()]
        if not self.on_gpus:
            verdict = "DOES NOT FIT: " + ", ".join(
                f"{sum(1 for v in self.device_map.values() if v == d)} module(s) on {d}" for d in spilled)
        else:
            over = [d for d, n in self.needed_bytes_per_device.items() if n > self.max_memory[d]]
            verdict = "FITS on the GPUs" if self.fits else (
                "DOES NOT FIT: weights fit, but with the KV cache and the reserve "
                + ", ".join(f"GPU {d}" for d in over) + " run over")
        lines = [f"{self.shape}, {self.fmt}, {self.n_gpus} x {self.gib_per_gpu:g} GiB GPUs, "
                 f"device_map={self.strategy!r}, context {self.context:,} x batch {self.batch}: {verdict}"]
        if self.hf_quantizer is not None:
            lines.append(f"  bitsandbytes cuts each budget to 90% while placing: {self.gib_per_gpu:g} GiB -> "
                         f"{0.9 * self.gib_per_gpu:.2f} GiB per GPU")
        lines.append(f"  reserve per GPU {self.reserve_bytes / GiB:.2f} GiB ({self.reserve_source})")
        where = placement(self.model, self.device_map)
        for dev, n in self.bytes_per_device.items():
            name = f"GPU {dev}" if isinstance(dev, int) else dev
            line = f"  {name:>6}: weights {self.true_bytes_per_device.get(dev, n) / GiB:6.2f} GiB"
            if dev in self.needed_bytes_per_device:
                line += (f" + KV cache {self.kv_bytes_per_device.get(dev, 0) / GiB:.2f} + reserve = "
                         f"{self.needed_bytes_per_device[dev] / GiB:.2f} of {self.max_memory[dev] / GiB:g} GiB")
            lines.append(f"{line}: {where.get(dev, '')}")
        cap = " (the model's max_position_embeddings)" if self.max_context_capped else ""
        lines.append(f"  longest context that fits at batch {self.batch}: {self.max_context:,} tokens{cap}")
        return wrap("\n".join(lines))  # each line fits a JupyterLab output line (helpers.text)


def _true_sizes(model, quantizer, fmt: str, sizes: dict) -> dict:
    """``sizes`` with each quantized weight charged its bytes with scales (:func:`_quantized_bytes`)."""
    out = dict(sizes)
    out.update({n: b for n, b in _quantized_bytes(model, quantizer, fmt).items() if n in out})
    return out


def _number(name: str, value, low: float = 0.0, allow_none: bool = False):
    """A finite real number above ``low`` (GiB counts, ...), else a ValueError naming the parameter."""
    import math

    if value is None and allow_none:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value <= low:
        raise ValueError(f"{name} must be a finite number above {low:g}, not {value!r}"
                         + (" (give a number of GiB, e.g. 24, not a string)" if isinstance(value, str) else ""))
    return value


def _max_context(config, layers_on: dict, free: dict, batch: int) -> tuple[int, bool]:
    """Longest context whose KV cache fits each GPU's free bytes (binary search), and whether the model's limit
    capped it."""
    limit = getattr(config, "max_position_embeddings", None) or getattr(config, "n_positions", None) or 2**20

    def fits(tokens: int) -> bool:
        per_layer = kv_cache_layers(config, tokens, batch)
        return all(sum(per_layer[i] for i in layers_on.get(d, [])) <= room for d, room in free.items())

    if not free or any(room < 0 for room in free.values()) or not fits(0):
        return 0, False
    if fits(limit):
        return int(limit), True
    lo, hi = 0, int(limit)
    while hi - lo > 1:
        mid = (lo + hi) // 2
        lo, hi = (mid, hi) if fits(mid) else (lo, mid)
    return lo, False


def plan(model: PretrainedConfig | str | os.PathLike, fmt: str = "bf16", n_gpus: int = 1, gib_per_gpu: float = 24,
         strategy: str = "balanced", cpu_gib: float | None = None, context: int = 4096, batch: int = 1,
         reserve_gib: float | None = None) -> Plan:
    """Plan a device map for ``n_gpus`` GPUs of ``gib_per_gpu`` GiB each, as ``from_pretrained`` would, with room
    for the KV cache of ``batch`` sequences of ``context`` tokens and a per-GPU reserve.

    Args:
        model: a shape name from :data:`helpers.shapes.SHAPES` (e.g.
            "llama-2-70b"), any transformers config of a decoder-only model
            (``MistralConfig(...)``), a local checkpoint directory (only its
            ``config.json`` is read) or a hub id (config only; needs internet).
        fmt: one of :data:`helpers.memory.FORMATS`.
        n_gpus: number of GPUs (1 to 64); they need not exist here.
        gib_per_gpu: memory per GPU, in GiB (2**30 bytes).
        strategy: one of :data:`STRATEGIES` (the string you would pass as ``device_map``).
        cpu_gib: RAM allowed for CPU offload (GiB); None (default) allows
            none, so what does not fit on the GPUs goes to "disk".
        context: tokens of context per sequence (prompt plus generated), >= 0.
        batch: sequences in flight, >= 1.
        reserve_gib: GiB kept free on each GPU for the CUDA context and
            activations; None: the reserve measured on a GPU
            (:func:`_measured_reserve`).

    Returns:
        A :class:`Plan`. ``plan.fits`` is False when any module lands on
        "cpu" or "disk" (a bitsandbytes model would then be refused by
        ``from_pretrained``; a bf16 one would load, slowly, with offload), or
        when weights + KV cache + reserve exceed a GPU's budget.
        ``plan.max_context`` is the longest context that fits at ``batch``.

    Raises:
        ValueError: unknown model, format or strategy, ``n_gpus`` outside
            1..64, a ``gib_per_gpu``/``cpu_gib``/``reserve_gib`` that is not a
            finite positive number, a negative context or a batch below 1.
        FileNotFoundError: ``reserve_gib=None`` and no measured reserve.
        ImportError: a quantized format without bitsandbytes installed.

    Notebook 03, section 4.
    """
    if strategy not in STRATEGIES:
        raise ValueError(f"unknown strategy {strategy!r}; choose one of {', '.join(STRATEGIES)}")
    if isinstance(n_gpus, bool) or not isinstance(n_gpus, int) or not 1 <= n_gpus <= 64:
        raise ValueError(f"n_gpus must be an integer from 1 to 64, not {n_gpus!r}")
    _number("gib_per_gpu", gib_per_gpu)
    _number("cpu_gib", cpu_gib, allow_none=True)
    if isinstance(context, bool) or not isinstance(context, int) or context < 0:
        raise ValueError(f"context must be a whole number of tokens >= 0, not {context!r}")
    if isinstance(batch, bool) or not isinstance(batch, int) or batch < 1:
        raise ValueError(f"batch must be a whole number >= 1, not {batch!r}")
    if reserve_gib is None:
        reserve, source = _measured_reserve()
    else:
        reserve, source = int(_number("reserve_gib", reserve_gib, low=-1e-12) * GiB), "given"
    label, config = _load_config(model)
    meta, quantizer = _prepared_model(config, fmt)
    budget = {i: int(gib_per_gpu * GiB) for i in range(n_gpus)}
    if cpu_gib is not None:
        budget["cpu"] = int(cpu_gib * GiB)
    device_map, caps = _plan_device_map(meta, quantizer, budget, strategy)
    sizes = tensor_sizes(meta, hf_quantizer=quantizer)
    planned = bytes_per_device(meta, device_map, sizes)
    true = bytes_per_device(meta, device_map, _true_sizes(meta, quantizer, fmt, sizes))
    layers_on: dict = {}
    for i, name in enumerate(_layer_names(meta)):
        layers_on.setdefault(device_of(name, device_map), []).append(i)
    per_layer = kv_cache_layers(config, context, batch)
    gpus = range(n_gpus)
    kv = {d: sum(per_layer[i] for i in layers_on.get(d, [])) for d in gpus}
    needed = {d: true.get(d, 0) + kv[d] + reserve for d in gpus}
    on_gpus = all(isinstance(d, int) for d in device_map.values())
    free = {d: budget[d] - true.get(d, 0) - reserve for d in gpus} if on_gpus else {}
    longest, capped = _max_context(config, layers_on, free, batch)
    return Plan(shape=label, fmt=fmt, n_gpus=n_gpus, gib_per_gpu=gib_per_gpu, strategy=strategy,
                device_map=device_map, max_memory=budget, effective_memory=caps, bytes_per_device=planned,
                true_bytes_per_device=true, context=context, batch=batch, kv_bytes_per_device=kv,
                reserve_bytes=reserve, reserve_source=source, needed_bytes_per_device=needed, on_gpus=on_gpus,
                fits=on_gpus and all(needed[d] <= budget[d] for d in gpus), max_context=longest,
                max_context_capped=capped, model=meta, hf_quantizer=quantizer)


def show_plan(model: PretrainedConfig | str | os.PathLike, fmt: str = "bf16", n_gpus: int = 1,
              gib_per_gpu: float = 24, strategy: str = "balanced", cpu_gib: float | None = None, context: int = 4096,
              batch: int = 1, reserve_gib: float | None = None, ax: Axes | tuple[Axes, Axes] | None = None,
              draw: bool = True) -> Plan:
    """Plan (see :func:`plan`, same arguments), print :meth:`Plan.summary` and draw the map.

    The drawing is :func:`helpers.devicemap.plot_device_map`: which layers
    sit on which device, and bytes of weights per device (transformers'
    accounting) against the budget given (before the 90% cut). It is not
    shown here: call ``plt.show()`` after (a notebook shows it at the end of
    the cell).

    Args:
        ax: passed to ``plot_device_map`` (None: a new figure).
        draw: False to print only.

    Returns:
        The :class:`Plan`. Raises as :func:`plan`. Notebook 03, section 6.
    """
    from .devicemap import plot_device_map

    p = plan(model, fmt, n_gpus, gib_per_gpu, strategy, cpu_gib, context, batch, reserve_gib)
    print(p.summary())
    if draw:
        plot_device_map(p.model, p.device_map, max_memory=p.max_memory, title=plan_title(p), ax=ax,
                        hf_quantizer=p.hf_quantizer, stacked=plan_stacked(p))
    return p


def plan_stacked(p: Plan) -> dict:
    """What a plan's drawing stacks on each GPU's weights: {"KV cache": {GPU: bytes}, "reserve": {GPU: bytes}}.

    Empty when the weights do not all land on GPUs (then the KV cache is not counted). Notebook 03.
    """
    if not p.on_gpus:
        return {}
    return {"KV cache": dict(p.kv_bytes_per_device), "reserve": {d: p.reserve_bytes for d in range(p.n_gpus)}}


def plan_title(p: Plan) -> str:
    """The title :func:`show_plan` and the planner widget give a plan's drawing: the question and the verdict."""
    verdict = "fits" if p.fits else "does not fit"
    return (f"{p.shape} {p.fmt} on {p.n_gpus} x {p.gib_per_gpu:g} GiB ({p.strategy}), "
            f"{p.context:,} tokens x {p.batch}: {verdict}")
