"""Plan a device map for GPUs you don't have, as ``from_pretrained`` would (notebooks 03 and 05).

:func:`plan` takes a model (a shape name from :data:`helpers.shapes.SHAPES`,
any transformers config, a local checkpoint directory, or a hub id), a storage
format, a number of GPUs and their memory, a context length, a batch and a
prompt length, and returns the map ``from_pretrained(..., device_map=strategy,
max_memory=...)`` would compute, with the bytes per device and a verdict that
counts every term that must fit (notebook 05): weights with their quantization
scales, the KV cache, a per-GPU reserve (the CUDA context, measured on a GPU:
``gpu-reference/one-gpu/reserve.json``), the prefill activation peak of the
prompt (:func:`helpers.memory.prefill_peak_bytes`) and the load peak
(:func:`helpers.memory.load_peak_bytes`); the term that binds; the longest
context that fits at that batch; with ``offload=True``, what the part on
"cpu"/"disk" needs in RAM and on disk and the predicted seconds per token
(:func:`helpers.offload.offload_seconds_per_token`).
:func:`show_plan` prints and draws it; :mod:`helpers.planner_widget` wraps it in
ipywidgets for live exploration.

Everything happens on the meta device (no weight bytes are allocated; a
70B plan takes seconds the first time a shape and format are asked, well
under a second after) and never touches a GPU, so it runs on a machine
without one.

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
adds them back (the formulas of :mod:`helpers.memory`); printed, each figure
is labelled (:func:`weights_label`: "weights with NF4 scales" against
"weights, transformers' count (0.5 byte per 4-bit weight)"). Neither figure
holds activations, the KV cache or the CUDA context: the verdict adds those.
With ``llm_int8_enable_fp32_cpu_offload=True`` and a map as a dict, modules on
"cpu"/"disk" stay unquantized in the load dtype: a plan charges them so.

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
from .memory import (FORMATS, QUANTIZED, kv_cache_layers, linear_bytes_per_weight, load_host_bytes, load_peak_bytes,
                     prefill_terms)
from .quiet import quiet_planning
from .shapes import SHAPES, as_config
from .text import wrap
from .units import GiB, MiB

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
        ValueError: ``config`` is not a causal language model's (a ``CLIPConfig``, a vision model, ...): the
            message names what to use instead.
    """
    from transformers import AutoModelForCausalLM
    from transformers import MODEL_FOR_CAUSAL_LM_MAPPING
    from transformers.quantizers import AutoHfQuantizer

    if type(config) not in MODEL_FOR_CAUSAL_LM_MAPPING:
        raise ValueError(
            f"the planner sizes causal language models (what AutoModelForCausalLM builds); {type(config).__name__} "
            f"is not one. For OpenCLIP and CLIP (a two-tower model without a KV cache) use "
            f"helpers.clip.predict_clip_footprint and helpers.clip.tower_map (notebook 09); for another model, "
            f"build it on the meta device and pass it to helpers.preflight.preflight with your map.")
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
    """The per-GPU reserve in bytes (the CUDA context and cuBLAS workspace) and a sentence naming where it was measured.

    The file also holds the activations of its run (``activation_bytes``); the planner counts activations as a
    term of their own (:func:`helpers.memory.prefill_peak_bytes`), so the reserve is the context alone.

    Raises:
        FileNotFoundError: no measurement committed; the message says how to make one.
    """
    if not RESERVE_FILE.is_file():
        raise FileNotFoundError(f"no measured reserve at {RESERVE_FILE}: run gpu-reference/tools/measure_reserve.py "
                                f"on a GPU, or pass reserve_gib=")
    r = json.loads(RESERVE_FILE.read_text())
    source = (f"CUDA context and cuBLAS workspace measured on {r['gpu']} (torch {r['hardware']['torch']}), "
              f"gpu-reference/one-gpu/reserve.json")
    return int(r["context_bytes"]), source


def _layer_names(model) -> list[str]:
    """The decoder layers (no-split blocks in a numbered list), in order: e.g. ``model.layers.0``, ..."""
    keep = set(getattr(model, "_no_split_modules", None) or [])
    return [n for n, m in model.named_modules() if type(m).__name__ in keep and n.rsplit(".", 1)[-1].isdigit()]


BINDINGS = ("weights", "reserve", "KV cache", "prefill activations", "load peak", "max_position_embeddings",
            "host RAM")
"""The terms :attr:`Plan.binding` names."""

WEIGHTS_WITH_SCALES = "weights with NF4/int8 scales"
WEIGHTS_TRANSFORMERS = "weights, transformers' count (0.5 byte per 4-bit weight, 1 per 8-bit weight, no scales)"
"""The two labels of "weights" (notebook 05): what a load really allocates, and what transformers' placement counts."""


def weights_label(fmt: str, counted: str = "true") -> str:
    """The label printed beside a weights figure: ``"weights with NF4 scales"``, ``"weights, transformers' count
    (0.5 byte per 4-bit weight)"``, or plain ``"weights"`` for an unquantized format (both counts agree).

    ``counted``: "true" (scales included, :attr:`Plan.true_bytes_per_device`) or "transformers"
    (:attr:`Plan.bytes_per_device`). Notebook 05.
    """
    if counted not in ("true", "transformers"):
        raise ValueError(f"counted must be 'true' or 'transformers', not {counted!r}")
    if fmt not in QUANTIZED:
        return "weights"
    kind = "int8" if fmt == "int8" else "NF4"
    if counted == "true":
        return f"weights with {kind} scales"
    return f"weights, transformers' count ({'1 byte per 8-bit' if fmt == 'int8' else '0.5 byte per 4-bit'} weight)"


DEFAULT_DISK_RATE = 2.0e9
"""Bytes/s assumed for reading offloaded weights from disk when no rate is given (an NVMe SSD's order of
magnitude, not a measurement: measure yours with :func:`helpers.offload.disk_read_rate`)."""


def reference_rates() -> dict:
    """The rates :func:`plan` predicts seconds per token with by default, and where each comes from.

    ``gpu_bandwidth`` and ``h2d_rate`` (pageable: accelerate's hooks copy from ordinary memory) from the one-GPU
    reference, ``gpu-reference/one-gpu/results.json`` (an H200 machine), read with
    ``helpers.reference.reference_results``; ``disk_rate`` is :data:`DEFAULT_DISK_RATE` (assumed). Returns
    ``{"gpu_bandwidth", "h2d_rate", "disk_rate": bytes/s, "source": str}``; without the reference file, the GPU
    rates are None and ``source`` says so. Notebook 05.
    """
    from .reference import reference_results

    try:
        ref = reference_results("one-gpu")
        gpu = ref["hardware"]["gpus"][0][0]
        return {"gpu_bandwidth": ref["bandwidth"]["GBps"] * 1e9, "h2d_rate": ref["h2d"]["pageable_GBps"] * 1e9,
                "disk_rate": DEFAULT_DISK_RATE,
                "source": f"GPU bandwidth and pageable host-to-device copy measured on one {gpu} "
                          f"(gpu-reference/one-gpu/results.json); disk {DEFAULT_DISK_RATE / 1e9:g} GB/s assumed"}
    except (FileNotFoundError, KeyError, IndexError):
        return {"gpu_bandwidth": None, "h2d_rate": None, "disk_rate": DEFAULT_DISK_RATE,
                "source": "no one-GPU reference results: pass rates= to predict seconds per token"}


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
            the placement used: 0.5 byte per 4-bit weight, no scales).
        true_bytes_per_device: {device: bytes} with the quantization scales
            added (equal to ``bytes_per_device`` when unquantized). For a
            quantized format, modules on "cpu"/"disk" are charged in the load
            dtype: with ``llm_int8_enable_fp32_cpu_offload=True`` and this map
            as a dict, transformers leaves them unquantized.
        context, batch: tokens of context (prompt plus generated) and
            sequences in flight the verdict makes room for.
        prompt: tokens prefilled at once (the prefill activation term).
        kv_bytes_per_device: {GPU id: bytes} of KV cache, each layer's beside
            it (:func:`helpers.memory.kv_cache_layers`, bf16 cache); the
            layers offloaded to "cpu"/"disk" keep theirs on the main GPU (the
            first in the map), where accelerate runs them.
        reserve_bytes, reserve_source: the per-GPU reserve (CUDA context) and
            where that figure comes from.
        prefill_bytes_per_device: {GPU id: bytes}: the prefill activation peak
            (:func:`helpers.memory.prefill_peak_bytes`) on every GPU that runs
            decoder layers (GPU 0 also runs offloaded ones); 0 elsewhere.
        needed_bytes_per_device: {GPU id: weights with scales + KV cache +
            reserve + prefill activations}.
        load_peak_bytes: {GPU id: peak while ``from_pretrained`` loads (and
            quantizes) its weights, reserve included; "cpu": host RAM held at
            the load's peak, offloaded weights included, for a checkpoint
            stored in the load dtype}
            (:func:`helpers.memory.load_peak_bytes`, :func:`helpers.memory.load_host_bytes`).
        cpu_bytes, disk_bytes: weights offloaded to RAM and to disk.
        ram_needed_bytes: host RAM the offloaded part needs (``cpu_bytes`` and
            the load's host peak, the larger of the two moments).
        disk_needed_bytes: room the offload folder may need: ``disk_bytes``,
            written there for a checkpoint that is not safetensors or whose
            weights a conversion changes; a safetensors checkpoint is read in
            place (transformers 5.24 indexes its own files; nothing written).
        on_gpus: True when every module landed on a GPU.
        fits: ``on_gpus``, ``context`` within ``max_position_embeddings``, and
            every GPU's needed bytes and load peak within its budget.
        runs: ``fits``, or (with ``offload=True``) the GPU part fits with
            the rest on "cpu"/"disk": runs with offload, at ``seconds_per_token``.
        binding: which term binds (one of :data:`BINDINGS`): a context above
            the cap first; then for weights that spill (without ``offload``)
            "weights"; else the first term that takes a GPU over its budget
            (in the order weights, reserve, KV cache, prefill activations, load
            peak); else "host RAM" when the offloaded part needs more than
            ``cpu_gib``; "weights" for a plan that runs with offload; for one
            that fits, what sets ``max_context`` ("KV cache", or the cap).
        max_context: the longest context (tokens) that fits at ``batch`` with
            this map, every term counted (0 when the rest alone does not fit),
            at most the model's ``max_position_embeddings``;
            ``max_context_capped`` says whether that cap, not memory, set it.
        seconds_per_token: :func:`helpers.offload.offload_seconds_per_token`'s
            terms at ``context`` (batch 1), with ``rates`` and their ``assumptions``.
        rates: {"gpu_bandwidth", "h2d_rate", "disk_rate": bytes/s, "source"}.
        placement_memory: the ``max_memory`` the map was placed with: the
            budget, or with ``offload=True`` the budget lowered until the GPU
            part fits with every term (pass it to ``from_pretrained``).
        model, hf_quantizer: the meta model planned and its quantizer (None
            when unquantized), for drawing and checking.

    Notebooks 03 and 05.
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
    prompt: int = 0
    prefill_bytes_per_device: dict = field(default_factory=dict)
    load_peak_bytes: dict = field(default_factory=dict)
    cpu_bytes: int = 0
    disk_bytes: int = 0
    ram_needed_bytes: int = 0
    disk_needed_bytes: int = 0
    runs: bool = False
    offload: bool = False
    binding: str = "weights"
    max_position_embeddings: int | None = None
    seconds_per_token: dict = field(default_factory=dict)
    rates: dict = field(default_factory=dict)
    placement_memory: dict = field(default_factory=dict)

    @property
    def total_bytes(self) -> int:
        """All weights in transformers' accounting (bytes)."""
        return sum(self.bytes_per_device.values())

    @property
    def total_true_bytes(self) -> int:
        """All weights with the quantization scales (bytes)."""
        return sum(self.true_bytes_per_device.values())

    def verdict(self) -> str:
        """One phrase: "FITS on the GPUs", "RUNS WITH OFFLOAD at 1.23 s per token", or "DOES NOT FIT: <why>"."""
        if self.max_position_embeddings is not None and self.context > self.max_position_embeddings:
            return (f"DOES NOT FIT: context {self.context:,} is above the model's max_position_embeddings "
                    f"({self.max_position_embeddings:,})")
        if self.fits:
            return "FITS on the GPUs"
        spilled = [d for d in ("cpu", "disk") if d in self.device_map.values()]
        where = ", ".join(f"{sum(1 for v in self.device_map.values() if v == d)} module(s) on {d}" for d in spilled)
        if self.runs:
            s = self.seconds_per_token.get("seconds_per_token")
            at = f" at {s:.3g} s per token (predicted)" if s else ""
            return f"RUNS WITH OFFLOAD{at}: {where}"
        if self.binding == "host RAM":
            return (f"DOES NOT FIT: the offloaded part needs {self.ram_needed_bytes / GiB:.2f} GiB of RAM, above "
                    f"cpu_gib={self.max_memory['cpu'] / GiB:g}: " + where)
        if not self.on_gpus and self.binding == "weights":
            return "DOES NOT FIT: " + where + ("" if self.offload else " (offload=True to plan running with offload)")
        over = [d for d in range(self.n_gpus) if max(self.needed_bytes_per_device[d],
                                                     self.load_peak_bytes.get(d, 0)) > self.max_memory[d]]
        gpus = ", ".join(f"GPU {d}" for d in over) or "a GPU"
        return (f"DOES NOT FIT: with the {self.binding}, {gpus} run{'s' if len(over) == 1 else ''} over budget"
                + (f" ({where} with offload)" if where else ""))

    def summary(self) -> str:
        """Lines: the verdict and the binding term first, the question, the reserve, each device's terms (GiB),
        load peak, host needs,
        predicted seconds per token, the longest context. Each weights figure is labelled (with scales, or
        transformers' count). Wrapped at words to :data:`helpers.text.LINE_WIDTH`. Notebooks 03 and 05.
        """
        lines = [f"{self.verdict()} (binding: {self.binding})",
                 f"  {self.shape}, {self.fmt}, {self.n_gpus} x {self.gib_per_gpu:g} GiB GPUs, "
                 f"device_map={self.strategy!r}, context {self.context:,} x batch {self.batch}, prompt "
                 f"{self.prompt:,} tokens"]
        if self.hf_quantizer is not None:
            lines.append(f"  bitsandbytes cuts each budget to 90% while placing: {self.gib_per_gpu:g} GiB -> "
                         f"{0.9 * self.gib_per_gpu:.2f} GiB per GPU; placed by "
                         f"{weights_label(self.fmt, 'transformers')}: {self.total_bytes / GiB:.2f} GiB in all")
        lines.append(f"  reserve per GPU {self.reserve_bytes / GiB:.2f} GiB ({self.reserve_source})")
        where = placement(self.model, self.device_map)
        for dev, n in self.bytes_per_device.items():
            name = f"GPU {dev}" if isinstance(dev, int) else dev
            label = weights_label(self.fmt) if isinstance(dev, int) or self.fmt not in QUANTIZED else (
                "weights unquantized, in the load dtype (llm_int8_enable_fp32_cpu_offload)")
            line = f"  {name:>6}: {label} {self.true_bytes_per_device.get(dev, n) / GiB:.2f} GiB"
            if dev in self.needed_bytes_per_device:
                line += (f" + KV cache {self.kv_bytes_per_device.get(dev, 0) / GiB:.2f} + reserve "
                         f"+ prefill {self.prefill_bytes_per_device.get(dev, 0) / GiB:.2f} = "
                         f"{self.needed_bytes_per_device[dev] / GiB:.2f} of {self.max_memory[dev] / GiB:g} GiB; "
                         f"load peak {self.load_peak_bytes.get(dev, 0) / GiB:.2f}")
            lines.append(f"{line}: {where.get(dev, '')}")
        if self.cpu_bytes or self.disk_bytes:
            lines.append(f"  host: RAM needed {self.ram_needed_bytes / GiB:.2f} GiB (offloaded weights "
                         f"{self.cpu_bytes / GiB:.2f} GiB, load peak {self.load_peak_bytes.get('cpu', 0) / GiB:.2f}), "
                         f"disk needed {self.disk_needed_bytes / GiB:.2f} GiB")
        s = self.seconds_per_token
        if s.get("seconds_per_token"):
            lines.append(f"  predicted {s['seconds_per_token']:.3g} s per token at batch 1 (GPU {s['gpu_s']:.3g} s"
                         + (f" + host to device {s['h2d_s']:.3g} s" if s["h2d_s"] else "")
                         + (f" + disk {s['disk_s']:.3g} s" if s["disk_s"] else "") + f"): {s['assumptions']}")
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


def _position_limit(config) -> int | None:
    """The model's longest context: ``max_position_embeddings`` (GPT-2: ``n_positions``), None where unset."""
    return getattr(config, "max_position_embeddings", None) or getattr(config, "n_positions", None)


def _max_context(config, layers_on: dict, free: dict, batch: int, prefill=lambda tokens: {}) -> tuple[int, bool]:
    """Longest context whose KV cache (and the prefill of its prompt, ``prefill(tokens)`` = {GPU: bytes}) fits
    each GPU's free bytes (binary search), and whether the model's limit capped it."""
    limit = _position_limit(config) or 2**20

    def fits(tokens: int) -> bool:
        per_layer = kv_cache_layers(config, tokens, batch)
        extra = prefill(tokens)
        return all(sum(per_layer[i] for i in layers_on.get(d, [])) + extra.get(d, 0) <= room
                   for d, room in free.items())

    if not free or any(room < 0 for room in free.values()) or not fits(0):
        return 0, False
    if fits(limit):
        return int(limit), True
    lo, hi = 0, int(limit)
    while hi - lo > 1:
        mid = (lo + hi) // 2
        lo, hi = (mid, hi) if fits(mid) else (lo, mid)
    return lo, False


def _prefill_by_gpu(config, prompt: int, batch: int, bytes_per_value: int, attention: str, layers_on: dict,
                    head_device, n_gpus: int) -> dict:
    """{GPU: prefill activation peak}: the layers' peak on every GPU that runs decoder layers (GPU 0 also runs
    those offloaded to "cpu"/"disk": accelerate's hooks bring their weights to it), the logits' on the head's GPU
    (GPU 0 for an offloaded head), the larger where both meet; 0 elsewhere."""
    terms = prefill_terms(config, prompt, batch, bytes_per_value, attention)
    layer_peak = max(v for k, v in terms.items() if k not in ("logits", "peak", "binding"))
    offloaded = bool(layers_on.get("cpu") or layers_on.get("disk"))
    logits_on = head_device if isinstance(head_device, int) else 0
    return {d: max(layer_peak if (layers_on.get(d) or (d == 0 and offloaded)) else 0,
                   terms["logits"] if d == logits_on else 0) for d in range(n_gpus)}


def _binding(weights: int, reserve: int, kv: int, prefill: int, load: int, budget: int) -> str:
    """The first term that takes one GPU over ``budget``: weights, reserve, KV cache, prefill activations (added in
    that order), else the load peak."""
    total = 0
    for name, b in (("weights", weights), ("reserve", reserve), ("KV cache", kv), ("prefill activations", prefill)):
        total += b
        if total > budget:
            return name
    return "load peak"


_SDPA: dict = {}


def _supports_sdpa(config) -> bool:
    """Whether transformers builds this config's causal LM with SDPA attention (its default where the class
    supports it): asked once per config class, by building its default config on the meta device with
    ``attn_implementation="sdpa"`` (transformers refuses a class without SDPA with a ValueError)."""
    from transformers import AutoModelForCausalLM

    kind = type(config)
    if kind not in _SDPA:
        try:
            with torch.device("meta"), quiet_planning():
                AutoModelForCausalLM.from_config(kind(), attn_implementation="sdpa")
            _SDPA[kind] = True
        except (ValueError, ImportError):
            _SDPA[kind] = False
    return _SDPA[kind]


DEFAULT_PROMPT = 4096
"""The prompt :func:`plan` prefills when ``prompt=None``: ``min(context, 4096)`` (a long prompt sent whole;
chunked prefill or a shorter prompt needs less)."""


def _int(name: str, value, low: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < low:
        raise ValueError(f"{name} must be a whole number >= {low}, not {value!r}")
    return value


def plan(model: PretrainedConfig | str | os.PathLike, fmt: str = "bf16", n_gpus: int = 1, gib_per_gpu: float = 24,
         strategy: str = "balanced", cpu_gib: float | None = None, context: int = 4096, batch: int = 1,
         reserve_gib: float | None = None, *, prompt: int | None = None, offload: bool = False,
         rates: dict | None = None, attention: str | None = None) -> Plan:
    """Plan a device map for ``n_gpus`` GPUs of ``gib_per_gpu`` GiB each, as ``from_pretrained`` would, and
    judge it with every term that must fit: weights with their scales, the KV cache of ``batch`` sequences of
    ``context`` tokens, a per-GPU reserve (CUDA context), the prefill activations of a ``prompt``-token prompt,
    and the load peak; plus what an offloaded part needs in RAM and on disk and what each token costs.

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
        reserve_gib: GiB kept free on each GPU for the CUDA context; None: the
            context measured on a GPU (:func:`_measured_reserve`).
        prompt: tokens prefilled at once per sequence (>= 0, at most
            ``context``); None: ``min(context, 4096)`` (:data:`DEFAULT_PROMPT`).
        offload: True to accept a map with modules on "cpu"/"disk" as
            "runs with offload" (``plan.runs``) when the GPU part fits.
        rates: {"gpu_bandwidth", "h2d_rate", "disk_rate"} in bytes/s (and
            optionally "source") for ``seconds_per_token``; None:
            :func:`reference_rates`.
        attention: "sdpa" or "eager" for the prefill term; None: "sdpa" where
            the model class supports it, else "eager".

    Returns:
        A :class:`Plan`. ``plan.fits`` is False when any module lands on
        "cpu" or "disk" (a bitsandbytes model then needs
        ``llm_int8_enable_fp32_cpu_offload=True`` and this map as a dict;
        ``plan.runs`` tells whether it runs with offload), when ``context``
        is above the model's ``max_position_embeddings``, or when any GPU's
        needed bytes or load peak exceed its budget; ``plan.binding`` names the term.

    Raises:
        ValueError: unknown model, format or strategy, ``n_gpus`` outside
            1..64, a ``gib_per_gpu``/``cpu_gib``/``reserve_gib`` that is not a
            finite positive number, a negative context, a batch below 1, a
            prompt below 0 or above ``context``, or ``rates`` without a rate
            the split needs.
        FileNotFoundError: ``reserve_gib=None`` and no measured reserve.
        ImportError: a quantized format without bitsandbytes installed.

    Notebook 03 (section 4), notebook 05 (every term).
    """
    from .offload import offload_seconds_per_token

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
    if prompt is None:
        prompt = min(context, DEFAULT_PROMPT)
    elif isinstance(prompt, bool) or not isinstance(prompt, int) or not 0 <= prompt <= context:
        raise ValueError(f"prompt must be a whole number of tokens from 0 to context ({context:,}), not {prompt!r} "
                         f"(the prompt is part of the context)")
    if reserve_gib is None:
        reserve, source = _measured_reserve()
    else:
        reserve, source = int(_number("reserve_gib", reserve_gib, low=-1e-12) * GiB), "given"
    label, config = _load_config(model)
    meta, quantizer = _prepared_model(config, fmt)
    if attention is None:
        attention = "sdpa" if _supports_sdpa(config) else "eager"
    budget = {i: int(gib_per_gpu * GiB) for i in range(n_gpus)}
    if cpu_gib is not None:
        budget["cpu"] = int(cpu_gib * GiB)
    limit = _position_limit(config)
    over_cap = limit is not None and context > limit
    place = dict(budget)  # the max_memory placed with; offload=True lowers it until the GPU part fits
    for _attempt in range(12):
        device_map, caps = _plan_device_map(meta, quantizer, place, strategy)
        sizes = tensor_sizes(meta, hf_quantizer=quantizer)
        planned = bytes_per_device(meta, device_map, sizes)
        true_sizes = _true_sizes(meta, quantizer, fmt, sizes)
        if quantizer is not None:  # offloaded modules stay unquantized, in the load dtype (the flag's behaviour)
            plain, _ = _prepared_model(config, "bf16")
            plain_sizes = tensor_sizes(plain)
            true_sizes.update({n: plain_sizes[n] for n in true_sizes
                               if n in plain_sizes and device_of(n, device_map) in ("cpu", "disk")})
        true = bytes_per_device(meta, device_map, true_sizes)
        layers_on: dict = {}
        for i, name in enumerate(_layer_names(meta)):
            layers_on.setdefault(device_of(name, device_map), []).append(i)
        gpus = range(n_gpus)
        on_gpus = all(isinstance(d, int) for d in device_map.values())
        head = meta.get_output_embeddings()
        head_name = next((n for n, m in meta.named_modules() if m is head), None)
        head_dev = device_of(head_name + ".weight", device_map) if head_name is not None else None
        act_bytes = 4 if fmt == "fp32" else 2

        # offloaded layers run on the main GPU (accelerate's hooks bring their weights there), and their KV cache
        # stays there: a DynamicCache keeps each layer's keys and values where they were computed
        main = next((d for d in device_map.values() if isinstance(d, int)), 0)
        kv_on = {d: list(layers_on.get(d, [])) for d in gpus}
        kv_on[main] = kv_on.get(main, []) + layers_on.get("cpu", []) + layers_on.get("disk", [])
        per_layer = kv_cache_layers(config, context, batch)
        kv = {d: sum(per_layer[i] for i in kv_on.get(d, [])) for d in gpus}
        act = _prefill_by_gpu(config, prompt, batch, act_bytes, attention, layers_on, head_dev, n_gpus)
        needed = {d: true.get(d, 0) + kv[d] + reserve + act[d] for d in gpus}
        # the load: weights (with the largest quantized weight's temporaries) and the CUDA context on each GPU
        numel = {n: p.numel() for n, p in meta.named_parameters()}
        quantized = set(_quantized_bytes(meta, quantizer, fmt)) if quantizer is not None else set()
        largest = {d: max((numel[n] for n in quantized if device_of(n, device_map) == d), default=0) for d in gpus}
        load = {d: load_peak_bytes(true.get(d, 0), largest[d], fmt, "cuda") + reserve for d in gpus}
        cpu_bytes, disk_bytes = int(true.get("cpu", 0)), int(true.get("disk", 0))
        load["cpu"] = cpu_bytes + load_host_bytes(sorted(numel.values(), reverse=True)[:4], fmt,
                                                  checkpoint_bytes_per_value=act_bytes, load_bytes_per_value=act_bytes)
        gpu_ok = {d: needed[d] <= budget[d] and load[d] <= budget[d] for d in gpus}
        fits = on_gpus and not over_cap and all(gpu_ok.values())
        runs = fits or (offload and not over_cap and all(gpu_ok.values()))
        over = {d: max(needed[d], load[d]) - budget[d] for d in gpus if not gpu_ok[d]}
        ram_over = max(cpu_bytes, load["cpu"]) - budget["cpu"] if "cpu" in budget and cpu_bytes else 0
        if ram_over > 0 and planned.get("cpu"):  # placed by transformers' count, held unquantized: scale down
            cut = 0.9 if quantizer is not None else 1.0  # the quantizer's adjust_max_memory
            over["cpu"] = place["cpu"] - int((planned["cpu"] * (1 - ram_over / true["cpu"])) / cut)
        if not (offload and over and not over_cap) or any(place[d] - over[d] <= 0 for d in over):
            break
        place.update({d: place[d] - over[d] - 64 * MiB for d in over})
    free = {d: budget[d] - true.get(d, 0) - reserve for d in gpus} if (on_gpus or offload) else {}
    if any(load[d] > budget[d] for d in gpus):
        free = {}
    longest, capped = _max_context(config, kv_on, free, batch, lambda tokens: _prefill_by_gpu(
        config, min(prompt, tokens), batch, act_bytes, attention, layers_on, head_dev, n_gpus))
    ram_needed = max(cpu_bytes, load["cpu"])
    ram_short = "cpu" in budget and cpu_bytes > 0 and ram_needed > budget["cpu"]
    runs = runs and not ram_short
    if over_cap:
        binding = "max_position_embeddings"
    elif not on_gpus and not offload:
        binding = "weights"
    elif not all(gpu_ok.values()):
        binding = next(_binding(true.get(d, 0), reserve, kv[d], act[d], load[d], budget[d])
                       for d in gpus if not gpu_ok[d])
    elif ram_short:
        binding = "host RAM"
    elif not on_gpus:
        binding = "weights"
    else:
        binding = "max_position_embeddings" if capped else "KV cache"
    rates = dict(reference_rates() if rates is None else rates)
    gpu_bytes = sum(true.get(d, 0) for d in gpus) + sum(kv.values())
    try:
        cost = offload_seconds_per_token(gpu_bytes, cpu_bytes, disk_bytes, gpu_bandwidth=rates.get("gpu_bandwidth"),
                                         h2d_rate=rates.get("h2d_rate"), disk_rate=rates.get("disk_rate"))
    except ValueError:
        if rates.get("gpu_bandwidth") is not None:
            raise
        cost = {}  # no reference rates here: nothing to predict with
    return Plan(shape=label, fmt=fmt, n_gpus=n_gpus, gib_per_gpu=gib_per_gpu, strategy=strategy,
                device_map=device_map, max_memory=budget, effective_memory=caps, bytes_per_device=planned,
                true_bytes_per_device=true, context=context, batch=batch, kv_bytes_per_device=kv,
                reserve_bytes=reserve, reserve_source=source, needed_bytes_per_device=needed, on_gpus=on_gpus,
                fits=fits, max_context=longest, max_context_capped=capped, model=meta, hf_quantizer=quantizer,
                prompt=prompt, prefill_bytes_per_device=act, load_peak_bytes=load, cpu_bytes=cpu_bytes,
                disk_bytes=disk_bytes, ram_needed_bytes=ram_needed, disk_needed_bytes=disk_bytes,
                runs=runs, offload=offload, binding=binding, max_position_embeddings=limit, placement_memory=place,
                seconds_per_token=cost, rates=rates)


def show_plan(model: PretrainedConfig | str | os.PathLike, fmt: str = "bf16", n_gpus: int = 1,
              gib_per_gpu: float = 24, strategy: str = "balanced", cpu_gib: float | None = None, context: int = 4096,
              batch: int = 1, reserve_gib: float | None = None, ax: Axes | tuple[Axes, Axes] | None = None,
              draw: bool = True, **more) -> Plan:
    """Plan (see :func:`plan`, same arguments; ``more``: its keyword-only ones, ``prompt=``, ``offload=``,
    ``rates=``, ``attention=``), print :meth:`Plan.summary` and draw the map.

    The drawing is :func:`helpers.devicemap.plot_device_map`: which layers
    sit on which device, and bytes of weights per device (transformers'
    accounting) against the budget given (before the 90% cut). It is not
    shown here: call ``plt.show()`` after (a notebook shows it at the end of
    the cell).

    Args:
        ax: passed to ``plot_device_map`` (None: a new figure).
        draw: False to print only.

    Returns:
        The :class:`Plan`. Raises as :func:`plan`. Notebooks 03 (section 6) and 05.
    """
    from .devicemap import plot_device_map

    p = plan(model, fmt, n_gpus, gib_per_gpu, strategy, cpu_gib, context, batch, reserve_gib, **more)
    print(p.summary())
    if draw:
        plot_device_map(p.model, p.device_map, max_memory=p.max_memory, title=plan_title(p), ax=ax,
                        hf_quantizer=p.hf_quantizer, stacked=plan_stacked(p))
    return p


def plan_stacked(p: Plan) -> dict:
    """What a plan's drawing stacks on each GPU's weights: {"KV cache": {GPU: bytes}, "reserve": {GPU: bytes},
    "prefill": {GPU: bytes}}.

    Empty when the weights do not all land on GPUs and the plan was not asked with ``offload=True`` (then the
    KV cache is not counted). Notebooks 03 and 05.
    """
    if not (p.on_gpus or p.offload):
        return {}
    return {"KV cache": dict(p.kv_bytes_per_device), "reserve": {d: p.reserve_bytes for d in range(p.n_gpus)},
            "prefill": dict(p.prefill_bytes_per_device)}


def plan_title(p: Plan) -> str:
    """The title :func:`show_plan` and the planner widget give a plan's drawing: the question and the verdict."""
    if p.fits:
        verdict = "fits"
    elif p.runs:
        s = p.seconds_per_token.get("seconds_per_token")
        verdict = "runs with offload" + (f", {s:.3g} s/token" if s else "")
    else:
        verdict = f"does not fit ({p.binding})"
    return (f"{p.shape} {p.fmt} on {p.n_gpus} x {p.gib_per_gpu:g} GiB ({p.strategy}), "
            f"{p.context:,} tokens x {p.batch} (prompt {p.prompt:,}): {verdict}")
