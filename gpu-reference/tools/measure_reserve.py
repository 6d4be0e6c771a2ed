"""Measure the per-GPU reserve the planner keeps free beside weights and KV cache, on GPU 0 of this machine.

    python gpu-reference/tools/measure_reserve.py --out gpu-reference/one-gpu/reserve.json

Two parts, both in bytes:
- ``context_bytes``: what the GPU loses before torch allocates anything, the CUDA
  context and cuBLAS's workspace (``torch.cuda.mem_get_info`` before and after
  initialising CUDA and running one bf16 matmul, minus what torch's allocator
  holds);
- ``activation_bytes``: the allocator's peak during ``generate`` of the bundled
  model in bf16 (batch 1, a prompt of ``--prompt`` tokens, 16 new tokens) beyond
  its weights and its KV cache: the prefill's activations and logits.
``reserve_bytes`` is their sum; ``helpers.planner`` reads it (notebook 03).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))  # this file lives in gpu-reference/tools/


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", required=True)
    ap.add_argument("--prompt", type=int, default=1024)
    args = ap.parse_args(argv)
    import torch
    from transformers import AutoModelForCausalLM

    from helpers.checkpoints import resolve_model
    from helpers.hardware import report
    from helpers.memory import kv_cache_bytes

    free0, total = torch.cuda.mem_get_info(0)  # initialises the context
    a = torch.ones(1024, 1024, dtype=torch.bfloat16, device="cuda:0")
    (a @ a).sum().item()  # cuBLAS handle and workspace
    torch.cuda.synchronize()
    free1, _ = torch.cuda.mem_get_info(0)
    context = total - free1 - torch.cuda.memory_reserved(0)
    del a
    torch.cuda.empty_cache()

    path = resolve_model("bundled")
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.bfloat16, device_map={"": 0}).eval()
    weights = torch.cuda.memory_allocated(0)
    torch.cuda.reset_peak_memory_stats(0)
    ids = torch.randint(0, model.config.vocab_size, (1, args.prompt), generator=torch.Generator().manual_seed(0))
    with torch.inference_mode():
        model.generate(ids.to("cuda:0"), attention_mask=torch.ones_like(ids).to("cuda:0"), max_new_tokens=16,
                       min_new_tokens=16, do_sample=False)
    torch.cuda.synchronize()
    peak = torch.cuda.max_memory_allocated(0)
    kv = kv_cache_bytes(model.config, args.prompt + 16, batch=1, bytes_per_value=2)
    activations = max(0, peak - weights - kv)
    out = {"gpu": torch.cuda.get_device_name(0), "hardware": report(), "context_bytes": int(context),
           "activation_bytes": int(activations), "reserve_bytes": int(context + activations),
           "how": (f"CUDA context and cuBLAS workspace (mem_get_info), plus the allocator's peak beyond weights and "
                   f"KV cache while the bundled model (bf16) generated 16 tokens after a {args.prompt}-token prompt "
                   f"at batch 1"),
           "prompt_tokens": args.prompt, "weights_bytes": int(weights), "kv_cache_bytes": int(kv),
           "peak_allocated_bytes": int(peak)}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(out, indent=1))
    print({k: v for k, v in out.items() if k.endswith("_bytes")})
    return 0


if __name__ == "__main__":
    sys.exit(main())
