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
# Notebook 06 split a model across GPUs with `device_map`: that buys memory, and the GPUs take turns.
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
#    a batch that saturates one GPU, each figure beside its limit and each ratio beside the spread of its
#    repeats (or, for figures recorded without repeats, the gap between two runs of the same
#    configuration), and say what the figures do and don't show.
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
# - Run time: about 25 s on an idle 2-core CPU, about a minute on one H200 GPU (two launches of
#   processes).

# %% tags=["parameters"]
MODEL = "bundled"  # "bundled" (SmolLM2-135M-Instruct), a local checkpoint folder, or a hub id
NEW_TOKENS = 12  # greedy new tokens per prompt

# %%
import json
import shlex
import shutil
import tempfile
from importlib.metadata import version
from pathlib import Path

import matplotlib.pyplot as plt
import torch
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, LlamaConfig
from transformers.distributed import DistributedConfig

from helpers.checkpoints import random_checkpoint, resolve_model
from helpers.launch import launch
from helpers.measure import compare_rates
from helpers.quiet import silence_known_warnings
from helpers.reference import read_reference
from helpers.text import say

silence_known_warnings()  # routine library messages, and accelerate's loading bar in quiet runs
path = resolve_model(MODEL)
n_gpu = torch.cuda.device_count()
work = Path(tempfile.mkdtemp(prefix="05-serve-"))  # the launches' output files; removed at the end

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
    say(f"- [{name}] One GPU reached {one[lo]['tokens_per_s'] / one[lo]['limit_tokens_per_s']:.1%} of its "
        f"memory-bandwidth limit at batch {lo} and {one[hi]['tokens_per_s'] / one[hi]['limit_tokens_per_s']:.1%} "
        f"at batch {hi}: memory reads were far from setting the pace of eager decoding.")

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
# 4. The executable self-check below: in the two-GPU reference file, how many times one GPU's tokens/s did
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
