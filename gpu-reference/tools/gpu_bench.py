"""Measure generation on several GPUs: one GPU, a split model, one replica per GPU, tensor parallel, CPU offload.

Run on a machine with at least two CUDA GPUs (the workbook's reference: two H200)::

    NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1 \\
    python gpu-reference/tools/gpu_bench.py --out gpu-reference/two-gpu/results.json

The model is a RANDOM-weight Llama of the llama-1b shape (hidden 2048, 22
layers, 32 heads, 4 key/value heads, 1.1 B parameters) in bfloat16, built once
on the machine (``helpers.checkpoints.random_checkpoint``): its text is
meaningless, every figure says so. Greedy ``generate``, eager, ``--tokens``
new tokens, warm-up then medians of 3 (``helpers.measure.time_generate``).

Sections of the JSON written to ``--out``:
- ``hardware``, ``versions``: helpers.hardware.report() and the packages;
- ``h2d``: host-to-device copy rate of a 1 GiB tensor, pinned and pageable (GB/s);
- ``single``: the whole model on GPU 0;
- ``split``: ``device_map="balanced"`` over the GPUs (what each GPU holds, memory per GPU);
- ``split_nf4``: the same in NF4 (bitsandbytes), with the module type and device of a quantized layer;
- ``replicas``: ``workers/replicas.py`` under torchrun, one process per GPU;
- ``tensor_parallel``: ``workers/tensor_parallel.py`` under torchrun (with its float32 logits check);
- ``offload``: decoder layers kept on the CPU (0 to 16 of 22), tokens/s against bytes offloaded,
  and the effective host-to-device rate from the slope.
Each speed row has ``batch``, ``tokens_per_s_per_sequence``, ``total_tokens_per_s``, ``ttft_s``; memory is in bytes.
"""

from __future__ import annotations

import argparse
import gc
import json
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))  # this file lives in gpu-reference/tools/


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", required=True, help="results JSON")
    ap.add_argument("--tokens", type=int, default=64, help="new tokens per timed run")
    ap.add_argument("--batches", type=int, nargs="*", default=[1, 16])
    ap.add_argument("--offload-layers", type=int, nargs="*", default=[0, 4, 8, 16],
                    help="decoder layers kept on the CPU, one run each")
    ap.add_argument("--offload-tokens", type=int, default=16)
    ap.add_argument("--skip", nargs="*", default=[], help="sections to skip (e.g. offload tensor_parallel)")
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


def speed_rows(model, vocab: int, batches, tokens: int) -> list[dict]:
    import torch

    from helpers.measure import time_generate

    rows = []
    g = torch.Generator().manual_seed(0)
    first = model.get_input_embeddings().weight.device
    for b in batches:
        ids = torch.randint(0, vocab, (b, 32), generator=g)
        inputs = {"input_ids": ids.to(first), "attention_mask": torch.ones_like(ids).to(first)}
        r = time_generate(model, inputs, new_tokens=tokens, repeats=3, warmup=1)
        rows.append({"batch": b, "ttft_s": r["ttft_s"], "tokens_per_s_per_sequence": r["tokens_per_s"],
                     "total_tokens_per_s": r["total_tokens_per_s"]})
        print(f"   batch {b:>3}: {r['tokens_per_s']:.1f} tokens/s per sequence, {r['total_tokens_per_s']:.0f} total",
              flush=True)
    return rows


def main(argv=None) -> int:
    args = parse_args(argv)
    import torch
    import transformers
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    from helpers.checkpoints import random_checkpoint
    from helpers.devicemap import placement
    from helpers.hardware import bnb_backend, report
    from helpers.launch import SAFE_ENV, launch
    from helpers.shapes import n_params

    n_gpus = torch.cuda.device_count() if torch.cuda.is_available() else 0
    if n_gpus < 2:
        print(f"gpu_bench needs at least two CUDA GPUs; this machine has {n_gpus}.", file=sys.stderr)
        return 2
    t_start = time.perf_counter()
    res: dict = {"hardware": report(), "env": SAFE_ENV, "new_tokens": args.tokens}
    res["versions"] = {k: res["hardware"][k] for k in ("python", "torch", "transformers", "accelerate", "bitsandbytes")}
    res["versions"]["cuda"] = res["hardware"]["cuda"]
    res["gpu_names"] = [torch.cuda.get_device_name(i) for i in range(n_gpus)]
    out = Path(args.out)

    def save():
        res["wall_s"] = round(time.perf_counter() - t_start, 1)
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(res, indent=1, default=str))

    print("== host-to-device copy", flush=True)
    res["h2d"] = h2d_rates()
    print("  ", {k: round(v, 1) for k, v in res["h2d"].items()}, flush=True)

    t = time.perf_counter()
    ckpt = random_checkpoint("llama-1b", torch.bfloat16, device="cuda")
    res["model"] = {"shape": "llama-1b", "random_weights": True, "dtype": "bfloat16",
                    "label": "RANDOM weights, llama-1b shape (hidden 2048, 22 layers, 32 heads, 4 kv heads)",
                    "build_or_verify_s": round(time.perf_counter() - t, 1)}
    free()

    def load(**kw):
        t0 = time.perf_counter()
        m = AutoModelForCausalLM.from_pretrained(ckpt, **kw)
        m.eval()
        torch.cuda.synchronize()
        return m, time.perf_counter() - t0

    print("== single GPU", flush=True)
    model, load_s = load(dtype=torch.bfloat16, device_map={"": 0})
    vocab = model.config.vocab_size
    res["model"].update(params=n_params(model), weight_bytes=int(model.get_memory_footprint()),
                        layers=model.config.num_hidden_layers)
    res["single"] = {"load_s": load_s, "mem_after_load_bytes": per_gpu(torch.cuda.memory_allocated)}
    res["single"]["rows"] = speed_rows(model, vocab, args.batches, args.tokens)
    res["single"]["peak_bytes"] = per_gpu(torch.cuda.max_memory_allocated)
    del model
    free()
    save()

    print("== split over the GPUs (device_map='balanced')", flush=True)
    model, load_s = load(dtype=torch.bfloat16, device_map="balanced")
    res["split"] = {"load_s": load_s, "device_map": "balanced", "placement": {str(d): w for d, w in placement(model, model.hf_device_map).items()},
                    "mem_after_load_bytes": per_gpu(torch.cuda.memory_allocated)}
    res["split"]["rows"] = speed_rows(model, vocab, args.batches, args.tokens)
    res["split"]["peak_bytes"] = per_gpu(torch.cuda.max_memory_allocated)
    del model
    free()
    save()

    print("== split, NF4 (bitsandbytes)", flush=True)
    q = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=torch.bfloat16)
    model, load_s = load(dtype=torch.bfloat16, device_map="balanced", quantization_config=q)
    lin = model.model.layers[-1].mlp.down_proj
    res["split_nf4"] = {"load_s": load_s, "placement": {str(d): w for d, w in placement(model, model.hf_device_map).items()},
                        "mem_after_load_bytes": per_gpu(torch.cuda.memory_allocated),
                        "module_type": f"{type(lin).__module__}.{type(lin).__name__}",
                        "weight_type": type(lin.weight).__name__, "weight_device": str(lin.weight.device),
                        "bnb_backend": bnb_backend()}
    res["split_nf4"]["rows"] = speed_rows(model, vocab, args.batches[:1], args.tokens)
    del model, lin
    free()
    save()

    if "replicas" not in args.skip:
        print("== one replica per GPU (torchrun workers/replicas.py)", flush=True)
        with tempfile.TemporaryDirectory() as d:
            t0 = time.perf_counter()
            launch(["torchrun", "--standalone", f"--nproc_per_node={n_gpus}", "workers/replicas.py",
                    "--expect-world-size", n_gpus, "--model", ckpt, "--random-weights", "--out", f"{d}/r.json",
                    "--bench", "--batches", *args.batches, "--bench-tokens", args.tokens], timeout=900)
            rep = json.loads(Path(d, "r.json").read_text())
            rep.pop("results", None)
            rep["launch_and_run_s"] = time.perf_counter() - t0
        res["replicas"] = rep
        for r in rep["bench"]:
            print(f"   batch {r['batch_total']:>3}: {r['total_tokens_per_s']:.0f} total tokens/s", flush=True)
        save()

    if "tensor_parallel" not in args.skip:
        print("== tensor parallel (torchrun workers/tensor_parallel.py)", flush=True)
        with tempfile.TemporaryDirectory() as d:
            t0 = time.perf_counter()
            launch(["torchrun", "--standalone", f"--nproc_per_node={n_gpus}", "workers/tensor_parallel.py",
                    "--expect-world-size", n_gpus, "--checkpoint", ckpt, "--out", f"{d}/tp.json",
                    "--bench", "--batches", *args.batches, "--bench-tokens", args.tokens], timeout=900)
            res["tensor_parallel"] = json.loads(Path(d, "tp.json").read_text())
            res["tensor_parallel"]["launch_and_run_s"] = time.perf_counter() - t0
        for r in res["tensor_parallel"]["bench"]:
            print(f"   batch {r['batch']:>3}: {r['tokens_per_s_per_sequence']:.1f} tokens/s per sequence", flush=True)
        print("   logits check:", res["tensor_parallel"]["logits_check"], flush=True)
        save()

    if "offload" not in args.skip:
        print("== CPU offload on one GPU", flush=True)
        rows = []
        n_layers = res["model"]["layers"]
        for k in args.offload_layers:
            dm = {"model.embed_tokens": 0, "model.norm": 0, "model.rotary_emb": 0, "lm_head": 0}
            dm.update({f"model.layers.{i}": ("cpu" if i < k else 0) for i in range(n_layers)})
            model, load_s = load(dtype=torch.bfloat16, device_map=dm)
            off = sum(p.numel() * p.element_size() for n, p in model.named_parameters()
                      if n.startswith("model.layers.") and int(n.split(".")[2]) < k)
            r = speed_rows(model, vocab, [1], args.offload_tokens)[0]
            rows.append({"layers_on_cpu": k, "bytes_offloaded": off, **r,
                         "s_per_token": 1 / r["tokens_per_s_per_sequence"]})
            del model
            free()
        import numpy as np

        x = np.array([r["bytes_offloaded"] for r in rows], dtype=float)
        y = np.array([r["s_per_token"] for r in rows])
        slope, intercept = np.polyfit(x, y, 1)
        res["offload"] = {"rows": rows, "tokens": args.offload_tokens, "batch": 1,
                          "fit_s_per_byte": slope, "fit_intercept_s": intercept,
                          "effective_h2d_GBps": (1 / slope) / 1e9 if slope > 0 else None}
        print(f"   effective host-to-device rate: {res['offload']['effective_h2d_GBps']:.1f} GB/s", flush=True)
        save()
    save()
    print(f"written {out} in {res['wall_s']} s", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
