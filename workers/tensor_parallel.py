"""Tensor parallelism with transformers' own support: every layer split across the GPUs.

Launch one process per GPU with torchrun (at least two CUDA GPUs; ``--cpu`` runs the same steps on CPU
processes with gloo, for a tiny checkpoint on a machine without GPUs, as notebook 07 does there)::

    NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1 \\
    torchrun --standalone --nproc_per_node 2 workers/tensor_parallel.py \\
        --checkpoint DIR --out tp.json [--bench]

DIR is a checkpoint whose attention and key/value head counts divide by the
number of processes: the workbook uses a RANDOM-weight Llama of the llama-1b
shape (hidden 2048, 22 layers, 32 heads, 4 key/value heads; built once by
``helpers.checkpoints.random_checkpoint``). The bundled SmolLM2 (9 heads, 3
key/value heads) does not split over 2.

What it does, in every process:
1. checks the world size (``--expect-world-size``) and that CUDA has a GPU per process;
2. loads the checkpoint tensor-parallel in float32 with
   ``from_pretrained(..., distributed_config=DistributedConfig(tp_size=N))``
   (transformers 5.17 and 5.24; the model's own ``base_model_tp_plan`` cuts
   q/k/v/gate/up by columns and o/down by rows) and computes the logits
   of fixed random token ids; rank 0 then loads the same checkpoint whole on
   its GPU and compares: the largest absolute difference must be at most
   ``--atol`` (default 1e-3) times max(1, largest |logit|) -- the shards only
   change the order in which partial sums are added;
3. with ``--bench``: loads it again in bfloat16 and times greedy ``generate`` at
   each batch size of ``--batches`` (``helpers.measure.time_generate``: warm-up,
   medians of 3 repeats with their spread; a timing too noisy to mean anything
   is recorded as ``error``), records the memory per GPU.
Rank 0 writes the JSON report (with each process's parameter bytes and its share of the KV cache per
token: a process holds the key/value heads of its shards only) and the tensor-parallel logits beside it
(``OUT`` with the suffix ``.logits.pt``); the process group is torn down after a success.

The same worker runs over several machines: one ``torchrun`` per machine with ``--nnodes``,
``--node-rank`` and a c10d rendezvous (``--rdzv-backend c10d --rdzv-endpoint HOST:PORT``) instead of
``--standalone``; notebook 07 starts two such "nodes" on one machine.

A failure stops the whole group in seconds: the process group is initialised
once, with a timeout on every collective (``--collective-timeout``), and no
barrier runs after an error (it would wait for ranks that are inside another
collective). A failing process prints ``rank N: <error>`` and exits; ``torchrun``
then stops the others. ``--fail-rank`` and ``--hang-rank`` plant a failure or a
hang on one rank for the tests (tests/test_processes.py).
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import sys
from datetime import timedelta
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from helpers.launch import add_test_options, planted, run_rank  # noqa: E402  (after the repository is on the path)


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--checkpoint", required=True, help="checkpoint directory (random llama-1b weights)")
    ap.add_argument("--expect-world-size", type=int, default=2)
    ap.add_argument("--out", required=True, help="JSON report written by rank 0")
    ap.add_argument("--atol", type=float, default=1e-3,
                    help="tolerance of the float32 logits check (x max(1, |logit|))")
    ap.add_argument("--bench", action="store_true", help="also time bfloat16 generation")
    ap.add_argument("--batches", type=int, nargs="*", default=[1, 16])
    ap.add_argument("--bench-tokens", type=int, default=64)
    ap.add_argument("--prompt-len", type=int, default=32)
    ap.add_argument("--cpu", action="store_true",
                    help="machines without GPUs: the same steps with gloo on CPU processes (tiny checkpoints only)")
    add_test_options(ap)  # --collective-timeout, and the tests' --fail-rank and --hang-rank
    return ap.parse_args(argv)


def local(t):
    """A plain tensor from what a TP model returns (a DTensor in some releases)."""
    return t.full_tensor() if hasattr(t, "full_tensor") else t


def main(argv=None) -> int:
    args = parse_args(argv)
    import torch
    import torch.distributed as dist

    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if world != args.expect_world_size:
        raise SystemExit(f"rank {rank}: expected {args.expect_world_size} processes, torchrun started {world}.")
    timeout = timedelta(seconds=args.collective_timeout)  # the longest a collective waits for the others
    if args.cpu:
        dev = torch.device("cpu")
        dist.init_process_group("gloo", timeout=timeout)
    else:
        here = int(os.environ.get("LOCAL_WORLD_SIZE", world))  # the processes on this machine
        if not torch.cuda.is_available() or torch.cuda.device_count() < here:
            raise SystemExit(
                f"rank {rank}: tensor parallelism here needs one CUDA GPU per process; "
                f"found {torch.cuda.device_count() if torch.cuda.is_available() else 0} for {here} processes "
                "on this machine."
            )
        torch.cuda.set_device(local_rank)
        dev = torch.device("cuda", local_rank)
        dist.init_process_group("nccl", device_id=dev, timeout=timeout)
    return run_rank(rank, lambda: run(args, world, rank, dev), dist.barrier, dist.destroy_process_group)


def run(args, world, rank, dev) -> int:
    import torch
    import torch.distributed as dist
    import transformers
    from transformers import AutoConfig, AutoModelForCausalLM
    from transformers.distributed import DistributedConfig

    from helpers.measure import MeasurementError, time_generate

    cuda = dev.type == "cuda"
    torch.backends.cuda.matmul.allow_tf32 = False  # keep the float32 check in float32
    torch.backends.cudnn.allow_tf32 = False
    cfg = AutoConfig.from_pretrained(args.checkpoint)
    for name in ("num_attention_heads", "num_key_value_heads"):
        n = getattr(cfg, name)
        if n % world:
            raise SystemExit(f"{name}={n} does not divide by {world} GPUs: pick a shape whose head counts do.")
    api = f"distributed_config=DistributedConfig(tp_size={world})"
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(0, cfg.vocab_size, (2, args.prompt_len), generator=gen)

    # 1. logits, tensor-parallel, float32
    model = AutoModelForCausalLM.from_pretrained(args.checkpoint, dtype=torch.float32,
                                                 distributed_config=DistributedConfig(tp_size=world))
    model.eval()
    shard = model.model.layers[0].self_attn.q_proj.weight
    shard_shape = list((shard.to_local() if hasattr(shard, "to_local") else shard).shape)
    held = [p.to_local() if hasattr(p, "to_local") else p for p in model.parameters()]
    param_bytes = sum(t.numel() * t.element_size() for t in held)  # what this process holds (its shards)
    with torch.inference_mode():
        tp_logits = local(model(ids.to(dev)).logits).float().cpu()
    del model
    gc.collect()  # accelerate/transformers hooks hold reference cycles: free the float32 shards now
    torch.cuda.empty_cache() if cuda else None
    check = None
    if rank == 0:
        ref = AutoModelForCausalLM.from_pretrained(args.checkpoint, dtype=torch.float32,
                                                   device_map={"": dev if cuda else "cpu"})
        with torch.inference_mode():
            ref_logits = ref(ids.to(dev)).logits.float().cpu()
        del ref
        gc.collect()
        torch.cuda.empty_cache() if cuda else None
        diff = (tp_logits - ref_logits).abs().max().item()
        scale = max(1.0, ref_logits.abs().max().item())
        check = {"dtype": "float32", "max_abs_diff": diff, "max_abs_logit": ref_logits.abs().max().item(),
                 "atol": args.atol, "tolerance": args.atol * scale, "ok": diff <= args.atol * scale,
                 "top1_agreement": (tp_logits.argmax(-1) == ref_logits.argmax(-1)).float().mean().item()}
    dist.barrier()

    # 2. speed and memory, bfloat16
    bench = []
    mem = {}
    if args.bench:
        torch.cuda.reset_peak_memory_stats(dev) if cuda else None
        model = AutoModelForCausalLM.from_pretrained(args.checkpoint, dtype=torch.bfloat16,
                                                     distributed_config=DistributedConfig(tp_size=world))
        model.eval()
        mem["after_load_bytes"] = torch.cuda.memory_allocated(dev) if cuda else 0
        for b in args.batches:
            enc = {"input_ids": torch.randint(0, cfg.vocab_size, (b, args.prompt_len), generator=gen).to(dev)}
            enc["attention_mask"] = torch.ones_like(enc["input_ids"])
            try:
                r = time_generate(model, enc, new_tokens=args.bench_tokens, repeats=3, barrier=dist.barrier,
                                  pad_token_id=0)
            except MeasurementError as e:  # all processes time one interval between barriers: they decide alike
                bench.append({"batch": b, "error": f"MeasurementError: {e}"})
                continue
            bench.append({"batch": b, "ttft_s": r["ttft_s"], "tokens_per_s": r["tokens_per_s"],
                          "total_tokens_per_s": r["total_tokens_per_s"],
                          "spread_total": [b * r["spread"][0], b * r["spread"][1]]})
        mem["peak_bytes"] = torch.cuda.max_memory_allocated(dev) if cuda else 0
        del model
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
    kv_per_token = 2 * cfg.num_hidden_layers * (cfg.num_key_value_heads // world) * head_dim * 4  # K and V, fp32
    mine = {"rank": rank, "device": str(dev), "node": os.environ.get("GROUP_RANK", "0"),
            "q_proj_shard_shape": shard_shape, "param_bytes_fp32": param_bytes,
            "kv_cache_bytes_per_token_fp32": kv_per_token, **mem}
    everyone = [None] * world
    planted(args, rank)  # tests only: --fail-rank / --hang-rank
    dist.all_gather_object(everyone, mine)
    if rank == 0:
        report = {
            "model": f"random weights ({cfg.num_hidden_layers} layers, hidden {cfg.hidden_size}; meaningless text)",
            "random_weights": True,
            "transformers": transformers.__version__,
            "torch": torch.__version__,
            "api": api,
            "world_size": world,
            "heads": [cfg.num_attention_heads, cfg.num_key_value_heads],
            "q_proj_full_shape": [cfg.num_attention_heads * (cfg.hidden_size // cfg.num_attention_heads),
                                  cfg.hidden_size],
            "logits_check": check,
            "bench_tokens": args.bench_tokens,
            "bench": bench,
            "per_rank": everyone,
        }
        Path(args.out).write_text(json.dumps(report, indent=1))
        torch.save(tp_logits, Path(args.out).with_suffix(".logits.pt"))  # to compare two launches bit for bit
        if not check["ok"]:
            print(f"logits differ by {check['max_abs_diff']:.3g} > {check['tolerance']:.3g}", file=sys.stderr)
            return 1
    return 0


if __name__ == "__main__":
    from torch.distributed.elastic.multiprocessing.errors import record

    sys.exit(record(main)())  # record: torchrun's summary shows the failing process's traceback
