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
# # Split a model across GPUs
#
# A model that does not fit one GPU can be split across two with `device_map`: each GPU holds some of
# the decoder layers, and `generate` works as before. That split buys **memory**, not speed: the layers
# still run one after the other, so only one GPU works at any moment. This notebook plans such splits,
# loads one, shows where the inputs go and why the GPUs take turns, checks that the split model says
# exactly what a single device says, splits a 4-bit model and checks its bytes per GPU, and reads what
# CPU offload costs on a GPU. (Serving many prompts faster, with one replica per GPU or tensor
# parallelism, is notebook 05.)
#
# **What you'll learn**
# 1. Plan a split with `device_map`: `"auto"`, `"balanced"`, `"balanced_low_0"`, a per-GPU budget such as
#    `max_memory={0: "35GiB", 1: "35GiB"}`, and a map written by hand.
# 2. Load the split, feed it inputs (they go to the embedding's device), and see why the layers run one
#    GPU at a time.
# 3. Generate for a batch with left padding and an attention mask, and check that the split model's
#    greedy output is identical to the single-device run.
# 4. Split a 4-bit (bitsandbytes NF4) model: load it in the dtype the plan assumed, check the bytes on
#    each GPU against the plan, and see why transformers refuses a 4-bit split onto the CPU or disk.
# 5. Read what CPU offload costs per token on a GPU, from the workbook's GPU reference run.
#
# **What you'll need**
# - Notebooks 02 (dispatch a checkpoint) and 03 (design a device map) first.
# - Hardware: two GPUs for the real split. The same code runs anywhere: with one GPU, GPU 0 holds the
#   first half and the CPU holds the second half's weights (offloaded: copied to GPU 0 at every pass);
#   without a GPU, the CPU and the disk play the two devices. Plans are made on the meta device, for the
#   GPUs the machine has, or for GPU ids 0 and 1 where it has fewer than two. GPU figures come from the
#   workbook's reference run of the tier that matches the machine (`gpu-reference/one-gpu/results.json`
#   without a GPU or with one, `gpu-reference/two-gpu/results.json` with two or more); figures that need
#   two GPUs, such as the split's speed, come from the two-GPU tier on every machine.
# - Run time: about 20 s on an idle 2-core CPU, about 35 s on one H200 GPU.

# %% tags=["parameters"]
MODEL = "bundled"  # "bundled" (SmolLM2-135M-Instruct), a local checkpoint folder, or a hub id
GPUS = None  # GPU ids to split over, e.g. [0, 1]; None: every visible GPU when there are two or more
NEW_TOKENS = 12  # greedy new tokens per prompt

# %%
import gc
import shutil
import time

import matplotlib.pyplot as plt
import torch
from accelerate import infer_auto_device_map
from accelerate.utils import CustomDtype, get_balanced_memory
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, BitsAndBytesConfig

from helpers.checkpoints import offload_folder, resolve_model
from helpers.devicemap import bytes_per_device, canonical_device, device_label, device_of, placement, tensor_sizes
from helpers.hardware import bnb_backend, gpu_count, print_report
from helpers.measure import time_generate
from helpers.memory import linear_bytes_per_weight
from helpers.quiet import quiet_planning, silence_known_warnings
from helpers.reference import (TIER_GPUS, batch_growth, by_batch, matching_tier, print_sources, records, reference_files,
                               speed)
from helpers.shapes import meta_model, n_params
from helpers.text import say
from helpers.units import MiB

silence_known_warnings()  # routine library messages, and accelerate's loading bar in quiet runs
_ = torch.manual_seed(0)

# %%
# NBVAL_IGNORE_OUTPUT
# The hardware report depends on the machine.
print_report()

# %% [markdown]
# ## 1. Plan a split over two GPUs
#
# We read the model's config and build it on the **meta device** (shapes, no bytes), as in notebook 02.
# `infer_auto_device_map` needs a budget per device, not the devices: we plan for this machine's GPUs,
# or for GPU ids 0 and 1 where it has fewer than two. The next cell says what it has and which devices
# the real load will use.

# %%
path = resolve_model(MODEL)
n_gpu = gpu_count()
real_gpus = n_gpu >= 2 and (GPUS is None or (len(GPUS) >= 2 and all(g < n_gpu for g in GPUS)))
gpus = (list(GPUS) if GPUS is not None else list(range(n_gpu))) if real_gpus else [0, 1]
dtype = torch.bfloat16 if n_gpu >= 1 else torch.float32  # bf16 on a GPU, fp32 on the CPU
if real_gpus:
    stand_in = {g: g for g in gpus}
    print(f"{n_gpu} GPUs here: the split goes to GPUs {gpus}.")
elif n_gpu == 1:
    stand_in = {0: 0, 1: "cpu"}
    print("A split needs two GPUs; this machine has one. GPU 0 takes GPU 0's share, and the CPU holds GPU 1's:\n"
          "those weights wait in RAM and are copied to GPU 0 for every pass (CPU offload, section 6).")
else:
    stand_in = {0: "cpu", 1: "disk"}
    print("A split needs two GPUs; this machine has none. The CPU plays GPU 0 and the disk plays GPU 1:\n"
          "the second half's weights stay on disk and are read for every pass.")
config = AutoConfig.from_pretrained(path)
meta = meta_model(config, dtype=dtype)
no_split = meta._no_split_modules  # {"LlamaDecoderLayer"}: a decoder layer stays whole on one device
weights = sum(p.numel() * p.element_size() for p in meta.parameters())
print(f"{config.model_type}: {n_params(meta) / 1e6:.1f} M parameters, {weights / MiB:.0f} MiB in {dtype}; "
      f"never split: {no_split}")

# %% [markdown]
# Four ways to ask for a split. `"auto"` and `"balanced"` are the same in transformers 5: budgets that
# spread the bytes evenly over the GPUs (`get_balanced_memory`; the embedding and head weigh as much as
# several layers, so the layer counts differ). `"balanced_low_0"` leaves GPU 0 light
# (room for `generate`'s work there). A budget per GPU names GPU ids and bytes: for a 65 GB model one would
# write `max_memory={0: "35GiB", 1: "35GiB"}`; we scale it to our model (60% of its weights per GPU, so it
# cannot fit one). And a map written by hand: module name -> device. Planning for GPU ids this machine
# lacks makes accelerate log "Device N is not available" once per call: `quiet_planning()` silences
# exactly that message.

# %%
plan_for = {g: "139GiB" for g in gpus}  # an H200's usable memory, for planning
budget = {g: f"{0.6 * weights / MiB:.0f}MiB" for g in gpus}  # {0: "35GiB", 1: "35GiB"}, scaled to this model
n_layers = config.num_hidden_layers
by_hand = {"model.embed_tokens": gpus[0], "lm_head": gpus[0], "model.rotary_emb": gpus[0], "model.norm": gpus[-1]}
by_hand.update({f"model.layers.{i}": gpus[i * len(gpus) // n_layers] for i in range(n_layers)})
with quiet_planning():
    balanced = get_balanced_memory(meta, max_memory=plan_for, no_split_module_classes=no_split, dtype=dtype)
    low_0 = get_balanced_memory(meta, max_memory=plan_for, no_split_module_classes=no_split, dtype=dtype,
                                low_zero=True)
    plans = {
        '"auto" / "balanced"': infer_auto_device_map(meta, max_memory=balanced, no_split_module_classes=no_split,
                                                     dtype=dtype),
        '"balanced_low_0"': infer_auto_device_map(meta, max_memory=low_0, no_split_module_classes=no_split,
                                                  dtype=dtype),
        f"max_memory={budget}": infer_auto_device_map(meta, max_memory=dict(budget),
                                                       no_split_module_classes=no_split, dtype=dtype),
        "by hand": by_hand,
    }
for name, plan in plans.items():
    print(name)
    for dev, parts in placement(meta, plan).items():
        print(f"  {device_label(dev):>6}: {parts}")

# %% [markdown]
# `helpers.devicemap.placement` lists the parts each device holds, decoder layers as ranges. The tied
# output head (`lm_head` shares the embedding's weights) sits with the embedding: after the last layer
# the hidden states travel back to that GPU for the head.
#
# Look at `"balanced_low_0"`: next to an H200's budget this model is tiny, and "keep GPU 0 light" leaves
# GPU 0 empty. For a model near the GPUs' size it would fill the other GPUs and put the rest on GPU 0.
#
# **Self-check.** `"auto"` uses every GPU, the budgets and the map by hand use more than one,
# `"balanced_low_0"` leaves GPU 0 empty, and no plan cuts a decoder layer:

# %%
for name, plan in plans.items():
    used = set(plan.values())
    if "low_0" in name:
        assert gpus[0] not in used, f"{name} should leave GPU {gpus[0]} empty for this small model: {used}"
    else:
        assert len(used) >= 2, f"{name} should use more than one GPU: {used}"
    assert all(k.count(".") <= 2 for k in plan if k.startswith("model.layers.")), f"{name} cut a layer"
assert set(plans['"auto" / "balanced"'].values()) == set(gpus), '"auto" should spread over every GPU'
print("the plans use GPUs", gpus, "and keep decoder layers whole")

# %% [markdown]
# ## 2. Load the split and feed it inputs
#
# We load the map by hand for real, on the devices the first cell of section 1 named, with an offload
# folder of our own in case a stand-in needs one (`helpers.checkpoints.offload_folder`, removed at the end).
# Then the same model whole on one device, as the reference. We record the bytes each GPU gained during
# the split's load (`torch.cuda.memory_allocated`, before the single-device copy arrives).

# %%
real_map = {name: stand_in[dev] for name, dev in by_hand.items()}
offload = offload_folder("04-split")
cuda_ids = sorted({d for d in real_map.values() if isinstance(d, int)})
before = {g: torch.cuda.memory_allocated(g) for g in cuda_ids}
split = AutoModelForCausalLM.from_pretrained(path, dtype=dtype, device_map=real_map, offload_folder=offload)
measured = {g: torch.cuda.memory_allocated(g) - before[g] for g in cuda_ids}
mapped = bytes_per_device(meta, real_map, tensor_sizes(meta))  # bytes the map puts on each device
single_device = 0 if n_gpu >= 1 else "cpu"
single = AutoModelForCausalLM.from_pretrained(path, dtype=dtype, device_map={"": single_device})
print("split over:", ", ".join(device_label(d) for d in mapped), "| single device:", device_label(single_device))
for dev, parts in placement(split, split.hf_device_map).items():
    print(f"  {device_label(dev):>6}: {parts}")

# %% [markdown]
# **Where do the inputs go?** To the device of the first module that sees them, the embedding.
# `model.device` names the device of the first parameter, which is the same here; the embedding's
# device says it directly. Every layer carries an accelerate hook that moves its inputs to its
# execution device; weights kept on `meta` (offloaded to the CPU or disk) are brought in by the hook at
# every pass.

# %%
first = split.get_input_embeddings().weight.device
print("inputs go to:", first, "| model.device:", split.device)
for i in (0, n_layers - 1):
    layer = split.model.layers[i]
    print(f"layer {i:>2}: {type(layer._hf_hook).__name__}, runs on {layer._hf_hook.execution_device}, "
          f"weights kept on {layer.mlp.up_proj.weight.device} between passes")

# %% [markdown]
# ## 3. Why the layers run one GPU at a time
#
# Each decoder layer needs the previous layer's output. We time-stamp every layer's start and end in one
# forward pass: no layer starts before the one before it has finished, so the second GPU waits while the
# first works, then the first waits. A split gives you the memory of two GPUs at about the speed of one.

# %%
stamps = []


def pre(module, args):
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    stamps.append(("start", module.layer_idx, args[0].device, time.perf_counter()))


def post(module, args, output):
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    hidden = output[0] if isinstance(output, tuple) else output
    stamps.append(("end", module.layer_idx, hidden.device, time.perf_counter()))


for layer in split.model.layers:
    layer.layer_idx = layer.self_attn.layer_idx
handles = [h for layer in split.model.layers
           for h in (layer.register_forward_pre_hook(pre), layer.register_forward_hook(post))]
tok = AutoTokenizer.from_pretrained(path)
with torch.inference_mode():
    split(**tok(["The capital of France is"], return_tensors="pt").to(first))
for h in handles:
    h.remove()

# %%
starts = [s for s in stamps if s[0] == "start"]
ends = [s for s in stamps if s[0] == "end"]
sequential = all(starts[i + 1][3] >= ends[i][3] for i in range(len(ends) - 1))
hops = [(a[1], b[1], str(a[2]), str(b[2])) for a, b in zip(ends, ends[1:]) if a[2] != b[2]]  # output devices
placed = [device_label(split.hf_device_map[f"model.layers.{s[1]}"]) for s in starts]
runs_on = [device_label(d) for d in dict.fromkeys(canonical_device(layer._hf_hook.execution_device)
                                                   for layer in split.model.layers)]
say("layer order:", [s[1] for s in starts] == list(range(n_layers)))
say("each layer starts after the previous one ends:", sequential)
say("map in run order:", " -> ".join(f"{d} x{placed.count(d)}" for d in dict.fromkeys(placed)))
say("layers compute on:", ", ".join(runs_on))
if hops:
    say("the hidden states changed device between layers:", hops,
          "\n(once per forward pass: one tensor of batch x tokens x hidden)")
else:
    say(f"the hidden states never changed device: {runs_on[0]} computes every layer, and the second half's "
          "weights are brought to it at every pass")

# %% [markdown]
# **Self-check:** `sequential` must be `True`, and each device of the map that computes (a GPU, or the
# CPU) appears among the devices the layers run on.

# %%
assert sequential, "a layer started before the previous one finished: not a plain device_map split?"
assert all(device_label(g) in runs_on for g in cuda_ids), f"a GPU of the map never computed: {runs_on}"
print("one layer at a time, on", ", ".join(runs_on))

# %% [markdown]
# ### Memory per device after the load
#
# For each device: the bytes the map puts there (parameters and buffers, tied weights once, from the meta
# model), and on GPUs what `torch.cuda.memory_allocated` gained during the load. For the CPU and the disk
# the figure is the map's (for the disk, transformers reads a safetensors checkpoint's offloaded weights
# from the checkpoint's own files, so the offload folder stays empty).

# %%
for dev, b in mapped.items():
    got = f"{measured[dev] / MiB:6.0f} MiB measured" if dev in measured else "not a GPU: not measured"
    print(f"{device_label(dev):>6}: {b / MiB:6.0f} MiB in the map, {got}")
fig, ax = plt.subplots(figsize=(5, 3))
labels = [device_label(d) for d in mapped]
ax.bar(labels, [b / MiB for b in mapped.values()], color="tab:blue", label="in the map")
if measured:  # GPUs only: CPU and disk bytes are not measured
    ax.bar(labels, [measured.get(d, 0) / MiB for d in mapped], width=0.4, color="tab:orange",
           label="measured (GPUs)")
ax.axhline(weights / MiB, ls="--", color="grey", label="whole model")
ax.set_title("Split model: memory per device")
ax.set_xlabel("device")
ax.set_ylabel("weights held (MiB)")
ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1), frameon=False)  # beside the bars
plt.show()

# %% [markdown]
# **Self-check.** Each GPU gained what the map puts on it, within 5% (plus 2 MiB for small buffers).
# Without a GPU there is nothing to measure, and the check says so.

# %%
for g, got in measured.items():
    assert abs(got - mapped[g]) <= 0.05 * mapped[g] + 2 * MiB, \
        f"GPU {g} gained {got / MiB:.0f} MiB but the map puts {mapped[g] / MiB:.0f} MiB there"
print("GPU bytes match the map on " + ", ".join(f"GPU {g}" for g in measured) if measured
      else "no GPU in this split: nothing to measure")

# %% [markdown]
# ## 4. Generate a batch: left padding, an attention mask, and the single-device check
#
# Prompts of different lengths are padded to one length. A decoder-only model continues from the **last**
# position of each row, so the padding goes on the **left** and the attention mask tells the model which
# positions are padding. The inputs go to the embedding's device.

# %%
prompts = ["The capital of France is", "Water boils at", "The three primary colours are red,"]
tok.padding_side = "left"
batch = tok(prompts, return_tensors="pt", padding=True)
print(batch["input_ids"])
print(batch["attention_mask"])

# %%
gen = dict(max_new_tokens=NEW_TOKENS, do_sample=False, pad_token_id=tok.pad_token_id)
with torch.inference_mode():
    out_split = split.generate(**batch.to(first), **gen)
    out_single = single.generate(**batch.to(single.device), **gen)
new = out_split[:, batch["input_ids"].shape[1]:].cpu()
for p, ids in zip(prompts, new):
    print(f"{p!r} -> {tok.decode(ids, skip_special_tokens=True)!r}")
identical = torch.equal(out_split.cpu(), out_single.cpu())
print("split output identical to the single-device run:", identical)

# %% [markdown]
# **Self-check.** Greedy decoding on the split model gives exactly the tokens of the single-device run:
# the split moves tensors between devices, it does not change any arithmetic.

# %%
assert identical, "the split model's greedy output differs from the single-device run"

# %% [markdown]
# What goes wrong with padding on the **right**: the short prompts end in padding, and the model
# continues after it. transformers logs a warning ("right-padding was detected"; the quiet runs that store
# these outputs hide it); the short rows' continuations drift from what the same prompt gives with left
# padding.

# %%
tok.padding_side = "right"
right = tok(prompts, return_tensors="pt", padding=True).to(first)
with torch.inference_mode():
    out_right = split.generate(**right, **gen)
tok.padding_side = "left"
for p, ids in zip(prompts, out_right[:, right["input_ids"].shape[1]:]):
    print(f"{p!r} -> {tok.decode(ids, skip_special_tokens=True)!r}")
same_as_left = [torch.equal(a, b) for a, b in zip(out_right[:, right["input_ids"].shape[1]:].cpu(), new)]
print("same as left padding, per prompt:", same_as_left)

# %% [markdown]
# How fast is the split? accelerate's
# [big model inference guide](https://huggingface.co/docs/accelerate/usage_guides/big_modeling) explains
# that a model split with a device map runs one device at a time, so on two GPUs expect about the speed
# of one (plus one hop per token), less where per-layer overhead dominates, as it does for a small model in
# eager mode: each layer's hook adds Python work. A stand-in pays more: its second half's weights are
# brought in at every pass. We time both on this machine (a warm-up, then medians of 3 on a GPU, one run on
# the CPU), then read the GPU reference runs.

# %%
# NBVAL_IGNORE_OUTPUT
# Timings depend on the machine and its load.
repeats = 3 if n_gpu else 1  # the CPU stand-ins are slow: one timed run after the warm-up
t_split = time_generate(split, batch.to(first), new_tokens=8, repeats=repeats, pad_token_id=tok.pad_token_id)
t_single = time_generate(single, batch.to(single.device), new_tokens=8, repeats=repeats,
                         pad_token_id=tok.pad_token_id)
ratio = t_split["tokens_per_s"] / t_single["tokens_per_s"]
print(f"split : {t_split['tokens_per_s']:.1f} tokens/s per sequence (batch {len(prompts)})")
print(f"single: {t_single['tokens_per_s']:.1f} tokens/s per sequence; split / single: {ratio:.2f}")

# %% [markdown]
# The GPU reference runs are `gpu-reference/<tier>/results.json`, made by `gpu-reference/tools/gpu_bench.py`
# on a random-weight llama-1b shape. Each measurement is a **record**: `path` (`"one GPU"`, `"split"`,
# `"cpu offload"`, ...), `format`, `batch` (sequences in flight), `tokens_per_s` (all their new tokens per
# second) and `limit_tokens_per_s`, the bandwidth limit for that path and batch. An older file (one section
# per method) is read into the same form. `helpers.reference` reads them: `records(res)`, `by_batch(res, path)` ({batch: record}) and
# `speed(record)` (tokens/s with the share of its limit).

# %% [markdown]
# Which tier's file do we read? The one that matches this machine: the two-GPU tier with two GPUs or more,
# else the one-GPU tier. A split needs two GPUs, so its figures come from the two-GPU tier wherever the
# matching tier lacks them. The cell prints which file each figure comes from, with that file's hardware
# and versions.

# %%
tier, files = matching_tier(n_gpu), reference_files(n_gpu)  # this machine's tier, and two-gpu for two GPUs
ref, two_ref = files[tier], files["two-gpu"]
print_sources(files, n_gpu)
if not by_batch(ref, "split"):
    print(f"The {tier} tier has no split (it needs two GPUs): the split's figures come from the two-gpu tier.")

# %% [markdown]
# **Self-check.** Each file is the tier it is read as: its own `tier` entry (where it has one) and the number
# of GPUs in its hardware report say so.

# %%
assert tier == ("two-gpu" if n_gpu >= 2 else "one-gpu"), "the tier does not match this machine"
assert all(len(res["hardware"]["gpus"]) == TIER_GPUS[name] for name, res in files.items())
print("figures from " + " and ".join(f"gpu-reference/{name}/ ({TIER_GPUS[name]} GPU{'s' * (name != 'one-gpu')})"
                                     for name in files))

# %%
one2, split2 = by_batch(two_ref, "one GPU"), by_batch(two_ref, "split")
say(f"[two-gpu] split over {split2[min(split2)]['gpus']} GPUs (device_map={two_ref['split']['device_map']!r}), "
      f"against one GPU in the same run:")
for b in sorted(set(one2) & set(split2)):
    say(f"  batch {b:>2}: split {speed(split2[b])}, one GPU {speed(one2[b])}: "
          f"{split2[b]['tokens_per_s'] / one2[b]['tokens_per_s']:.2f}x")
one = by_batch(ref, "one GPU")
lo, hi, growth, step = batch_growth(ref)  # step: how much longer a decoding step took at batch hi than at lo
say(f"[{tier}] one GPU: batch {lo} {speed(one[lo])}, batch {hi} {speed(one[hi])}:\n  {hi // lo}x the rows gave "
      f"{growth:.1f}x the tokens/s: a decoding step for {hi} rows took {step:.2f}x as long as one for {lo}")
shares = [r["tokens_per_s"] / r["limit_tokens_per_s"] for r in (one[lo], one[hi]) if r.get("limit_tokens_per_s")]
if step < 2:
    say("  so the GPU's arithmetic did not set the pace" + (
        f", nor did its memory reads (at most {max(shares):.1%} of the bandwidth limit)" if shares and max(shares) < 0.5
        else ""))

# %% [markdown]
# The two-GPU reference split ran below one GPU's speed at every batch it measured. A step that costs about
# the same for many rows as for one is bound by per-step work outside the arithmetic (Python, kernel
# launches), and accelerate's hooks add more of it at every layer of a split.

# %%
assert all(split2[b]["tokens_per_s"] < one2[b]["tokens_per_s"] for b in set(one2) & set(split2)), \
    "the two-GPU reference split was not slower than one GPU"
del split, single, layer
gc.collect()  # accelerate's hooks hold reference cycles: collect them to free the memory now
if torch.cuda.is_available():
    torch.cuda.empty_cache()

# %% [markdown]
# ## 5. A 4-bit model split across GPUs
#
# bitsandbytes' 4-bit layers can be split across GPUs like any other. transformers quantizes the Linear
# layers inside the decoder blocks; the embedding, the norms and the (tied) head stay in the **compute
# dtype**, here bfloat16. So the plan counts each quantized weight at half a byte (accelerate's
# `CustomDtype.INT4`) and everything else at two bytes, and we give each GPU 60% of that 4-bit model.

# %%
compute_dtype = torch.bfloat16  # the dtype of the plan, of bitsandbytes' compute, and of the load below
meta_4bit = meta_model(config, dtype=compute_dtype)
quantized = {f"{n}.weight" for n, m in meta_4bit.named_modules()
             if isinstance(m, torch.nn.Linear) and n.startswith("model.layers.")}
special = {n: CustomDtype.INT4 for n in quantized}
sizes_4bit = tensor_sizes(meta_4bit)  # bytes per tensor in bf16 ...
sizes_4bit.update({n: sizes_4bit[n] // 4 for n in quantized})  # ... and half a byte per 4-bit weight
budget_4bit = {g: round(0.6 * sum(sizes_4bit.values()) / MiB) * MiB for g in gpus}
with quiet_planning():
    plan_4bit = infer_auto_device_map(meta_4bit, max_memory=dict(budget_4bit), no_split_module_classes=no_split,
                                      dtype=compute_dtype, special_dtypes=special)
planned = bytes_per_device(meta_4bit, plan_4bit, sizes_4bit)
print(f"{len(quantized)} Linear layers in 4-bit; model {sum(sizes_4bit.values()) / MiB:.0f} MiB; "
      f"budget {budget_4bit[gpus[0]] / MiB:.0f} MiB per GPU")
for dev, parts in placement(meta_4bit, plan_4bit).items():
    print(f"  {device_label(dev):>6}: {planned[dev] / MiB:5.1f} MiB, {parts}")

# %% [markdown]
# We load that plan on the devices of section 2, **in the dtype the plan assumed**: `dtype=compute_dtype`.
# Without `dtype`, the unquantized parts keep the checkpoint's dtype (float32 for the bundled model), and
# the embedding alone takes twice the bytes the plan gave it. With one GPU or none, the stand-in puts
# 4-bit layers on the CPU or disk, and transformers refuses: 4-bit layers of a dispatched model cannot live
# there (the escape hatch, `llm_int8_enable_fp32_cpu_offload=True`, keeps those layers unquantized in float32).

# %%
bnb = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=compute_dtype)
map_4bit = {name: stand_in[dev] for name, dev in plan_4bit.items()}
before = {g: torch.cuda.memory_allocated(g) for g in range(n_gpu)}
try:
    model_4bit = AutoModelForCausalLM.from_pretrained(path, dtype=compute_dtype, quantization_config=bnb,
                                                      device_map=map_4bit, offload_folder=offload)
except ValueError as e:
    model_4bit = None
    print(f"{type(e).__name__}: {str(e).split('. ')[0]}.")
else:
    gained = {g: torch.cuda.memory_allocated(g) - before[g] for g in gpus}
    lin = model_4bit.model.layers[-1].mlp.down_proj
    print(f"last layer's down_proj: {type(lin).__module__}.{type(lin).__name__}, weight {type(lin.weight).__name__} "
          f"on {lin.weight.device}; bitsandbytes backend: {bnb_backend()}")
    print("embedding:", model_4bit.get_input_embeddings().weight.dtype)
    with torch.inference_mode():
        out_4bit = model_4bit.generate(**batch.to(model_4bit.get_input_embeddings().weight.device), **gen)
    for p, ids in zip(prompts, out_4bit[:, batch["input_ids"].shape[1]:]):
        print(f"{p!r} -> {tok.decode(ids, skip_special_tokens=True)!r}")
    del lin

# %% [markdown]
# **Self-check: the bytes on each GPU.** The plan counts half a byte per 4-bit weight; NF4 also stores one
# float32 scale per block of 64 weights (0.0625 byte a weight, `helpers.memory.linear_bytes_per_weight`).
# With the model on GPUs, what each GPU gained during the load must be the plan's bytes plus those scales,
# **within 5%**: an embedding left in float32 shows up here as a GPU far over its share. Where the load
# was refused there are no GPU bytes: the cell says so and checks the plan's bytes against the budget.

# %%
scales = linear_bytes_per_weight("nf4") - 0.5  # bytes a 4-bit weight costs on top of the plan's half byte
n_4bit = {g: sum(2 * sizes_4bit[n] for n in quantized if device_of(n, plan_4bit) == g) for g in gpus}  # weights
expected = {g: planned.get(g, 0) + scales * n_4bit[g] for g in gpus}
assert all(planned.get(g, 0) <= budget_4bit[g] for g in gpus), f"the plan overfills a GPU: {planned}"
if model_4bit is not None:
    for g in gpus:
        print(f"GPU {g}: gained {gained[g] / MiB:.1f} MiB; plan {planned.get(g, 0) / MiB:.1f} MiB + scales = "
              f"{expected[g] / MiB:.1f} MiB; budget {budget_4bit[g] / MiB:.0f} MiB")
        assert abs(gained[g] - expected[g]) <= 0.05 * expected[g], \
            f"GPU {g} holds {gained[g] / MiB:.1f} MiB, not the planned {expected[g] / MiB:.1f}: check the load's dtype"
    print("each GPU holds what the plan gave it (within 5%)")
else:
    print("The 4-bit load was refused here, so no GPU bytes to measure. On two GPUs this cell checks each\n"
          "GPU's torch.cuda.memory_allocated gain against the plan plus the NF4 scales, within 5%. Here it\n"
          "checked the plan: " + ", ".join(f"GPU {g} {planned.get(g, 0) / MiB:.1f} MiB" for g in gpus)
          + f", each within its {budget_4bit[gpus[0]] / MiB:.0f} MiB budget.")

# %% [markdown]
# On the GPU reference machines, `gpu-reference/tools/gpu_bench.py` loaded the random-weight llama-1b shape
# in NF4 (with `dtype=torch.bfloat16`): on one GPU where the file has it, and split over two GPUs with
# `device_map="balanced"` where the file has that. What the files recorded, each line naming its tier:

# %%
nf4_one, nf4_split = ref.get("nf4"), two_ref.get("split_nf4")  # one GPU (newer files); a split (older files)
if nf4_one:
    lib = nf4_one["bnb_library"]
    say(f"[{tier}] NF4 on one GPU: {nf4_one['module_type']} with {nf4_one['weight_type']} on "
          f"{nf4_one['weight_device']}, bitsandbytes library {lib['library']} ({lib['backend']})")
    q, bf = by_batch(ref, "one GPU", "nf4"), by_batch(ref, "one GPU")
    say(f"  memory footprint {nf4_one['footprint_bytes'] / 2**30:.2f} GiB in NF4, "
          f"{ref['model']['weight_bytes'] / 2**30:.2f} GiB in bf16")
    for b in sorted(set(q) & set(bf)):
        say(f"  batch {b:>2}: {speed(q[b])} in NF4, {speed(bf[b])} in bf16")
if nf4_split:
    say(f"[two-gpu] NF4 split: {nf4_split['module_type']} with {nf4_split['weight_type']} on "
          f"{nf4_split['weight_device']}, bitsandbytes backend {nf4_split['bnb_backend']}")
    say("  memory after the load:", ", ".join(f"GPU {g} {b / 2**30:.2f} GiB"
                                               for g, b in enumerate(nf4_split["mem_after_load_bytes"])),
          "| bf16 split:", ", ".join(f"GPU {g} {b / 2**30:.2f} GiB"
                                     for g, b in enumerate(two_ref["split"]["mem_after_load_bytes"])))
    say(f"  batch 1: {speed(by_batch(two_ref, 'split', 'nf4')[1])} in NF4, {speed(split2[1])} in bf16")
assert nf4_one or nf4_split, "neither reference file has an NF4 measurement"
if model_4bit is not None:
    del model_4bit
_ = gc.collect()

# %% [markdown]
# ## 6. The price of CPU offload on a GPU
#
# Notebook 02 offloads layers when the main device is too small (to CPU RAM first on a GPU machine, to disk
# on a CPU-only one). On a GPU every offloaded layer is copied
# to the GPU **at every forward pass**, so each token pays `bytes offloaded / host-to-device rate`. The
# reference run of the matching tier kept a growing number of decoder layers on the CPU of a GPU machine
# (batch 1; records with path `"cpu offload"`); the inverse of the slope of seconds per token against bytes
# offloaded is the effective host-to-device rate, compared below with plain copies measured in the same run.

# %%
off = ref["offload"]  # the fit of seconds per token against bytes offloaded
rows = sorted((r for r in records(ref) if r["path"] == "cpu offload"), key=lambda r: r["layers_on_cpu"])
xs = [r["bytes_offloaded"] / 1e9 for r in rows]
ys = [r["s_per_token"] * 1e3 for r in rows]
hw = ref["hardware"]
say(f"[{tier}] {ref['model']['label']}: {ref['model']['layers']} decoder layers, batch {off['batch']}, "
      f"on one {hw['gpus'][0][0]}")
for r in rows:
    say(f"{r['layers_on_cpu']:>2} layers on the CPU ({r['bytes_offloaded'] / 1e9:.2f} GB): {speed(r)}")
say(f"effective host-to-device rate (1 / slope): {off['effective_h2d_GBps']:.1f} GB/s; a plain 1 GiB copy: "
      f"{ref['h2d']['pageable_GBps']:.1f} GB/s pageable, {ref['h2d']['pinned_GBps']:.1f} GB/s pinned")
fig, ax = plt.subplots(figsize=(5, 3.5))
ax.plot(xs, ys, "o", label="measured")
ax.plot(xs, [(off["fit_intercept_s"] + off["fit_s_per_byte"] * x * 1e9) * 1e3 for x in xs], "-",
        label=f"fit: {off['effective_h2d_GBps']:.1f} GB/s")
ax.set_title(f"CPU offload on one {hw['gpus'][0][0]} (random llama-1b, bf16, batch {off['batch']})")
ax.set_xlabel("weights offloaded to the CPU (GB)")
ax.set_ylabel("time per token (ms)")
ax.legend()
plt.show()

# %% [markdown]
# Offload makes a model fit; it does not make it fast: every offloaded byte crosses the host-to-device
# link again for every token. How the measured rate compares with the two plain copies, from the file:

# %%
rate, pageable, pinned = off["effective_h2d_GBps"], ref["h2d"]["pageable_GBps"], ref["h2d"]["pinned_GBps"]
assert rate < pinned, "offload ran at pinned-copy speed?"
slow = rows[-1]["tokens_per_s"] / rows[0]["tokens_per_s"]
say(f"[{tier}] offload moved weights at {rate / pageable:.0%} of a pageable copy's rate and {rate / pinned:.0%} "
      f"of a pinned copy's; {rows[-1]['layers_on_cpu']} layers on the CPU gave {slow:.2f}x the tokens/s of none")
shutil.rmtree(offload, ignore_errors=True)  # the offload folder this notebook made

# %% [markdown]
# ## Summary
#
# - A `device_map` split (`"auto"`/`"balanced"`, `"balanced_low_0"`, per-GPU budgets, or a map by hand) puts
#   whole decoder layers on each GPU; the inputs go to the embedding's device; hooks move the hidden states.
# - The layers run one after the other: a split buys memory, at about the speed of one GPU or less (the
#   two-GPU reference run's split was slower than one GPU).
# - Batches are padded on the left with an attention mask; greedy output of the split model is identical to
#   the single-device run.
# - A 4-bit model splits across GPUs like any other: plan its block Linear layers at half a byte, load it
#   with the `dtype` the plan assumed, and check each GPU's bytes against the plan. transformers refuses to
#   put 4-bit layers of a dispatched model on the CPU or disk.
# - CPU offload costs its bytes over the host-to-device link at every token.
#
# ## Exercises
#
# 1. Plan the split with `max_memory={0: "200MiB", 1: "200MiB", "cpu": "2GiB"}` for float32 (build
#    `meta_model(config, dtype=torch.float32)` first: on a GPU, `meta` is bf16). How many
#    layers land on each GPU, and where does the rest go? *Self-check:* the map then holds `"cpu"` entries.
# 2. Move `lm_head` and `model.embed_tokens` to the second device in the map by hand and load it. What does
#    transformers do with the tied pair? *Self-check:* compare `split.hf_device_map["lm_head"]` with the
#    embedding's device.
# 3. Load the 4-bit plan without `dtype=` on two GPUs. *Self-check:* the bytes check of section 5 fails
#    on the GPU that holds the embedding.
# 4. The executable self-check below: how many decoder layers does the `max_memory={...}` budget plan of
#    section 1 put on GPU 0? Set `answer` and run the cell.

# %%
from helpers.exercises import check_answer

answer = None  # your answer: a whole number of decoder layers
plan_budget = plans[f"max_memory={budget}"]
right_answer = sum(1 for k, d in plan_budget.items() if k.startswith("model.layers.") and d == gpus[0])
_ = check_answer(answer, right_answer, f"{right_answer} layers fit GPU 0's budget next to the embedding and the tied head",
                 lambda a: f"you said {a}; read the layer range on GPU 0 (a range a-b holds b - a + 1 layers)",
                 "count the layers placement() lists for GPU 0 under max_memory=...")

# %% [markdown]
# ## Further reading
#
# - [Big model inference](https://huggingface.co/docs/accelerate/usage_guides/big_modeling) (accelerate):
#   device maps, `max_memory`, offload, and why a split runs one device at a time.
# - [bitsandbytes in transformers](https://huggingface.co/docs/transformers/quantization/bitsandbytes):
#   4-bit and 8-bit loading, which modules stay unquantized, `llm_int8_enable_fp32_cpu_offload`.
# - [Optimizing LLMs for speed and memory](https://huggingface.co/docs/transformers/llm_tutorial_optimization)
#   (transformers): why naive pipeline parallelism (a split) leaves GPUs idle.
# - `docs/published-figures.md` in this repository: published figures for splits and offload, with sources.
# - Notebook 05: serving many prompts with one replica per GPU or tensor parallelism.
