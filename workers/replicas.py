"""One replica of the model per process: prompts divided between processes, results gathered in order.

Launch it as separate processes, one per GPU (or two CPU processes on a machine
without a GPU), with torchrun::

    NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1 \\
    torchrun --standalone --nproc_per_node 2 workers/replicas.py \\
        --expect-world-size 2 --model bundled --out replicas.json

Every process asserts the world size it expects: a plain ``PartialState()``
under torchrun on a machine without a GPU was seen reporting "rank 0 of 1" in
each process (each then did all the work). Without CUDA this script asks for
``PartialState(cpu=True)``, which starts a real gloo process group.

Each process loads the whole model on its own device, takes its share of the
prompts with ``PartialState().split_between_processes`` (contiguous slices,
rank 0 first), generates greedily with left padding, and the results are
gathered with ``accelerate.utils.gather_object`` in rank order, so prompt i's
answer is at position i. Rank 0 writes a JSON file (see ``--out``).

A failure stops the whole group in seconds: the process group is initialised
once, with a timeout on every collective (``--collective-timeout``), and torn
down only after a success, with no barrier after an error (a barrier there waits
for ranks that are inside another collective, and the group deadlocks). A
failing process prints ``rank N: <error>`` and exits; ``torchrun`` then stops the
others. ``--fail-rank`` and ``--hang-rank`` plant a failure or a hang on one rank
for the tests (tests/test_processes.py).

With ``--bench``, each process also times generation on its share of a batch
(``--batches``) with ``helpers.measure.time_generate`` (warm-up, medians of 3
repeats with their spread; barrier, generate, barrier, so every process
measures the slowest). A timing too noisy to mean anything is recorded as
``error`` (time_generate's MeasurementError) instead of a rate.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from datetime import timedelta
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from helpers.launch import add_test_options, planted, run_rank  # noqa: E402  (after the repository is on the path)

PROMPTS = [
    "The capital of France is",
    "Water boils at a temperature of",
    "The largest planet in our solar system is",
    "A good way to learn a new language is",
    "The three primary colours are",
    "Photosynthesis is the process by which",
]


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--expect-world-size", type=int, required=True,
                    help="number of processes this run must have; every process checks it")
    ap.add_argument("--model", default="bundled", help="'bundled' or a local checkpoint directory")
    ap.add_argument("--prompts", type=int, default=len(PROMPTS), help="how many of the built-in prompts to use")
    ap.add_argument("--new-tokens", type=int, default=12, help="greedy new tokens per prompt")
    ap.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16"],
                    help="auto: bfloat16 on CUDA, float32 on CPU")
    ap.add_argument("--out", required=True, help="JSON file written by rank 0")
    ap.add_argument("--bench", action="store_true", help="also time generation at the batch sizes of --batches")
    ap.add_argument("--batches", type=int, nargs="*", default=[1, 16],
                    help="total batch sizes (prompts in flight over all processes) for --bench")
    ap.add_argument("--bench-tokens", type=int, default=64, help="new tokens per timed run")
    ap.add_argument("--random-weights", action="store_true",
                    help="label the checkpoint as random weights in the output")
    add_test_options(ap)  # --collective-timeout, and the tests' --fail-rank and --hang-rank
    return ap.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    import torch
    from accelerate import PartialState
    from accelerate.utils import gather_object

    use_cuda = torch.cuda.is_available()
    # cpu=True: without it, torchrun's processes on a CPU-only machine each saw "rank 0 of 1".
    # timeout: init_process_group's, the longest any collective waits for the other processes.
    state = PartialState(cpu=not use_cuda, timeout=timedelta(seconds=args.collective_timeout))
    return run_rank(state.process_index, lambda: run(args, state, use_cuda, gather_object),
                    state.wait_for_everyone, state.destroy_process_group)


def run(args, state, use_cuda, gather_object) -> int:
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    from helpers.checkpoints import resolve_model
    from helpers.measure import MeasurementError, time_generate

    if state.num_processes != args.expect_world_size:
        raise SystemExit(
            f"rank {state.process_index}: expected {args.expect_world_size} processes but this process sees "
            f"{state.num_processes} (distributed type {state.distributed_type}). Launch with "
            f"torchrun --nproc_per_node {args.expect_world_size}; without a GPU, PartialState(cpu=True) is needed."
        )
    if not use_cuda:
        # the processes share the cores: each takes its share, so that they do not fight over them
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // state.num_processes))
    dtype = {"auto": torch.bfloat16 if use_cuda else torch.float32, "float32": torch.float32,
             "bfloat16": torch.bfloat16}[args.dtype]
    device = state.device
    path = resolve_model(args.model)
    if args.random_weights:
        tok = None  # a random checkpoint has no tokenizer: fixed random token ids stand in for prompts
        vocab = AutoConfig.from_pretrained(path).vocab_size
    else:
        tok = AutoTokenizer.from_pretrained(path)
        tok.padding_side = "left"  # decoder-only: pad on the left so every row ends with its last real token
        if tok.pad_token is None:
            tok.pad_token = tok.eos_token
    pad_id = tok.pad_token_id if tok else 0

    def encode(indices):
        if tok:
            return tok([PROMPTS[i % len(PROMPTS)] for i in indices], return_tensors="pt", padding=True).to(device)
        ids = torch.stack([torch.randint(0, vocab, (16,), generator=torch.Generator().manual_seed(i)) for i in indices])
        return {"input_ids": ids.to(device), "attention_mask": torch.ones_like(ids).to(device)}
    t0 = time.perf_counter()
    # one whole replica per process, on this process's device
    model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype, device_map={"": device})
    model.eval()
    load_s = time.perf_counter() - t0
    if use_cuda:
        torch.cuda.synchronize(device)
    mem_after_load = torch.cuda.memory_allocated(device) if use_cuda else 0

    prompts = list(enumerate(PROMPTS[: args.prompts]))
    results = []
    with state.split_between_processes(prompts) as mine:
        mine = list(mine)
        if mine:
            batch = encode([i for i, _ in mine])
            with torch.inference_mode():
                out = model.generate(**batch, max_new_tokens=args.new_tokens, do_sample=False, pad_token_id=pad_id)
            new = out[:, batch["input_ids"].shape[1]:]
            for (i, p), ids in zip(mine, new):
                results.append({"index": i, "prompt": p if tok else f"random ids #{i}", "rank": state.process_index,
                                "completion": tok.decode(ids, skip_special_tokens=True) if tok else "",
                                "new_ids": ids.tolist()})
    me = {"rank": state.process_index, "local_rank": state.local_process_index,
          "world_size": state.num_processes, "device": "cpu" if device.type == "cpu" else str(device),
          "pid": os.getpid(),
          "backend": str(state.backend), "prompt_indices": [r["index"] for r in results],
          "load_s": round(load_s, 2), "mem_after_load_bytes": int(mem_after_load)}

    bench = []
    if args.bench:
        for total in args.batches:
            share = list(range(total))
            with state.split_between_processes(share) as idx:
                n_local = len(list(idx))
            row = {"batch_total": total, "batch_local": n_local}
            try:
                r = time_generate(model, encode(list(range(n_local))) if n_local else None, repeats=3,
                                  new_tokens=args.bench_tokens, barrier=state.wait_for_everyone, pad_token_id=pad_id)
            except MeasurementError as e:  # all processes time one interval between barriers: they decide alike
                row["error"] = f"MeasurementError: {e}"
            else:  # a sequence's tokens/s; every process measured the slowest, so total = total batch x that
                row.update(ttft_s=r["ttft_s"], wall_s=r["wall_s"], tokens_per_s=r["tokens_per_s"],
                           total_tokens_per_s=total * r["tokens_per_s"],
                           spread_total=[total * r["spread"][0], total * r["spread"][1]])
            row["peak_bytes"] = int(torch.cuda.max_memory_allocated(device)) if use_cuda else 0
            bench.append(row)
        me["bench"] = bench

    planted(args, state.process_index)  # tests only: --fail-rank / --hang-rank
    gathered = gather_object(results)  # rank 0's list, then rank 1's, ...: prompt order is kept
    everyone = gather_object([me])
    ranks = sorted(p["rank"] for p in everyone)
    assert ranks == list(range(args.expect_world_size)), f"ranks seen: {ranks}"
    assert [r["index"] for r in gathered] == [i for i, _ in prompts], "results came back out of order"
    if state.is_main_process:
        report = {
            "model": "random weights (meaningless text)" if args.random_weights else args.model,
            "random_weights": bool(args.random_weights),
            "dtype": str(dtype).replace("torch.", ""),
            "world_size": state.num_processes,
            "processes": everyone,
            "results": gathered,
        }
        if args.bench:
            report["bench"] = [  # rank 0's timing (all ranks timed the same barriers), every rank's memory
                {**{k: v for k, v in rows[0].items() if k not in ("batch_local", "peak_bytes")},
                 "per_rank": [{"rank": p["rank"], "batch_local": p["bench"][k]["batch_local"],
                               "peak_bytes": p["bench"][k]["peak_bytes"]} for p in everyone]}
                for k, rows in enumerate(zip(*[p["bench"] for p in everyone]))
            ]
        Path(args.out).write_text(json.dumps(report, indent=1))
    return 0


if __name__ == "__main__":
    from torch.distributed.elastic.multiprocessing.errors import record

    sys.exit(record(main)())  # record: torchrun's summary shows the failing process's traceback
