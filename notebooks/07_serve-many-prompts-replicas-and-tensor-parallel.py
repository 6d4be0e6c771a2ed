# ---
# jupyter:
#   jupytext:
#     text_representation:
#       extension: .py
#       format_name: percent
#       format_version: '1.3'
#       jupytext_version: 1.19.6
#   kernelspec:
#     display_name: Python 3 (ipykernel)
#     language: python
#     name: python3
# ---

# %% [markdown]
# # Serve many prompts: replicas, tensor parallel, continuous batching and a real server
#
# Notebook 06 split a model across GPUs with `device_map`: that buys memory, and the GPUs take turns.
# When the model fits one GPU and you have many prompts, there are two ways to put every GPU to work at
# once: a whole **replica** of the model on each GPU, each answering its own share of the prompts, or
# **tensor parallelism**, which cuts every layer across the GPUs so that they all work on each token.
# This notebook runs both as separate processes started by `torchrun`, checks each against a single
# device, and compares them from the figures of the workbook's GPU reference runs, at equal batch per
# GPU and at a batch that saturates one GPU, or says which figure a run lacks. Then it serves the way
# servers do: requests of different lengths through **continuous batching**, an OpenAI-compatible server
# (`transformers serve`) queried by the `openai` client, and the tensor-parallel worker over two machines.
#
# **What you'll learn**
# 1. Write the `torchrun` command line that starts one process per GPU, and serve one replica per process
#    with accelerate's `PartialState().split_between_processes`, gathering the answers in prompt order.
# 2. Check that the processes saw the world size you meant, and that the replicas answer exactly what a
#    plain `generate` answers.
# 3. Load a model tensor-parallel with `from_pretrained(..., distributed_config=DistributedConfig(tp_size=N))`,
#    see which head counts allow it, and check its logits against a single device.
# 4. Compare a split, replicas and tensor parallelism from measured figures, at equal batch per GPU and at
#    a batch that saturates one GPU, each figure beside its limit and each ratio beside the spread of its
#    repeats (or, for figures recorded without repeats, the gap between two runs of the same
#    configuration), and say what the figures do and don't show.
# 5. Serve requests of different lengths with continuous batching (`continuous_batching_context_manager`,
#    `ContinuousBatchingConfig`, a paged KV cache) and compare it with padded static batches of the same
#    requests: tokens/s, idle slots, padding, KV cache held, latency per request, greedy tokens.
# 6. Start `transformers serve` from a cell and stop it whatever happens, query it with the `openai` client
#    at bounded concurrency (time to first token, throughput, p50 and p95 latency), meet its bad-request
#    answers, and check a request before it is sent.
# 7. Launch the tensor-parallel worker as two `torchrun` machines (`--nnodes 2`, a c10d rendezvous), and
#    know what production engines (vLLM, SGLang) add and when to move to one.
#
# **What you'll need**
# - Notebook 06 (split a model across GPUs) first.
# - Hardware: GPUs for the real thing (one replica per GPU; tensor parallelism needs two). The same code
#   runs anywhere: on one GPU, one replica; without a GPU, two CPU processes stand in for two GPUs. With
#   fewer than two GPUs, tensor parallelism runs on two CPU processes with a toy model of random weights.
#   The measured comparison comes from the workbook's reference run of the tier that matches the machine
#   (`gpu-reference/one-gpu/results.json` without a GPU or with one, `gpu-reference/two-gpu/results.json`
#   with two or more); figures that need two GPUs (a split, tensor parallelism, two replicas) come from the
#   two-GPU tier on every machine.
# - The server's packages (`fastapi`, `uvicorn`, `openai`; the workbook's set-up installs them).
# - Run time: about 90 s on an idle 2-core CPU (three launches of processes, two servers started).

# %% tags=["parameters"]
MODEL = "bundled"  # "bundled" (SmolLM2-135M-Instruct), a local checkpoint folder, or a hub id
NEW_TOKENS = 12  # greedy new tokens per prompt

# %%
import json
import logging
import shlex
import shutil
import statistics
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from importlib.metadata import version
from pathlib import Path

import matplotlib.pyplot as plt
import torch
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, LlamaConfig
from transformers.distributed import DistributedConfig

from helpers.checkpoints import random_checkpoint, resolve_model
from helpers.launch import launch
from helpers.measure import compare_rates, decode_limit, memory_bandwidth, rate_text
from helpers.quiet import silence_known_warnings
from helpers.reference import read_reference
from helpers.serving import check_chat_request, free_port, served
from helpers.text import say

silence_known_warnings()  # routine library messages, and accelerate's loading bar in quiet runs
path = resolve_model(MODEL)
n_gpu = torch.cuda.device_count()
work = Path(tempfile.mkdtemp(prefix="07-serve-"))  # the launches' output files; removed at the end

# %%
# NBVAL_IGNORE_OUTPUT
# Versions and GPUs depend on the machine (notebook 00 prints the whole hardware report).
print(", ".join(f"{p} {version(p)}" for p in ("torch", "transformers", "accelerate")),
      f"| GPUs: {[torch.cuda.get_device_name(g) for g in range(n_gpu)] or 'none'}")

# %% [markdown]
# ## 1. One replica per GPU
#
# When the model fits one GPU, each GPU can hold a whole copy and answer its own share of the prompts.
# `workers/replicas.py` does that with accelerate; its core:
#
# ```python
# state = PartialState(cpu=not torch.cuda.is_available())   # one process per GPU (or CPU process)
# assert state.num_processes == args.expect_world_size       # every process checks the world size
# model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype, device_map={"": state.device})
# with state.split_between_processes(list(enumerate(prompts))) as mine:   # contiguous slices, rank 0 first
#     ... generate for `mine` with left padding ...
# results = gather_object(results)   # rank 0's answers, then rank 1's: prompt order kept
# state.destroy_process_group()
# ```
#
# It runs as separate processes started by `torchrun`, not forked from this kernel. Without a GPU, a plain
# `PartialState()` under `torchrun` starts no process group: accelerate 1.15's `PartialState` (its choice of
# backend, in `accelerate/state.py`) picks a multi-CPU (gloo) group only when `cpu=True`, so each process would report
# "rank 0 of 1" and do all the work. `cpu=True` starts the gloo group, and the world-size assertion catches a
# process that is alone. How many processes to start depends on the machine:

# %%
nproc = n_gpu if n_gpu >= 1 else 2
if n_gpu >= 2:
    print(f"{n_gpu} GPUs: one replica per GPU, {nproc} processes.")
elif n_gpu == 1:
    print("One GPU: one replica, in one process (a second GPU would take a second replica and half the prompts).")
else:
    print("No GPU: two CPU processes (gloo) stand in for two GPUs, one replica each. They share this\n"
          "machine's cores, so they show the mechanics, not a speed-up.")

# %% [markdown]
# The command line: `torchrun --standalone` starts a one-machine group, `--nproc_per_node` processes, each
# with its own `RANK` and `WORLD_SIZE`. The worker's `--expect-world-size` makes every process check it.
# `helpers.launch.launch` runs exactly this line (with this kernel's Python, NVLink multicast off, the
# repository on `PYTHONPATH`) and raises with the processes' own error lines if one fails. `$WORK` stands
# for this run's temporary folder.

# %%
cmd = ["torchrun", "--standalone", f"--nproc_per_node={nproc}", "workers/replicas.py",
       "--expect-world-size", nproc, "--model", MODEL, "--new-tokens", NEW_TOKENS, "--out", work / "replicas.json"]
say(shlex.join(map(str, cmd)).replace(str(work), "$WORK"))
launch(cmd)
replicas = json.loads((work / "replicas.json").read_text())
for p in replicas["processes"]:
    say(f"rank {p['rank']} of {p['world_size']} on {p['device']} ({p['backend']}): prompts {p['prompt_indices']}")
for r in replicas["results"]:
    say(f"#{r['index']} (rank {r['rank']}) {r['prompt']!r} ->")
    say("    " + " ".join(r["completion"].split()))  # the completion, its whitespace folded to fit

# %% [markdown]
# **Self-check.** Each process saw its own rank and the same world size, there was one process per
# replica, and the answers came back in prompt order.

# %%
ranks = [p["rank"] for p in replicas["processes"]]
assert ranks == list(range(nproc)), f"ranks {ranks}: each process should see its own rank"
assert {p["world_size"] for p in replicas["processes"]} == {nproc}, "a process saw another world size"
assert [r["index"] for r in replicas["results"]] == list(range(len(replicas["results"])))
assert len({p["pid"] for p in replicas["processes"]}) == nproc, "one process per replica"
print(f"{nproc} processes, ranks {ranks}, answers in order")

# %% [markdown]
# **Same answers as a plain `generate`?** We load the model once in this kernel, on GPU 0 (bf16) or the CPU
# (fp32), the dtype the worker picks, and generate greedily for each process's share, padded on the left
# like the worker's. A replica changes where the work runs, not the arithmetic, so the new tokens must match.

# %%
device = "cuda:0" if n_gpu else "cpu"
plain = AutoModelForCausalLM.from_pretrained(path, dtype=torch.bfloat16 if n_gpu else torch.float32,
                                             device_map={"": device})
tok = AutoTokenizer.from_pretrained(path)
tok.padding_side = "left"
same = []
for p in replicas["processes"]:
    share = [r for r in replicas["results"] if r["rank"] == p["rank"]]
    if share:
        enc = tok([r["prompt"] for r in share], return_tensors="pt", padding=True).to(device)
        with torch.inference_mode():
            out = plain.generate(**enc, max_new_tokens=NEW_TOKENS, do_sample=False, pad_token_id=tok.pad_token_id)
        same += [ids.tolist() == r["new_ids"] for ids, r in zip(out[:, enc["input_ids"].shape[1]:], share)]
print(f"replica answers equal to a plain generate: {sum(same)} of {len(same)}")
assert all(same), "a replica answered differently from a plain generate of the same prompts"
del plain

# %% [markdown]
# ## 2. Tensor parallelism: every layer across the GPUs
#
# Tensor parallelism cuts each weight matrix: the query/key/value and MLP input projections by columns
# (each GPU computes some heads), the output projections by rows (partial sums, added up by an
# all-reduce). transformers ships the plan with the model: the config's `base_model_tp_plan`, merged with
# the model class's own rules (the output head cut by columns and gathered) and, where there is a plan, the
# input embedding cut by vocabulary rows, into `model.tp_plan` (`init_parallel_plans` in
# `transformers/distributed/mixin.py`). Attention and key/value head counts must divide by the number of GPUs:

# %%
config = AutoConfig.from_pretrained(path)
with torch.device("meta"):  # shapes only: the plan needs no weights
    meta = AutoModelForCausalLM.from_config(config)
tp_n = 2  # the number of GPUs (processes) to cut every layer over
if meta.tp_plan:
    print(f"{type(meta).__name__}'s plan (model.tp_plan):", json.dumps(meta.tp_plan, indent=1))
else:
    say(f"{type(meta).__name__} has no tensor-parallel plan in transformers {version('transformers')} "
        f"(config.base_model_tp_plan is {config.base_model_tp_plan}): from_pretrained refuses tp_size={tp_n} "
        "for it unless DistributedConfig(tp_plan=...) gives it rules. The rest of this section uses a Llama.")
toy = LlamaConfig(hidden_size=256, intermediate_size=512, num_hidden_layers=2, num_attention_heads=8,
                  num_key_value_heads=4, vocab_size=1024)  # the CPU stand-in below: a toy Llama
for name, cfg in {"this model": config, "toy Llama": toy}.items():
    h = cfg.num_attention_heads
    kv = getattr(cfg, "num_key_value_heads", None) or h  # GPT-2 and Bloom: one key/value head per head
    print(f"{name:>10}: {h} heads, {kv} key/value heads -> both divide by {tp_n}: {h % tp_n == 0 and kv % tp_n == 0}")

# %% [markdown]
# The bundled model's heads (9 and 3) do not split over 2, so the run below uses a Llama with **random
# weights**: the llama-1b shape on two GPUs, the toy on the CPU. The call that loads a model tensor-parallel
# takes a `DistributedConfig`. Each process makes it under `torchrun` (it needs the process group the
# launcher sets up), so `workers/tensor_parallel.py` makes it, exactly as written here (`tests/test_launch.py`
# checks the worker's source against this line):
#
# ```python
# model = AutoModelForCausalLM.from_pretrained(args.checkpoint, dtype=torch.float32,
#                                              distributed_config=DistributedConfig(tp_size=world))
# ```
#
# `DistributedConfig(tp_size=2)` leaves `tp_plan` at `None`. That is not a missing plan: `None` means no
# override, so `from_pretrained` cuts the model by its own `model.tp_plan`, printed above. A dict is merged
# into that plan (`plan | override` in `_resolve_parallel_plans`, `transformers/distributed/mixin.py`, which
# `from_pretrained` calls in each process before it loads the weights): its rules replace single rules or
# add new ones, so a dict also gives a plan to a model that has none of its own. The `DistributedConfig`
# docstring (`transformers/distributed/configuration_utils.py`) says an empty dict "applies no tensor
# parallel rule"; with `tp_size` above 1, `_resolve_parallel_plans` then refuses the empty plan, as it
# refuses a model without a plan. The cell asks it on fresh meta models of this checkpoint (no process
# group needed) and prints each refusal whole: its last sentence is the remedy.

# %%
distributed_config = DistributedConfig(tp_size=tp_n)
say(f"DistributedConfig(tp_size={tp_n}): tp_size {distributed_config.tp_size}, tp_plan "
    f"{distributed_config.tp_plan!r} (no override: the model's own plan), pp_size {distributed_config.pp_size}")
head = next(n for n, m in meta.named_modules() if m is meta.get_output_embeddings())  # "lm_head"
for override in (None, {}, {head: "colwise"}):
    with torch.device("meta"):  # a fresh model each time: a dict override is written into the model it resolves
        asked = AutoModelForCausalLM.from_config(config)
    try:
        resolved = asked._resolve_parallel_plans(DistributedConfig(tp_size=tp_n, tp_plan=override))[0]
        cut = [n for n in resolved if not n.endswith((".weight", ".bias"))]  # each module comes with its weight
        ends = " to ".join(dict.fromkeys(f"{n!r} ({resolved[n]})" for n in (cut[0], cut[-1])))
        say(f"tp_plan={override!r}: {len(cut)} module(s) cut, {'from ' * (len(cut) > 1)}{ends}")
    except ValueError as e:
        say(f"tp_plan={override!r}: {type(e).__name__}: {e}")

# %% [markdown]
# Each process loads its shards and computes the logits of fixed random token ids in float32; rank 0
# then loads the whole model on one device and compares. The shards change only the order in which
# partial sums are added, so the logits agree within 1e-3 (times the largest logit, if above 1).
#
# With two GPUs or more this runs over two of them on the llama-1b shape. With fewer, the cell says so and
# runs the same worker on two CPU processes (gloo) with the toy Llama (2 layers, hidden 256, 8 heads, 4
# key/value heads, random weights): the code path is the same, the sizes are not. The stand-in's processes
# start with `CUDA_VISIBLE_DEVICES=` (no GPU visible): transformers sets up tensor parallelism on the
# machine's accelerator, and on a machine with one GPU it would try to use it.

# %%
hide = {} if n_gpu >= 2 else {"CUDA_VISIBLE_DEVICES": ""}  # CPU processes: a visible GPU would pull them to it
if n_gpu >= 2:
    tp_checkpoint, extra = random_checkpoint("llama-1b", torch.bfloat16), []  # RANDOM weights, built once
    say(f"{n_gpu} GPUs: tensor parallel over {tp_n} of them on the llama-1b shape, RANDOM weights")
else:
    say(f"Tensor parallelism needs at least two GPUs (one process per GPU, each holding part of every layer);\n"
        f"this machine has {n_gpu}. Running the same worker on {tp_n} CPU processes with the toy Llama "
        f"(RANDOM weights) instead.")
    tp_checkpoint, extra = work / "toy-llama", ["--cpu"]
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(toy, dtype=torch.float32).save_pretrained(tp_checkpoint)
cmd = ["torchrun", "--standalone", f"--nproc_per_node={tp_n}", "workers/tensor_parallel.py",
       "--checkpoint", tp_checkpoint, "--expect-world-size", tp_n, "--out", work / "tp.json", *extra]
say("".join(f"{k}={v} " for k, v in hide.items())
    + shlex.join(map(str, cmd)).replace(str(work), "$WORK").replace(str(Path(tp_checkpoint).parent), "$CACHE"))
try:
    launch(cmd, extra_env=hide)
    tp = json.loads((work / "tp.json").read_text())
except RuntimeError as e:  # helpers.launch.LaunchError: the processes' own error lines
    tp = None
    say(f"{type(e).__name__}: {e}")
if tp:
    say(f"model: {tp['model']}; {tp['world_size']} processes; api: {tp['api']}")
    shards = [r["q_proj_shard_shape"] for r in tp["per_rank"]]
    say(f"q_proj: full {tp['q_proj_full_shape']}, shard per process {shards}")

# %% [markdown]
# **Memory per process is weights and KV cache.** Each process holds its shards of the weights (the parts not
# cut, the norms, are held whole by every process) and, for the key/value heads of its shards only, its share
# of the KV cache. The worker counts both; the cache is given at 16 sequences of 1,024 tokens, in float32 as
# the run here (bfloat16 halves both).

# %%
if tp:
    for r in tp["per_rank"]:
        kv = r["kv_cache_bytes_per_token_fp32"] * 16 * 1024
        say(f"rank {r['rank']}: weights {r['param_bytes_fp32'] / 2**20:.1f} MiB + KV cache {kv / 2**20:.1f} MiB "
            f"= {(r['param_bytes_fp32'] + kv) / 2**20:.1f} MiB ({r['kv_cache_bytes_per_token_fp32']} bytes a token: "
            f"{tp['heads'][1] // tp['world_size']} of the {tp['heads'][1]} key/value heads, every layer)")

# %%
# NBVAL_IGNORE_OUTPUT
# The last digits of the difference depend on the machine's float arithmetic.
if tp is None:
    print("no logits to compare: the launch above failed (its processes' error is printed there)")
else:
    check = tp["logits_check"]
    print(f"max |logit difference| {check['max_abs_diff']:.2e} (tolerance {check['tolerance']:.0e}); "
          f"top-1 agreement {check['top1_agreement']:.3f}")

# %% [markdown]
# **Self-check.** The tensor-parallel logits match the single-device run within the tolerance, and each
# process held its share of every column-split weight.

# %%
assert tp is not None, ("the tensor-parallel launch failed: read its processes' error two cells up (with tp_n "
                        "above 2, the head counts must divide by tp_n)")
assert tp["logits_check"]["ok"], "tensor-parallel logits differ from the single-device run"
assert all(r["q_proj_shard_shape"][0] * tp["world_size"] == tp["q_proj_full_shape"][0] for r in tp["per_rank"])
print("logits within tolerance:", tp["logits_check"]["ok"])

# %% [markdown]
# ## 3. The three compared on the reference GPUs
#
# A split, replicas and tensor parallelism were measured on the workbook's GPU reference machines by
# `gpu-reference/tools/gpu_bench.py` (random-weight llama-1b shape, bfloat16, eager `generate`, greedy,
# warm-up then medians of 3), one file per hardware tier: `gpu-reference/<tier>/results.json`. Each
# measurement is a **record**: `path` (`"one GPU"`, `"split"`, `"replicas"`, `"tensor parallel"`), `format`,
# `batch` (the prompts in flight over all GPUs), `tokens_per_s` (all their tokens, the median of the
# repeats), `spread` (the lowest and highest repeat, where the file recorded them) and `limit_tokens_per_s`,
# the bandwidth limit for that path and batch. An older file (one section per method, no limit) is read into
# the same form, its limits computed from the GPU's specified bandwidth.
#
# Which tier's file do we read? The one that matches this machine: the two-GPU tier with two GPUs or more,
# else the one-GPU tier. A split, tensor parallelism and two replicas need two GPUs, so those figures come
# from the two-GPU tier wherever the matching tier lacks them. `helpers.reference.read_reference` prints
# which file each figure comes from, with that file's hardware and versions, files each record under
# `rows[path, format][batch]` and adds its `rate` (its tokens/s beside its limit, as
# `helpers.measure.rate_text` prints it). Every figure below names its file in brackets.

# %%
files = read_reference(n_gpu)  # {tier: results}: this machine's tier first, then two-gpu
tier = next(iter(files))
ref, two_ref = files[tier], files["two-gpu"]
lacks = [p for p in ("split", "tensor parallel") if (p, "bf16") not in ref["rows"]]
lacks += [] if any(r["gpus"] >= 2 for r in ref["rows"].get(("replicas", "bf16"), {}).values()) else ["two replicas"]
if lacks:
    say(f"The {tier} tier has no {', no '.join(lacks)} (they need two GPUs): those come from the two-gpu tier.")

# %% [markdown]
# **Self-check.** Each file is the tier it is read as (`read_reference` refuses one whose `tier` entry or
# GPU count is not its folder's), and its replicas ran one process per GPU of that tier.

# %%
assert tier == ("two-gpu" if n_gpu >= 2 else "one-gpu"), "the tier does not match this machine"
for name, res in files.items():
    n = len(res["hardware"]["gpus"])
    assert all(r["gpus"] == n for r in res["rows"]["replicas", "bf16"].values()), f"{name}: replicas"
print("replicas, one process per GPU:", ", ".join(f"{k} {len(res['hardware']['gpus'])}" for k, res in files.items()))

# %% [markdown]
# First the plain table, one per file: total tokens/s at each total batch the file holds, with its share
# of the limit. The two files are two different runs, so they get two tables and two panels: a figure is
# compared only with figures of its own run, and only as far as the spread of its repeats allows, or, where
# the file recorded none, the noise bound (the cells after the table).

# %%
PATHS = ("one GPU", "split", "replicas", "tensor parallel")
tables = {name: {p: res["rows"][p, "bf16"] for p in PATHS if (p, "bf16") in res["rows"]} for name, res in files.items()}
for name, tps in tables.items():
    spreads = all(r.get("spread") for row in tps.values() for r in row.values())
    print(f"[{name}] total tokens/s (share of the limit); spreads of repeats "
          f"{'in the file' if spreads else 'not recorded'}\n{'total batch':>11}" + "".join(f"{p:>18}" for p in tps))
    for b in sorted(set().union(*tps.values())):
        cells = [f"{r['tokens_per_s']:.0f} ({r['tokens_per_s'] / r['limit_tokens_per_s']:.1%})" if r else "-"
                 for r in (row.get(b) for row in tps.values())]
        print(f"{b:>11}" + "".join(f"{c:>18}" for c in cells))
fig, axes = plt.subplots(1, len(tables), figsize=(8, 3.5), sharey=True, squeeze=False)
for ax, (name, tps) in zip(axes[0], tables.items()):
    for p, row in tps.items():
        ax.plot(sorted(row), [row[b]["tokens_per_s"] for b in sorted(row)], "o-", label=p)
    ax.set_xscale("log", base=2)
    ax.set_title(f"[{name}] one run, {len(files[name]['hardware']['gpus'])} x {files[name]['hardware']['gpus'][0][0]}",
                 fontsize=9)
    ax.set_xlabel("total batch (prompts over all GPUs)")
    ax.legend(fontsize=7)
axes[0][0].set_ylabel("total tokens/s")
fig.suptitle("Reference runs: random-weight llama-1b, bf16 (each panel its own run)", fontsize=10)
plt.show()

# %% [markdown]
# Memory is the other side: a replica holds the whole model on every GPU, a split and tensor parallelism
# hold about half of it on each of two. The peak bytes per GPU each file recorded for each method, at the
# largest batch it measured (an older file keeps one peak per method, over all its batches). A peak is taken
# over the whole generation, so it holds each GPU's KV cache too: all of it for one GPU and a replica, the
# layers it holds for a split, its key/value heads' share for tensor parallelism.

# %%
for name, tps in tables.items():
    for p, row in tps.items():
        top = max(row)
        shown = ", ".join(f"GPU {g} {b / 2**30:.2f} GiB" for g, b in enumerate(row[top]["peak_bytes_per_gpu"] or [])
                          if b)
        print(f"[{name}] {p:<16}batch {top:>3}: {shown or 'not in the file'}")

# %% [markdown]
# A ratio at equal total batch says little on its own: if one GPU is far from busy at that batch, halving
# each GPU's batch saves almost nothing. Replicas pay when each GPU gets as much work as one GPU would
# (**equal batch per GPU**: one GPU at batch *b* against *n* replicas at a total of *n b*), and they pay most
# once one GPU is **saturated**: the smallest batch at which doubling it raises one GPU's tokens/s by less
# than 10%. With one GPU, *n* is 1: one replica against plain `generate` at equal batch. The next cells
# compute both for each file, or say which measurement a file lacks. The saturation rule reads medians; a
# file that recorded no spread of repeats cannot tell a 10% step from noise, and the cell says so. A
# doubling of the batch that more than doubles tokens/s is flagged too: it would need a step for twice the
# rows to take less time than a step for the rows before.

# %%
def saturation_walk(one):
    """One GPU's tokens/s ratio per doubling from the smallest batch, the saturating batch (or None), the last batch."""
    doubling, b, saturated = {}, min(one), None
    while 2 * b in one and saturated is None:
        doubling[b] = one[2 * b] / one[b]
        saturated = b if doubling[b] < 1.10 else None
        b *= 2
    return doubling, saturated, b


# %%
walks, missing, locatable = {}, {}, {}
for name, res in files.items():
    rows = res["rows"]["one GPU", "bf16"]
    one = {b: r["tokens_per_s"] for b, r in rows.items()}
    walks[name] = doubling, saturated, last = saturation_walk(one)
    locatable[name] = all(r.get("spread") for r in rows.values())  # a 10% step needs spreads to be seen
    for b, g in doubling.items():
        say(f"[{name}] one GPU, batch {b} -> {2 * b}: tokens/s x{g:.2f}" + (
            ": more than double, which needs a step for twice the rows to take less time: noise" if g > 2 else ""))
    bound = rows[min(rows)].get("noise_bound")
    if doubling and not locatable[name]:
        say(f"[{name}] this file cannot locate saturation: the rule looks for a doubling that adds less than 10%, "
            "and its figures carry no spread of repeats" + (f", while two runs of the same configuration "
                                                            f"differed by {bound:.2f}x" if bound else ""))
    elif saturated is not None:
        say(f"[{name}] by the medians, one GPU saturates at batch {saturated}")
    elif doubling and last == max(one):
        say(f"[{name}] by the medians, the largest batch measured did not saturate one GPU: tokens/s rose "
            f"{doubling[last // 2] - 1:.0%} from batch {last // 2} to {last}")
    else:
        missing[name] = True
        say(f"[{name}] MISSING for the saturating batch: one GPU at batches a doubling apart ({min(one)}, "
            f"{2 * min(one)}, {4 * min(one)}, ...) up to the first doubling that adds less than 10%. The file "
            f"has one GPU at batches {sorted(one)}: one GPU at batch {2 * last} is the next one missing.")
    if "saturation" in res:
        say(f"[{name}] the file's own finding: {res['saturation']}")

# %%
equals = {}
for name, res in files.items():
    one, rep = res["rows"]["one GPU", "bf16"], res["rows"]["replicas", "bf16"]
    n = max(r["gpus"] for r in rep.values())
    equals[name] = {b: (rep[n * b], one[b]) for b in sorted(one) if n * b in rep}
    for b, (r, o) in equals[name].items():
        what = "one replica" if n == 1 else f"{n} replicas at total {n * b}"
        say(f"[{name}] equal batch per GPU ({b}): " + compare_rates(r, o, what, f"one GPU at {b}")
            + (f" (ideal {n}.00x)" if n > 1 else ""))
    if not equals[name]:
        missing[name] = True
        say(f"[{name}] MISSING for equal batch per GPU: one GPU at a batch b together with replicas at a total "
            f"of {n}*b. The file has one GPU at batches {sorted(one)} and replicas at totals {sorted(rep)}.")
    saturated = walks[name][1] if locatable[name] else None  # a saturating batch the file cannot locate is none
    if saturated is not None and n * saturated in rep and n * saturated in one:
        B = n * saturated
        say(f"[{name}] at the saturating total {B}: " + compare_rates(rep[B], one[B], f"{n} replica(s)", "one GPU"))
    elif saturated is not None:
        missing[name] = True
        say(f"[{name}] MISSING: one GPU saturates at batch {saturated}, but the file lacks replicas at a total "
            f"of {n * saturated}.")

# %% [markdown]
# What the figures say, in sentences computed from them (they change when the benchmark is remade). A ratio
# is given with the spread of its repeats where the file has them; where it has none, it is judged against
# the noise bound `read_reference` printed (the largest gap between two runs of the same configuration):
# inside it, no difference can be claimed; outside it, the sentence says which is slower.

# %%
for name, res in files.items():
    one = res["rows"]["one GPU", "bf16"]
    lo, hi = min(one), max(one)
    step = hi / lo / (one[hi]["tokens_per_s"] / one[lo]["tokens_per_s"])  # time of a step at hi over one at lo
    say(f"- [{name}] One GPU at batch {hi} ({hi // lo}x the prompts of batch {lo}): "
        + compare_rates(one[hi], one[lo], f"batch {hi}", f"batch {lo}")
        + f"; by the medians, a step for {hi} rows took {step:.2f}x as long as one for {lo}.")
    shares = [one[b]["tokens_per_s"] / one[b]["limit_tokens_per_s"] for b in (lo, hi)]
    say(f"- [{name}] One GPU reached {shares[0]:.1%} of its memory-bandwidth limit at batch {lo} and "
        f"{shares[1]:.1%} at batch {hi}" + (": memory reads were far from setting the pace of eager decoding."
                                           if max(shares) < 0.5 else "."))

# %%
for name, res in files.items():
    one, rep = res["rows"]["one GPU", "bf16"], res["rows"]["replicas", "bf16"]
    n, lo, hi = max(r["gpus"] for r in rep.values()), min(one), max(one)
    if n == 1:
        say(f"- [{name}] One replica adds no GPU: the lines above time the same model on the same GPU, in two "
            "processes; a gain from replicas needs a second GPU.")
        continue
    if lo in rep and lo < n:
        say(f"- [{name}] At total batch {lo}, {n - lo} of {n} replicas had no prompt: "
            + compare_rates(rep[lo], one[lo], "replicas", "one GPU") + ". Replicas do not make one prompt faster.")
    if hi in rep:
        say(f"- [{name}] At total batch {hi}, {n} replicas ({hi // n} per GPU) against one GPU with all {hi}: "
            + compare_rates(rep[hi], one[hi], "replicas", "one GPU") + ".")
    if missing.get(name):
        say(f"- [{name}] So the file cannot yet say how much replicas gain when every GPU is busy: that needs "
            "the measurements marked MISSING above.")
    elif not locatable[name]:
        say(f"- [{name}] The file cannot say when one GPU is busy (no spreads of repeats): how much replicas gain "
            "when every GPU is busy needs a run that records them.")
    elif walks[name][1] is None:
        say(f"- [{name}] One GPU was not saturated by batch {hi}: how much replicas gain when every GPU is busy "
            "needs larger batches.")

# %%
why = {"split": "a split buys memory, not speed", "tensor parallel": "two all-reduces a layer add to each step"}
for name, tps in tables.items():
    for p in why:
        for b in sorted(set(tps.get(p, {})) & set(tps["one GPU"])):
            say(f"- [{name}] {p} at total batch {b}: " + compare_rates(tps[p][b], tps["one GPU"][b], p, "one GPU")
                + f" (what to expect of eager decoding: {why[p]}).")

# %% [markdown]
# Two runs are not one. Where the reference files measured the same configuration more than once (the
# same GPU model, shape, format, batch and work on each GPU: one GPU, a single replica and offload of no
# layer all run the model whole on one GPU), the figures show how far two runs can differ. The largest gap
# is the noise bound every ratio above was judged by (`helpers.reference.same_configuration`).

# %%
noise = ref["noise"]  # over every reference file, whichever tiers this machine reads
for c in noise["configurations"]:
    print(f"{c['configuration']}: {c['ratio']:.2f}x apart")
    for t, r in c["figures"]:
        what = {"replicas": "one replica"}.get(r["path"], r["path"]) + (", no layer on the CPU" if
                                                                          r.get("layers_on_cpu") == 0 else "")
        say(f"  [{t}] {what}: {r['rate']}")
print(f"noise bound: {noise['bound']:.2f}x, the largest of these" if noise["bound"] else
      "no configuration was measured twice: no noise bound, and a ratio without spreads claims no difference")

# %% [markdown]
# Published material explains the split's side: it runs one GPU at a time (accelerate's
# [big model inference guide](https://huggingface.co/docs/accelerate/usage_guides/big_modeling)). For
# tensor parallelism it shows the other side: with the per-layer overhead compiled away, gpt-fast's
# [README](https://github.com/pytorch-labs/gpt-fast/blob/main/README.md) reports tensor parallelism on 2, 4
# and 8 GPUs faster than one at batch 1. `docs/published-figures.md` in this repository quotes those
# figures with their hardware. The reference runs here are eager `generate`, and measure the first side only.
#
# **Self-check.** The comparison's own numbers are consistent: in the two-GPU file no method exceeded the
# number of GPUs times one GPU's tokens/s; in each file no figure exceeded its limit, and a saturating batch
# the file states agrees with its records; and the tensor-parallel logits checks on the GPUs passed, with
# the transformers of the run and (the two-GPU tier's `tp-system-transformers.json`) with the GPU machine's
# own, older transformers.

# %%
n_ref, one2 = len(two_ref["hardware"]["gpus"]), two_ref["rows"]["one GPU", "bf16"]
assert all(r["tokens_per_s"] <= n_ref * one2[b]["tokens_per_s"] * 1.05 for row in tables["two-gpu"].values()
           for b, r in row.items() if b in one2), "a method beat (number of GPUs) x one GPU?"
for name, res in files.items():
    assert all(r["tokens_per_s"] <= r["limit_tokens_per_s"] for r in res["records"]), f"{name}: above a limit?"
    if "saturation" in res:
        doubling, saturated, last = walks[name]
        assert res["saturation"]["found"] == (saturated is not None), f"the {name} file's saturation disagrees"
        assert res["saturation"]["batch"] == (saturated if saturated is not None else last), \
            f"the {name} file's saturating batch disagrees with its records"
for run in filter(None, (two_ref["tensor_parallel"], two_ref["other_files"].get("tp-system-transformers.json"))):
    assert run["logits_check"]["ok"], "a reference tensor-parallel logits check failed"
    check = run["logits_check"]
    version_of_run = run.get("transformers", two_ref["versions"]["transformers"])
    say(f"[two-gpu] tensor-parallel logits with transformers {version_of_run}: max difference "
        f"{check['max_abs_diff']:.1e} (tolerance {check['tolerance']:.0e}), API {run['api']}")
# %% [markdown]
# ## 4. Continuous batching: requests of different lengths on one model
#
# Replicas and tensor parallelism put more hardware to work. On one device, what a server does with the
# requests matters as much. Real requests differ: prompts of different lengths and answers of different
# lengths, arriving at different times. A **static batch** pads every prompt to the longest (on the left)
# and runs until its longest answer is done: a request that wanted 2 new tokens holds its row, and its KV
# cache, until the one that wanted 16 is finished, and the next batch waits for all of them.
# **Continuous batching** (transformers 5: `generate_batch`, and `continuous_batching_context_manager`
# for requests with their own `max_new_tokens`) keeps no rows: each step packs the tokens of every request
# in flight into one flat batch (a new request's whole prompt, one token for each request already
# decoding), drops a request the moment it is done and takes in the next. Its KV cache is **paged**: blocks
# of `page_size` tokens handed to a request as it grows and taken back when it finishes.
#
# The requests: 8 prompts of different lengths, each with its own `max_new_tokens`, greedy, in bfloat16.

# %%
from transformers import ContinuousBatchingConfig, GenerationConfig

questions = ["Hi.", "What is the capital of France?", "Name three colours of the rainbow, please.",
             "Explain in one sentence why the sky is blue by day and red at sunset.",
             "Tell me a fact.", "Write a short poem about autumn leaves falling in a quiet park.",
             "What is two plus two?", "List the planets of the solar system in order, starting from the Sun."]
news = [16, 4, 12, 2, 8, 14, 6, 10]  # max_new_tokens of each request


def prepare(checkpoint):
    """The model in bfloat16, its tokenizer (left padding), the requests' token ids, the greedy settings."""
    t = AutoTokenizer.from_pretrained(checkpoint, padding_side="left")
    t.pad_token = t.pad_token or t.eos_token  # some tokenizers (GPT-2's) have no padding token
    m = AutoModelForCausalLM.from_pretrained(checkpoint, dtype=torch.bfloat16, device_map={"": device})
    g = GenerationConfig(do_sample=False, max_new_tokens=max(news), pad_token_id=t.pad_token_id,
                         eos_token_id=t.eos_token_id)
    return m, t, [t(q)["input_ids"] for q in questions], g


serving_path = path  # the model sections 4 and 5 serve
model, tok, prompts, gen = prepare(serving_path)
for p, n in zip(prompts, news):
    say(f"{len(p):>3} prompt tokens, up to {n:>2} new: {tok.decode(p)!r}")

# %% [markdown]
# The paged cache is set by `ContinuousBatchingConfig` (`transformers/generation/configuration_utils.py`):
# `page_size` (tokens per page, default 256), `num_blocks` (the cache's size in blocks of `page_size` tokens
# of every layer), `max_batch_tokens` (the most tokens one step packs) and `max_memory_percent`. Left to
# themselves, `max_batch_tokens` is 8,192 and `num_blocks` fills the share `max_memory_percent` of the memory
# free after loading: 0.9 on a GPU, 0.8 with logit processors, 0.6 on a CPU, where the cache comes out of this
# machine's RAM (`resolve_max_memory_percent` in `transformers/generation/continuous_batching/initialization.py`).
# We give the sizes ourselves: pages of 16 tokens, 32 blocks, at most 128 tokens a step.
#
# The function below is a server's loop in a few lines: every request added with its own
# `max_new_tokens`, each result taken as it finishes, with the time it finished.

# %%
cb_config = ContinuousBatchingConfig(page_size=16, num_blocks=32, max_batch_tokens=128)


def serve_continuously():
    """All requests at once; returns {request: new token ids}, {request: seconds to finish}, the paged cache."""
    t0, out, done = time.perf_counter(), {}, {}
    with model.continuous_batching_context_manager(generation_config=gen, continuous_batching_config=cb_config,
                                                   block=True, timeout=10) as manager:
        ids = {manager.add_request(p, max_new_tokens=n): i for i, (p, n) in enumerate(zip(prompts, news))}
        while len(out) < len(prompts):
            r = manager.get_result(timeout=120)
            if r is None or r.error:
                raise RuntimeError(f"continuous batching stopped: {r.error if r else 'no result in 120 s'}")
            if r.is_finished():
                out[ids[r.request_id]], done[ids[r.request_id]] = r.generated_tokens, time.perf_counter() - t0
        return out, done, manager.batch_processor.cache


cb_logger = logging.getLogger("ContinuousBatchingLogger")  # transformers' own: it logs a refusal's traceback
cb_level = cb_logger.level
cb_logger.setLevel(logging.CRITICAL)  # the refusal is printed below, once, whole
try:
    serve_continuously()  # once, untimed: it pays the set-up, and shows whether this model takes it
except (RuntimeError, ValueError) as e:
    serving_path = resolve_model("bundled")
    say(f"Continuous batching refused {type(model).__name__} here ({type(e).__name__}: {e}); sections 4 and 5 "
        "serve the bundled model instead.")
    model, tok, prompts, gen = prepare(serving_path)
finally:
    cb_logger.setLevel(cb_level)


# %% [markdown]
# The static alternative, as a server without continuous batching would run it: batches of 4 requests in
# arrival order, each padded on the left to its longest prompt and run to its largest `max_new_tokens`.
# Every row of a batch finishes when the batch does. A row's own tokens end at its `max_new_tokens` or its
# end-of-text token; the rest of its steps are **idle slots**, computed and thrown away.

# %%
def serve_static(size=4):
    """Padded batches of `size`; returns {request: new ids}, {request: seconds to finish}, slots, pad tokens."""
    t0, out, done, slots, pads = time.perf_counter(), {}, {}, 0, 0
    for start in range(0, len(prompts), size):
        idx = range(start, min(start + size, len(prompts)))
        enc = tok.pad({"input_ids": [prompts[i] for i in idx]}, return_tensors="pt").to(device)
        with torch.inference_mode():
            o = model.generate(**enc, do_sample=False, max_new_tokens=max(news[i] for i in idx),
                               pad_token_id=tok.pad_token_id)
        new = o[:, enc["input_ids"].shape[1]:]
        slots, pads = slots + new.numel(), pads + int((enc["attention_mask"] == 0).sum())
        for i, row in zip(idx, new.tolist()):
            row = row[:news[i]]
            out[i] = row[:row.index(tok.eos_token_id) + 1] if tok.eos_token_id in row else row
            done[i] = time.perf_counter() - t0
    return out, done, slots, pads


# %% [markdown]
# **Greedy outputs.** Both ways must answer what a plain `generate` answers for each request alone. We
# compare token by token; where they differ, the cell prints where the first difference is and the gap
# between the two best next-token logits of the plain run there: a near tie that another order of
# additions (a flat batch with a mask instead of one row) can flip.

# %%
# NBVAL_IGNORE_OUTPUT
# Where two logits tie exactly in bfloat16, another CPU's order of additions can pick the other token.
cb_out, _, cache = serve_continuously()
static_out, *_ = serve_static()
alone, differing = [], 0
for i, (p, n) in enumerate(zip(prompts, news)):
    with torch.inference_mode():
        o = model.generate(torch.tensor([p], device=device), do_sample=False, max_new_tokens=n,
                           pad_token_id=tok.pad_token_id, output_logits=True, return_dict_in_generate=True)
    alone.append(o.sequences[0, len(p):].tolist())
    for name, got in (("continuous", cb_out[i]), ("static", static_out[i])):
        if got != alone[i]:
            differing += 1
            k = next((j for j, (a, b) in enumerate(zip(got, alone[i])) if a != b), min(len(got), len(alone[i])))
            top = o.logits[min(k, len(o.logits) - 1)][0].float().topk(2).values
            say(f"request {i}, {name}: {sum(a != b for a, b in zip(got, alone[i]))} of {len(alone[i])} tokens differ, "
                f"the first at new token {k}, where the plain run's two best logits were {top[0] - top[1]:.3f} apart")
print(f"requests whose tokens equal a plain generate of that request alone: continuous "
      f"{sum(cb_out[i] == alone[i] for i in range(len(alone)))} of {len(alone)}, static "
      f"{sum(static_out[i] == alone[i] for i in range(len(alone)))} of {len(alone)}")

# %% [markdown]
# **The paged cache it used,** read from the manager's cache (`manager.batch_processor.cache`, a
# `PagedAttentionCache`), beside the cache each way needs for these requests. A static batch holds a row
# of (longest prompt + largest `max_new_tokens`) tokens for every request of the batch; the paged cache
# holds whole pages of `page_size` tokens, only for the requests in flight.

# %%
cfg = model.config
head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
kv_heads = getattr(cfg, "num_key_value_heads", None) or cfg.num_attention_heads
kv_token = 2 * cfg.num_hidden_layers * kv_heads * head_dim * 2  # bytes per token: K and V, every layer, bf16
lens = [len(p) + len(o) for p, o in zip(prompts, cb_out.values())]
static_rows = sum(len(b) * (max(len(prompts[i]) for i in b) + max(news[i] for i in b))
                  for b in (range(s, min(s + 4, len(prompts))) for s in range(0, len(prompts), 4)))
paged = sum(-(-n // cb_config.page_size) * cb_config.page_size for n in lens)  # whole pages, in tokens
say(f"paged cache: {cache.num_blocks} blocks of {cb_config.page_size} tokens, at most {cache.max_batch_tokens} "
    f"tokens a step, {cache.cache_tensor.numel() / 2**20:.1f} MiB allocated up front ({kv_token} bytes a token)")
say(f"these 8 requests use {sum(lens)} tokens of KV cache; the two static batches reserve {static_rows} token "
    f"slots ({static_rows / sum(lens):.2f}x, the rest padding and idle rows), whole pages {paged} "
    f"({paged / sum(lens):.2f}x)")

# %% [markdown]
# **Timing.** Both ways, one untimed round each (the first continuous round paid its set-up above), then 3
# timed rounds, alternated. A rate counts the tokens the requests asked for and got, not the idle slots; the
# limit beside it is the memory-bandwidth limit for 8 requests in flight (notebook 04), measured here.

# %%
# NBVAL_IGNORE_OUTPUT
# Timings depend on the machine and its load.
bandwidth = memory_bandwidth(device)
limit = decode_limit(model, bandwidth, batch=len(prompts), context=max(lens))
rounds = {"continuous": [], "static": []}
for r in range(4):
    for name, run in (("continuous", serve_continuously), ("static", serve_static)):
        t0 = time.perf_counter()
        out, done, *rest = run()
        if r:  # round 0 is the warm-up
            rounds[name].append((sum(map(len, out.values())) / (time.perf_counter() - t0), done, rest))
rates = {}
for name, rs in rounds.items():
    tps = sorted(x[0] for x in rs)
    rates[name] = {"tokens_per_s": statistics.median(tps), "spread": (tps[0], tps[-1])}
    lat = sorted(statistics.median(x[1][i] for x in rs) for i in range(len(prompts)))
    say(f"{name:>10}: {rate_text(rates[name]['tokens_per_s'], limit, rates[name]['spread'])}; "
        f"requests done after {lat[0]:.2f} s (first) to {lat[-1]:.2f} s (last), median {statistics.median(lat):.2f} s")
slots, pads = rounds["static"][0][2]
say(f"static: {slots} new-token slots computed for {sum(map(len, static_out.values()))} tokens the requests "
    f"kept ({1 - sum(map(len, static_out.values())) / slots:.0%} idle), and {pads} padding tokens in the prompts")
say(compare_rates(rates["continuous"], rates["static"], "continuous", "static"))

# %%
# NBVAL_IGNORE_OUTPUT
# The times and the verdict depend on the machine and its load.
short = news.index(min(news))
say(f"the shortest request ({news[short]} new tokens) was done after (medians of the 3 rounds) "
    f"{statistics.median(x[1][short] for x in rounds['continuous']):.2f} s with continuous batching and "
    f"{statistics.median(x[1][short] for x in rounds['static']):.2f} s in its static batch")
say("On this machine continuous batching " + ("gave the higher total rate." if rates["continuous"]["spread"][0]
    > rates["static"]["spread"][1] else "did not give a measurably higher total rate than padded static batches."))

# %% [markdown]
# **Why, and where each wins.** The lines above are this machine's; the reasons hold everywhere:
#
# - Each step of continuous batching does work a padded batch does not. The scheduler picks the requests
#   of the step, and the step's flat batch needs its index tables and, with `sdpa` (the path without a flash
#   kernel, the one a CPU takes), a block-diagonal attention mask over every request in flight, rebuilt each
#   step (`build_attention_mask` in `transformers/generation/continuous_batching/utils.py`). On a small model
#   on a CPU, where a step costs little arithmetic, that overhead can cost more than the idle slots it saves:
#   then padded `generate` is faster in total tokens/s, although it computes idle slots.
# - It wins where requests differ: no idle slot is computed (the static line above counts them), a short
#   request leaves as soon as it is done instead of waiting for its batch, and a request arriving later
#   joins the next step instead of the next batch. The KV cache is held in pages for the requests in flight
#   only, not a padded row per request (the cache lines above): on a GPU, that memory is more requests at once.
# - On a GPU, `init_continuous_batching` switches `sdpa`/`eager` to flash attention when it is installed
#   (`auto_switch_to_flash`, `switch_to_cb_friendly_attn`), decoding steps take a fast path reading the pages
#   through block tables (`flash_attn_with_kvcache`, sized by `max_blocks_per_request`), and CUDA graphs
#   (`use_cuda_graph`, decided automatically) replay a step without launching each kernel again: the
#   per-step overhead that dominates here mostly goes.

# %% [markdown]
# ## 5. A real server: `transformers serve`
#
# transformers ships an OpenAI-compatible server: `transformers serve MODEL` answers `POST
# /v1/chat/completions` (streamed or not) and `GET /health`; `--continuous-batching` runs its requests
# through the manager of section 4, otherwise it answers them one at a time with `generate`
# (`GenerateManager` in `transformers/cli/serving/utils.py`). It needs `fastapi`, `uvicorn`, `pydantic` and
# `openai` (the workbook installs them). Without a GPU, its paged cache would take 60% of the RAM the server
# process leaves free (section 4), so we give it 16 blocks (`--cb-num-blocks`; pages of 256 tokens by default).
#
# `helpers.serving.served` starts the command line in a process of its own, waits until `/health` answers,
# and stops the server when its `with` block ends, also when the block fails or the stop button is pressed.

# %%
import openai
import psutil

server_path = serving_path if tok.chat_template else resolve_model("bundled")
if server_path != serving_path:
    say("This model's tokenizer has no chat template, which the chat API needs: the server serves the bundled model.")


def serve_command(continuous):
    return ["transformers", "serve", server_path, "--device", device, "--dtype", "bfloat16", "--host",
            "127.0.0.1", "--port", free_port()] + (["--continuous-batching", "--cb-num-blocks", 16] if continuous else [])


shown = serve_command(True)
say(shlex.join(map(str, shown)).replace(str(server_path), "$MODEL").replace(f"--port {shown[shown.index('--port') + 1]}", "--port $PORT"))

# %% [markdown]
# The client is the official `openai` package, pointed at the server. Each request is streamed, so the time
# to its first token (**TTFT**) is seen; the last chunk reports the tokens generated. The workbook's own check
# (`check_chat_request`, shown below) runs before each request is sent. A round sends the 8 requests of
# section 4 with at most 4 in flight (a thread pool of 4: a bounded number of concurrent requests, as a
# real client should); one untimed round first, then 3 timed rounds. A request's TTFT and latency include
# its wait behind the requests in flight before it: without continuous batching the server answers one at a time.

# %%
def ask(client, question, max_tokens):
    """One streamed chat request: (seconds to the first token, seconds to the last, tokens generated)."""
    messages = [{"role": "user", "content": question}]
    check_chat_request(messages, max_tokens)  # refuses, before sending, what the server mishandles
    t0, first, tokens = time.perf_counter(), None, 0
    for chunk in client.chat.completions.create(model=str(server_path), messages=messages, max_tokens=max_tokens,
                                                temperature=0, stream=True):
        if chunk.choices and chunk.choices[0].delta.content and first is None:
            first = time.perf_counter() - t0
        tokens = chunk.usage.completion_tokens if chunk.usage else tokens
    return first, time.perf_counter() - t0, tokens


def measure(server, concurrency=4, repeats=3):
    """One untimed round (the warm-up), then `repeats` timed rounds of the 8 requests: rates, TTFTs, latencies."""
    client = openai.OpenAI(base_url=server.base_url, api_key="not-needed", max_retries=0)
    rates, ttft, latency = [], [], []
    for r in range(repeats + 1):
        t0 = time.perf_counter()
        with ThreadPoolExecutor(concurrency) as pool:
            done = list(pool.map(lambda qn: ask(client, *qn), zip(questions, news)))
        if r == 0:  # the warm-up round
            continue
        rates.append(sum(d[2] for d in done) / (time.perf_counter() - t0))
        ttft += [d[0] for d in done if d[0] is not None]
        latency += [d[1] for d in done]
    return {"tokens_per_s": statistics.median(rates), "spread": (min(rates), max(rates)), "ttft": ttft,
            "latency": latency}

# %% [markdown]
# **Bad requests.** What a learner meets when a request is wrong: the function below sends, with the bare
# client, a request with no messages and one with `max_tokens=-3` (plain and streamed), each on a fresh
# connection, prints what came back and the server's own last error line (the reason, which only its log
# holds), then asks a good question to see the server still serving. Then the workbook's check: it refuses
# the same requests with the fix in its message, and the server's log shows that nothing was sent.

# %%
def bad_requests(server):
    user = [{"role": "user", "content": "Hi."}]
    for what, kw in (("no messages", {"messages": []}), ("max_tokens=-3", {"messages": user, "max_tokens": -3}),
                     ("max_tokens=-3, streamed", {"messages": user, "max_tokens": -3, "stream": True})):
        client = openai.OpenAI(base_url=server.base_url, api_key="not-needed", max_retries=0)
        seen = len(server.log(10**6).splitlines())
        try:
            r = client.chat.completions.create(model=str(server_path), temperature=0, **kw)
            text = ("".join(c.choices[0].delta.content or "" for c in r if c.choices) if kw.get("stream")
                    else r.choices[0].message.content)
            say(f"{what}: accepted, HTTP 200, reply {text!r}")
        except openai.APIError as e:
            say(f"{what}: {type(e).__name__}: {e}")
        for _ in range(20):  # the server may log its error just after it answered: wait up to 2 s for it
            new = server.log(10**6).splitlines()[seen:]
            errors = [line for line in new if line.startswith(("ValueError", "RuntimeError", "TypeError"))]
            if errors:
                break
            time.sleep(0.1)
        say(f"    the server's log: {errors[-1] if errors else 'no error'}")
    client = openai.OpenAI(base_url=server.base_url, api_key="not-needed")
    r = client.chat.completions.create(model=str(server_path), temperature=0, max_tokens=12,
                                       messages=[{"role": "user", "content": "What is the capital of France?"}])
    say(f"still serving: {r.choices[0].message.content!r}")


# %%
def check_before_sending(server):
    """The workbook's check on the same requests, and the count of requests the server received meanwhile."""
    sent = server.log(10**6).count("POST /v1/chat/completions")
    for messages, n in (([], 20), ([{"role": "user", "content": "Hi."}], -3)):
        try:
            check_chat_request(messages, n)
        except ValueError as e:
            say(f"check_chat_request({messages!r}, {n}): {type(e).__name__}: {e}")
    say(f"requests the server received during the checks: {server.log(10**6).count('POST /v1/chat/completions') - sent}")


# %% [markdown]
# Without continuous batching first. The server is stopped when the `with` block ends; the cell then checks
# that none of its processes is left.

# %%
# NBVAL_IGNORE_OUTPUT
# Timings depend on the machine and its load.
with torch.device("meta"):  # the served model's shapes (the bundled one where this model has no chat template)
    served_model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(server_path), dtype=torch.bfloat16)
stats, limit4 = {}, decode_limit(served_model, bandwidth, batch=4, context=64)  # what 4 requests in flight can reach


def report(name, s):
    q = statistics.quantiles
    say(f"{name}: {rate_text(s['tokens_per_s'], limit4, s['spread'])}; TTFT p50 {statistics.median(s['ttft']):.2f} s; "
        f"latency p50 {q(s['latency'], n=20)[9]:.2f} s, p95 {q(s['latency'], n=20)[18]:.2f} s")


with served(serve_command(False)) as server:
    stats["one at a time"] = measure(server)
report("one at a time", stats["one at a time"])
print("server processes left:", [p for p in server.pids if psutil.pid_exists(p)])

# %% [markdown]
# With `--continuous-batching`. In the same `with` block, the bad requests and the check. The block's last
# call raises (the check refuses `max_tokens=-3` inside `ask`), on purpose: the server is stopped all the same.

# %%
# NBVAL_IGNORE_OUTPUT
# Timings depend on the machine and its load.
try:
    with served(serve_command(True)) as server:
        stats["continuous"] = measure(server)
        bad_requests(server)
        check_before_sending(server)
        ask(openai.OpenAI(base_url=server.base_url, api_key="not-needed"), "Hi.", -3)  # refused before sending
except ValueError as e:
    say(f"the with-block ended in {type(e).__name__}: {e}")
print("server processes left:", [p for p in server.pids if psutil.pid_exists(p)])
report("continuous", stats["continuous"])
say(compare_rates(stats["continuous"], stats["one at a time"], "continuous", "one at a time"))

# %% [markdown]
# **Self-check.** Both servers answered every request, and none of their processes outlived its `with` block
# (the second one ended in an error).

# %%
assert all(len(s["latency"]) == 3 * len(questions) for s in stats.values()), "a request went unanswered"
assert not [p for p in server.pids if psutil.pid_exists(p)], "a server process outlived its with-block"
print("both servers answered all", 3 * len(questions), "requests of their rounds; no server process left")

# %% [markdown]
# ## 6. Past one machine
#
# When one machine's GPUs are not enough, the same worker runs over several machines: one `torchrun` per
# machine, each told how many machines there are (`--nnodes`), which one it is (`--node_rank`) and where to
# meet (a c10d rendezvous at `--rdzv_endpoint HOST:PORT`, served by the first machine to arrive).
# `--standalone` was shorthand for a one-machine rendezvous. Here the two "machines" are two `torchrun`s on
# this one, one process each, meeting at 127.0.0.1 on a free port, started at the same time (two threads).
# With two GPUs or more, each "machine" sees one GPU (`CUDA_VISIBLE_DEVICES`), as a real one would see its own.

# %%
rdzv = f"127.0.0.1:{free_port()}"
nodes = [["torchrun", "--nnodes=2", "--nproc_per_node=1", f"--node_rank={r}", "--rdzv_backend=c10d",
          f"--rdzv_endpoint={rdzv}", "workers/tensor_parallel.py", "--checkpoint", tp_checkpoint,
          "--expect-world-size", tp_n, "--out", work / "tp-2nodes.json", *extra] for r in range(2)]
envs = [{"CUDA_VISIBLE_DEVICES": str(r)} if n_gpu >= 2 else hide for r in range(2)]
for cmd, env in zip(nodes, envs):
    say("".join(f"{k}={v} " for k, v in env.items()) + shlex.join(map(str, cmd)).replace(str(work), "$WORK")
        .replace(str(Path(tp_checkpoint).parent), "$CACHE").replace(rdzv.split(":")[1], "$PORT"))
try:
    with ThreadPoolExecutor(2) as pool:
        list(pool.map(lambda c_e: launch(c_e[0], extra_env=c_e[1], timeout=300), zip(nodes, envs)))
    tp2 = json.loads((work / "tp-2nodes.json").read_text())
except RuntimeError as e:  # helpers.launch.LaunchError
    tp2 = None
    say(f"{type(e).__name__}: {e}")
if tp and tp2:
    one_node, two_nodes = (torch.load(work / f, weights_only=True) for f in ("tp.logits.pt", "tp-2nodes.logits.pt"))
    say(f"processes on 'machines' {[r['node'] for r in tp2['per_rank']]}; tensor-parallel logits equal to the "
        f"one-machine run's, bit for bit: {torch.equal(one_node, two_nodes)} (largest difference "
        f"{(one_node - two_nodes).abs().max().item():.1e})")

# %% [markdown]
# **Self-check.** Two machines, one process each, and the same logits as one machine with two processes: the
# shards and the order of the additions are the same; only the rendezvous changed.

# %%
assert tp2 is not None and tp is not None, "a launch failed: its processes' error is printed above"
assert sorted(r["node"] for r in tp2["per_rank"]) == ["0", "1"], "the two processes should sit on two 'machines'"
assert torch.allclose(one_node, two_nodes, atol=tp["logits_check"]["tolerance"]), "the two runs' logits differ"
print("two machines, one process each; logits as on one machine")

# %% [markdown]
# On two real hosts with 8 GPUs each, the lines are the same with the first host's address (reachable from
# the second; a firewall must let the port through), run on each host, `--node_rank=0` on the first:

# %%
gpus_per_host, first_host = 8, "10.0.0.1"  # the first host's address on the network both share
for r in range(2):
    say(f"# on host {r}:\ntorchrun --nnodes=2 --nproc_per_node={gpus_per_host} --node_rank={r} --rdzv_backend=c10d "
        f"--rdzv_endpoint={first_host}:29500 workers/tensor_parallel.py --checkpoint DIR "
        f"--expect-world-size {2 * gpus_per_host} --out tp.json")

# %% [markdown]
# Tensor parallelism adds its all-reduces to every layer of every step, and between hosts they cross the
# network instead of NVLink. The usual layout therefore keeps tensor parallelism inside a host and puts
# pipeline stages or whole replicas across hosts: vLLM's documentation gives as the common practice a
# tensor-parallel size of the GPUs of one host and a pipeline-parallel size of the number of hosts
# ([distributed inference and serving](https://docs.vllm.ai/en/v0.8.3/serving/distributed_serving.html)).
#
# **What production engines add.** `transformers serve` shows the mechanics; engines built for serving add,
# each on by default or one flag away:
#
# | | vLLM | SGLang |
# | --- | --- | --- |
# | KV cache | PagedAttention (the paged cache of section 4 started there), prefix caching | RadixAttention: a radix tree of cached prefixes shared across requests |
# | decoding | continuous batching, CUDA graphs, speculative decoding | the same; speculative decoding with EAGLE (`--speculative-algorithm EAGLE3`) |
# | several GPUs | `--tensor-parallel-size`, `--pipeline-parallel-size`; over hosts with Ray ([docs](https://docs.vllm.ai/en/v0.8.3/serving/distributed_serving.html)) | `--tp` (over all hosts), with `--nnodes`, `--node-rank`, `--dist-init-addr` ([docs](https://docs.sglang.io/references/multi_node_deployment/multi_node.html)) |
# | published, one request at a time | Llama-3.1-8B-Instruct, fp16, one H100 80GB, vLLM 0.21: 122 tokens/s at concurrency 1 ([InferenceBench concurrency sweep](https://yobitelcomm.github.io/bench/recipes/concurrency-sweep/)); Llama-3.1-8B-Instruct, bf16, one A100 40GB, vLLM 0.23: about 75 tokens/s ([a throughput-latency sweep](https://johnmusgrave.com/p/vllm-throughput-latency-sweep-on)) | Qwen3-8B, one H100 SXM, ShareGPT, batch 1: SGLang 0.5.3 with FP8 weights and EAGLE3 speculative decoding, 0.62 s mean latency per request, against 1.66 s for the page's baseline, vLLM 0.11 with no optimization ([GPUStack performance lab](https://docs.gpustack.ai/latest/performance-lab/qwen3-8b/h100-latency)) |
# | published, saturated | the same H100 run: 1,384 tokens/s at concurrency 16, 1,312 at 64 (the peak is passed); the A100 run: 6.6x its one-request rate at concurrency 8, its knee (more beyond it, at a steep cost in latency) | Qwen3-14B, one H100, ShareGPT: SGLang with FP8 weights, 10,426 tokens/s in total, against 6,596 for the page's baseline, vLLM with no optimization ([GPUStack performance lab](https://docs.gpustack.ai/latest/performance-lab/qwen3-14b/h100)) |
#
# These are other people's runs on other hardware, with other models and prompts, one run each as
# published: a benchmark tool's documented example, a personal blog and a deployment vendor's lab (the
# engines' own announcements, e.g. vLLM's [v0.6.0 update](https://blog.vllm.ai/2024/09/05/perf-update.html),
# lead with gains over earlier versions and other engines). They say what such engines reach, not how they
# compare with each other or with this notebook; the GPUStack baselines differ from the tuned runs in more
# than the engine (FP8 weights, speculative decoding). **When to move to one:** when the figures of sections
# 4 and 5, measured on your GPU, fall short of what you must serve: many users at once, long shared prompts
# (prefix caching), tight latency at batch 1 (speculative decoding, CUDA graphs), or a model over several
# hosts. For learning, measuring and checking a model, `generate` and `transformers serve` stay the simplest.

# %%
del model
shutil.rmtree(work, ignore_errors=True)  # this notebook's temporary folder

# %% [markdown]
# ## Summary
#
# - `torchrun --standalone --nproc_per_node=N script.py` starts one process per GPU; every process checks
#   the world size it expects (`--expect-world-size`).
# - One replica per GPU: `PartialState().split_between_processes` gives each process a contiguous share of
#   the prompts, `gather_object` returns the answers in prompt order, and the group is torn down at the
#   end. The answers equal a plain `generate`.
# - Tensor parallelism cuts every layer: `from_pretrained(..., distributed_config=DistributedConfig(tp_size=N))`
#   (transformers 5.24; the two-GPU tier shows 5.17 took it too) cuts by the model's own `model.tp_plan`
#   (`DistributedConfig.tp_plan=None` means no override; a dict is merged into that plan, and gives one to a
#   model without; an empty plan is refused); the attention and key/value head counts must
#   divide by N, and the logits match a single device within float32 rounding.
# - Compare replicas with one GPU at equal batch per GPU and at a batch that saturates one GPU; a ratio at
#   equal total batch, where one GPU is far from busy, says little. A ratio means something only beside the
#   spread of its repeats or, for figures recorded without repeats, outside the noise bound (the largest gap
#   between two runs of the same configuration); and only within one run.
# - Continuous batching (`continuous_batching_context_manager`, `add_request(..., max_new_tokens=n)`) packs
#   the requests in flight into one flat batch each step, with a paged KV cache (`ContinuousBatchingConfig`:
#   `page_size`, `num_blocks`, `max_batch_tokens`, `max_memory_percent`). It computes no idle slot and holds no
#   padded row, and a short request leaves early; each step costs scheduling and a mask that a padded batch
#   does not, which on a CPU can make padded static batches faster in total tokens/s. On a GPU, flash
#   attention, the decode fast path and CUDA graphs remove most of that overhead.
# - `transformers serve PATH [--continuous-batching]` is an OpenAI-compatible server: start it in a process of
#   its own, wait for `/health`, stop it in a `finally` (`helpers.serving.served`), query it with the `openai`
#   client at bounded concurrency, and check requests before sending them: the server answers an empty
#   conversation with a bare HTTP 500 (the reason only in its log) and, with `--continuous-batching`, takes
#   a negative `max_tokens` silently (HTTP 200, an empty reply).
# - Past one machine: one `torchrun` per machine, `--nnodes`, `--node_rank` and a c10d rendezvous; the worker
#   and its output do not change. Production engines add prefix caching, speculative decoding, CUDA graphs
#   and their own parallelism.
#
# ## Exercises
#
# 1. Run `workers/replicas.py` with `--expect-world-size 3` under `torchrun --nproc_per_node=2` (build the
#    command as in section 1 and pass it to `launch` inside `try`/`except RuntimeError`: `launch` raises a
#    `LaunchError`). With one GPU, use `--nproc_per_node=1` and `--expect-world-size 2` instead: a second
#    process would ask for a GPU that is not there before the check runs.
#    *Self-check:* every process stops with a message naming both numbers.
# 2. Change `tp_n` to 3 in section 2. Which shape splits now? *Self-check:* the bundled model (9 and 3 heads
#    divide by 3) and not the toy Llama (8 and 4 do not).
# 3. On two GPUs, extend `gpu-reference/tools/gpu_bench.py --batches` with batches a doubling apart and
#    run it; then section 3 finds the saturating batch. *Self-check:* the MISSING lines disappear.
# 4. In section 4, run `serve_static(size=8)`: all 8 requests in one padded batch. *Self-check:* its idle
#    share of slots is at least that of batches of 4, and every request, the shortest too, is done only when
#    the longest is.
# 5. The executable self-check below: in the two-GPU reference file, how many times one GPU's tokens/s did
#    the replicas give at the largest total batch that has both figures? Two decimals.

# %%
from helpers.exercises import check_answer

answer = None  # your answer, e.g. 1.23
rep2 = {b: r["tokens_per_s"] for b, r in two_ref["rows"]["replicas", "bf16"].items()}
one2 = {b: r["tokens_per_s"] for b, r in two_ref["rows"]["one GPU", "bf16"].items()}
top = max(set(rep2) & set(one2))  # the largest total batch with both figures
truth = round(rep2[top] / one2[top], 2)
_ = check_answer(answer, lambda a: abs(a - truth) < 0.006,
                 f"{truth:.2f}x at total batch {top}, with {top // n_ref} prompts per GPU",
                 lambda a: f"{a} is not it; divide replicas' tokens/s by one GPU's at total batch {top}",
                 f"read the replicas column of the [two-gpu] table in section 3, at total batch {top}",
                 wrong_example=round(one2[top] / rep2[top], 2) if abs(one2[top] / rep2[top] - truth) > 0.01
                 else round(2 * truth, 2))  # the ratio the wrong way round (or, near 1.00x, doubled for two GPUs)

# %% [markdown]
# ## Further reading
#
# - [Distributed inference](https://huggingface.co/docs/accelerate/usage_guides/distributed_inference)
#   (accelerate): `split_between_processes` and gathering the results.
# - [Tensor parallelism](https://huggingface.co/docs/transformers/perf_infer_gpu_multi) (transformers): the
#   plans, `DistributedConfig`, launching with `torchrun`.
# - [torchrun](https://docs.pytorch.org/docs/stable/elastic/run.html) (PyTorch): the launcher's options.
# - [Big model inference](https://huggingface.co/docs/accelerate/usage_guides/big_modeling) (accelerate):
#   why a `device_map` split runs one device at a time.
# - `docs/published-figures.md` in this repository: published speed figures with their sources and hardware.
# - [Continuous batching](https://huggingface.co/docs/transformers/main/en/continuous_batching) and
#   [serving](https://huggingface.co/docs/transformers/main/en/serving) (transformers): `generate_batch`, the
#   paged cache, `transformers serve`.
# - [The OpenAI Python library](https://github.com/openai/openai-python): the client used in section 5.
