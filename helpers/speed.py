"""The compute side of the roofline: this machine's matrix-multiply rate, the FLOP a step needs, compiled graphs.

:mod:`helpers.measure` measures the memory side (bandwidth, bytes a decode step reads, the decode
limit). This module adds what a roofline needs besides: the FLOP/s this device reaches on a large
matrix product (:func:`matmul_rate`), the FLOP of a prefill and of a decode step
(:func:`prefill_flops`, :func:`decode_flops`), a count of the graphs ``torch.compile`` has made
(:func:`compiled_graphs`, to check that a compiled path really ran) and the plot (:func:`roofline`).
Notebook 04 explains all of it; ``tools/bench.py`` uses it.
"""

from __future__ import annotations

import statistics
import time
from typing import TYPE_CHECKING

import torch

from .measure import sync

if TYPE_CHECKING:
    from matplotlib.axes import Axes
    from transformers import PretrainedConfig


def matmul_rate(device: str | torch.device = "cpu", dtype: torch.dtype = torch.bfloat16, n: int | None = None,
                repeats: int = 5) -> dict:
    """FLOP/s of one square ``n x n`` matrix product on ``device`` in ``dtype``: warm-up, then median of ``repeats``.

    One product is ``2 * n**3`` FLOP (a multiply and an add per term). The default ``n`` is 2048 on a CPU
    (about 0.1 s on 2 cores) and 8192 on a GPU, large enough to reach the device's matrix rate. This is
    the compute ceiling of the roofline: a prefill (many tokens at once) is bound by it, a decode step at
    small batch by the memory bandwidth. Explained in notebook 04.

    Returns:
        ``{"flops_per_s": median FLOP/s, "spread": (lowest, highest), "n": n, "dtype": "bfloat16",
        "device": "cpu", "repeats": repeats}``.

    Raises:
        ValueError: ``repeats`` below 3 (no spread to judge the median by).
    """
    if repeats < 3:
        raise ValueError("measure the matmul rate with at least 3 repeats")
    device = torch.device(device)
    n = n or (8192 if device.type == "cuda" else 2048)
    a = torch.randn(n, n, device=device).to(dtype)
    b = torch.randn(n, n, device=device).to(dtype)
    a @ b  # warm-up: kernel selection, caches
    rates = []
    for _ in range(repeats):
        sync()
        t0 = time.perf_counter()
        a @ b
        sync()
        rates.append(2 * n**3 / (time.perf_counter() - t0))
    return {"flops_per_s": statistics.median(rates), "spread": (min(rates), max(rates)), "n": n,
            "dtype": str(dtype).replace("torch.", ""), "device": str(device), "repeats": repeats}


def _dims(config: PretrainedConfig) -> tuple[int, int, int, int]:
    """(layers, hidden size, query heads x head dim, key/value heads x head dim) of a decoder config."""
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    layers = text.num_hidden_layers
    hidden = text.hidden_size
    heads = text.num_attention_heads
    head_dim = getattr(text, "head_dim", None) or hidden // heads
    kv = getattr(text, "num_key_value_heads", None) or heads
    return layers, hidden, heads * head_dim, kv * head_dim


def matmul_params(config: PretrainedConfig) -> int:
    """Weights that take part in a matrix product for every token: the decoder layers' projections and the head.

    For a Llama-like config: per layer, q and o (hidden x heads*head_dim each), k and v (hidden x
    kv_heads*head_dim each) and the gated MLP (3 x hidden x intermediate); plus the output head
    (vocab x hidden), tied or not (a tied head still multiplies by the whole matrix). The input
    embedding (a row lookup), norms and biases are left out. A config without ``intermediate_size``
    (GPT-2, Bloom) counts a 4 x hidden MLP of two matrices. Notebook 04.
    """
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    layers, hidden, q, kv = _dims(text)
    inter = getattr(text, "intermediate_size", None)
    mlp = 3 * hidden * inter if inter else 2 * hidden * 4 * hidden
    attn = 2 * hidden * q + 2 * hidden * kv
    return layers * (attn + mlp) + text.vocab_size * hidden


def prefill_flops(config: PretrainedConfig, prompt_tokens: int, batch: int = 1, all_logits: bool = False) -> float:
    """The FLOP floor of a prefill of ``prompt_tokens`` tokens for ``batch`` sequences.

    ``2 * weights * tokens * batch`` for the decoder layers' weights, plus causal attention: scores and
    the weighted sum each cost ``2 * tokens**2 * heads * head_dim`` per layer, halved by the causal mask,
    so ``2 * layers * tokens**2 * heads * head_dim * batch``. The output head (``vocab x hidden``) counts
    once a sequence: ``generate`` asks the model for the last position's logits only
    (``logits_to_keep=1``); ``all_logits=True`` counts it for every token, as a plain forward that
    returns every position's logits does. A floor: kernels that compute the whole square, softmax and
    norms add to it. Divided by :func:`matmul_rate` it gives the shortest time to first token the device
    allows. Notebook 04.
    """
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    layers, hidden, q, _ = _dims(text)
    head = text.vocab_size * hidden
    body = matmul_params(text) - head
    return float(2 * body * prompt_tokens * batch + 2 * head * (prompt_tokens if all_logits else 1) * batch
                 + 2 * layers * prompt_tokens**2 * q * batch)


def decode_flops(config: PretrainedConfig, batch: int = 1, context: int = 0) -> float:
    """FLOP of one decode step: ``2 * matmul_params * batch`` plus attention over ``context`` tokens.

    Attention of one new token over ``context`` cached ones costs ``4 * context * heads * head_dim`` per
    layer and sequence (scores, then the weighted sum). With :func:`helpers.measure.decode_bytes` it
    gives a decode step's arithmetic intensity (FLOP per byte read), its place on the roofline. Notebook 04.
    """
    layers, _, q, _ = _dims(config)
    return float(2 * matmul_params(config) * batch + 4 * layers * context * q * batch)


def compiled_graphs() -> int:
    """How many graphs ``torch.compile`` (dynamo) has compiled in this process so far.

    Read before a compiled path's warm-up, after it and after the timed repeats: a compiled graph
    really ran when the count rose during the warm-up (the compile) and not during the timed repeats
    (no recompile, so the timed runs used the graph). The count is dynamo's ``unique_graphs`` counter
    (``torch._dynamo.utils.counters``, listed in :mod:`helpers.private_apis`: torch has no public
    count). Notebook 04.
    """
    from torch._dynamo.utils import counters

    return int(counters["stats"]["unique_graphs"])


def roofline(ax: Axes, bandwidth: float, flops_per_s: float, points: list[dict]) -> Axes:
    """Draw a roofline on ``ax``: FLOP/s against arithmetic intensity (FLOP per byte), log-log.

    The two ceilings: memory, ``bandwidth * intensity`` (``bandwidth`` in bytes/s, from
    :func:`helpers.measure.memory_bandwidth`), and compute, ``flops_per_s`` (from :func:`matmul_rate`);
    they meet at the ridge, ``flops_per_s / bandwidth`` FLOP per byte. Each point is a measured step,
    ``{"label": str, "flops": FLOP of one step, "bytes": bytes read in one step, "seconds": its time}``,
    drawn at ``(flops / bytes, flops / seconds)``: its height under the ceiling is the share of the
    limit it reached. Returns ``ax``. Notebook 04 and ``tools/bench.py``.

    Raises:
        ValueError: a point without positive ``flops``, ``bytes`` or ``seconds``.
    """
    import numpy as np

    for p in points:
        if not (p.get("flops", 0) > 0 and p.get("bytes", 0) > 0 and p.get("seconds", 0) > 0):
            raise ValueError(f"roofline point {p.get('label')!r} needs positive flops, bytes and seconds: {p}")
    ridge = flops_per_s / bandwidth
    xs = [p["flops"] / p["bytes"] for p in points] + [ridge]
    x = np.logspace(np.log10(min(xs) / 4), np.log10(max(xs) * 4), 200)
    ax.loglog(x, np.minimum(bandwidth * x, flops_per_s), color="black", lw=2, label="limit (roofline)")
    ax.axvline(ridge, color="grey", ls=":", lw=1)
    ax.annotate(f"ridge {ridge:.0f} FLOP/byte", (ridge, flops_per_s), textcoords="offset points",
                xytext=(4, -14), fontsize=8, color="grey")
    for p in points:
        ax.loglog(p["flops"] / p["bytes"], p["flops"] / p["seconds"], "o", label=p["label"])
    ax.set_xlabel("arithmetic intensity (FLOP per byte read)")
    ax.set_ylabel("FLOP/s reached")
    ax.set_title(f"Roofline: {bandwidth / 1e9:.0f} GB/s memory, {flops_per_s / 1e12:.2f} TFLOP/s matmul")
    ax.legend(fontsize=8)
    return ax
