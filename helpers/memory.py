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
