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
# parallelism, is notebook 07.)
#
# **What you'll learn**
# 1. Plan a split with `device_map`: `"auto"`, `"balanced"`, `"balanced_low_0"`, a per-GPU budget such as
#    `max_memory={0: "35GiB", 1: "35GiB"}`, and a map written by hand.
# 2. Load the split, feed it inputs (they go to the embedding's device), and see why the layers run one
#    GPU at a time.
# 3. Generate for a batch with left padding and an attention mask, and check that the split model's
#    greedy output is identical to the single-device run.
# 4. Time the split against the single device, each rate beside the most this machine's memory bandwidth
#    allows, and compare them only as far as the spread of the repeats allows.
# 5. Split a 4-bit (bitsandbytes NF4) model: load it in the dtype the plan assumed, check the bytes on
#    each GPU against the plan, see why transformers refuses a 4-bit split onto the CPU or disk, and what
#    its escape hatch, `llm_int8_enable_fp32_cpu_offload`, really does. Then read what CPU offload costs
#    per token on a GPU, from the workbook's GPU reference run.
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
# - Run time: about 20 s on an idle 2-core CPU (most of it timing the CPU-and-disk stand-in of the
#   split); about 35 s on one H200 GPU, measured before sections 4 and 5 timed the split and loaded the
#   flag's map.

# %% tags=["parameters"]
MODEL = "bundled"  # "bundled" (SmolLM2-135M-Instruct), a local checkpoint folder, or a hub id
GPUS = None  # GPU ids to split over, e.g. [0, 1]; None: every visible GPU when there are two or more
NEW_TOKENS = 12  # greedy new tokens per prompt

# %%
import gc
import logging
import shutil
import tempfile
import time
from collections import Counter
from importlib.metadata import version

import matplotlib.pyplot as plt
import torch
from accelerate import infer_auto_device_map
from accelerate.utils import CustomDtype, compute_module_sizes
from accelerate.utils.modeling import get_max_layer_size
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, BitsAndBytesConfig
from transformers.integrations import accelerate as hf_accelerate  # the planner from_pretrained itself uses

from helpers.checkpoints import resolve_model
from helpers.devicemap import placement
from helpers.measure import compare_rates, decode_limit, memory_bandwidth, rate_text, time_generate
from helpers.quiet import silence_known_warnings
from helpers.reference import read_reference
from helpers.text import say

silence_known_warnings()  # routine library messages, and accelerate's loading bar in quiet runs
# after it: importing transformers' quantizers imports torchao, which logs on a CPU that its CUDA kernels cannot load
from transformers.quantizers import AutoHfQuantizer
_ = torch.manual_seed(0)
MiB = 2**20

# %%
def label(dev):
    """'GPU 0' for a GPU id or a CUDA device; 'cpu' or 'disk' otherwise."""
    if isinstance(dev, str) and dev.startswith("cuda"):
        dev = torch.device(dev)
    if isinstance(dev, torch.device):
        dev = dev.index if dev.type == "cuda" else dev.type
    return f"GPU {dev}" if isinstance(dev, int) else str(dev)


def owner(name, device_map):
    """The device a map gives module or tensor `name`: its longest key that is `name` or a prefix of it."""
    keys = [k for k in device_map if k == "" or name == k or name.startswith(k + ".")]
    return device_map[max(keys, key=len)]

# %%
# NBVAL_IGNORE_OUTPUT
# Versions and GPUs depend on the machine (notebook 00 prints the whole hardware report).
n_gpu = torch.cuda.device_count()
print(", ".join(f"{p} {version(p)}" for p in ("torch", "transformers", "accelerate", "bitsandbytes")),
      f"| GPUs: {[torch.cuda.get_device_name(g) for g in range(n_gpu)] or 'none'}")

# %% [markdown]
# ## 1. Plan a split over two GPUs
#
# We read the model's config and build it on the **meta device** (shapes, no bytes), as in notebook 02.
# `infer_auto_device_map` needs a budget per device, not the devices: we plan for this machine's GPUs,
# or for GPU ids 0 and 1 where it has fewer than two. The next cell says what it has and which devices
# the real load will use.

# %%
path = resolve_model(MODEL)
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
with torch.device("meta"):  # shapes, no bytes; the config's ties are applied, as after from_pretrained
    meta = AutoModelForCausalLM.from_config(config, dtype=dtype)
no_split = meta._no_split_modules  # e.g. {"LlamaDecoderLayer"}: a decoder layer stays whole on one device
sizes = compute_module_sizes(meta, dtype=dtype)  # bytes of every module and tensor, a tied weight once
weights = sizes[""]
print(f"{config.model_type}: {sum(p.numel() for p in meta.parameters()) / 1e6:.1f} M parameters, "
      f"{weights / MiB:.0f} MiB in {dtype}; never split: {no_split}")

# %% [markdown]
# A map written by hand names modules: the decoder layers (the blocks `no_split` names) and what sits
# before and after them. We read those names from the model rather than typing them: `blocks` are the
# decoder layers in order, and the modules beside them are the base model's other children (embedding,
# final norm, ...) and the output head. The first half of the layers and what comes before them go to the
# first GPU, the rest to the last; a head tied to the embedding stays with the embedding.

# %%
blocks = [n for n, m in meta.named_modules() if type(m).__name__ in no_split]  # "model.layers.0", ...
container = blocks[0].rpartition(".")[0]  # "model.layers" (Llama, Qwen2), "transformer.h" (GPT-2, Bloom)
base = container.rpartition(".")[0]  # "model", "transformer"
children = [f"{base}.{n}" for n, _ in meta.get_submodule(base).named_children()]
emb = next(n for n, m in meta.named_modules() if m is meta.get_input_embeddings())
head = next(n for n, m in meta.named_modules() if m is meta.get_output_embeddings())
tied = meta.get_output_embeddings().weight is meta.get_input_embeddings().weight
by_hand = {}
for n in children + [head]:
    module = meta.get_submodule(n)
    if n == container or not [*module.parameters(), *module.buffers()]:
        continue  # the layers are placed one by one below; a module without tensors needs no place
    before = n in children and children.index(n) < children.index(container)
    by_hand[n] = gpus[0] if before or (n == head and tied) else gpus[-1]
by_hand.update({b: gpus[i * len(gpus) // len(blocks)] for i, b in enumerate(blocks)})
say(f"{len(blocks)} decoder layers under {container!r}; beside them {[n for n in by_hand if n not in blocks]}; "
    f"the head {head!r} is {'tied to' if tied else 'separate from'} the embedding {emb!r}")

# %% [markdown]
# Four ways to ask for a split. `from_pretrained(device_map="auto")` plans in `_get_device_map`
# (`transformers/integrations/accelerate.py`) with transformers' **own** `get_balanced_memory` and
# `infer_auto_device_map`, not accelerate's (whose margin is smaller, so it can plan another split); we call
# the same two functions on the meta model. `"auto"` and `"balanced"` are the same: every GPU but the last
# gets a cap of the model's bytes over the number of GPUs **plus a margin** of 1.25 x the larger of the
# biggest decoder layer and the biggest single weight (usually the embedding); the last GPU keeps its whole
# budget. `"balanced_low_0"` gives GPU 0 only what the other GPUs cannot hold (room for `generate`'s work
# there). A budget per GPU names GPU ids and bytes: for a 65 GB model one would write
# `from_pretrained(..., device_map="auto", max_memory={0: "35GiB", 1: "35GiB"})`, and each cap is the
# smaller of the budget and the balanced share; we scale it to our model (60% of its weights per GPU, so
# it cannot fit one). And the map by hand. Planning for GPU ids this machine lacks makes accelerate log
# "Device N is not available" once per call: the first line of the cell silences exactly that logger.

# %%
logging.getLogger("accelerate.utils.modeling").setLevel(logging.ERROR)  # "Device 0 is not available, ..."
plan_for = {g: "139GiB" for g in gpus}  # an H200's usable memory, for planning
budget_bytes = round(0.6 * weights / MiB) * MiB
budget = {g: f"{budget_bytes // MiB}MiB" for g in gpus}  # {0: "35GiB", 1: "35GiB"}, scaled to this model
asks = {'"auto" / "balanced"': (plan_for, False), '"balanced_low_0"': (plan_for, True),
        f"max_memory={budget}": (budget, False)}  # (max_memory, low_zero) as _get_device_map passes them
caps, plans = {}, {}
for name, (max_memory, low_zero) in asks.items():
    caps[name] = hf_accelerate.get_balanced_memory(meta, max_memory=dict(max_memory),
                                                   no_split_module_classes=no_split, low_zero=low_zero)
    plans[name] = hf_accelerate.infer_auto_device_map(meta, max_memory=caps[name], no_split_module_classes=no_split)
plans["by hand"] = by_hand
for name, plan in plans.items():
    print(name + (f" (GPU {gpus[0]} capped at {caps[name][gpus[0]] / MiB:.0f} MiB)" if name in caps else ""))
    for dev, parts in placement(meta, plan).items():
        print(f"  {label(dev):>6}: {parts}")

# %% [markdown]
# `helpers.devicemap.placement` lists the parts each device holds, decoder layers as ranges. A tied
# output head (it shares the embedding's weights) sits with the embedding: after the last layer the
# hidden states travel back to that GPU for the head.
#
# Look at `"balanced_low_0"`: next to an H200's budget a small model is tiny, and "keep GPU 0 light" leaves
# GPU 0 empty. For a model near the GPUs' size it would fill the other GPUs and put the rest on GPU 0.
#
# **Self-check.** No plan cuts a decoder layer, the map by hand uses every GPU, and `"balanced_low_0"`
# leaves GPU 0 empty for a model far smaller than a GPU. Whether `"auto"` and the budget use both GPUs
# depends on the model, through two rules. GPU 0's cap is its share plus the margin: where the embedding
# is a large part of the model, that holds the whole model, and the last GPU stays empty. And on GPU 0
# `infer_auto_device_map` keeps room for the largest layer (where an offloaded layer would be brought
# in): a cap too small for the embedding beside that room leaves GPU 0 empty. The planner fills the
# devices in order and never returns to an earlier one. The cell says, from the caps, which happened.

# %%
largest, largest_names = get_max_layer_size(list(meta.named_children()), sizes, no_split)
for name, plan in plans.items():
    assert not any(k.startswith(b + ".") for k in plan for b in blocks), f"{name} cut a decoder layer"
    used = sorted(set(plan.values()), key=str)
    print(f"{name}: {', '.join(label(d) for d in used)}")
    cap = caps[name][gpus[0]] if name in caps and name != '"balanced_low_0"' else None
    if cap is not None and gpus[0] not in used and cap - largest < sizes[emb]:
        say(f"  GPU {gpus[0]} stays empty: its cap, {cap / MiB:.0f} MiB, less the room kept for the largest layer "
            f"({largest_names[0]}, {largest / MiB:.0f} MiB), cannot hold the first module, {emb} "
            f"({sizes[emb] / MiB:.0f} MiB)")
    elif cap is not None and used == [gpus[0]]:
        say(f"  GPU {gpus[-1]} stays empty: GPU {gpus[0]}'s cap, {cap / MiB:.0f} MiB (its share of the model's "
            f"{weights / MiB:.0f} MiB plus the margin), holds the whole model")
    if "disk" in used:
        say(f"  the disk gets {placement(meta, plan)['disk']}: no GPU's cap had room left for it")
assert set(by_hand.values()) == set(gpus), "the map by hand should use every GPU"
if weights < 0.5 * 139 * 2**30:
    assert gpus[0] not in plans['"balanced_low_0"'].values(), "balanced_low_0 should leave GPU 0 empty"
print("every plan keeps its decoder layers whole")

# %% [markdown]
# ## 2. Load the split and feed it inputs
#
# We load the map by hand for real, on the devices the first cell of section 1 named, with an offload
# folder of our own in case a stand-in needs one (a temporary folder, removed at the end). Then the same
# model whole on one device, as the reference. We record the bytes each GPU gained during the split's load
# (`torch.cuda.memory_allocated`, before the single-device copy arrives).

# %%
real_map = {name: stand_in[dev] for name, dev in by_hand.items()}
offload = tempfile.mkdtemp(prefix="04-split-")
cuda_ids = sorted({d for d in real_map.values() if isinstance(d, int)})
before = {g: torch.cuda.memory_allocated(g) for g in cuda_ids}
split = AutoModelForCausalLM.from_pretrained(path, dtype=dtype, device_map=real_map, offload_folder=offload)
measured = {g: torch.cuda.memory_allocated(g) - before[g] for g in cuda_ids}
mapped = {}  # bytes the map puts on each device: the sizes of the modules it names there
for name, dev in real_map.items():
    mapped[dev] = mapped.get(dev, 0) + sizes[name]
single_device = 0 if n_gpu >= 1 else "cpu"
single = AutoModelForCausalLM.from_pretrained(path, dtype=dtype, device_map={"": single_device})
print("split over:", ", ".join(label(d) for d in mapped), "| single device:", label(single_device))
for dev, parts in placement(split, split.hf_device_map).items():
    print(f"  {label(dev):>6}: {parts}")

# %% [markdown]
# **Where do the inputs go?** To the device of the first module that sees them, the embedding.
# `model.device` names the device of the first parameter, which is the same here; the embedding's
# device says it directly. Every layer carries an accelerate hook that moves its inputs to its
# execution device; weights kept on `meta` (offloaded to the CPU or disk) are brought in by the hook at
# every pass.

# %%
first = split.get_input_embeddings().weight.device
layers = split.get_submodule(container)
print("inputs go to:", first, "| model.device:", split.device)
for i in (0, len(layers) - 1):
    hook = layers[i]._hf_hook
    print(f"layer {i:>2}: {type(hook).__name__}, runs on {hook.execution_device}, "
          f"weights kept on {next(layers[i].parameters()).device} between passes")

# %% [markdown]
# ## 3. Why the layers run one GPU at a time
#
# Each decoder layer needs the previous layer's output. We time-stamp every layer's start and end in one
# forward pass: no layer starts before the one before it has finished, so the second GPU waits while the
# first works, then the first waits. A split gives you the memory of two GPUs at about the speed of one.

# %%
stamps = []


def stamp(kind, i, hidden):
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    stamps.append((kind, i, hidden.device, time.perf_counter()))


handles = []
for i, layer in enumerate(layers):  # the hidden states come in positionally or as a keyword, by architecture
    handles.append(layer.register_forward_pre_hook(
        lambda m, args, kwargs, i=i: stamp("start", i, args[0] if args else kwargs["hidden_states"]), with_kwargs=True))
    handles.append(layer.register_forward_hook(
        lambda m, args, out, i=i: stamp("end", i, out[0] if isinstance(out, tuple) else out)))
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
placed = [label(split.hf_device_map[blocks[s[1]]]) for s in starts]
runs_on = [label(d) for d in dict.fromkeys(layer._hf_hook.execution_device for layer in layers)]
say("layer order:", [s[1] for s in starts] == list(range(len(layers))))
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
assert all(label(g) in runs_on for g in cuda_ids), f"a GPU of the map never computed: {runs_on}"
print("one layer at a time, on", ", ".join(runs_on))

# %% [markdown]
# ### Memory per device after the load
#
# For each device: the bytes the map puts there (accelerate's `compute_module_sizes` of the meta model:
# parameters and buffers, a tied weight once), and on GPUs what `torch.cuda.memory_allocated` gained during
# the load. For the CPU and the disk the figure is the map's (for the disk, transformers reads a
# safetensors checkpoint's offloaded weights from the checkpoint's own files, so the offload folder stays
# empty).

# %%
for dev, b in mapped.items():
    got = f"{measured[dev] / MiB:6.0f} MiB measured" if dev in measured else "not a GPU: not measured"
    print(f"{label(dev):>6}: {b / MiB:6.0f} MiB in the map, {got}")
fig, ax = plt.subplots(figsize=(5, 3))
labels = [label(d) for d in mapped]
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
# eager mode: each layer's hook adds Python work. A stand-in has more to pay: its second half's weights
# are brought in at every pass. Whether this machine's repeats can show that cost, the comparison below says.
#
# A rate means little without the most it could be. A decode step reads every weight once (a tied head the
# embedding's matrix; an untied input embedding one row a sequence), so tokens/s can be at most
# `batch x memory bandwidth / bytes read`: `helpers.measure.decode_limit(model, memory_bandwidth(), batch)`,
# with the bandwidth measured here by a 1 GiB copy (for a stand-in, the bandwidth of the device that holds
# the first half, the faster one: an upper bound). `time_generate` times a warm-up and then 3 repeats and
# gives their median and spread. It refuses (`MeasurementError`) two things only: a run whose decoding took
# no more than 5% of it (it measures again, and gives up once more tries have failed than there are
# repeats), and a median above `limit_tokens_per_s` where one is given (`rate_text` refuses a rate above
# its limit too). It does not judge the spread: a wide spread is printed, and the comparison reads it.
# Two rates differ measurably only when the ratio's range over the repeats leaves out 1.00.

# %%
# NBVAL_IGNORE_OUTPUT
# Timings depend on the machine and its load.
timing_tokens = 16 if n_gpu else 4  # few on the CPU, where the stand-in reads its disk half at every pass
bandwidth = memory_bandwidth(first if first.type == "cuda" else "cpu")  # bytes/s, a 1 GiB copy
timed = {}
for name, model in (("split", split), ("single", single)):
    b = len(prompts)
    try:  # MeasurementError (a RuntimeError): no decoding time to measure, or a rate above the limit; it says why
        r = time_generate(model, batch.to(model.get_input_embeddings().weight.device), repeats=3,
                          new_tokens=timing_tokens, pad_token_id=tok.pad_token_id)
        limit = decode_limit(model, bandwidth, b)  # total tokens/s for the batch
        say(f"{name:>6}: {rate_text(r['total_tokens_per_s'], limit, [b * x for x in r['spread']])}")
        timed[name] = r
    except RuntimeError as e:
        say(f"{name}: {type(e).__name__}: {e}")
if len(timed) == 2:
    verdict = compare_rates(timed["split"], timed["single"], "split", "single")
    say(verdict)
    say("so the split's extra work at every pass (its hooks, and a stand-in's weights brought in) "
        + ("cost measurable time here" if verdict.endswith("split is slower") else
           "did not show in these repeats: the split measured faster" if verdict.endswith("faster") else
           "is hidden here by the spread of the repeats"))

# %% [markdown]
# The GPU reference runs are `gpu-reference/<tier>/results.json`, made by `gpu-reference/tools/gpu_bench.py`
# on a random-weight llama-1b shape. Each measurement is a **record**: `path` (`"one GPU"`, `"split"`,
# `"cpu offload"`, ...), `format`, `batch` (sequences in flight), `tokens_per_s` (all their new tokens per
# second, the median of its repeats), `spread` (the lowest and highest repeat, where the file recorded them)
# and `limit_tokens_per_s`, the bandwidth limit for that path and batch. An older file (one section per
# method, no limit) is read into the same form, its limits computed from the GPU's specified bandwidth.
#
# Which tier's file do we read? The one that matches this machine: the two-GPU tier with two GPUs or more,
# else the one-GPU tier. A split needs two GPUs, so its figures come from the two-GPU tier wherever the
# matching tier lacks them. `helpers.reference.read_reference` reads both and prints which file each figure
# comes from, with that file's hardware and versions; it files each record under `rows[path, format][batch]`
# and adds its `rate`, the tokens/s as `rate_text` prints it (beside its limit; a figure above its limit
# would stop the cell). These files recorded no spread of repeats, so `read_reference` also measures their
# noise, the **noise bound**: the largest ratio between two runs of the same configuration in any reference
# file (the same GPU model, shape, format, batch and work on each GPU). `compare_rates` calls a ratio of two
# such figures a difference only outside that bound.

# %%
files = read_reference(n_gpu)  # {tier: results}: this machine's tier first, then two-gpu
tier = next(iter(files))
ref, two_ref = files[tier], files["two-gpu"]  # each with "rows": {(path, format): {batch: record}}
if ("split", "bf16") not in ref["rows"]:
    print(f"The {tier} tier has no split (it needs two GPUs): the split's figures come from the two-gpu tier.")

# %% [markdown]
# **Self-check.** Each file is the tier it is read as (its number of GPUs says so), and no figure in it is
# above its limit.

# %%
assert tier == ("two-gpu" if n_gpu >= 2 else "one-gpu"), "the tier does not match this machine"
assert all(len(res["hardware"]["gpus"]) == (2 if name == "two-gpu" else 1) for name, res in files.items())
assert all(r["tokens_per_s"] <= r["limit_tokens_per_s"] for res in files.values() for r in res["records"])
print("figures from " + " and ".join(f"gpu-reference/{name}/" for name in files) + ", each within its limit")

# %%
one2, split2 = two_ref["rows"]["one GPU", "bf16"], two_ref["rows"]["split", "bf16"]  # {batch: record}
print(f"[two-gpu] split over {split2[min(split2)]['gpus']} GPUs (device_map={two_ref['split']['device_map']!r}) "
      "and one GPU, in the same run:")
for b in sorted(set(one2) & set(split2)):
    print(f"  batch {b:>2}, split  : {split2[b]['rate']}")
    print(f"  batch {b:>2}, one GPU: {one2[b]['rate']}")
    say("  " + compare_rates(split2[b], one2[b], "split", "one GPU"))

# %% [markdown]
# Where a file recorded no spread of its repeats, a ratio is judged against the noise bound printed above:
# inside it, the figures cannot show whether, or by how much, the split was slower than one GPU; outside
# it, they can. Each line says which. What holds on every machine is the mechanism of section 3, the
# layers running one after the other, and the small share of the limit every figure reached: eager
# decoding of a small model is bound by per-step work outside the memory reads (Python, kernel launches),
# and a split's hooks add more of it at every layer. Figures of two different runs are not set against
# each other: how far apart they came out is what the noise bound measures.

# %%
del split, single, layers
gc.collect()  # accelerate's hooks hold reference cycles: collect them to free the memory now
if torch.cuda.is_available():
    torch.cuda.empty_cache()

# %% [markdown]
# ## 5. A 4-bit model split across GPUs
#
# bitsandbytes' 4-bit layers can be split across GPUs like any other. Which weights become 4-bit is
# transformers' quantizer's decision, so we ask it, as `from_pretrained` does before it plans: on the meta
# model, `AutoHfQuantizer.from_config(...).preprocess_model(...)` replaces the layers it quantizes (the
# Linear layers, and GPT-2's `Conv1D`, outside the modules it keeps, such as the output head) with
# `bitsandbytes.nn.Linear4bit`. Everything else (the embedding, the norms, the head) keeps the **load
# dtype**: `dtype=` if given, else the checkpoint's. We load with `dtype=torch.bfloat16`, the compute dtype,
# so the plan counts each 4-bit weight at half a byte (accelerate's `CustomDtype.INT4`) and everything else
# at two bytes, and we give each GPU 60% of that 4-bit model.

# %%
import bitsandbytes as bnb  # here, after silence_known_warnings(): its import may log a harmless kernel notice

compute_dtype = torch.bfloat16  # bitsandbytes' compute dtype, and the load dtype (dtype=) the plan assumes
bnb_config = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=compute_dtype)
with torch.device("meta"):
    meta_4bit = AutoModelForCausalLM.from_config(config, dtype=compute_dtype)
quantizer = AutoHfQuantizer.from_config(bnb_config, pre_quantized=False)  # the quantizer from_pretrained makes
quantizer.preprocess_model(model=meta_4bit, dtype=compute_dtype, device_map="auto", checkpoint_files=None,
                           use_kernels=False)  # replaces the layers it quantizes, on the meta device
converted = [n for n, m in meta_4bit.named_modules() if isinstance(m, bnb.nn.Linear4bit)]
special = {f"{n}.weight": CustomDtype.INT4 for n in converted}  # half a byte per 4-bit weight
sizes_4bit = compute_module_sizes(meta_4bit, dtype=compute_dtype, special_dtypes=special)
budget_4bit = {g: round(0.6 * sizes_4bit[""] / MiB) * MiB for g in gpus}
plan_4bit = infer_auto_device_map(meta_4bit, max_memory=dict(budget_4bit), no_split_module_classes=no_split,
                                  dtype=compute_dtype, special_dtypes=special)
planned = {}
for name, dev in plan_4bit.items():
    planned[dev] = planned.get(dev, 0) + sizes_4bit[name]
say(f"{len(converted)} layers in 4-bit, from {converted[0]} to {converted[-1]}; not converted: "
    f"{sorted(quantizer.modules_to_not_convert)}")
print(f"model {sizes_4bit[''] / MiB:.0f} MiB; budget {budget_4bit[gpus[0]] / MiB:.0f} MiB per GPU")
for dev, parts in placement(meta_4bit, plan_4bit).items():
    print(f"  {label(dev):>6}: {planned[dev] / MiB:5.1f} MiB, {parts}")

# %% [markdown]
# We load that plan on the devices of section 2, **in the dtype the plan assumed**: `dtype=compute_dtype`.
# Without `dtype`, the modules left unquantized keep the checkpoint's dtype (float32 for the bundled model),
# and the embedding alone takes twice the bytes the plan gave it. With one GPU or none, the stand-in puts
# 4-bit layers on the CPU or disk, and transformers refuses: the whole message follows.

# %%
map_4bit = {name: stand_in.get(dev, dev) for name, dev in plan_4bit.items()}  # a plan's "disk" stays "disk"
before = {g: torch.cuda.memory_allocated(g) for g in range(n_gpu)}
try:
    model_4bit = AutoModelForCausalLM.from_pretrained(path, dtype=compute_dtype, quantization_config=bnb_config,
                                                      device_map=map_4bit, offload_folder=offload)
except ValueError as e:
    model_4bit = None
    say(f"{type(e).__name__}: {e}")
else:
    gained = {g: torch.cuda.memory_allocated(g) - before[g] for g in gpus}
    lin = model_4bit.get_submodule(converted[-1])
    print(f"{converted[-1]}: {type(lin).__module__}.{type(lin).__name__}, weight {type(lin.weight).__name__} "
          f"on {lin.weight.device}")
    print("embedding:", model_4bit.get_input_embeddings().weight.dtype)
    with torch.inference_mode():
        out_4bit = model_4bit.generate(**batch.to(model_4bit.get_input_embeddings().weight.device), **gen)
    for p, ids in zip(prompts, out_4bit[:, batch["input_ids"].shape[1]:]):
        print(f"{p!r} -> {tok.decode(ids, skip_special_tokens=True)!r}")
    del lin

# %% [markdown]
# **Self-check: the bytes on each GPU.** The plan counts half a byte per 4-bit weight; NF4 also stores one
# float32 scale per block of 64 weights (4 / 64 = 0.0625 byte a weight). With the model on GPUs, what each
# GPU gained during the load must be the plan's bytes plus those scales, **within 5%**: an embedding left in
# float32 shows up here as a GPU far over its share. Where the load was refused there are no GPU bytes: the
# cell says so and checks the plan's bytes against the budget.

# %%
scales = 4 / 64  # bytes a 4-bit weight costs on top of the plan's half byte: a float32 absmax per 64 weights
n_4bit = {g: sum(meta_4bit.get_submodule(n).weight.numel() for n in converted if owner(n, plan_4bit) == g)
          for g in gpus}  # 4-bit weights on each GPU
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
# **The escape hatch, and what it really does.** The refusal's advice is `llm_int8_enable_fp32_cpu_offload=True`
# with a custom `device_map`, "keeping these modules in 32-bit". In transformers 5.24 the flag does two
# things (`Bnb4BitHfQuantizer` in `transformers/quantizers/quantizer_bnb_4bit.py`): `validate_environment`
# no longer raises the refusal above for a map with `"cpu"` or `"disk"` in it, and
# `_process_model_before_weight_loading` adds every module the map sends to `"cpu"` or `"disk"` to the
# modules not to convert. Those layers stay ordinary layers in the **load dtype** (`dtype=`, else the
# checkpoint's): not 4-bit, and not float32 unless that is the load dtype. On a machine without a GPU,
# where the map holds only `"cpu"` and `"disk"`, nothing is quantized at all. We load with the flag and the
# stand-in map (on two GPUs: GPU 1's share moved to the CPU, as if GPU 1 were missing), in float16 on
# purpose, a dtype neither the flag's name nor the compute dtype suggests, and look at the layers the
# quantizer would have converted. Where the map leaves nothing to quantize, transformers warns "You are
# loading your model using eetq but no linear modules were found in your model" (its bitsandbytes code
# borrows another method's words; quiet runs hide it): the flag at work.

# %%
hatch = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=compute_dtype,
                           llm_int8_enable_fp32_cpu_offload=True)
hatch_map = {n: stand_in.get(d, d) if not real_gpus or d == gpus[0] else "cpu" for n, d in plan_4bit.items()}
model_hatch = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float16, quantization_config=hatch,
                                                   device_map=hatch_map, offload_folder=offload)
kinds = Counter((label(owner(n, hatch_map)), type(model_hatch.get_submodule(n)).__name__) for n in converted)
for (dev, kind), count in sorted(kinds.items()):
    print(f"  {dev:>6}: {count} {kind}")
away = [n for n in converted if owner(n, hatch_map) in ("cpu", "disk")]
mod = model_hatch.get_submodule(away[0])
w = mod.weight if mod.weight.device.type != "meta" else mod._hf_hook.weights_map["weight"]  # disk: the stored copy
say(f"{away[0]} on {owner(away[0], hatch_map)}: {type(mod).__name__}, weight {w.dtype}, "
    f"{w.numel() * w.element_size() / MiB:.2f} MiB (float32 would be {w.numel() * 4 / MiB:.2f} MiB, "
    f"NF4 {w.numel() * (0.5 + scales) / MiB:.2f} MiB)")
assert w.dtype == torch.float16 and not isinstance(mod, bnb.nn.Linear4bit), "an offloaded layer was converted?"
del model_hatch, mod, w
_ = gc.collect()

# %% [markdown]
# So the flag makes the load succeed by quantizing less: the layers on the CPU or disk keep the load dtype
# and its bytes, and they are copied to the GPU at every pass like any offloaded layer (section 6).
# Notebook 08 follows the whole recipe to a working load.
#
# On the GPU reference machines, `gpu-reference/tools/gpu_bench.py` loaded the random-weight llama-1b shape
# in NF4 (with `dtype=torch.bfloat16`): on one GPU where the file has it, and split over two GPUs with
# `device_map="balanced"` where the file has that. What the files recorded, each line naming its tier:

# %%
nf4_one, nf4_split = ref.get("nf4"), two_ref.get("split_nf4")  # one GPU (newer files); a split (older files)
if nf4_one:
    lib = nf4_one["bnb_library"]
    say(f"[{tier}] NF4 on one GPU: {nf4_one['module_type']} with {nf4_one['weight_type']} on "
        f"{nf4_one['weight_device']}, bitsandbytes library {lib['library']} ({lib['backend']})")
    fp, whole = nf4_one["footprint_bytes"], ref["model"]["weight_bytes"]
    n4 = (whole - fp) / 1.5  # 4-bit weights: 2 bytes each in bf16, 0.5 in NF4; every other byte is the same
    say(f"  memory footprint {fp / 2**30:.2f} GiB in NF4, {whole / 2**30:.2f} GiB in bf16 (get_memory_footprint: "
        f"parameters and buffers). The NF4 absmax scales are neither: {n4 * scales / 2**30:.2f} GiB more "
        f"({n4 / 1e6:.0f} M 4-bit weights x {scales} byte), {(fp + n4 * scales) / 2**30:.2f} GiB in all. The NF4 "
        "limits below leave the scales out too, so they are a little high: still upper bounds.")
    q, bf = ref["rows"]["one GPU", "nf4"], ref["rows"]["one GPU", "bf16"]
    for b in sorted(set(q) & set(bf)):
        print(f"  batch {b:>2}, NF4 : {q[b]['rate']}\n  batch {b:>2}, bf16: {bf[b]['rate']}")
        say("  " + compare_rates(q[b], bf[b], "NF4", "bf16"))
if nf4_split:
    say(f"[two-gpu] NF4 split: {nf4_split['module_type']} with {nf4_split['weight_type']} on "
        f"{nf4_split['weight_device']}, bitsandbytes backend {nf4_split['bnb_backend']}")
    say("  memory after the load:", ", ".join(f"GPU {g} {b / 2**30:.2f} GiB"
                                             for g, b in enumerate(nf4_split["mem_after_load_bytes"])),
        "| bf16 split:", ", ".join(f"GPU {g} {b / 2**30:.2f} GiB"
                                   for g, b in enumerate(two_ref["split"]["mem_after_load_bytes"])))
    q = two_ref["rows"]["split", "nf4"]
    print(f"  batch  1, NF4 : {q[1]['rate']}\n  batch  1, bf16: {split2[1]['rate']}")
    say("  " + compare_rates(q[1], split2[1], "NF4", "bf16"))
assert nf4_one or nf4_split, "neither reference file has an NF4 measurement"
if model_4bit is not None:
    del model_4bit
_ = gc.collect()

# %% [markdown]
# ## 6. The price of CPU offload on a GPU
#
# Notebook 02 offloads layers when the main device is too small (to CPU RAM first on a GPU machine, to disk
# on a CPU-only one). On a GPU every offloaded layer is copied to the GPU **at every forward pass**, so each
# token pays `bytes offloaded / host-to-device rate`. The reference run of the matching tier kept a growing
# number of decoder layers on the CPU of a GPU machine (batch 1; records with path `"cpu offload"`); each
# figure's limit adds its offloaded bytes at the pinned host-to-device copy rate measured in the same run.
# The inverse of the slope of seconds per token against bytes offloaded is the effective host-to-device
# rate, compared below with plain copies measured in the same run.

# %%
off = ref["offload"]  # the fit of seconds per token against bytes offloaded
offloaded = sorted(ref["rows"]["cpu offload", "bf16"].values(), key=lambda r: r["layers_on_cpu"])
xs = [r["bytes_offloaded"] / 1e9 for r in offloaded]
ys = [r["s_per_token"] * 1e3 for r in offloaded]
hw = ref["hardware"]
say(f"[{tier}] {ref['model']['label']}: {ref['model']['layers']} decoder layers, batch {off['batch']}, "
    f"on one {hw['gpus'][0][0]}")
for r in offloaded:
    say(f"{r['layers_on_cpu']:>2} layers on the CPU ({r['bytes_offloaded'] / 1e9:.2f} GB): {r['rate']}")
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
# link again for every token. How the measured rate compares with the two plain copies, from the file, and
# what the file can say about the most offloaded run against none.
#
# The run with no layer on the CPU is the model whole on GPU 0 at batch 1 (its map puts every module on
# GPU 0, so `from_pretrained` adds no hooks: it dispatches only a map with two devices or a disk), the same
# configuration as the file's one-GPU bf16 figure at batch 1. The two were timed over different numbers of
# new tokens, at different points of the run; the cell sets them side by side, judged by the noise bound.

# %%
h2d, pageable, pinned = off["effective_h2d_GBps"], ref["h2d"]["pageable_GBps"], ref["h2d"]["pinned_GBps"]
assert h2d < pinned, "offload ran at pinned-copy speed?"
say(f"[{tier}] offload moved weights at {h2d / pageable:.0%} of a pageable copy's rate and {h2d / pinned:.0%} "
    "of a pinned copy's")
say(f"[{tier}] " + compare_rates(offloaded[-1], offloaded[0], f"{offloaded[-1]['layers_on_cpu']} layers on the CPU",
                                 "none"))
whole = ref["rows"].get(("one GPU", "bf16"), {}).get(1)
if whole and offloaded[0]["layers_on_cpu"] == 0:
    say(f"[{tier}] the same configuration twice: one GPU at batch 1, {ref['new_tokens']} new tokens: {whole['rate']}; "
        f"0 layers on the CPU, {off['tokens']} new tokens: {offloaded[0]['rate']}. "
        + compare_rates(offloaded[0], whole, "0 layers on the CPU", "one GPU"))
shutil.rmtree(offload, ignore_errors=True)  # the offload folder this notebook made

# %% [markdown]
# ## Summary
#
# - A `device_map` split (`"auto"`/`"balanced"`, `"balanced_low_0"`, per-GPU budgets, or a map by hand) puts
#   whole decoder layers on each GPU; the inputs go to the embedding's device; hooks move the hidden states.
#   `from_pretrained` plans `"auto"` with transformers' own `get_balanced_memory` (a margin of 1.25 x the
#   biggest layer or weight on every GPU but the last); a model whose embedding outweighs its layers may
#   not split at all under it.
# - The layers run one after the other: a split buys memory, at about the speed of one GPU or less.
# - A rate is printed beside its limit (`decode_limit(model, memory_bandwidth(), batch)`), and two rates
#   are compared only through the spread of their repeats, or, for figures recorded without repeats, against
#   the noise bound: the largest gap between two runs of the same configuration.
# - Batches are padded on the left with an attention mask; greedy output of the split model is identical to
#   the single-device run.
# - A 4-bit model splits across GPUs like any other: plan the layers transformers' quantizer converts at half
#   a byte, load it with the `dtype` the plan assumed, and check each GPU's bytes against the plan.
#   transformers refuses 4-bit layers of a dispatched model on the CPU or disk; with
#   `llm_int8_enable_fp32_cpu_offload=True` it no longer refuses, and those layers are simply not quantized:
#   they keep the load dtype.
# - CPU offload costs its bytes over the host-to-device link at every token.
#
# ## Exercises
#
# 1. Plan the split with `max_memory={0: "200MiB", 1: "200MiB", "cpu": "2GiB"}` for float32 (build the meta
#    model with `dtype=torch.float32` first: on a GPU, `meta` is bf16). How many layers land on each GPU,
#    and where does the rest go? *Self-check:* the map then holds `"cpu"` entries.
# 2. Move the head and the embedding (`head` and `emb` above) to the second device in the map by hand and
#    load it. What does transformers do with a tied pair? *Self-check:* compare `split.hf_device_map[head]`
#    with the embedding's device.
# 3. Load the 4-bit plan without `dtype=` on two GPUs. *Self-check:* the bytes check of section 5 fails
#    on the GPU that holds the embedding when the checkpoint is stored in float32.
# 4. The executable self-check below: how many decoder layers does the `max_memory={...}` budget plan of
#    section 1 put on GPU 0? Set `answer` and run the cell.

# %%
from helpers.exercises import check_answer

answer = None  # your answer: a whole number of decoder layers
plan_budget = plans[f"max_memory={budget}"]
right_answer = sum(1 for b in blocks if owner(b, plan_budget) == gpus[0])
_ = check_answer(answer, right_answer, f"{right_answer} layers fit GPU 0's budget next to the modules before them",
                 lambda a: f"you said {a}; read the layer range on GPU 0 (a range a-b holds b - a + 1 layers)",
                 "count the layers placement() lists for GPU 0 under max_memory=...",
                 wrong_example=right_answer - 1 if right_answer else 1)  # a range a-b read as b - a layers

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
# - Notebook 07: serving many prompts with one replica per GPU or tensor parallelism.
