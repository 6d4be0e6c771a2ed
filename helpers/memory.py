"""Memory arithmetic: bytes per weight in each format, and the KV cache (notebooks 00, 01 and 03).

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

Which weights a format quantizes is not decided here: transformers' own
quantizer decides (the Linear layers inside the decoder blocks, and GPT-2's
``Conv1D`` layers, which are not ``nn.Linear``; never the modules in its skip
list, by default the output head and whatever is tied to it). The one footprint
predictor, :func:`helpers.planner.predict_footprint`, asks it and charges these
formulas; the modules left unquantized keep the load dtype (``dtype=`` of
``from_pretrained``, else the checkpoint's), not the compute dtype.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from transformers import PretrainedConfig

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

    Explained in notebook 00; :func:`helpers.planner.predict_footprint` and notebook 03's planner charge
    them to the weights transformers' quantizer quantizes.
    """
    if fmt not in BYTES_PER_PARAM:
        raise ValueError(f"unknown format {fmt!r}; choose one of {', '.join(FORMATS)}")
    if fmt == "int8":
        return 1.0 + 4.0 / in_features
    return BYTES_PER_PARAM[fmt]


def kv_cache_layers(config: PretrainedConfig, tokens: int, batch: int = 1, bytes_per_value: float = 2) -> list[int]:
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
        bytes_per_value: 2 for a bf16/fp16 cache, 4 for fp32. The cache takes
            the dtype of the hidden states, which is the load dtype (a
            bitsandbytes layer casts its output back to its input's dtype,
            whatever its compute dtype).

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


def kv_cache_bytes(config: PretrainedConfig, tokens: int, batch: int = 1, bytes_per_value: float = 2) -> int:
    """KV-cache bytes of the whole model: the sum of :func:`kv_cache_layers` (same arguments and errors).

    Without a sliding window that is ``2 x layers x kv heads x head dim x
    bytes per value x tokens x batch``. Notebook 03 explains it.
    """
    return sum(kv_cache_layers(config, tokens, batch, bytes_per_value))
