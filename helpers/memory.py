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


NOT_GATED = ("gpt2", "bloom", "gpt_neox", "gptj", "opt", "falcon", "phi", "codegen", "gpt_bigcode", "starcoder2")
"""``model_type`` s whose MLP is ``fc -> act -> proj`` (two intermediates), not Llama's gated ``gate * up``."""


def _dims(config: PretrainedConfig) -> dict:
    """hidden, intermediate, heads, kv heads, head dim, vocab and whether the MLP is gated, read from a config."""
    hidden = config.hidden_size
    heads = config.num_attention_heads
    inner = (getattr(config, "intermediate_size", None) or getattr(config, "n_inner", None)
             or getattr(config, "ffn_hidden_size", None) or 4 * hidden)
    return dict(h=hidden, i=inner, n=heads, kv=getattr(config, "num_key_value_heads", None) or heads,
                d=getattr(config, "head_dim", None) or hidden // heads, v=config.vocab_size,
                gated=getattr(config, "model_type", "") not in NOT_GATED)


def prefill_terms(config: PretrainedConfig, prompt: int, batch: int = 1, bytes_per_value: int = 2,
                  attention: str = "sdpa", logits: str = "last") -> dict:
    """The live bytes of each phase of one prefill forward, beyond weights and KV cache
    (see :func:`prefill_peak_bytes`).

    Returns ``{"mlp": ..., "attention": ..., "scores": ..., "norm": ..., "logits": ..., "peak": the largest,
    "binding": its name}``, all in bytes for ``batch`` sequences of ``prompt`` tokens. Same arguments and errors
    as :func:`prefill_peak_bytes`. Notebook 05.
    """
    if isinstance(prompt, bool) or not isinstance(prompt, int) or prompt < 0:
        raise ValueError(f"prompt must be a whole number of tokens >= 0, not {prompt!r}")
    if isinstance(batch, bool) or not isinstance(batch, int) or batch < 1:
        raise ValueError(f"batch must be a whole number >= 1, not {batch!r}")
    if attention not in ("sdpa", "eager"):
        raise ValueError(f"attention must be 'sdpa' or 'eager' (the attn_implementation), not {attention!r}")
    if logits not in ("last", "all"):
        raise ValueError(f"logits must be 'last' (generate: logits_to_keep=1) or 'all' (a plain forward), "
                         f"not {logits!r}")
    g, p, t = _dims(config), bytes_per_value, batch * prompt
    h, i, n, kv, d = g["h"], g["i"], g["n"], g["kv"], g["d"]
    carried = 2 * h * p + 2 * d * p  # embedding output (kept by the model's forward), the layer's input; cos and sin
    repeat = 2 * n * d * p if (attention == "eager" and kv != n) else 0  # eager's repeat_kv copies of k and v
    terms = {
        # residual after attention and the normed input, beside gate/up/act*up (gated) or fc/act (not gated)
        "mlp": t * (carried + 2 * h * p + (3 if g["gated"] else 2) * i * p),
        # normed input, q and the rotary temporaries (q*cos, rotate_half(q), its product with sin), k and v
        "attention": t * (carried + h * p + (4 * n * d + 2 * kv * d) * p),
        # RMSNorm: the input cast to float32 and its square (or product), 4 bytes each
        "norm": t * (carried + h * p + 2 * 4 * h),
        # eager only: scores (p), their float32 copy and float32 softmax (4 + 4), the mask (p per pair, all heads)
        "scores": (t * (carried + h * p + n * d * p) + repeat * t + batch * prompt * prompt * (n * (p + 8) + p))
        if attention == "eager" else 0,
        # the head's output (p) and generate's float32 copy (4) of the last position; or every position (p)
        "logits": (batch * g["v"] * (p + 4) if logits == "last" else t * g["v"] * p) if prompt else 0,
    }
    binding = max(terms, key=terms.get)
    return {**{k: int(v) for k, v in terms.items()}, "peak": int(terms[binding]), "binding": binding}


def prefill_peak_bytes(config: PretrainedConfig, prompt: int, batch: int = 1, bytes_per_value: int = 2,
                       attention: str = "sdpa", logits: str = "last") -> int:
    """The transient memory (bytes) of one prefill forward of ``batch`` prompts of ``prompt`` tokens, beyond the
    weights and the KV cache: the largest set of activations alive at once.

    Derived from transformers 5.24's Llama forward (``LlamaModel.forward``, ``LlamaDecoderLayer``, ``LlamaMLP``,
    ``LlamaRMSNorm``, ``apply_rotary_pos_emb``, ``integrations/sdpa_attention.py``), ``P`` = ``bytes_per_value``,
    ``h`` hidden, ``i`` intermediate, ``n`` heads, ``kv`` key/value heads, ``d`` head dim, ``v`` vocabulary,
    per token of the ``batch x prompt`` tokens:

    - always alive: the embedding output (``LlamaModel.forward`` keeps ``inputs_embeds``), the current layer's
      input (its caller holds it) and the rotary ``cos``/``sin``: ``2hP + 2dP``;
    - the MLP (the largest phase for every shape in :data:`helpers.shapes.SHAPES`): the residual and the normed
      input, ``2hP``, and ``act(gate)``, ``up`` and their product, ``3iP`` (two ``iP`` for an ungated MLP);
    - attention with ``sdpa``: q, its rotary temporaries, k, v: ``hP + (4nd + 2 kv d)P``. SDPA with
      ``is_causal`` and no mask (one prompt, or prompts of one length: ``create_causal_mask`` then returns no
      mask) runs a fused kernel on the CPU and on a GPU (flash or memory-efficient) that never holds the
      ``prompt x prompt`` scores; with ``"eager"`` they are held: ``n x prompt^2 x (P + 8)`` per sequence (the
      scores, softmax's float32 copy of its input and its float32 output) plus the mask (``P`` per pair);
    - the logits: ``generate`` asks for the last position only (``logits_to_keep=1`` in
      ``generation/utils.py``), ``vP`` plus its float32 copy (``4v``) per sequence; ``logits="all"`` (a plain
      ``model(ids)`` forward) holds ``prompt x vP`` per sequence.

    The peak is the largest phase (:func:`prefill_terms` gives each). Padded prompts of different lengths make
    transformers build a ``batch x prompt^2`` mask (one byte per pair), not counted here.

    Checked on the bundled model on the CPU (bf16, ``generate(max_new_tokens=1)``, measured with
    :func:`helpers.measure.allocation_peak` less the prompt's KV cache): sdpa 3,610,656 bytes measured against
    3,604,480 from the formula at 256 tokens, 14,442,528 against 14,417,920 at 1,024, 57,770,016 against
    57,671,680 at 4,096 (+0.17% each); eager 7.51, 99.0 and 1,500.1 MiB against 7.50, 99.0 and 1,500.0.
    On a GPU, ``gpu-reference/one-gpu/reserve.json`` holds the same model's activations at 1,024 tokens on an
    H200: 14,084,096 bytes, 2.3% under the formula. Notebook 05 measures it again; ``tests/test_planner.py``
    holds it within 10% on a tiny random model (+0.6% sdpa, +0.1% eager there). For architectures outside
    Llama's family (Mistral and Qwen2 share its layers) it is an estimate from the same terms.

    Args:
        config: a transformers config of a decoder-only model.
        prompt: tokens prefilled at once, >= 0.
        batch: sequences prefilled together, >= 1.
        bytes_per_value: 2 (bf16/fp16 activations) or 4 (fp32).
        attention: "sdpa" (transformers' default) or "eager".
        logits: "last" (``generate``) or "all" (a plain forward).

    Returns:
        Bytes (int).

    Raises:
        ValueError: a negative or non-integer ``prompt``, ``batch`` < 1, an unknown ``attention`` or ``logits``.

    Notebook 05.
    """
    return prefill_terms(config, prompt, batch, bytes_per_value, attention, logits)["peak"]


QUANTIZE_BYTES_PER_WEIGHT = {
    "cuda": {"int8": 2 + 2, "nf4": 2, "nf4-dq": 2},
    "cpu": {"int8": 9, "nf4": 16, "nf4-dq": 16},
}
"""Bytes alive per weight of the one weight being quantized, beyond its quantized result, by device and format
(bf16 load dtype). GPU: the bf16 copy (int8 adds the float16 copy ``Int8Params`` quantizes; the CUDA kernels
write the result directly): read from the code, not measured here (no GPU). CPU (bitsandbytes' default backend,
``backends/default/ops.py``): NF4, read from the code, the bf16 copy (2), ``A.float()`` (4), the scaled and the
clamped blocks (4 + 4), then the int32 codes, their uint8 copy and the packed bytes as those go: 16 at most;
measured (anonymous memory in a fresh process, glibc's thresholds pinned: ``helpers.measure.load_peak_rss``)
14.7 on the bundled model's largest weight (0.88 M weights) and 12.9 on a 16.8 M-weight one. int8: 9, as
measured (10.0 and 8.0 on the same two weights; the code's bf16, float16 and float32 copies would allow 12)."""


def load_peak_bytes(weights_bytes: float, largest_quantized: int = 0, fmt: str = "bf16", device: str = "cuda",
                    load_bytes_per_value: int = 2) -> int:
    """Peak bytes on ``device`` while ``from_pretrained`` loads ``weights_bytes`` of weights there, quantizing
    while loading (``BitsAndBytesConfig`` on an unquantized checkpoint).

    What transformers 5.24 does (``core_model_loading.convert_and_load_state_dict_in_model``): every checkpoint
    tensor is a lazy safetensors slice (the files are memory-mapped by ``modeling_utils``' loader);
    with on-the-fly quantization there is no thread pool ("sync loading to avoid worker threads loading
    full-precision tensors to GPU faster than the main thread can quantize them"), so ONE tensor at a time is
    materialized (``_materialize_copy``: ``tensor[...]`` then ``.to(device, dtype)``), quantized
    (``Bnb4bitQuantize``/``Bnb8bitQuantize``: ``Params4bit(...).to(device)``) and set. Neither a shard nor the
    state dict is materialized whole in the load dtype. So the peak is the weights plus the temporaries of the
    largest quantized weight: ``weights_bytes + largest_quantized x QUANTIZE_BYTES_PER_WEIGHT[device][fmt]``.
    Unquantized formats add nothing on the device (each loaded tensor becomes the parameter; the copy in the
    checkpoint's dtype is made in host RAM, see :func:`load_host_bytes`).

    This counts tensors. A process's resident memory on the CPU is higher: the memory-mapped checkpoint's pages
    (file-backed, reclaimable: the kernel drops them under pressure), modules imported during the load (about
    30 MiB) and, unless glibc's thresholds are pinned, freed blocks the C allocator keeps. Measured on the CPU
    (:func:`helpers.measure.load_peak_rss`, pinned), the transient above the loaded model was 12.4 MiB (NF4)
    and 8.4 MiB (int8) on the bundled model against 13.5 and 7.6 MiB from this formula; on a random model whose
    largest weight has 16.8 M elements, 207 MiB (NF4) and 128 MiB (int8) against 256 and 144 MiB. With glibc's
    defaults the same NF4 load peaked 1.3 GiB above the loaded model (freed blocks kept): that is the allocator,
    not the loader.

    Args:
        weights_bytes: the weights that end on ``device`` (with scales), e.g. a plan's ``true_bytes_per_device``.
        largest_quantized: elements of the largest weight quantized on ``device`` (0: none).
        fmt: a format of :data:`FORMATS`.
        device: "cuda" (any GPU) or "cpu".
        load_bytes_per_value: bytes per value of the load dtype (2 for bf16; the table assumes 2).

    Returns:
        Bytes (int).

    Raises:
        ValueError: an unknown format or device.

    Notebook 05.
    """
    if fmt not in FORMATS:
        raise ValueError(f"unknown format {fmt!r}; choose one of {', '.join(FORMATS)}")
    if device not in QUANTIZE_BYTES_PER_WEIGHT:
        raise ValueError(f"device must be 'cuda' (any GPU) or 'cpu', not {device!r}")
    per = QUANTIZE_BYTES_PER_WEIGHT[device].get(fmt, 0) * load_bytes_per_value / 2
    return int(weights_bytes + largest_quantized * per)


def load_host_bytes(largest: int | list[int], fmt: str = "bf16", checkpoint_bytes_per_value: int = 4,
                    load_bytes_per_value: int = 2, workers: int = 4) -> int:
    """Host RAM (bytes, anonymous memory) that a load onto a GPU holds at once beyond the weights mapped to "cpu".

    ``_materialize_copy`` reads each tensor into RAM in the checkpoint's dtype (``tensor[...]``) and, when the
    load dtype differs, ``.to(cuda, dtype)`` converts on the CPU first (a CUDA copy that changes dtype converts on
    the source device). Quantizing while loading does one tensor at a time; an unquantized load uses a thread
    pool of ``GLOBAL_WORKERS = min(4, cpu count)`` workers, so up to ``workers`` tensors are in flight. Not
    counted: the checkpoint's memory-mapped pages (up to the whole checkpoint, file-backed and reclaimable).

    Args:
        largest: elements of the checkpoint's largest tensor (often the embedding), or of its largest tensors,
            largest first (the first ``workers`` count for an unquantized load; one for a quantized one).
        fmt: a format of :data:`FORMATS`.
        checkpoint_bytes_per_value: 4 for a float32 checkpoint, 2 for bf16/fp16.
        load_bytes_per_value: 2 for bf16.
        workers: the loader's thread pool (4, or the machine's cores if fewer).

    Returns:
        Bytes (int).

    Raises:
        ValueError: an unknown format.

    Notebook 05.
    """
    if fmt not in FORMATS:
        raise ValueError(f"unknown format {fmt!r}; choose one of {', '.join(FORMATS)}")
    sizes = sorted([largest] if isinstance(largest, int) else list(largest), reverse=True)
    in_flight = sizes[:1] if fmt in QUANTIZED else (sizes * workers if len(sizes) == 1 else sizes)[:workers]
    each = checkpoint_bytes_per_value + (load_bytes_per_value if load_bytes_per_value != checkpoint_bytes_per_value
                                         else 0)
    return int(sum(in_flight) * each)
