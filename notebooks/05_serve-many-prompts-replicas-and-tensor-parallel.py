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
# # Serve many prompts: replicas and tensor parallel
#
# Notebook 04 split a model across GPUs with `device_map`: that buys memory, and the GPUs take turns.
# When the model fits one GPU and you have many prompts, there are two ways to put every GPU to work at
# once: a whole **replica** of the model on each GPU, each answering its own share of the prompts, or
# **tensor parallelism**, which cuts every layer across the GPUs so that they all work on each token.
# This notebook runs both as separate processes started by `torchrun`, checks each against a single
# device, and compares them from the figures of the workbook's GPU reference runs, at equal batch per
# GPU and at a batch that saturates one GPU, or says which figure a run lacks.
#
# **What you'll learn**
# 1. Write the `torchrun` command line that starts one process per GPU, and serve one replica per process
#    with accelerate's `PartialState().split_between_processes`, gathering the answers in prompt order.
# 2. Check that the processes saw the world size you meant, and that the replicas answer exactly what a
#    plain `generate` answers.
# 3. Load a model tensor-parallel with `from_pretrained(..., distributed_config=DistributedConfig(tp_size=N))`,
#    see which head counts allow it, and check its logits against a single device.
# 4. Compare a split, replicas and tensor parallelism from measured figures, at equal batch per GPU and at
#    a batch that saturates one GPU, and say what the figures do and don't show.
#
# **What you'll need**
# - Notebook 04 (split a model across GPUs) first.
# - Hardware: GPUs for the real thing (one replica per GPU; tensor parallelism needs two). The same code
#   runs anywhere: on one GPU, one replica; without a GPU, two CPU processes stand in for two GPUs. With
#   fewer than two GPUs, tensor parallelism runs on two CPU processes with a toy model of random weights.
#   The measured comparison comes from the workbook's reference run of the tier that matches the machine
#   (`gpu-reference/one-gpu/results.json` without a GPU or with one, `gpu-reference/two-gpu/results.json`
#   with two or more); figures that need two GPUs (a split, tensor parallelism, two replicas) come from the
#   two-GPU tier on every machine.
# - Run time: about 35 s on an idle 2-core CPU, about a minute on one H200 GPU (two launches of
#   processes).

# %% tags=["parameters"]
MODEL = "bundled"  # "bundled" (SmolLM2-135M-Instruct), a local checkpoint folder, or a hub id
NEW_TOKENS = 12  # greedy new tokens per prompt

# %%
import inspect
import json
import shlex
import shutil
import tempfile
from pathlib import Path

import matplotlib.pyplot as plt
import torch
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, LlamaConfig
from transformers.distributed import DistributedConfig

from helpers.checkpoints import cache_dir, random_checkpoint, resolve_model
from helpers.hardware import gpu_count, print_report
from helpers.launch import ROOT, LaunchError, launch
from helpers.quiet import silence_known_warnings
from helpers.reference import (REFERENCE, TIER_GPUS, batch_growth, by_batch, matching_tier, print_sources, records,
                               reference_files, speed)
from helpers.shapes import SHAPES, random_model
from helpers.text import say

silence_known_warnings()  # routine library messages, and accelerate's loading bar in quiet runs
path = resolve_model(MODEL)
n_gpu = gpu_count()
work = Path(tempfile.mkdtemp(prefix="05-serve-"))  # the launches' output files; removed at the end

# %%
# NBVAL_IGNORE_OUTPUT
# The hardware report depends on the machine.
print_report()

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
# `PartialState()` under `torchrun` was seen reporting "rank 0 of 1" in each process (each then did all the
# work); `cpu=True` starts a real gloo process group, and the world-size assertion catches the failure if
# it ever comes back. How many processes to start depends on the machine:

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
# all-reduce). transformers ships the plan with the model (`base_model_tp_plan`), and attention and
# key/value head counts must divide by the number of GPUs:

# %%
config = AutoConfig.from_pretrained(path)
tp_n = 2  # the number of GPUs (processes) to cut every layer over
print("Llama's plan:", json.dumps(config.base_model_tp_plan, indent=1))
shapes = {"bundled": config.to_dict(), "llama-1b": SHAPES["llama-1b"]}
for name, shape in shapes.items():
    h, kv = shape["num_attention_heads"], shape["num_key_value_heads"]
    print(f"{name:>8}: {h} heads, {kv} key/value heads -> splits over {tp_n}: {h % tp_n == 0 and kv % tp_n == 0}")

# %% [markdown]
# The bundled model's heads do not split over 2, so we use the **llama-1b shape** with **random weights**.
# The call that loads a model tensor-parallel takes a `DistributedConfig` (transformers 5.24 here; the
# two-GPU tier's `tp-system-transformers.json`, printed below, shows 5.17 took it too).
# Each process makes it under `torchrun` (it needs the process
# group the launcher sets up), so we define it here and check that the worker makes exactly this call:

# %%
distributed_config = DistributedConfig(tp_size=tp_n)
say(f"DistributedConfig(tp_size={distributed_config.tp_size}): tp_plan {distributed_config.tp_plan}, "
      f"pp_size {distributed_config.pp_size}")


def load_tensor_parallel(checkpoint, world):
    """What each process of workers/tensor_parallel.py runs: its own shard of every layer (one process per GPU)."""
    return AutoModelForCausalLM.from_pretrained(checkpoint, dtype=torch.float32,
                                                distributed_config=DistributedConfig(tp_size=world))


mine = " ".join(inspect.getsource(load_tensor_parallel).split())  # the call above, on one line
call = mine[mine.index("AutoModelForCausalLM.from_pretrained("):]
worker = " ".join((ROOT / "workers" / "tensor_parallel.py").read_text().split())
assert call.replace("(checkpoint,", "(args.checkpoint,") in worker, "the worker no longer makes this call"
say("the worker calls:", call.replace("(checkpoint,", "(args.checkpoint,"))
old = json.loads((REFERENCE / "two-gpu" / "tp-system-transformers.json").read_text())
say(f"GPU reference with transformers {old['transformers']}: {old['api']}, logits check ok: "
      f"{old['logits_check']['ok']}")

# %% [markdown]
# Each process loads its shards and computes the logits of fixed random token ids in float32; rank 0
# then loads the whole model on one device and compares. The shards change only the order in which
# partial sums are added, so the logits agree within 1e-3 (times the largest logit, if above 1).
#
# With two GPUs or more this runs over two of them on the llama-1b shape. With fewer, the cell says so and
# runs the same worker on two CPU processes (gloo) with a toy Llama of the same layout (2 layers, hidden
# 256, 8 heads, 4 key/value heads, random weights): the code path is the same, the sizes are not. The
# stand-in's processes start with `CUDA_VISIBLE_DEVICES=` (no GPU visible): transformers sets up tensor
# parallelism on the machine's accelerator, and on a machine with one GPU it would try to use it.

# %%
hide = {} if n_gpu >= 2 else {"CUDA_VISIBLE_DEVICES": ""}  # CPU processes: a visible GPU would pull them to it
if n_gpu >= 2:
    tp_checkpoint, extra = random_checkpoint("llama-1b", torch.bfloat16), []  # RANDOM weights, built once
    say(f"{n_gpu} GPUs: tensor parallel over {tp_n} of them on the llama-1b shape, RANDOM weights")
else:
    say(f"Tensor parallelism needs at least two GPUs (one process per GPU, each holding part of every layer);\n"
          f"this machine has {n_gpu}. Running the same worker on {tp_n} CPU processes with a toy Llama "
          f"(RANDOM weights) instead.")
    toy = LlamaConfig(hidden_size=256, intermediate_size=512, num_hidden_layers=2, num_attention_heads=8,
                      num_key_value_heads=4, vocab_size=1024)
    tp_checkpoint, extra = work / "toy-llama", ["--cpu"]
    random_model(toy, dtype=torch.float32, seed=0).save_pretrained(tp_checkpoint)
cmd = ["torchrun", "--standalone", f"--nproc_per_node={tp_n}", "workers/tensor_parallel.py",
       "--checkpoint", tp_checkpoint, "--expect-world-size", tp_n, "--out", work / "tp.json", *extra]
say("".join(f"{k}={v} " for k, v in hide.items())
      + shlex.join(map(str, cmd)).replace(str(work), "$WORK").replace(str(cache_dir()), "$CACHE"))
try:
    launch(cmd, extra_env=hide)
    tp = json.loads((work / "tp.json").read_text())
except LaunchError as e:
    tp = None
    say(f"{type(e).__name__}: {' '.join(str(e).splitlines()[:2])}")
if tp:
    say(f"model: {tp['model']}; {tp['world_size']} processes; api: {tp['api']}")
    say(f"q_proj: full {tp['q_proj_full_shape']}, shard per process {[r['q_proj_shard_shape'] for r in tp['per_rank']]}")

# %%
# NBVAL_IGNORE_OUTPUT
# The last digits of the difference depend on the machine's float arithmetic.
check = tp["logits_check"]
print(f"max |logit difference| {check['max_abs_diff']:.2e} (tolerance {check['tolerance']:.0e}); "
      f"top-1 agreement {check['top1_agreement']:.3f}")

# %% [markdown]
# **Self-check.** The tensor-parallel logits match the single-device run within the tolerance, and each
# process held its share of every column-split weight.

# %%
assert tp is not None and tp["logits_check"]["ok"], "tensor-parallel logits differ from the single-device run"
assert all(r["q_proj_shard_shape"][0] * tp["world_size"] == tp["q_proj_full_shape"][0] for r in tp["per_rank"])
print("logits within tolerance:", tp["logits_check"]["ok"])

# %% [markdown]
# ## 3. The three compared on the reference GPUs
#
# A split, replicas and tensor parallelism were measured on the workbook's GPU reference machines by
# `gpu-reference/tools/gpu_bench.py` (random-weight llama-1b shape, bfloat16, eager `generate`, greedy,
# warm-up then medians of 3), one file per hardware tier: `gpu-reference/<tier>/results.json`. Each
# measurement is a **record**: `path` (`"one GPU"`, `"split"`, `"replicas"`, `"tensor parallel"`), `format`,
# `batch` (the prompts in flight over all GPUs), `tokens_per_s` (all their tokens) and `limit_tokens_per_s`,
# the bandwidth limit for that path and batch. An older file (one section per method) is read into the same
# form. `helpers.reference` reads them: `records(res)`, `by_batch(res, path)` ({batch: record}) and
# `speed(record)` (tokens/s with the share of its limit).

# %% [markdown]
# Which tier's file do we read? The one that matches this machine: the two-GPU tier with two GPUs or more,
# else the one-GPU tier. A split, tensor parallelism and two replicas need two GPUs, so those figures come
# from the two-GPU tier wherever the matching tier lacks them. The cell prints which file each figure
# comes from, with that file's hardware and versions; every figure below names its tier in brackets.

# %%
tier, files = matching_tier(n_gpu), reference_files(n_gpu)  # this machine's tier, and two-gpu for two GPUs
ref, two_ref = files[tier], files["two-gpu"]
print_sources(files, n_gpu)
lacks = [p for p in ("split", "tensor parallel") if not by_batch(ref, p)]
lacks += [] if any(r["gpus"] >= 2 for r in by_batch(ref, "replicas").values()) else ["two replicas"]
if lacks:
    say(f"The {tier} tier has no {', no '.join(lacks)} (they need two GPUs): those come from the two-gpu tier.")

# %% [markdown]
# **Self-check.** Each file is the tier it is read as (`reference_files` refuses one whose `tier` entry or
# GPU count is not its folder's), and its replicas ran one process per GPU of that tier.

# %%
assert tier == matching_tier(n_gpu), "the tier does not match this machine"
for name, res in files.items():
    assert all(r["gpus"] == TIER_GPUS[name] for r in by_batch(res, "replicas").values()), f"{name}: replicas"
print("replicas, one process per GPU:", ", ".join(f"{name} {TIER_GPUS[name]}" for name in files))

# %% [markdown]
# First the plain table, one per file: total tokens/s at each total batch the file holds, its share of the
# limit where the file records one, and each method against one GPU **at the same total batch, in the same
# file**. At equal total batch, two replicas give each GPU half the prompts.

# %%
PATHS = ("one GPU", "split", "replicas", "tensor parallel")
tables = {name: {p: by_batch(res, p) for p in PATHS if by_batch(res, p)} for name, res in files.items()}
for name, tps in tables.items():
    one = tps["one GPU"]
    print(f"[{name}] total tokens/s (share of the limit) ratio to one GPU\n{'total batch':>11}"
          + "".join(f"{p:>24}" for p in tps))
    for b in sorted(set().union(*tps.values())):
        cells = []
        for r in (row.get(b) for row in tps.values()):
            share = f"({r['tokens_per_s'] / r['limit_tokens_per_s']:.1%})" if r and r["limit_tokens_per_s"] else ""
            ratio = f"{r['tokens_per_s'] / one[b]['tokens_per_s']:.2f}x" if r and b in one else ""
            cells.append(f"{r['tokens_per_s']:.0f} {share} {ratio}" if r else "-")
        print(f"{b:>11}" + "".join(f"{c:>24}" for c in cells))
fig, ax = plt.subplots(figsize=(6, 3.5))
for name, tps in tables.items():
    for p, row in tps.items():
        ax.plot(sorted(row), [row[b]["tokens_per_s"] for b in sorted(row)], "o-" if name == tier else "s--",
                label=f"{p} [{name}]")
ax.set_xscale("log", base=2)
ax.set_xlabel("total batch (prompts in flight over all GPUs)")
ax.set_ylabel("total tokens/s")
ax.set_title("Reference runs: random-weight llama-1b, bf16, "
             + " / ".join(sorted({res["hardware"]["gpus"][0][0] for res in files.values()})))
ax.legend(fontsize=7)
plt.show()

# %% [markdown]
# Memory is the other side: a replica holds the whole model on every GPU, a split and tensor parallelism
# hold about half of it on each of two. The peak bytes per GPU each file recorded for each method, at the
# largest batch it measured (an older file keeps one peak per method, over all its batches):

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
# compute both for each file, or say which measurement a file lacks.

# %%
def saturation_walk(one):
    """One GPU's tokens/s ratio per doubling from the smallest batch, the saturating batch (or None), the last batch."""
    doubling, b, saturated = {}, min(one), None
    while 2 * b in one and saturated is None:
        doubling[b] = one[2 * b] / one[b]
        saturated = b if doubling[b] < 1.10 else None
        b *= 2
    return doubling, saturated, b


walks, missing = {}, {}
for name, res in files.items():
    one = {b: r["tokens_per_s"] for b, r in by_batch(res, "one GPU").items()}
    walks[name] = doubling, saturated, last = saturation_walk(one)
    for b, g in doubling.items():
        say(f"[{name}] one GPU, batch {b} -> {2 * b}: tokens/s x{g:.2f}")
    if saturated is not None:
        say(f"[{name}] one GPU saturates at batch {saturated}")
    elif doubling and last == max(one):
        say(f"[{name}] one GPU was not saturated by the largest batch measured: tokens/s still rose "
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
    one, rep = by_batch(res, "one GPU"), by_batch(res, "replicas")
    n = max(r["gpus"] for r in rep.values())
    equals[name] = {b: rep[n * b]["tokens_per_s"] / one[b]["tokens_per_s"] for b in sorted(one) if n * b in rep}
    for b, x in equals[name].items():
        if n == 1:
            say(f"[{name}] batch {b}: one replica {speed(rep[b])}, plain generate {speed(one[b])}: {x:.2f}x")
        else:
            say(f"[{name}] equal batch per GPU ({b}): {n} replicas at total {n * b} gave {x:.2f}x one GPU at {b} "
                  f"(ideal {n}.00x)")
    if not equals[name]:
        missing[name] = True
        say(f"[{name}] MISSING for equal batch per GPU: one GPU at a batch b together with replicas at a total "
              f"of {n}*b. The file has one GPU at batches {sorted(one)} and replicas at totals {sorted(rep)}.")
    saturated = walks[name][1]
    if saturated is not None and n * saturated in rep and n * saturated in one:
        B = n * saturated
        say(f"[{name}] at total {B}, {n} replica{'s' * (n > 1)} gave "
              f"{rep[B]['tokens_per_s'] / one[B]['tokens_per_s']:.2f}x one GPU")
    elif saturated is not None:
        missing[name] = True
        say(f"[{name}] MISSING: one GPU saturates at batch {saturated}, but the file lacks replicas at a total "
              f"of {n * saturated}.")

# %% [markdown]
# What the figures say, in sentences computed from them (they change when the benchmark is remade):

# %%
for name, res in files.items():
    lo, hi, growth, step = batch_growth(res)  # step: how much longer a decoding step took at batch hi than at lo
    say(f"- [{name}] One GPU at batch {hi} gave {growth:.1f}x its tokens/s at batch {lo} ({hi // lo}x the "
          f"prompts): a step for {hi} rows took {step:.2f}x as long as one for {lo}"
          + (f": in this run (one timed sweep), one GPU was far from saturated below {hi}." if step < 2 else "."))
    if one[lo]["limit_tokens_per_s"] and one[hi]["limit_tokens_per_s"]:
        say(f"- [{name}] One GPU reached {one[lo]['tokens_per_s'] / one[lo]['limit_tokens_per_s']:.1%} of its "
              f"memory-bandwidth limit at batch {lo} and "
              f"{one[hi]['tokens_per_s'] / one[hi]['limit_tokens_per_s']:.1%} at batch {hi}.")

# %%
for name, res in files.items():
    one, rep = by_batch(res, "one GPU"), by_batch(res, "replicas")
    n, lo, hi = max(r["gpus"] for r in rep.values()), min(one), max(one)
    x = {b: rep[b]["tokens_per_s"] / one[b]["tokens_per_s"] for b in sorted(set(rep) & set(one))}
    if n == 1:
        say(f"- [{name}] One replica adds no GPU: against plain generate it gave {min(x.values()):.2f}x to "
              f"{max(x.values()):.2f}x at batches {sorted(x)}. Both time the same model on the same GPU, in two "
              f"processes, so a ratio away from 1.00x is a difference between two runs, not a gain: a gain from "
              f"replicas needs a second GPU.")
        continue
    if lo in x and lo < n:
        say(f"- [{name}] At total batch {lo}, {n - lo} of {n} replicas had no prompt: {x[lo]:.2f}x one GPU. "
              "Replicas do not make one prompt faster.")
    if hi in x:
        gain = "gained nothing" if x[hi] <= 1 else f"gained {x[hi] - 1:.0%}"
        say(f"- [{name}] At total batch {hi}, {n} replicas ({hi // n} per GPU) gave {x[hi]:.2f}x one GPU: "
              f"giving each GPU {hi // n} of the {hi} prompts {gain}.")
    if equals[name]:
        b = walks[name][1] if walks[name][1] in equals[name] else max(equals[name])
        say(f"- [{name}] At equal batch per GPU ({b}), replicas reached {equals[name][b] / n:.0%} of the ideal {n}x.")
    if missing.get(name):
        say(f"- [{name}] So the file cannot yet say how much replicas gain when every GPU is busy: that needs "
              "the measurements marked MISSING above.")
    elif walks[name][1] is None:
        say(f"- [{name}] One GPU was not saturated by batch {hi}: how much replicas gain when every GPU is busy "
              "needs larger batches.")

# %%
why = {"split": "a split buys memory, not speed", "tensor parallel": "two all-reduces per layer add to its work"}
for name, tps in tables.items():
    one = tps["one GPU"]
    for p in why:
        both = sorted(set(tps.get(p, {})) & set(one))
        if both:
            r_lo, r_hi = (tps[p][b]["tokens_per_s"] / one[b]["tokens_per_s"] for b in (both[0], both[-1]))
            say(f"- [{name}] {p}: {r_lo:.2f}x one GPU at total batch {both[0]}, {r_hi:.2f}x at {both[-1]} "
                  f"(eager decoding; {why[p]}).")

# %% [markdown]
# Published material says the same about the split: it runs one GPU at a time (accelerate's
# [big model inference guide](https://huggingface.co/docs/accelerate/usage_guides/big_modeling)). For
# tensor parallelism it shows the other side: with the per-layer overhead compiled away, gpt-fast's
# [README](https://github.com/pytorch-labs/gpt-fast/blob/main/README.md) reports tensor parallelism on 2, 4
# and 8 GPUs faster than one at batch 1. `docs/published-figures.md` in this repository quotes those
# figures with their hardware. The reference runs here are eager `generate`, and measure the first side only.
#
# **Self-check.** The comparison's own numbers are consistent: in the two-GPU file no method exceeded the
# number of GPUs times one GPU's tokens/s; in each file no figure exceeded the limit recorded beside it, and
# a saturating batch the file states agrees with its records; and the tensor-parallel logits check on the
# GPUs passed.

# %%
n_ref, one2 = len(two_ref["hardware"]["gpus"]), by_batch(two_ref, "one GPU")
assert all(r["tokens_per_s"] <= n_ref * one2[b]["tokens_per_s"] * 1.05 for row in tables["two-gpu"].values()
           for b, r in row.items() if b in one2), "a method beat (number of GPUs) x one GPU?"
for name, res in files.items():
    assert all(r["tokens_per_s"] <= r["limit_tokens_per_s"] for r in records(res) if r["limit_tokens_per_s"]), \
        f"a figure of the {name} file beat its own bandwidth limit?"
    if "saturation" in res:
        doubling, saturated, last = walks[name]
        assert res["saturation"]["found"] == (saturated is not None), f"the {name} file's saturation disagrees"
        assert res["saturation"]["batch"] == (saturated if saturated is not None else last), \
            f"the {name} file's saturating batch disagrees with its records"
tp_ref = two_ref["tensor_parallel"]["logits_check"]
assert tp_ref["ok"], "the reference tensor-parallel logits check failed"
say(f"[two-gpu] reference tensor-parallel logits: max difference {tp_ref['max_abs_diff']:.1e} "
      f"(tolerance {tp_ref['tolerance']:.0e}), API {two_ref['tensor_parallel']['api']}")
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
#   (transformers 5.24; the two-GPU tier shows 5.17 took it too); the attention and key/value head counts must divide by N, and
#   the logits match a single device within float32 rounding.
# - Compare replicas with one GPU at equal batch per GPU and at a batch that saturates one GPU; a ratio at
#   equal total batch, where one GPU is far from busy, says little. The reference files' figures and what
#   they lack are printed above.
#
# ## Exercises
#
# 1. Run `workers/replicas.py` with `--expect-world-size 3` under `torchrun --nproc_per_node=2` (build the
#    command as in section 1 and pass it to `launch` inside `try`/`except LaunchError`). With one GPU,
#    use `--nproc_per_node=1` and `--expect-world-size 2` instead: a second process would ask for a GPU
#    that is not there before the check runs.
#    *Self-check:* every process stops with a message naming both numbers.
# 2. Change `tp_n` to 3 in section 2. Which shape splits now? *Self-check:* the bundled one (9 and 3 heads
#    divide by 3) and not llama-1b (32 and 4 do not).
# 3. On two GPUs, extend `gpu-reference/tools/gpu_bench.py --batches` with batches a doubling apart and
#    run it; then section 3 finds the saturating batch. *Self-check:* the MISSING lines disappear.
# 4. The executable self-check below: in the two-GPU reference file, how many times one GPU's tokens/s did
#    the replicas give at the largest total batch that has both figures? Two decimals.

# %%
from helpers.exercises import check_answer

answer = None  # your answer, e.g. 1.23
rep2 = {b: r["tokens_per_s"] for b, r in by_batch(two_ref, "replicas").items()}
one2 = {b: r["tokens_per_s"] for b, r in by_batch(two_ref, "one GPU").items()}
top = max(set(rep2) & set(one2))  # the largest total batch with both figures
truth = round(rep2[top] / one2[top], 2)
_ = check_answer(answer, lambda a: abs(a - truth) < 0.006,
                 f"{truth:.2f}x at total batch {top}, with {top // n_ref} prompts per GPU",
                 lambda a: f"{a} is not it; divide replicas' tokens/s by one GPU's at total batch {top}",
                 f"read the replicas column of the [two-gpu] table in section 3, at total batch {top}")

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
