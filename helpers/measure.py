"""Measuring: time to first token and tokens/s with warm-up and medians, memory bandwidth and rate limits.

Figures measured with these functions depend on the machine: print them next
to :func:`helpers.hardware.print_report` and prefer ratios measured in one run.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable

import torch


def sync() -> None:
    """Wait for every visible GPU (a split model runs on several); a no-op without CUDA.

    Notebooks 02, 04 and 06 time with it.
    """
    if torch.cuda.is_available():
        for i in range(torch.cuda.device_count()):
            torch.cuda.synchronize(i)


class MeasurementError(RuntimeError):
    """A timing too short or too noisy to mean anything, or a rate above the machine's limit (notebook 04)."""


def memory_bandwidth(device: str | torch.device = "cpu", gib: float = 1.0, repeats: int = 5) -> float:
    """Memory bandwidth of ``device`` in bytes/s: a copy of ``gib`` GiB, bytes read plus written, median of ``repeats``.

    A copy reads each byte once and writes it once, so the rate counts ``2 * size`` bytes per copy
    (the STREAM "copy" convention). One untimed copy first. This is the limit a decode step that reads
    every weight once is measured against (:func:`decode_limit`). Explained in notebook 04.

    Raises:
        ValueError: ``gib`` below 1 (a smaller copy fits a CPU's caches and overstates the rate) or
            ``repeats`` below 3.
    """
    if gib < 1 or repeats < 3:
        raise ValueError("measure the bandwidth with a copy of at least 1 GiB and at least 3 repeats")
    n = int(gib * 2**30)
    src = torch.empty(n, dtype=torch.uint8, device=device).fill_(1)
    dst = torch.empty_like(src)
    dst.copy_(src)
    times = []
    for _ in range(repeats):
        sync()
        t0 = time.perf_counter()
        dst.copy_(src)
        sync()
        times.append(time.perf_counter() - t0)
    del src, dst
    return 2 * n / statistics.median(times)


def stored_bytes(t: torch.Tensor) -> int:
    """Bytes a tensor really holds: ``numel() * element_size()``, or for a tensor subclass the sum over the tensors
    it is made of (``__tensor_flatten__``).

    A torchao weight (``TorchAoConfig``) is a subclass whose ``dtype`` says bfloat16 while it holds int8 (or
    packed int4) data with its scales: counted by its dtype it would look as large as bf16. Notebook 04.
    """
    if hasattr(t, "__tensor_flatten__"):
        return sum(stored_bytes(getattr(t, name)) for name in t.__tensor_flatten__()[0])
    return t.numel() * t.element_size()


def decode_bytes(model: torch.nn.Module, batch: int = 1, context: int = 0) -> int:
    """Bytes one decode step must read: every weight once, the embedding as one row a token, and the KV cache.

    Every unique parameter and buffer is read once (a tied head shares the embedding's bytes, counted
    once, since the head reads the whole matrix); an untied input embedding is read as ``batch`` rows,
    not whole. The KV cache adds ``helpers.memory.kv_cache_bytes`` at ``context`` tokens, in the
    model's dtype. Tensors count the bytes they hold (:func:`stored_bytes`: a torchao weight by its int8 or
    int4 data and scales). A lower bound on the bytes moved, so :func:`decode_limit` is an upper bound on
    tokens/s. Explained in notebook 04.
    """
    from .memory import kv_cache_bytes

    emb = model.get_input_embeddings().weight
    head = model.get_output_embeddings()
    tied = head is not None and head.weight is emb
    seen, total = set(), 0
    for t in list(model.parameters()) + list(model.buffers()):
        if id(t) in seen:
            continue
        seen.add(id(t))
        total += stored_bytes(t)
    if not tied:
        total -= stored_bytes(emb) - batch * emb.shape[1] * emb.element_size()
    if context:
        total += kv_cache_bytes(model.config, context, batch, bytes_per_value=emb.element_size())
    return int(total)


def decode_limit(model: torch.nn.Module, bandwidth: float, batch: int = 1, context: int = 0) -> float:
    """The most total tokens/s decoding can reach: ``batch * bandwidth / decode_bytes(model, batch, context)``.

    ``bandwidth`` in bytes/s (:func:`memory_bandwidth` of the device that holds the weights). Every
    rate the workbook prints is set beside this limit. Explained in notebook 04.
    """
    return batch * bandwidth / decode_bytes(model, batch, context)


def rate_text(tokens_per_s: float, limit_tokens_per_s: float, spread: tuple[float, float] | None = None) -> str:
    """``"12.3 tokens/s (4.5% of the limit, 273 tokens/s)"``, with the spread of repeats when given.

    Every rate a notebook prints goes through here, so a test can read each stored rate beside its
    limit. Raises :class:`MeasurementError` for a rate above the limit: it cannot be true.
    """
    if tokens_per_s > limit_tokens_per_s:
        raise MeasurementError(f"{tokens_per_s:.4g} tokens/s is above this machine's limit of "
                               f"{limit_tokens_per_s:.4g} tokens/s: measure again on an idle machine")
    low_high = f", repeats {_rate(spread[0])} to {_rate(spread[1])}" if spread else ""
    return (f"{_rate(tokens_per_s)} tokens/s ({tokens_per_s / limit_tokens_per_s:.1%} of the limit, "
            f"{_rate(limit_tokens_per_s)} tokens/s{low_high})")


def _rate(v: float) -> str:
    """Three significant digits below 100, whole numbers with thousands separators above: 31.2, 1,093."""
    return f"{v:,.0f}" if v >= 100 else f"{v:.3g}"


@torch.inference_mode()
def time_generate(model: torch.nn.Module, inputs: dict | None, new_tokens: int = 32, repeats: int = 3, warmup: int = 1,
                  barrier: Callable[[], None] | None = None, limit_tokens_per_s: float | None = None,
                  **generate_kwargs: object) -> dict:
    """Time greedy ``model.generate`` on ``inputs``.

    Each repeat runs ``generate`` twice: once for one new token (time to first
    token: the prefill) and once for ``new_tokens`` forced tokens
    (``min_new_tokens=new_tokens``). Decode speed of a repeat is
    ``(new_tokens - 1) / (t_full - t_first)``; the median over repeats is
    returned with its spread. A repeat whose full run was not clearly longer
    than its first token (a busy machine) is measured again, up to
    ``repeats`` more times; then :class:`MeasurementError` is raised rather
    than a rate divided by noise. Used in notebooks 01, 04, 07 and 08 and by the
    workers they launch.

    Args:
        model: a causal LM (any device map).
        inputs: the tokenizer's output (``input_ids``, ``attention_mask``),
            shape ``(batch, prompt_len)``, already on the first device.
        new_tokens: tokens generated per sequence (>= 2).
        repeats: timed repeats (>= 3, so a spread exists); medians are returned.
        warmup: untimed runs first (the first run of a process is the slowest).
        barrier: for several processes timed together (replicas, tensor
            parallel), e.g. ``dist.barrier``: called before the clock starts
            and again before it stops, so every process measures the slowest
            one. ``inputs=None`` then means this process has no share of the
            batch: it only takes part in the barriers.
        limit_tokens_per_s: this machine's limit per sequence
            (:func:`decode_limit` divided by the batch); a median above it
            raises :class:`MeasurementError`.
        generate_kwargs: passed to ``generate`` (e.g. ``pad_token_id``).

    Returns:
        ``{"ttft_s": seconds, "tokens_per_s": new tokens per second per
        sequence during decoding (median), "spread": (lowest, highest) of the
        repeats, "batch": batch size, "total_tokens_per_s": tokens_per_s *
        batch, "wall_s": median seconds of a whole ``new_tokens`` run,
        "runs": repeats}``.

    Raises:
        ValueError: ``new_tokens`` < 2 or ``repeats`` < 3.
        MeasurementError: the decode time stayed indistinguishable from the
            first token's, or the median is above ``limit_tokens_per_s``.
    """
    if new_tokens < 2:
        raise ValueError("new_tokens must be at least 2")
    if repeats < 3:
        raise ValueError("repeats must be at least 3: one or two runs give no spread to judge a rate by")
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
    firsts, fulls, rates = [], [], []
    retries = 0
    while len(rates) < repeats:
        first, full = run(1), run(new_tokens)
        # a decode that took under 5% of the run, or no time at all, is noise, not a rate
        if full - first <= 0.05 * full:
            retries += 1
            if retries > repeats:
                raise MeasurementError(
                    f"generate of {new_tokens} tokens took no longer than of 1 token ({full:.3g} s against "
                    f"{first:.3g} s) in {retries} tries: the machine is too busy or new_tokens too small to "
                    "time decoding; raise new_tokens or run again on an idle machine")
            continue
        firsts.append(first)
        fulls.append(full)
        rates.append((new_tokens - 1) / (full - first))
    ttft = statistics.median(firsts)
    wall = statistics.median(fulls)
    batch = int(inputs["input_ids"].shape[0]) if inputs is not None else 0
    tps = statistics.median(rates)
    if limit_tokens_per_s is not None and tps > limit_tokens_per_s:
        raise MeasurementError(f"{tps:.4g} tokens/s is above this machine's limit of {limit_tokens_per_s:.4g}: "
                               "measure again on an idle machine")
    return {"ttft_s": ttft, "tokens_per_s": tps, "spread": (min(rates), max(rates)), "batch": batch,
            "total_tokens_per_s": tps * batch, "wall_s": wall, "runs": repeats}


def compare_rates(a: dict, b: dict, a_name: str = "a", b_name: str = "b") -> str:
    """How rate ``a`` compares with rate ``b``, the spread of their repeats first.

    ``a`` and ``b`` are :func:`time_generate` results or GPU reference records: ``tokens_per_s`` and,
    where repeats were recorded, ``spread`` (lowest, highest), both in the same unit (per sequence or
    total) for the two. The ratio's range over the repeats runs from ``a``'s lowest over ``b``'s highest
    to ``a``'s highest over ``b``'s lowest. A range that holds 1.00 is "no measurable difference", never
    a gain or a loss.

    Without a spread on both, the figures come from benchmark runs that recorded no repeats; then the
    **noise bound** judges them: ``noise_bound`` in either record (``helpers.reference.read_reference``
    adds it: the largest ratio between two runs of the same configuration in the reference files, e.g.
    1.90). A median ratio outside ``[1 / bound, bound]`` is a difference ("split is slower", the bound
    named); one inside it is "within the 1.90x two runs of the same configuration differed by: no
    difference can be claimed". Without a bound either, no difference is claimed.
    Returns one sentence, e.g. ``"split / single: repeats 0.41x to 0.52x, median 0.47x: split is slower"``.
    Notebooks 04, 06 and 07.
    """
    def x(v: float) -> str:  # two decimals, or two significant digits below 0.1
        return f"{v:.2f}x" if v >= 0.1 else f"{v:.2g}x"

    ratio = a["tokens_per_s"] / b["tokens_per_s"]
    head = f"{a_name} / {b_name}:"
    if not (a.get("spread") and b.get("spread")):
        bound = max((r["noise_bound"] for r in (a, b) if r.get("noise_bound")), default=None)
        if bound is None:
            return (f"{head} {x(ratio)}, figures of one benchmark run with no spread of repeats recorded: "
                    "no difference can be claimed from it")
        if 1 / bound <= ratio <= bound:
            return (f"{head} {x(ratio)}, within the {bound:.2f}x two runs of the same configuration differed by: "
                    "no difference can be claimed")
        return (f"{head} {x(ratio)}, beyond the {bound:.2f}x two runs of the same configuration differed by "
                f"(no spread of repeats recorded): {a_name} is {'slower' if ratio < 1 else 'faster'}")
    lo, hi = a["spread"][0] / b["spread"][1], a["spread"][1] / b["spread"][0]
    if lo <= 1 <= hi:
        verdict = "no measurable difference"
    else:
        verdict = f"{a_name} is {'slower' if hi < 1 else 'faster'}"
    return f"{head} repeats {x(lo)} to {x(hi)}, median {x(ratio)}: {verdict}"


def allocation_peak(fn: Callable[[], object], device: str | torch.device = "cpu") -> tuple[object, int]:
    """Run ``fn()`` and return ``(its result, the peak of bytes torch allocated during it beyond what was live
    before)``: the transient memory of a forward pass, the KV cache it builds included.

    On a GPU: ``torch.cuda.max_memory_allocated`` after ``reset_peak_memory_stats``, less the bytes allocated
    before. On the CPU, where torch keeps no such counter, from the allocation and free events of
    ``torch.profiler`` (``profile_memory=True``): their running sum's maximum. Both count tensors only, not what
    the C allocator or the CUDA caching allocator keeps around them, so they do not move with other processes
    or with memory freed earlier, which a process's resident size does. The CPU count includes tensors
    allocated by other threads of this process during ``fn``. Notebook 05 measures the prefill peak with it.

    Raises:
        ValueError: a device that is neither "cpu" nor a CUDA device.
    """
    dev = torch.device(device)
    if dev.type == "cuda":
        sync()
        torch.cuda.reset_peak_memory_stats(dev)
        before = torch.cuda.memory_allocated(dev)
        out = fn()
        sync()
        return out, int(torch.cuda.max_memory_allocated(dev) - before)
    if dev.type != "cpu":
        raise ValueError(f"allocation_peak measures 'cpu' or a CUDA device, not {device!r}")
    import os
    import sys

    from torch.profiler import ProfilerActivity, profile

    # kineto writes "USDT: ... profiler_start" / "profiler_stop" straight to file descriptor 2 (C++, not Python's
    # sys.stderr; KINETO_LOG_LEVEL does not stop it): a notebook would show them as error output. fd 2 goes to
    # /dev/null while the profiler starts and stops, and comes back in every case.
    sys.stderr.flush()
    saved, null = os.dup(2), os.open(os.devnull, os.O_WRONLY)
    try:
        os.dup2(null, 2)
        with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
            os.dup2(saved, 2)  # fn's own messages keep their place
            try:
                out = fn()
            finally:
                sys.stderr.flush()
                os.dup2(null, 2)
    finally:
        os.dup2(saved, 2)
        os.close(saved)
        os.close(null)
    events = sorted((e for e in prof.profiler.kineto_results.events()
                     if e.name() == "[memory]" and e.device_type() == torch.autograd.DeviceType.CPU),
                    key=lambda e: e.start_ns())
    live = peak = 0
    for e in events:
        live += e.nbytes()
        peak = max(peak, live)
    return out, int(peak)


_LOAD_CHILD = r"""
import json, sys, threading, time
path, fmt, dtype_name = sys.argv[1:4]
import torch, transformers, bitsandbytes  # noqa: F401  imported before the baseline: their memory is not the load's
from transformers import AutoModelForCausalLM, BitsAndBytesConfig

def status():
    out = {}
    with open("/proc/self/status") as f:
        for line in f:
            key, _, value = line.partition(":")
            if key in ("VmRSS", "RssAnon", "RssFile"):
                out[key] = int(value.split()[0]) * 1024
    return out

q = {"int8": BitsAndBytesConfig(load_in_8bit=True),
     "nf4": BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=torch.bfloat16),
     "nf4-dq": BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                                  bnb_4bit_compute_dtype=torch.bfloat16)}.get(fmt)
base = status()
peak = dict(base)
done = threading.Event()

def sample():
    while not done.is_set():
        for k, v in status().items():
            peak[k] = max(peak[k], v)
        time.sleep(0.002)

t = threading.Thread(target=sample, daemon=True)
t.start()
t0 = time.perf_counter()
model = AutoModelForCausalLM.from_pretrained(path, dtype=getattr(torch, dtype_name), quantization_config=q,
                                             device_map={"": "cpu"})
wall = time.perf_counter() - t0
done.set()
t.join()
after = status()
largest = max([m.in_features * m.out_features for m in model.modules()
               if type(m).__name__ in ("Linear4bit", "Linear8bitLt")] or [0])
print("LOAD-PEAK " + json.dumps({
    "anon_peak": peak["RssAnon"] - base["RssAnon"], "anon_after": after["RssAnon"] - base["RssAnon"],
    "file_peak": peak["RssFile"] - base["RssFile"], "rss_peak": peak["VmRSS"] - base["VmRSS"],
    "footprint": model.get_memory_footprint(), "largest_quantized": largest, "wall_s": wall}))
"""


def load_peak_rss(path: str, fmt: str = "nf4", dtype: str = "bfloat16", pin_allocator: bool = True,
                  timeout_s: float = 900) -> dict:
    """Load a checkpoint on the CPU with ``from_pretrained`` in a fresh Python process and return its memory,
    sampled every 2 ms from ``/proc/self/status`` while the load runs (bytes above the baseline taken after
    importing torch, transformers and bitsandbytes).

    Returns:
        ``{"anon_peak": anonymous memory at its peak, "anon_after": anonymous memory once loaded, "file_peak":
        file-backed pages at their peak (the memory-mapped checkpoint and libraries loaded during the load:
        reclaimable), "rss_peak": resident set at its peak, "footprint": get_memory_footprint(),
        "largest_quantized": elements of the largest quantized weight, "wall_s"}``. ``anon_peak - anon_after``
        is the load's transient, to set beside ``helpers.memory.load_peak_bytes(...) - weights`` on the CPU;
        ``anon_after - footprint`` is memory the load leaves besides the weights (modules imported lazily,
        bitsandbytes' state).

    ``pin_allocator=True`` starts the process with ``MALLOC_MMAP_THRESHOLD_=131072`` and
    ``MALLOC_TRIM_THRESHOLD_=131072``: glibc then returns freed blocks to the system at once. Without them glibc
    raises its mmap threshold after each large free and keeps freed memory in its heap, so the resident peak
    also holds blocks no tensor uses (the bundled model in NF4: a peak of +152 MiB pinned; +164 to +392 MiB in
    three runs with glibc's defaults).
    Linux only (``/proc``). Notebook 05.

    Raises:
        RuntimeError: not Linux, or the load failed (its last output lines are in the message).
        ValueError: an unknown format.
        subprocess.TimeoutExpired: the load ran past ``timeout_s``.
    """
    import json
    import os
    import subprocess
    import sys
    from pathlib import Path

    if fmt not in ("bf16", "fp16", "fp32", "int8", "nf4", "nf4-dq"):
        raise ValueError(f"unknown format {fmt!r}; choose bf16, fp16, fp32, int8, nf4 or nf4-dq")
    if not Path("/proc/self/status").is_file():
        raise RuntimeError("load_peak_rss reads /proc/self/status: Linux only")
    if fmt in ("fp16", "fp32"):
        dtype = {"fp16": "float16", "fp32": "float32"}[fmt]
    env = dict(os.environ)
    if pin_allocator:
        env.update(MALLOC_MMAP_THRESHOLD_="131072", MALLOC_TRIM_THRESHOLD_="131072")
    root = str(Path(__file__).resolve().parent.parent)
    env["PYTHONPATH"] = root + os.pathsep + env.get("PYTHONPATH", "")
    run = subprocess.run([sys.executable, "-c", _LOAD_CHILD, str(path), fmt, dtype], env=env, capture_output=True,
                         text=True, timeout=timeout_s)
    lines = [line for line in run.stdout.splitlines() if line.startswith("LOAD-PEAK ")]
    if run.returncode or not lines:
        tail = "\n".join((run.stdout + run.stderr).splitlines()[-15:])
        raise RuntimeError(f"the load in a fresh process failed (exit {run.returncode}):\n{tail}")
    return json.loads(lines[-1][len("LOAD-PEAK "):])
