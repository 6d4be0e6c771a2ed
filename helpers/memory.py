"""Memory arithmetic: bytes per parameter per format and a footprint predictor (notebook 00).

Figures (bytes per weight of a quantized Linear layer):
- fp32 4, bf16/fp16 2.
- LLM.int8 (bitsandbytes ``Linear8bitLt``): 1 byte per weight plus one float32
  scale per output row, i.e. ``1 + 4 / in_features``.
- NF4/FP4 (``Linear4bit``): 0.5 byte per weight (two per uint8) plus one
  float32 absmax per block of 64 weights: ``0.5 + 4/64 = 0.5625``.
- NF4/FP4 with double quantization: the absmax values are themselves stored
  as uint8 with one float32 per 256 of them: ``0.5 + 1/64 + 4/(64*256)``,
  about 0.516.
Source: the QLoRA paper (Dettmers et al., 2023, section 3) and bitsandbytes'
defaults (blocksize 64, nested blocksize 256).

transformers quantizes only the ``nn.Linear`` layers inside the decoder
blocks: embeddings, norms and the output head stay in the compute dtype.
"""

from __future__ import annotations

import torch

BYTES_PER_PARAM = {
    "fp32": 4.0,
    "fp16": 2.0,
    "bf16": 2.0,
    "int8": 1.0,  # + 4 / in_features for the per-row scale: see linear_bytes_per_weight
    "nf4": 0.5 + 4 / 64,
    "nf4-dq": 0.5 + 1 / 64 + 4 / (64 * 256),
}
"""Bytes per weight of a Linear layer in each format (nf4 stands for FP4 too)."""

FORMATS = tuple(BYTES_PER_PARAM)
"""Storage formats the workbook knows: fp32, fp16 and bf16 unquantized; int8 (LLM.int8), nf4 and nf4-dq
(NF4 with double quantization) through bitsandbytes."""

QUANTIZED = ("int8", "nf4", "nf4-dq")
"""The formats of :data:`FORMATS` that bitsandbytes quantizes."""


def linear_bytes_per_weight(fmt: str, in_features: int = 4096) -> float:
    """Bytes per weight of one Linear layer stored in ``fmt``.

    Args:
        fmt: one of ``FORMATS``.
        in_features: the layer's input size (only int8 depends on it: one
            float32 scale per output row).

    Raises:
        ValueError: unknown format.

    Explained in notebook 00; notebook 03's planner adds these bytes back to transformers' accounting.
    """
    if fmt not in BYTES_PER_PARAM:
        raise ValueError(f"unknown format {fmt!r}; choose one of {', '.join(FORMATS)}")
    if fmt == "int8":
        return 1.0 + 4.0 / in_features
    return BYTES_PER_PARAM[fmt]


def _unique_params(model: torch.nn.Module):
    """(name, parameter) pairs, a tied parameter once (under its first name)."""
    seen = set()
    for name, p in model.named_parameters(remove_duplicate=False):
        key = id(p)
        if key in seen:
            continue
        seen.add(key)
        yield name, p


def _quantizable(model: torch.nn.Module) -> set[str]:
    """Names of the weights transformers would quantize: Linear layers except the output head."""
    skip = {"lm_head"}
    names = set()
    for mname, module in model.named_modules():
        if isinstance(module, torch.nn.Linear) and mname.split(".")[-1] not in skip:
            names.add(f"{mname}.weight")
    return names


def param_groups(model: torch.nn.Module) -> dict[str, int]:
    """Count parameters by kind, shared (tied) parameters once.

    Returns:
        ``{"linear (in blocks)": n, "embedding": n, "norm": n, "lm_head": n,
        "other": n}`` in parameters. ``lm_head`` is 0 when it is tied to the
        embedding. Explained in notebook 00.
    """
    quant = _quantizable(model)
    groups = {"linear (in blocks)": 0, "embedding": 0, "norm": 0, "lm_head": 0, "other": 0}
    for name, p in _unique_params(model):
        if name in quant:
            groups["linear (in blocks)"] += p.numel()
        elif "embed" in name or "wte" in name or "word_embeddings" in name:
            groups["embedding"] += p.numel()
        elif "norm" in name or "ln_" in name:
            groups["norm"] += p.numel()
        elif name.startswith("lm_head"):
            groups["lm_head"] += p.numel()
        else:
            groups["other"] += p.numel()
    return groups


def predict_footprint(model: torch.nn.Module, fmt: str, dtype_bytes: float | None = None) -> int:
    """Predict a model's weight bytes when loaded with transformers in ``fmt``.

    Linear layers inside the blocks take ``linear_bytes_per_weight(fmt)``;
    everything else (embeddings, norms, an untied head, biases) takes
    ``dtype_bytes`` (default: 4 for fp32, else 2: the compute dtype).
    Tied parameters are counted once. Works on a meta-device model.

    Returns:
        Bytes (int). Raises ValueError for an unknown format.

    Explained in notebook 00 (predicted against measured) and used again in notebook 01.
    """
    if dtype_bytes is None:
        dtype_bytes = 4.0 if fmt == "fp32" else 2.0
    quant = _quantizable(model)
    total = 0.0
    for name, p in _unique_params(model):
        if name in quant:
            total += p.numel() * linear_bytes_per_weight(fmt, p.shape[-1])
        else:
            total += p.numel() * dtype_bytes
    return int(round(total))


def kv_cache_layers(config, tokens: int, batch: int = 1, bytes_per_value: float = 2) -> list[int]:
    """KV-cache bytes of each decoder layer after ``tokens`` tokens of context, for ``batch`` sequences.

    Each layer keeps a key and a value vector per key/value head for every
    token it attends to: ``2 x kv heads x head dim x bytes per value`` per
    token (grouped-query attention shares each key/value head between several
    query heads, so ``num_key_value_heads`` counts, not ``num_attention_heads``).
    A layer with a sliding window attends to at most ``sliding_window`` tokens,
    so its cache stops growing there: every layer when the config sets
    ``sliding_window`` (Mistral 7B v0.1: 4096), only the layers whose
    ``layer_types`` entry is ``"sliding_attention"`` when the config lists them
    (Gemma 2 and 3 alternate), none when ``use_sliding_window`` is False (Qwen2).

    Args:
        config: a transformers config of a decoder-only model (GPT-2's and
            Bloom's names are mapped by their configs' ``attribute_map``).
        tokens: context length (prompt plus generated tokens), >= 0.
        batch: sequences in flight, >= 1.
        bytes_per_value: 2 for a bf16/fp16 cache (the default cache dtype is
            the compute dtype), 4 for fp32.

    Returns:
        A list of ints, one per layer, in bytes. Notebook 03 (planning with
        room for the cache) explains it.

    Raises:
        ValueError: negative ``tokens`` or ``batch`` < 1.
    """
    if tokens < 0 or batch < 1:
        raise ValueError(f"tokens must be >= 0 and batch >= 1, not tokens={tokens!r}, batch={batch!r}")
    layers = config.num_hidden_layers
    heads = config.num_attention_heads
    kv_heads = getattr(config, "num_key_value_heads", None) or heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
    window = getattr(config, "sliding_window", None)
    types = getattr(config, "layer_types", None)
    if getattr(config, "use_sliding_window", True) is False:
        window = None
    out = []
    for i in range(layers):
        sliding = window is not None and (types is None or types[i] == "sliding_attention")
        seen = min(tokens, window) if sliding else tokens
        out.append(int(2 * kv_heads * head_dim * bytes_per_value * seen * batch))
    return out


def kv_cache_bytes(config, tokens: int, batch: int = 1, bytes_per_value: float = 2) -> int:
    """KV-cache bytes of the whole model: the sum of :func:`kv_cache_layers` (same arguments and errors).

    Without a sliding window that is ``2 x layers x kv heads x head dim x
    bytes per value x tokens x batch``. Notebook 03 explains it.
    """
    return sum(kv_cache_layers(config, tokens, batch, bytes_per_value))
