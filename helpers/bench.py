"""Measuring generation: time to first token and tokens/s, with warm-up and medians.

Figures measured with these functions depend on the machine: print them next
to :func:`helpers.hardware.report` and prefer ratios measured in one run.
"""

from __future__ import annotations

import statistics
import time

import torch


def _sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


@torch.inference_mode()
def time_generate(model, inputs: dict, new_tokens: int = 32, repeats: int = 3, warmup: int = 1) -> dict:
    """Time greedy ``model.generate`` on ``inputs``.

    Each repeat runs ``generate`` twice: once for one new token (time to first
    token: the prefill) and once for ``new_tokens`` forced tokens
    (``min_new_tokens=new_tokens``). Decode speed is
    ``(new_tokens - 1) / (t_full - t_first)``.

    Args:
        model: a causal LM (any device map).
        inputs: the tokenizer's output (``input_ids``, ``attention_mask``),
            shape ``(batch, prompt_len)``, already on the first device.
        new_tokens: tokens generated per sequence (>= 2).
        repeats: timed runs; medians are returned.
        warmup: untimed runs first (the first run of a process is the slowest).

    Returns:
        ``{"ttft_s": seconds, "tokens_per_s": new tokens per second per
        sequence during decoding, "batch": batch size,
        "total_tokens_per_s": tokens_per_s * batch, "runs": repeats}``.
    """
    if new_tokens < 2:
        raise ValueError("new_tokens must be at least 2")
    kw = dict(do_sample=False, pad_token_id=getattr(model.generation_config, "pad_token_id", None))

    def run(n: int) -> float:
        _sync()
        t0 = time.perf_counter()
        model.generate(**inputs, max_new_tokens=n, min_new_tokens=n, **kw)
        _sync()
        return time.perf_counter() - t0

    for _ in range(warmup):
        run(new_tokens)
    firsts, fulls = [], []
    for _ in range(repeats):
        firsts.append(run(1))
        fulls.append(run(new_tokens))
    ttft = statistics.median(firsts)
    decode = max(statistics.median(fulls) - ttft, 1e-9)
    batch = int(inputs["input_ids"].shape[0])
    tps = (new_tokens - 1) / decode
    return {"ttft_s": ttft, "tokens_per_s": tps, "batch": batch, "total_tokens_per_s": tps * batch, "runs": repeats}
