"""What only a GPU can show of notebook 05 (fit a model bigger than your GPU), measured on one GPU.

RANDOM weights of the llama-1b shape (helpers.shapes), bf16 checkpoint built once on the GPU. Every run is
greedy, batch 1, a 16-token prompt, 32 new tokens, medians of 3 after a warm-up, on GPU 0:

- ``h2d``: host-to-device copy rate of 1 GiB, pageable and pinned (bytes / second).
- ``recipes``: the same checkpoint loaded whole on the GPU (bf16, NF4) and with whole decoder layers on the
  CPU or on disk: NF4 on the GPU plus bf16 layers on the CPU through ``llm_int8_enable_fp32_cpu_offload=True``
  and a custom ``device_map`` (what dtype the CPU part holds), and the same with those layers on disk. Each
  records tokens/s, the bytes offloaded, the tokens against its reference, and a cost predicted from the
  bytes that cross per token at the pageable rate measured here.
  The NF4 + CPU recipe's reference is NF4 with the same layers left unquantized (``llm_int8_skip_modules``),
  loaded whole on the GPU: the offloaded layers are bf16, not NF4, so only that reference can be identical.
- ``kv``: a long prompt's cache: dynamic (on the GPU), ``"offloaded"`` and ``"quantized"`` (fp8 backend):
  peak GPU memory, time, tokens against the dynamic cache's.

Usage (gpu-reference/README.md): ``python3 gpu-reference/tools/offload_check.py --out OUT/offload.json``.
Writes the file after every section; a section that fails records its error and the rest go on.
"""
from __future__ import annotations

import argparse
import gc
import json
import statistics
import sys
import tempfile
import time
import traceback
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

PROMPT, NEW = 16, 32


def free() -> None:
    import torch

    gc.collect()
    torch.cuda.empty_cache()


def h2d() -> dict:
    """Host-to-device copy rates of 1 GiB (bytes/s), pageable and pinned: helpers.offload.host_to_device_rate."""
    from helpers.offload import host_to_device_rate

    out = {f"{kind}_Bps": host_to_device_rate(pinned=kind == "pinned") for kind in ("pageable", "pinned")}
    free()
    return out


def gen(model, ids, new=NEW, **kw):
    import torch

    with torch.inference_mode():
        return model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=new, min_new_tokens=new,
                              do_sample=False, pad_token_id=0, **kw)


def timed(model, ids, new=NEW, repeats=3, **kw) -> dict:
    import torch

    gen(model, ids, 2, **kw)  # warm-up
    times = []
    for _ in range(repeats):
        torch.cuda.synchronize()
        t = time.perf_counter()
        out = gen(model, ids, new, **kw)
        torch.cuda.synchronize()
        times.append(time.perf_counter() - t)
    return {"s": statistics.median(times), "spread_s": [min(times), max(times)], "tokens": out[0].tolist()}


def same(a: list, b: list, prompt: int) -> dict:
    new_a, new_b = a[prompt:], b[prompt:]
    first = next((i for i, (x, y) in enumerate(zip(new_a, new_b)) if x != y), None)
    return {"identical": new_a == new_b, "first_difference": first,
            "differing": sum(x != y for x, y in zip(new_a, new_b))}


def recipes(path: Path, ids, rates: dict, res: dict, save) -> None:
    import torch
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    cfg = json.loads((path / "config.json").read_text())
    n = cfg["num_hidden_layers"]
    k = n // 3 * 2  # two thirds of the layers leave the GPU: the GPU holds about a third of the model
    moved = [f"model.layers.{i}" for i in range(n - k, n)]
    gpu_map = {"model.embed_tokens": 0, "model.norm": 0, "model.rotary_emb": 0, "lm_head": 0,
               **{f"model.layers.{i}": 0 for i in range(n - k)}}
    nf4 = dict(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=torch.bfloat16)
    rows = res.setdefault("recipes", {})

    def run(name, ref, **load):
        try:
            torch.cuda.reset_peak_memory_stats()
            m = AutoModelForCausalLM.from_pretrained(path, dtype=torch.bfloat16, **load).eval()
            r = timed(m, ids.to("cuda:0"))
            off = {}
            for dev in ("cpu", "disk"):
                names = [n_ for n_, d in (getattr(m, "hf_device_map", {}) or {}).items() if d == dev]
                off[dev] = sum(p.numel() * p.element_size() for n_ in names
                               for p in m.get_submodule(n_).parameters())
            cpu_dtypes = sorted({str(p.dtype) for n_ in moved if load.get("device_map", {}).get(n_) == "cpu"
                                 for p in m.get_submodule(n_).parameters()}) if load.get("device_map") else []
            crossing = off["cpu"] + off["disk"]
            row = {"tokens_per_s": NEW / r["s"], "s_per_token": r["s"] / NEW,  # end to end, prefill included
                   "spread_s": r["spread_s"], "bytes_on_cpu": off["cpu"], "bytes_on_disk": off["disk"],
                   "cpu_part_dtypes": cpu_dtypes, "peak_gpu_bytes": torch.cuda.max_memory_allocated(),
                   "predicted_extra_s_per_token_pageable": crossing / rates["pageable_Bps"],
                   "tokens": r["tokens"]}
            if ref in rows and "tokens" in rows[ref]:
                row["against"] = {ref: same(rows[ref]["tokens"], r["tokens"], ids.shape[1])}
            rows[name] = row
            print(f"{name}: {row['s_per_token'] * 1000:.1f} ms/token, cpu {off['cpu'] / 1e9:.2f} GB, "
                  f"disk {off['disk'] / 1e9:.2f} GB, {row.get('against')}", flush=True)
            del m
        except Exception as e:  # recorded, the next recipe goes on
            rows[name] = {"error": f"{type(e).__name__}: {e}", "trace": traceback.format_exc()[-2000:]}
            print(name, "FAILED", type(e).__name__, e, flush=True)
        free()
        save()

    run("bf16 whole", None, device_map={"": 0})
    run("bf16, layers on CPU", "bf16 whole", device_map={**gpu_map, **{m: "cpu" for m in moved}})
    run("nf4 whole", None, device_map={"": 0}, quantization_config=BitsAndBytesConfig(**nf4))
    run("nf4, those layers unquantized, whole", None, device_map={"": 0},
        quantization_config=BitsAndBytesConfig(**nf4, llm_int8_skip_modules=["lm_head", *moved]))
    run("nf4 + layers on CPU (llm_int8_enable_fp32_cpu_offload)", "nf4, those layers unquantized, whole",
        device_map={**gpu_map, **{m: "cpu" for m in moved}},
        quantization_config=BitsAndBytesConfig(**nf4, llm_int8_enable_fp32_cpu_offload=True))
    run("nf4 + layers on CPU, without the flag", None, device_map={**gpu_map, **{m: "cpu" for m in moved}},
        quantization_config=BitsAndBytesConfig(**nf4))
    with tempfile.TemporaryDirectory(dir=Path.home()) as folder:
        run("nf4 + layers on disk (llm_int8_enable_fp32_cpu_offload)", "nf4, those layers unquantized, whole",
            device_map={**gpu_map, **{m: "disk" for m in moved}}, offload_folder=folder,
            quantization_config=BitsAndBytesConfig(**nf4, llm_int8_enable_fp32_cpu_offload=True))
    res["recipes_note"] = (f"{k} of {n} decoder layers moved off the GPU: {moved[0]} .. {moved[-1]}; "
                           "predicted_extra_s_per_token_pageable = bytes off the GPU / pageable host-to-device rate")


def kv(path: Path, res: dict, save, prompt: int = 8192, new: int = 32) -> None:
    import torch
    from transformers import AutoModelForCausalLM

    m = AutoModelForCausalLM.from_pretrained(path, dtype=torch.bfloat16, device_map={"": 0}).eval()
    ids = torch.randint(0, m.config.vocab_size, (1, prompt), generator=torch.Generator().manual_seed(1)).to(0)
    rows = res.setdefault("kv", {"prompt": prompt, "new_tokens": new})
    for name, kw in (("dynamic", {}), ("offloaded", {"cache_implementation": "offloaded"}),
                     ("quantized fp8", {"cache_implementation": "quantized", "cache_config": {"backend": "fp8"}})):
        try:
            free()
            base = torch.cuda.memory_allocated()
            torch.cuda.reset_peak_memory_stats()
            r = timed(m, ids, new, **kw)
            row = {"s": r["s"], "spread_s": r["spread_s"], "peak_above_weights_bytes":
                   torch.cuda.max_memory_allocated() - base, "tokens": r["tokens"][prompt:]}
            if "dynamic" in rows and name != "dynamic":
                row["against_dynamic"] = same(rows["dynamic"]["tokens"], row["tokens"], 0)
            rows[name] = row
            print(f"kv {name}: {r['s']:.2f} s, peak above weights {row['peak_above_weights_bytes'] / 2**30:.2f} GiB, "
                  f"{row.get('against_dynamic')}", flush=True)
        except Exception as e:
            rows[name] = {"error": f"{type(e).__name__}: {e}", "trace": traceback.format_exc()[-2000:]}
            print("kv", name, "FAILED", type(e).__name__, e, flush=True)
        save()
    del m
    free()


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, required=True)
    args = ap.parse_args(argv)
    import torch

    from helpers.checkpoints import random_checkpoint
    from helpers.hardware import report

    args.out.parent.mkdir(parents=True, exist_ok=True)
    res: dict = {"what": "notebook 05's GPU-only checks, RANDOM weights of the llama-1b shape",
                 "prompt_tokens": PROMPT, "new_tokens": NEW, "repeats": 3,
                 "gpu": torch.cuda.get_device_name(0), "hardware": report(), "date": time.strftime("%Y-%m-%d")}

    def save():
        args.out.write_text(json.dumps(res, indent=1, default=str))

    t0 = time.perf_counter()
    res["h2d"] = h2d()
    print("h2d", {k: f"{v / 1e9:.1f} GB/s" for k, v in res["h2d"].items()}, flush=True)
    path = random_checkpoint("llama-1b", dtype=torch.bfloat16, device="cuda")
    ids = torch.randint(0, 32000, (1, PROMPT), generator=torch.Generator().manual_seed(0))
    save()
    recipes(path, ids, res["h2d"], res, save)
    kv(path, res, save)
    res["wall_s"] = time.perf_counter() - t0
    save()
    print(f"done in {res['wall_s']:.0f} s -> {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
