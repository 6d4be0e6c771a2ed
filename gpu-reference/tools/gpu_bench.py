"""Measure generation on this machine's GPUs for the GPU reference: one GPU, split, replicas, tensor parallel, offload.

Run on a machine with one or more CUDA GPUs (the workbook's references: one H200, two H200)::

    python gpu-reference/tools/gpu_bench.py --out gpu-reference/one-gpu/results.json

The model is a RANDOM-weight Llama of the llama-1b shape (hidden 2048, 22
layers, 32 heads, 4 key/value heads, 1.1 B parameters) in bfloat16, built once
on the machine (``helpers.checkpoints.random_checkpoint``): its text is
meaningless, every figure says so. Greedy ``generate``, eager, ``--tokens``
new tokens after a 32-token prompt, warm-up then medians of 3 repeats with
their spread (``helpers.measure.time_generate``: a timing too noisy to mean
anything raises ``MeasurementError``; such a measurement, or one above its
limit, is left out of ``records`` and listed in ``refused`` with the reason).

Every speed measurement is a record in ``records``::

    {"shape": "llama-1b", "format": "bf16" | "nf4", "path": "one GPU" | "split" | "replicas" |
     "tensor parallel" | "cpu offload", "batch": total sequences in flight, "gpus": GPUs used,
     "tokens_per_s": total new tokens per second (median of the repeats), "spread": [lowest, highest]
     total tokens/s of the repeats, "tokens_per_s_per_sequence": ..., "ttft_s": ...,
     "limit_tokens_per_s": the bandwidth limit for that path and batch, "peak_bytes_per_gpu": [...]}

The limit is measured in the same run: ``bandwidth`` is a device-to-device copy
of 2 GiB on GPU 0 (bytes read plus bytes written, divided by the time, median of
5); a decode step reads every weight once (the input embedding only one row per
sequence) plus the KV cache, so ``limit = batch * bandwidth / bytes read per step``
(a split reads the same bytes one GPU after the other; replicas and tensor
parallel read them on several GPUs at once; CPU offload adds the offloaded bytes
at the pinned host-to-device copy rate, ``h2d``).

The file is written again after every measurement, and each measurement is
first kept as it came (``raw``: what ``time_generate`` or a worker returned,
with its labels) before anything is formatted from it: a field missing from a
measurement refuses that measurement (the reason in ``refused``) and an error
later in the run stops it with the file written (``error``), never losing what
was measured before.

Other sections: ``hardware`` and ``versions`` (helpers.hardware.report()),
``h2d`` (host-to-device copy rate, pinned and pageable), ``saturation`` (the
smallest batch at which doubling it raises one GPU's tokens/s by less than
10%), ``nf4`` (module type, weight device and bitsandbytes library of a
quantized layer), ``split`` (what each GPU holds; 2+ GPUs), ``tensor_parallel``
(the float32 logits check; 2+ GPUs) and ``offload`` (decoder layers kept on the
CPU against seconds per token, and the effective host-to-device rate).
"""

from __future__ import annotations

import argparse
import gc
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))  # this file lives in gpu-reference/tools/

SHAPE = "llama-1b"
PROMPT = 32


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", required=True, help="results JSON")
    ap.add_argument("--tokens", type=int, default=64, help="new tokens per timed run")
    ap.add_argument("--batches", type=int, nargs="*", default=[1, 2, 4, 8, 16, 32, 64, 128, 256, 512],
                    help="batch sweep on one GPU (powers of two: saturation compares each with its double)")
    ap.add_argument("--offload-layers", type=int, nargs="*", default=[0, 4, 8, 16],
                    help="decoder layers kept on the CPU, one run each")
    ap.add_argument("--offload-tokens", type=int, default=16)
    ap.add_argument("--skip", nargs="*", default=[],
                    help="sections to skip: nf4 split replicas tensor_parallel offload")
    return ap.parse_args(argv)


def free():
    import torch

    gc.collect()
    torch.cuda.empty_cache()
    for i in range(torch.cuda.device_count()):
        torch.cuda.reset_peak_memory_stats(i)


def per_gpu(fn) -> list[int]:
    import torch

    return [int(fn(i)) for i in range(torch.cuda.device_count())]


def device_bandwidth(n_bytes: int = 2 * 2**30, runs: int = 5) -> dict:
    """A device-to-device copy on GPU 0: (bytes read + bytes written) / time, median of ``runs``."""
    import torch

    src = torch.ones(n_bytes, dtype=torch.uint8, device="cuda:0")
    dst = torch.empty_like(src)
    dst.copy_(src)  # warm-up
    times = []
    for _ in range(runs):
        torch.cuda.synchronize()
        t = time.perf_counter()
        dst.copy_(src)
        torch.cuda.synchronize()
        times.append(time.perf_counter() - t)
    del src, dst
    free()
    return {"bytes_copied": n_bytes, "runs": runs, "median_s": statistics.median(times),
            "GBps": 2 * n_bytes / statistics.median(times) / 1e9}


def h2d_rates(n_bytes: int = 2**30) -> dict:
    import torch

    out = {}
    for kind in ("pageable", "pinned"):
        src = torch.empty(n_bytes, dtype=torch.uint8, pin_memory=(kind == "pinned"))
        src.fill_(1)
        dst = torch.empty(n_bytes, dtype=torch.uint8, device="cuda:0")
        times = []
        for _ in range(4):
            torch.cuda.synchronize()
            t = time.perf_counter()
            dst.copy_(src, non_blocking=(kind == "pinned"))
            torch.cuda.synchronize()
            times.append(time.perf_counter() - t)
        out[f"{kind}_GBps"] = n_bytes / sorted(times)[1] / 1e9
        del src, dst
    free()
    return out


def step_bytes(model, batch: int, context: int, weight_bytes: int | None = None) -> int:
    """Bytes a decode step reads: weights (the input embedding one row per sequence) plus the KV cache."""
    cfg = model.config
    emb = model.get_input_embeddings().weight
    weights = weight_bytes if weight_bytes is not None else model.get_memory_footprint()
    rows = batch * emb.shape[1] * emb.element_size()
    head_dim = cfg.hidden_size // cfg.num_attention_heads
    kv = 2 * cfg.num_hidden_layers * cfg.num_key_value_heads * head_dim * 2 * context * batch
    return int(weights - emb.numel() * emb.element_size() + rows + kv)


def timed(model, vocab: int, batch: int, tokens: int, limit: float) -> dict:
    """Time ``batch`` random prompts against ``limit`` (total tokens/s). Raises MeasurementError (time_generate)."""
    import torch

    from helpers.measure import time_generate

    g = torch.Generator().manual_seed(batch)
    ids = torch.randint(0, vocab, (batch, PROMPT), generator=g)
    first = model.get_input_embeddings().weight.device
    inputs = {"input_ids": ids.to(first), "attention_mask": torch.ones_like(ids).to(first)}
    r = time_generate(model, inputs, new_tokens=tokens, repeats=3, warmup=1, limit_tokens_per_s=limit / batch)
    return {**r, "spread_total": [batch * r["spread"][0], batch * r["spread"][1]]}


NEEDED = ("total_tokens_per_s", "spread_total", "tokens_per_s")
"""The fields of a measurement that :func:`record` makes a record of."""


def record(fmt: str, path: str, batch: int, gpus: int, r: dict, limit: float, refused: list) -> dict | None:
    """A record of ``r`` (total and per-sequence tokens/s, ``spread_total``), or None when it cannot be one.

    A measurement that failed (``r["error"]``: time_generate's MeasurementError), lacks a field of
    :data:`NEEDED` or whose median is above ``limit`` is not a rate: it goes to ``refused`` with the
    reason, and the caller records nothing (:class:`Results` kept the measurement itself in ``raw``).
    """
    import torch

    what = {"format": fmt, "path": path, "batch": batch}
    missing = [k for k in NEEDED if k not in r]
    if "error" in r or missing or r["total_tokens_per_s"] > limit:
        reason = (r.get("error") or (f"the measurement has no {', '.join(missing)} (it is kept in raw)" if missing
                                     else f"{r['total_tokens_per_s']:.4g} tokens/s is above the limit {limit:.4g}"))
        refused.append({**what, "reason": reason})
        print(f"   {path:<16} {fmt:<5} batch {batch:>3}: refused: {reason}", flush=True)
        return None
    row = {"shape": SHAPE, **what, "gpus": gpus, "tokens_per_s": r["total_tokens_per_s"],
           "spread": r["spread_total"], "tokens_per_s_per_sequence": r["tokens_per_s"], "ttft_s": r.get("ttft_s"),
           "limit_tokens_per_s": limit, "peak_bytes_per_gpu": per_gpu(torch.cuda.max_memory_allocated)}
    print(f"   {path:<16} {fmt:<5} batch {batch:>3}: {row['tokens_per_s']:9.1f} tokens/s (repeats "
          f"{row['spread'][0]:.1f} to {row['spread'][1]:.1f}) = {row['tokens_per_s'] / limit:.1%} of {limit:,.0f}",
          flush=True)
    return row


class Results:
    """The results file of a run, written whole after every measurement.

    ``res`` gets ``raw`` (every measurement as it came, with its labels),
    ``records`` and ``refused``; :meth:`keep` saves a measurement in ``raw``
    before :func:`record` formats anything from it.
    """

    def __init__(self, out: Path, res: dict):
        self.out, self.res, self.t_start = Path(out), res, time.perf_counter()
        for key in ("raw", "records", "refused"):
            res.setdefault(key, [])

    def save(self) -> None:
        self.res["wall_s"] = round(time.perf_counter() - self.t_start, 1)
        self.out.parent.mkdir(parents=True, exist_ok=True)
        self.out.write_text(json.dumps(self.res, indent=1, default=str))

    def measured(self, section: str, r: dict, **labels) -> dict:
        """Keep ``r`` in ``raw`` as it came and write the file; returns ``r``."""
        self.res["raw"].append({"section": section, **labels, "measured": r})
        self.save()
        return r

    def keep(self, fmt: str, path: str, batch: int, gpus: int, r: dict, limit: float, raw: bool = True,
             **labels) -> dict | None:
        """:func:`record` of ``r``, kept in ``records``; ``r`` itself is saved in ``raw`` first, with ``labels``
        (``raw=False``: it already is, inside a worker's report)."""
        if raw:
            self.measured(path, r, format=fmt, batch=batch, gpus=gpus, limit_tokens_per_s=limit, **labels)
        rec = record(fmt, path, batch, gpus, r, limit, self.res["refused"])
        if rec is not None:
            self.res["records"].append(rec)
        self.save()
        return rec


def measure(model, vocab: int, batch: int, tokens: int, limit: float) -> dict:
    """:func:`timed`, with a MeasurementError returned as ``{"error": message}`` for :func:`record`."""
    from helpers.measure import MeasurementError

    try:
        return timed(model, vocab, batch, tokens, limit)
    except MeasurementError as e:
        return {"error": f"MeasurementError: {e}"}


def saturation(rows: list[dict]) -> dict:
    """The smallest batch b whose double raises one GPU's total tokens/s by less than 10%."""
    by_batch = {r["batch"]: r["tokens_per_s"] for r in rows}
    for b in sorted(by_batch):
        if 2 * b in by_batch and by_batch[2 * b] < 1.10 * by_batch[b]:
            return {"batch": b, "rule": "smallest batch whose double adds < 10% tokens/s", "found": True}
    return {"batch": max(by_batch), "rule": "smallest batch whose double adds < 10% tokens/s", "found": False}


def main(argv=None) -> int:
    args = parse_args(argv)
    import torch

    from helpers.hardware import report
    from helpers.launch import SAFE_ENV

    n_gpus = torch.cuda.device_count() if torch.cuda.is_available() else 0
    if n_gpus < 1:
        print("gpu_bench needs a CUDA GPU; this machine has none.", file=sys.stderr)
        return 2
    res: dict = {"tier": "one-gpu" if n_gpus == 1 else "two-gpu", "hardware": report(), "env": SAFE_ENV,
                 "new_tokens": args.tokens, "prompt_tokens": PROMPT}
    res["versions"] = {k: res["hardware"].get(k) for k in
                       ("python", "torch", "transformers", "accelerate", "bitsandbytes", "cuda")}
    results = Results(Path(args.out), res)
    try:
        return bench(args, n_gpus, results)
    except BaseException as e:  # the file keeps what was measured, and says why the run stopped
        res["error"] = f"{type(e).__name__}: {e}"
        raise
    finally:
        results.save()


def bench(args, n_gpus: int, results: Results) -> int:
    """The measurements of :func:`main`, each saved by ``results`` as soon as it is made."""
    import torch
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    from helpers.checkpoints import random_checkpoint
    from helpers.devicemap import placement
    from helpers.hardware import bnb_library
    from helpers.launch import launch
    from helpers.shapes import n_params
    from helpers.quiet import silence_known_warnings

    silence_known_warnings()  # bnb_library() imports bitsandbytes: its import notice is a known, harmless one

    res, refused, save = results.res, results.res["refused"], results.save

    keep = results.keep

    print("== bandwidth (device-to-device copy) and host-to-device copy", flush=True)
    res["bandwidth"] = device_bandwidth()
    res["h2d"] = h2d_rates()
    save()
    bw = res["bandwidth"]["GBps"] * 1e9
    print(f"   {res['bandwidth']['GBps']:.0f} GB/s on GPU 0; h2d", {k: round(v, 1) for k, v in res["h2d"].items()})

    t = time.perf_counter()
    ckpt = random_checkpoint(SHAPE, torch.bfloat16, device="cuda")
    res["model"] = {"shape": SHAPE, "random_weights": True, "dtype": "bfloat16",
                    "label": "RANDOM weights, llama-1b shape (hidden 2048, 22 layers, 32 heads, 4 kv heads)",
                    "build_or_verify_s": round(time.perf_counter() - t, 1)}
    context = PROMPT + args.tokens // 2  # the KV cache's mean length over a run

    def load(**kw):
        t0 = time.perf_counter()
        m = AutoModelForCausalLM.from_pretrained(ckpt, **kw).eval()
        torch.cuda.synchronize()
        return m, time.perf_counter() - t0

    print("== one GPU, bf16: batch sweep", flush=True)
    model, load_s = load(dtype=torch.bfloat16, device_map={"": 0})
    vocab = model.config.vocab_size
    res["model"].update(params=n_params(model), weight_bytes=int(model.get_memory_footprint()),
                        layers=model.config.num_hidden_layers, load_s=round(load_s, 2))
    res["model"]["step_bytes_batch_1"] = base = step_bytes(model, 1, context)
    extra = step_bytes(model, 2, context) - base  # one more sequence: an embedding row and its KV cache

    def replica_limit(total: int, gpus: int) -> float:
        """Total tokens/s when each of ``gpus`` GPUs reads a whole step's bytes for its own share of ``total``
        (split_between_processes: the largest share, ``ceil(total / gpus)``, sets the pace)."""
        return total * bw / (base + (-(-total // gpus) - 1) * extra)

    def tp_limit(batch: int, gpus: int) -> float:
        """Total tokens/s when each of ``gpus`` GPUs reads 1/gpus of a step's bytes for all ``batch`` sequences."""
        return gpus * batch * bw / (base + (batch - 1) * extra)
    limit = {b: b * bw / step_bytes(model, b, context) for b in args.batches}
    one = [keep("bf16", "one GPU", b, 1, measure(model, vocab, b, args.tokens, limit[b]), limit[b])
           for b in args.batches]
    one = [r for r in one if r is not None]
    res["saturation"] = saturation(one)
    sat = res["saturation"]["batch"]
    print(f"   one GPU saturates at batch {sat} ({res['saturation']})", flush=True)
    del model
    free()
    save()

    if "nf4" not in args.skip:
        print("== one GPU, NF4 (bitsandbytes, bf16 compute)", flush=True)
        q = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=torch.bfloat16)
        model, load_s = load(dtype=torch.bfloat16, device_map={"": 0}, quantization_config=q)
        lin = model.model.layers[-1].mlp.down_proj
        nf4_bytes = int(model.get_memory_footprint())
        res["nf4"] = {"load_s": round(load_s, 2), "footprint_bytes": nf4_bytes,
                      "module_type": f"{type(lin).__module__}.{type(lin).__name__}",
                      "weight_type": type(lin.weight).__name__, "weight_device": str(lin.weight.device),
                      "bnb_library": bnb_library()}
        for b in (1, 16):
            lim = b * bw / step_bytes(model, b, context, nf4_bytes)
            keep("nf4", "one GPU", b, 1, measure(model, vocab, b, args.tokens, lim), lim)
        del model, lin
        free()
        save()

    if n_gpus >= 2 and "split" not in args.skip:
        print("== split over the GPUs (device_map='balanced')", flush=True)
        model, load_s = load(dtype=torch.bfloat16, device_map="balanced")
        res["split"] = {"load_s": round(load_s, 2), "device_map": "balanced",
                        "placement": {str(d): w for d, w in placement(model, model.hf_device_map).items()},
                        "mem_after_load_bytes": per_gpu(torch.cuda.memory_allocated)}
        for b in sorted({1, 16, sat}):  # one GPU works at a time: the same bytes, the same limit
            lim = b * bw / step_bytes(model, b, context)
            keep("bf16", "split", b, n_gpus, measure(model, vocab, b, args.tokens, lim), lim)
        del model
        free()
        save()

    if "replicas" not in args.skip:
        batches = sorted({n_gpus, 16 * n_gpus, sat * n_gpus})  # equal batch per GPU: 1, 16 and saturating
        print(f"== one replica per GPU ({n_gpus}): torchrun workers/replicas.py, total batches {batches}", flush=True)
        with tempfile.TemporaryDirectory() as d:
            t0 = time.perf_counter()
            launch(["torchrun", "--standalone", f"--nproc_per_node={n_gpus}", "workers/replicas.py",
                    "--expect-world-size", n_gpus, "--model", ckpt, "--random-weights", "--out", f"{d}/r.json",
                    "--bench", "--batches", *batches, "--bench-tokens", args.tokens], timeout=900)
            rep = results.measured("replicas", json.loads(Path(d, "r.json").read_text()))  # the worker's report
        res["replicas_launch_and_run_s"] = round(time.perf_counter() - t0, 1)
        for r in rep.get("bench", []):  # each GPU reads the whole model for its own share of the batch
            rec = keep("bf16", "replicas", r["batch_total"], n_gpus, r, replica_limit(r["batch_total"], n_gpus),
                       raw=False)
            if rec:
                rec["peak_bytes_per_gpu"] = [p.get("peak_bytes", 0) for p in r.get("per_rank", [])]
        save()

    if n_gpus >= 2 and "tensor_parallel" not in args.skip:
        print("== tensor parallel: torchrun workers/tensor_parallel.py", flush=True)
        with tempfile.TemporaryDirectory() as d:
            t0 = time.perf_counter()
            launch(["torchrun", "--standalone", f"--nproc_per_node={n_gpus}", "workers/tensor_parallel.py",
                    "--expect-world-size", n_gpus, "--checkpoint", ckpt, "--out", f"{d}/tp.json",
                    "--bench", "--batches", *sorted({1, 16, sat}), "--bench-tokens", args.tokens], timeout=900)
            tp = results.measured("tensor parallel", json.loads(Path(d, "tp.json").read_text()))  # the report
        res["tensor_parallel"] = {"api": tp.get("api"), "logits_check": tp.get("logits_check"),
                                  "launch_and_run_s": round(time.perf_counter() - t0, 1)}
        for r in tp.get("bench", []):  # every GPU reads its share of the weights at once
            lim = tp_limit(r["batch"], n_gpus)
            rec = keep("bf16", "tensor parallel", r["batch"], n_gpus, r, lim, raw=False)
            if rec:
                rec["peak_bytes_per_gpu"] = [p.get("peak_bytes", 0) for p in tp.get("per_rank", [])]
        save()

    if "offload" not in args.skip:
        print("== CPU offload on GPU 0", flush=True)
        rows = []
        n_layers = res["model"]["layers"]
        for k in args.offload_layers:
            dm = {"model.embed_tokens": 0, "model.norm": 0, "model.rotary_emb": 0, "lm_head": 0}
            dm.update({f"model.layers.{i}": ("cpu" if i < k else 0) for i in range(n_layers)})
            model, _ = load(dtype=torch.bfloat16, device_map=dm)
            off = sum(p.numel() * p.element_size() for n, p in model.named_parameters()
                      if n.startswith("model.layers.") and int(n.split(".")[2]) < k)
            # the bytes left on GPU 0 at its copy rate, the offloaded ones at the pinned host-to-device rate
            lim = 1 / ((base - off) / bw + off / (res["h2d"]["pinned_GBps"] * 1e9))
            rec = keep("bf16", "cpu offload", 1, 1, measure(model, vocab, 1, args.offload_tokens, lim), lim,
                       layers_on_cpu=k, bytes_offloaded=off)
            if rec:
                rec.update(layers_on_cpu=k, bytes_offloaded=off, s_per_token=1 / rec["tokens_per_s"])
                rows.append(rec)
            del model
            free()
        import numpy as np

        if len(rows) < 2:
            raise SystemExit(f"offload: {len(rows)} measurement(s) left after refusals ({refused}): run again")
        x = np.array([r["bytes_offloaded"] for r in rows], dtype=float)
        y = np.array([r["s_per_token"] for r in rows])
        slope, intercept = np.polyfit(x, y, 1)
        res["offload"] = {"tokens": args.offload_tokens, "batch": 1, "fit_s_per_byte": slope,
                          "fit_intercept_s": intercept, "effective_h2d_GBps": (1 / slope) / 1e9 if slope > 0 else None}
        rate = res["offload"]["effective_h2d_GBps"]
        said = "none (the fit has no positive slope)" if rate is None else f"{rate:.1f} GB/s"
        print(f"   effective host-to-device rate: {said}", flush=True)
    save()
    print(f"written {results.out} in {res['wall_s']} s", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
