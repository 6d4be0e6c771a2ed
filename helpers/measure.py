"""Measuring: time to first token and tokens/s with warm-up and medians, and the memory of this process.

Figures measured with these functions depend on the machine: print them next
to :func:`helpers.hardware.print_report` and prefer ratios measured in one run.
"""

from __future__ import annotations

import os
import statistics
import time
from collections.abc import Callable

import torch


def sync() -> None:
    """Wait for every visible GPU (a split model runs on several); a no-op without CUDA. Notebooks 02 and 04 time with it."""
    if torch.cuda.is_available():
        for i in range(torch.cuda.device_count()):
            torch.cuda.synchronize(i)


def rss_bytes() -> int:
    """Resident memory of this process in bytes (psutil). Explained in notebook 00."""
    import psutil

    return psutil.Process(os.getpid()).memory_info().rss


@torch.inference_mode()
def time_generate(model, inputs: dict | None, new_tokens: int = 32, repeats: int = 3, warmup: int = 1,
                  barrier: Callable[[], None] | None = None, **generate_kwargs) -> dict:
    """Time greedy ``model.generate`` on ``inputs``.

    Each repeat runs ``generate`` twice: once for one new token (time to first
    token: the prefill) and once for ``new_tokens`` forced tokens
    (``min_new_tokens=new_tokens``). Decode speed is
    ``(new_tokens - 1) / (t_full - t_first)``. Used in notebooks 04 and 05 and
    by the workers they launch.

    Args:
        model: a causal LM (any device map).
        inputs: the tokenizer's output (``input_ids``, ``attention_mask``),
            shape ``(batch, prompt_len)``, already on the first device.
        new_tokens: tokens generated per sequence (>= 2).
        repeats: timed runs; medians are returned.
        warmup: untimed runs first (the first run of a process is the slowest).
        barrier: for several processes timed together (replicas, tensor
            parallel), e.g. ``dist.barrier``: called before the clock starts
            and again before it stops, so every process measures the slowest
            one. ``inputs=None`` then means this process has no share of the
            batch: it only takes part in the barriers.
        generate_kwargs: passed to ``generate`` (e.g. ``pad_token_id``).

    Returns:
        ``{"ttft_s": seconds, "tokens_per_s": new tokens per second per
        sequence during decoding, "batch": batch size,
        "total_tokens_per_s": tokens_per_s * batch, "wall_s": median seconds
        of a whole ``new_tokens`` run, "runs": repeats}``.

    Raises:
        ValueError: ``new_tokens`` < 2.
    """
    if new_tokens < 2:
        raise ValueError("new_tokens must be at least 2")
    kw = dict(do_sample=False, pad_token_id=getattr(model.generation_config, "pad_token_id", None))
    kw.update(generate_kwargs)

    def run(n: int) -> float:
        if barrier:
            barrier()
        sync()
        t0 = time.perf_counter()
        if inputs is not None:
            model.generate(**inputs, max_new_tokens=n, min_new_tokens=n, **kw)
        sync()
        if barrier:
            barrier()
        return time.perf_counter() - t0

    for _ in range(warmup):
        run(new_tokens)
    firsts, fulls = [], []
    for _ in range(repeats):
        firsts.append(run(1))
        fulls.append(run(new_tokens))
    ttft = statistics.median(firsts)
    wall = statistics.median(fulls)
    decode = max(wall - ttft, 1e-9)
    batch = int(inputs["input_ids"].shape[0]) if inputs is not None else 0
    tps = (new_tokens - 1) / decode
    return {"ttft_s": ttft, "tokens_per_s": tps, "batch": batch, "total_tokens_per_s": tps * batch, "wall_s": wall,
            "runs": repeats}
