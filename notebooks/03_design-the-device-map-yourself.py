# ---
# jupyter:
#   jupytext:
#     text_representation:
#       extension: .py
#       format_name: percent
#   kernelspec:
#     display_name: Python 3 (ipykernel)
#     language: python
#     name: python3
# ---

# %% [markdown]
# # Design the device map yourself
#
# `device_map="auto"` decides for you which layers go to which GPU, which to the CPU and which to
# disk. When a model barely fits, when you share a GPU, or when you are about to rent eight GPUs
# for a 70B model, you want to make that decision yourself, and before anything loads. This
# notebook walks the manual route that accelerate's big-model inference documents (an empty model
# from its config, a map computed from a memory budget, the checkpoint loaded into the map, the
# model dispatched), makes it work on current versions, and then plans maps for GPUs this machine
# does not have, in bf16 and in 4-bit, exactly as `from_pretrained` would. Every library call the
# recipe and the planning need is in the notebook's own cells, so you can lift them into a script.
#
# **What you'll learn**
# 1. The manual recipe, step by step: config, an empty model on the meta device with a dtype,
#    `_no_split_modules`, `infer_auto_device_map` with a budget per device (`max_memory`),
#    `load_checkpoint_in_model`, `dispatch_model`, then `generate`.
# 2. What `max_memory`'s keys mean (GPU ids, `"cpu"`, `"disk"`), how its size strings are read, and
#    how the workbook's check catches the budgets that go wrong (sizes in bits, `"cuda:0"` keys).
# 3. How `balanced`, `balanced_low_0` and `sequential` differ on the same budget (and why
#    `balanced_low_0` fails on GPU ids that skip one).
# 4. How to plan for GPUs you don't have (2 x 24 GiB, 4 x 80 GiB, 8 x 80 GiB) in bf16 and NF4, with
#    transformers' own quantizer and sizing, and where that sizing differs from the real bytes.
# 5. How to check a map before loading (`helpers.preflight.preflight`).
#
# Planning with room for the KV cache, and what a model bigger than your GPU costs per token, is notebook 05.
#
# **What you'll need**: notebook 02 (the meta device, `init_empty_weights`, offload hooks). A CPU
# is enough: the recipe runs on the bundled model, and every plan for big GPUs is computed on the
# meta device, without allocating its weights. About 20 s on an idle 2-core CPU. On a GPU
# machine section 1 puts part of the model on GPU 0 and offloads the rest to the CPU. The recipe runs
# on any causal LM you pass as `MODEL` (a small one is enough).

# %% tags=["parameters"]
# The model: "bundled" (SmolLM2-135M-Instruct, offline), a local checkpoint directory, or a hub id.
MODEL = "bundled"
# The dtype the recipe loads the model in.
DTYPE = "bfloat16"

# %%
import json
import os
import shutil
import textwrap
import warnings

import matplotlib.pyplot as plt
import torch
import transformers
from accelerate import dispatch_model, infer_auto_device_map, init_empty_weights, load_checkpoint_in_model
from accelerate.utils import compute_module_sizes, convert_file_size_to_int
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

from helpers.checkpoints import offload_folder, resolve_model
from helpers.devicemap import plot_device_map
from helpers.exercises import check_answer
from helpers.preflight import preflight
from helpers.quiet import quiet_planning, silence_known_warnings
from helpers.refusals import refused

# routine library messages and, in quiet runs only, accelerate's loading bar: see helpers/quiet.py
silence_known_warnings()

# %%
path = resolve_model(MODEL)
dtype = getattr(torch, DTYPE)
N_GPUS = torch.cuda.device_count()
MAIN = 0 if N_GPUS else "cpu"  # the main device: where layers run and inputs go
print(f"transformers {transformers.__version__}, torch {torch.__version__}, GPUs here: {N_GPUS}")


def say(*parts):
    """print(*parts), wrapped at words: 107 characters a line, what a JupyterLab output line holds."""
    print(textwrap.fill(" ".join(map(str, parts)), 107, subsequent_indent="  "))

# %% [markdown]
# ## 1. The recipe, on the bundled model (or yours)
#
# ### 1.1 An empty model from the config
#
# The config is a few kilobytes of JSON; `AutoModelForCausalLM.from_config` builds the causal-LM class
# registered for its `model_type` and takes the dtype (transformers 5 calls it `dtype`; `torch_dtype` is
# deprecated). Built inside `init_empty_weights()`, every parameter lands on the meta device: shapes and
# dtypes, no data.

# %%
config = AutoConfig.from_pretrained(path)
with init_empty_weights():
    model = AutoModelForCausalLM.from_config(config, dtype=dtype)
model.tie_weights()  # init_empty_weights loses the tie between embedding and head (notebook 02): restore it
model.eval()  # from_config builds in training mode (dropout on); from_pretrained calls eval() (notebook 02)

print(type(model).__name__, "| parameters on:", {p.device.type for p in model.parameters()},
      "| dtype:", {p.dtype for p in model.parameters()})
print("head tied to the embedding:", model.get_output_embeddings().weight is model.get_input_embeddings().weight,
      "| ties the model declares:", dict(model.all_tied_weights_keys))

# %% [markdown]
# ### 1.2 What must never be split
#
# A decoder layer adds its input back to its output (the residual connection). If its attention sat on
# one device and its MLP on another, those tensors would meet on different devices. The model class
# names the blocks that must stay whole:

# %%
print("_no_split_modules:", model._no_split_modules)
layers = [n for n, m in model.named_modules() if type(m).__name__ in model._no_split_modules]
print(f"{len(layers)} modules of those classes: {layers[0]!r} ... {layers[-1]!r}, the decoder layers")
assert layers, "the model class should name its decoder layer class in _no_split_modules"

# %% [markdown]
# ### 1.3 A budget per device, and the map it gives
#
# `max_memory` caps the bytes of **weights** each device may take. We give the main device less
# room than the model needs, so that part of the model must be offloaded: room for everything that is
# not a decoder layer, for half of the layers and for one more (accelerate keeps room for the largest
# offloaded layer on the main device: see below), computed from the model's own sizes. On a machine
# without a GPU the CPU is the main device, and what does not fit goes to `"disk"` (an offload
# folder). With a GPU, GPU 0 gets the small budget and the rest is offloaded to CPU RAM instead.

# %%
sizes = compute_module_sizes(model)  # bytes of each module ("" is the whole model), a tied weight once
LAYER = max(sizes[n] for n in layers)
budget = sizes[""] - sum(sizes[n] for n in layers) + (len(layers) // 2 + 1) * LAYER
if N_GPUS:
    MAX_MEMORY = {0: budget, "cpu": sizes[""]}  # part on GPU 0, the rest offloaded to CPU RAM
else:
    MAX_MEMORY = {"cpu": budget}  # the CPU is the main device; the rest goes to disk
print("max_memory:", {dev: f"{n / 2**20:.1f} MiB" for dev, n in MAX_MEMORY.items()},
      f"(the model: {sizes[''] / 2**20:.1f} MiB)")

device_map = infer_auto_device_map(model, max_memory=dict(MAX_MEMORY), no_split_module_classes=model._no_split_modules)
print(f"{len(device_map)} map entries, e.g.", dict(list(device_map.items())[:3]))

# %% [markdown]
# The map is a plain dict, `{module name: device}`; a name covers every module under it. Before
# loading, check it against the model, the budget and the checkpoint. `mode="run"` also checks that
# every device in the map exists on this machine. Then read it: which decoder layers sit where.

# %%
report = preflight(model, device_map, MAX_MEMORY, mode="run", checkpoint=path)
print(report)
assert report.ok, "fix the map before loading"


def device_of(name):
    """The device of a module or tensor: that of the longest map key that is a prefix of its name ("" for all)."""
    return device_map[max((k for k in device_map if k in ("", name) or name.startswith(k + ".")), key=len)]


offloaded_to = [dev for dev in report.bytes_per_device if dev != MAIN]  # GPUs, then cpu, then disk
for dev in [MAIN] + offloaded_to:
    on_it = [i for i, n in enumerate(layers) if device_of(n) == dev]
    others = [k for k, d in device_map.items() if d == dev and k not in layers]
    say(f"{dev!r}: " + (f"decoder layers {on_it[0]}-{on_it[-1]}" if on_it else "no decoder layer")
        + f" | other entries: {others} | {report.bytes_per_device[dev] / 2**20:.1f} MiB of weights")
assert report.bytes_per_device[MAIN] < MAX_MEMORY[MAIN], "the main device is over budget"
assert offloaded_to, "the budget should leave part of the model for another device"

# %% [markdown]
# The embedding (with the head, when the head is tied to it) and the first layers stay on the main
# device, and the rest of the layers are offloaded, whole, to the next device; an untied head comes
# after the layers in the model, so it goes with them. The main device holds less than its budget:
# accelerate keeps room on it for the largest offloaded layer, which is brought there at each forward
# pass.
#
# ### 1.4 Load the checkpoint into the map, then dispatch
#
# `load_checkpoint_in_model` reads the checkpoint shard by shard: weights for the CPU or a GPU go
# straight there, weights for `"disk"` are written to the offload folder (one `.dat` file per tensor
# plus an `index.json`; a map without `"disk"`, as on a GPU machine here, writes nothing there).
# `dispatch_model` then adds the hooks that move inputs and offloaded weights at each forward pass:
# the offloaded parameters stay on the meta device in the model, and a hook brings each one to the
# main device when its layer runs. The offload folder is this notebook's own, made fresh under the
# workbook's cache by `helpers.checkpoints.offload_folder`, and removed at the end.

# %%
OFFLOAD = offload_folder("03-recipe")  # a new, empty folder: removed at the end
on_disk = [n for n, _ in model.named_parameters() if device_of(n) == "disk"]
offloaded = [n for n, _ in model.named_parameters() if device_of(n) != MAIN]

load_checkpoint_in_model(model, path, device_map=device_map, offload_folder=OFFLOAD, dtype=dtype)
model = dispatch_model(model, device_map=device_map, offload_dir=OFFLOAD)
n_files = sum(1 for f in os.listdir(OFFLOAD) if f.endswith(".dat"))
print(f"offload folder: {n_files} .dat files" + (" + index.json" if (OFFLOAD / "index.json").exists() else ""),
      f"for the {len(on_disk)} parameters mapped to disk")
meta = [n for n, p in model.named_parameters() if p.device.type == "meta"]
print(f"on the meta device: {len(meta)} parameters, the ones mapped to {' and '.join(map(repr, offloaded_to))}")
assert n_files == len(on_disk) and sorted(meta) == sorted(offloaded), "offloaded weights should be hooked, not resident"

# %% [markdown]
# ### 1.5 Generate, and compare with the model loaded whole
#
# Greedy decoding (`do_sample=False`) is deterministic, so the dispatched model must produce exactly
# the tokens of the same model loaded in one piece with `from_pretrained`.

# %%
tokenizer = AutoTokenizer.from_pretrained(path)
messages = [{"role": "user", "content": "What is the capital of France?"}]
inputs = tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_tensors="pt",
                                       return_dict=True).to(MAIN)
NEW_TOKENS = 16
with torch.inference_mode():
    out = model.generate(**inputs, max_new_tokens=NEW_TOKENS, do_sample=False)
    whole = AutoModelForCausalLM.from_pretrained(path, dtype=dtype, device_map={"": MAIN})
    ref = whole.generate(**inputs, max_new_tokens=NEW_TOKENS, do_sample=False)
del whole
answer = tokenizer.decode(out[0, inputs["input_ids"].shape[1]:], skip_special_tokens=True)
say(repr(answer))
assert torch.equal(out.cpu(), ref.cpu()), "the dispatched model should generate the same tokens"
print(f"same {NEW_TOKENS} tokens as the model loaded whole")

# %% [markdown]
# **Self-check.** Why did we call `model.tie_weights()` in 1.1? (Hint: the checkpoint has no
# `lm_head.weight`; without the tie the head would stay on the meta device, and the map could place
# it on another device than the embedding. Notebook 08, cases 1 and 2, shows both failures.)
#
# **What changed since the recipe was first written** (accelerate's 2022 guide): `torch_dtype=` is
# now `dtype=`; `_no_split_modules` is a set read from the class (no need to type `"LlamaDecoderLayer"`);
# `init_empty_weights` needs `tie_weights()` afterwards; a map with `"disk"` entries needs the folder
# `load_checkpoint_in_model` wrote passed to `dispatch_model` (`offload_dir=`: without it, it raises
# "We need an `offload_dir`..."). And, as ever, a model built from its config is in
# training mode until `eval()`: with dropout on (GPT-2, for one) it would not generate the tokens of
# the model loaded whole.

# %% [markdown]
# ## 2. How `max_memory` is read
#
# **Keys** are devices:
# - an integer is a GPU (accelerator) id, as torch numbers them after `CUDA_VISIBLE_DEVICES`;
# - `"cpu"` is RAM: for offloaded weights on a GPU machine, for the whole model on a CPU-only one;
# - `"disk"` needs no size: it is always added at the end, without limit, and used only for what does
#   not fit elsewhere (an `offload_folder` must then be given).
#
# GPUs are filled first (in id order), then the CPU, then disk, whatever order you write the keys in.
# Note that accelerate converts the size strings **in the dict you pass, in place**: pass a copy
# (`dict(MAX_MEMORY)`) if you reuse it. Anything else than these keys is refused:

# %%
from accelerate.utils import get_max_memory

with quiet_planning():  # accelerate warns "Device N is not available" for GPUs a machine lacks: expected, silenced
    say(get_max_memory({"cpu": "30GiB", 1: "24GiB", 0: "24GiB"}))
mine = {"cpu": "160MiB"}
get_max_memory(mine)
say("the dict passed in, afterwards:", mine)
_ = refused(lambda: get_max_memory({"cuda:0": "24GiB"}), ValueError)

# %% [markdown]
# **Values** are bytes (an int) or strings read by `accelerate.utils.convert_file_size_to_int`. It
# reads the unit in any case and tries `GiB`, `MiB`, `KiB` first: those are powers of 2 (so `"24Gib"`
# and `"24gib"` are 24 GiB too). Then `GB`, `MB`, `KB` are powers of 10, and for these three only, a
# **lowercase final `b`** means **bits** (the count is divided by 8): `"24Gb"` and `"24gb"` are 3 GB,
# while `"24gB"` is 24 GB. There is no `TB`, and a bare `G` or `B` is refused.

# %%
for size in ["24GiB", "24Gib", "24gib", "24GB", "24gB", "24Gb", "24gb", "160MiB", "160MB", "160mb", 10**9]:
    n = convert_file_size_to_int(size)
    print(f"{size!r:>10} -> {n:>14,} bytes = {n / 2**30:7.3f} GiB")
for bad in ["24G", "24B", "2TB"]:
    refused(lambda: convert_file_size_to_int(bad), ValueError, label=f"{bad!r:>10} ->")

# %%
# Self-check: how many bytes is "80GB", and is it more or less than "80GiB"?
assert convert_file_size_to_int("80GB") == 80 * 10**9 < convert_file_size_to_int("80GiB") == 80 * 2**30
assert convert_file_size_to_int("8Gb") == 10**9, "a lowercase final b after G, M or K means bits"
assert convert_file_size_to_int("8Gib") == 8 * 2**30, "an iB unit, in any case, is a power of 2: never bits"

# %% [markdown]
# accelerate takes `"24Gb"` without a word and plans with an eighth of the memory you meant. The
# workbook's check reads a budget the same way (`preflight` reads its `max_memory` with
# `helpers.budgets.parse_budget` and keeps the bytes in `report.budget`), and warns (a `BudgetWarning`)
# when a size is in bits. The recipe's map, checked against its main device's budget written three ways,
# in whole MB:

# %%
n_mb = -(-MAX_MEMORY[MAIN] // 10**6)  # the recipe's budget for the main device, rounded up to whole MB
warned = {}
for size in (f"{n_mb}Mb", f"{n_mb}MB", f"{n_mb}MiB"):
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        checked = preflight(model, device_map, {**MAX_MEMORY, MAIN: size})
    warned[size] = [f"{w.category.__name__}: {w.message}" for w in caught]
    n = checked.budget[MAIN]
    say(f"{size!r}: {n:,} bytes (as accelerate reads it: {n == convert_file_size_to_int(size)}); the check: "
        + ("OK" if checked.ok else ", ".join(checked.kinds())))
    for message in warned[size]:
        say(f"  {message}")
assert warned[f"{n_mb}Mb"] and not warned[f"{n_mb}MB"] and not warned[f"{n_mb}MiB"], "only bits should warn"

# %% [markdown]
# A `"cuda:0"` key (torch's name for the device) is the other common slip: accelerate refuses it, as the
# `get_max_memory` call above showed, but only once planning starts; a bare string instead of a dict
# fails inside accelerate with `TypeError: string indices must be integers`. The check refuses both
# before anything runs, and names the fix:

# %%
for bad in ({"cuda:0": "24GiB"}, "24GiB"):
    refused(lambda: preflight(model, device_map, bad), ValueError)
good = preflight(model, device_map, {0: "24GiB", "cpu": "30GiB"}).budget
assert good == {0: 24 * 2**30, "cpu": 30 * 2**30}, "GPU ids are ints, sizes bytes"

# %% [markdown]
# ## 3. `balanced`, `balanced_low_0` and `sequential` on the same budget
#
# Take the Llama-2-7B shape (built on the meta device from its published config: no weights, no
# download) in bf16, and four 24 GiB GPUs. `from_pretrained(device_map=...)` accepts three strategies,
# and computes them with transformers' own copies of accelerate's planning functions (in
# `transformers/integrations/accelerate.py`, called by its `_get_device_map`), which this section uses:
# - **sequential**: `infer_auto_device_map` with the full budgets: fill GPU 0, then GPU 1, ...
# - **balanced** (what `"auto"` means): first `get_balanced_memory` lowers each GPU's cap to about
#   model size / number of GPUs plus a margin: 1.25 x the larger of the biggest decoder layer and the
#   biggest leaf module (often the embedding); the last GPU keeps its full budget in case the margin
#   was not enough.
# - **balanced_low_0**: the same, but GPU 0 gets as little as possible, leaving it room for what
#   `generate` puts there (inputs, logits, the sampling).

# %%
from transformers.integrations.accelerate import get_balanced_memory as hf_balanced_memory
from transformers.integrations.accelerate import infer_auto_device_map as hf_infer_auto_device_map

from helpers.shapes import shape_config

with torch.device("meta"):  # shapes only: no bytes allocated, ties applied as from_pretrained would
    llama7 = AutoModelForCausalLM.from_config(shape_config("llama-2-7b"), dtype=torch.bfloat16)
budget = {i: "24GiB" for i in range(4)}
no_split = llama7._no_split_modules

strategies = {}
with quiet_planning():
    for name in ("balanced", "balanced_low_0", "sequential"):
        caps = get_max_memory(dict(budget)) if name == "sequential" else hf_balanced_memory(
            llama7, max_memory=dict(budget), no_split_module_classes=no_split, low_zero=(name == "balanced_low_0"))
        strategies[name] = hf_infer_auto_device_map(llama7, max_memory=caps, no_split_module_classes=no_split)
        print(f"{name:>15}: caps (GiB) {[round(v / 2**30, 2) for v in caps.values()]}")

for name, dm in strategies.items():
    used = preflight(llama7, dm, mode="plan").bytes_per_device  # weights per device, as the check counts them
    print(f"{name:>15}: " + " | ".join(f"GPU {d}: {n / 2**30:.2f} GiB" for d, n in used.items()))

# %%
fig, axes = plt.subplots(3, 1, figsize=(8.4, 5.6))  # 840 px: JupyterLab shows it unscaled
for ax, (name, dm) in zip(axes, strategies.items()):
    plot_device_map(llama7, dm, max_memory=budget, title=f"llama-2-7b bf16 on 4 x 24 GiB: {name}", ax=ax)
plt.show()

# %%
# Self-check: which strategy left GPU 0 empty, and which used a single GPU?
used = {name: sorted(set(dm.values())) for name, dm in strategies.items()}
print(used)
assert used["sequential"] == [0] and 0 not in used["balanced_low_0"] and used["balanced"] == [0, 1, 2, 3]

# %% [markdown]
# **accelerate's functions of the same names** (`accelerate.utils.get_balanced_memory` and
# `accelerate.infer_auto_device_map`, which accelerate's `load_checkpoint_and_dispatch` uses) balance
# with a margin that is never larger: 1.25 x the larger of the *first* decoder layer and the *mean*
# size of the leaf modules. For Llama-2-7B both margins are the decoder layer, so the caps above are the same;
# for a model whose embedding outweighs its layers they are not. Bloom-1b7 in bf16 on four 80 GiB GPUs:

# %%
from accelerate.utils import get_balanced_memory as acc_balanced_memory

with torch.device("meta"):
    bloom = AutoModelForCausalLM.from_config(shape_config("bloom-1b7"), dtype=torch.bfloat16)
four_80 = {i: 80 * 2**30 for i in range(4)}
with quiet_planning():
    for who, balance, place_modules in (("transformers'", hf_balanced_memory, hf_infer_auto_device_map),
                                        ("accelerate's", acc_balanced_memory, infer_auto_device_map)):
        caps = balance(bloom, max_memory=dict(four_80), no_split_module_classes=bloom._no_split_modules)
        dm = place_modules(bloom, max_memory=caps, no_split_module_classes=bloom._no_split_modules)
        say(f"{who:<14} caps (GiB) {[round(v / 2**30, 2) for v in caps.values()]}: model on GPUs "
            f"{sorted(set(dm.values()))}")
    same_for_llama7 = acc_balanced_memory(llama7, max_memory=dict(budget), no_split_module_classes=no_split) == \
        hf_balanced_memory(llama7, max_memory=dict(budget), no_split_module_classes=no_split)
print("llama-2-7b on 4 x 24 GiB, the same caps from both:", same_for_llama7)

# %% [markdown]
# `sequential` keeps the whole model on one GPU when it fits: fewest transfers between GPUs, but one GPU
# does all the work and holds all the memory. `balanced` spreads the weights (and so the KV cache, which
# lives beside each layer); it does not make a single sequence faster (notebook 06: the layers still run
# one GPU at a time).
#
# **Skipped GPU ids.** Say GPU 1 is busy and you write `max_memory={0: ..., 2: ...}`. `balanced` and
# `sequential` take it, but `balanced_low_0` reads the budgets of GPUs 0, 1, ... by position and stops
# with a bare `KeyError: 1`: transformers' `get_balanced_memory` below, so
# `from_pretrained(device_map="balanced_low_0")` (notebook 08, case 10), and accelerate's alike. The
# check says why, and what to write instead:

# %%
SKIPPED = {0: "24GiB", 2: "24GiB"}  # GPU 1 left out
with quiet_planning():
    refused(lambda: hf_balanced_memory(llama7, max_memory=dict(SKIPPED), no_split_module_classes=no_split,
                                       low_zero=True), KeyError, label="transformers:")
gap = refused(lambda: preflight(llama7, strategies["balanced"], SKIPPED, strategy="balanced_low_0"), ValueError,
              label="the check:")
print("the same budget with 'balanced', as the check reads it:",
      preflight(llama7, strategies["balanced"], SKIPPED, strategy="balanced").budget)
assert gap is not None, "the check should refuse GPU ids with a gap for balanced_low_0"

# %% [markdown]
# ## 4. Plan for GPUs you don't have
#
# The same calls work for any budget, because the model is on the meta device and no GPU is touched.
# `helpers.planner.plan` runs them for a named shape (or any config: notebook 05) and format and returns
# the map, the bytes per device and a verdict. *Fits* needs every module on a GPU and, on each GPU, the
# weights plus the KV cache (by default 4,096 tokens of context, batch 1), the reserve for the CUDA
# context (measured on a GPU) and the activations of reading the prompt, within its budget, and the peak
# while loading too (notebook 05 writes out each term). (For NF4 it prepares the
# model with transformers' quantizer; section 5 shows those steps.) Nine setups per format. The
# weights are in two columns: *counted* as transformers counts them to place modules (0.5 byte per
# 4-bit weight), and *real*, with the scales bitsandbytes stores beside NF4 weights (section 5; notebook
# 00's footprints are these); the largest load on a GPU and the verdict use the real bytes:

# %%
from helpers.planner import plan

SHAPES = ("bloom-1b7", "llama-2-7b", "llama-2-70b")
SETUPS = ((2, 24), (4, 80), (8, 80))
FORMATS = ("bf16", "nf4")
plans = {(s, f, n, g): plan(s, f, n, g) for s in SHAPES for f in FORMATS for n, g in SETUPS}

print(f"{'':<32}{'weights (GiB)':^17}".rstrip())
print(f"{'model':<12} {'format':<6} {'GPUs':>10}  {'counted':>8} {'real':>8}  {'max on a GPU':>12}  {'GPUs used':>9}"
      "  verdict")
for (s, f, n, g), p in plans.items():
    gpus = [d for d in p.bytes_per_device if isinstance(d, int)]
    on_gpu = max(p.true_bytes_per_device[d] for d in gpus)
    spilled = ", ".join(d for d in p.bytes_per_device if d in ("cpu", "disk")) or p.binding
    verdict = "fits" if p.fits else f"does not fit: {spilled}"
    print(f"{s:<12} {f:<6} {n:>2} x {g:>2} GiB  {p.total_bytes / 2**30:8.2f} {p.total_true_bytes / 2**30:8.2f}  "
          f"{on_gpu / 2**30:8.2f} GiB  {len(gpus):>5} of {n}  {verdict}")

# %% [markdown]
# Two things stand out. The 70B shape in bf16 does not fit 2 x 24 GiB (`plan` allows no CPU RAM
# unless you give it `cpu_gib`, so its remaining layers go to disk). And `balanced` often uses fewer
# GPUs than you have ("GPUs used"): its per-GPU cap is the model size / number of GPUs plus a margin
# of 1.25 x the biggest decoder layer or leaf module (transformers' `get_balanced_memory`, section 3),
# and for a small model with a big vocabulary that margin (1.25 x the embedding) is larger than the
# share itself.
#
# Each plan drawn: one figure per model and format, one strip per setup, one cell per module in
# model order, coloured by device (the legend gives each device's weights against its budget).

# %%
for fmt in FORMATS:
    for shape in SHAPES:
        fig, axes = plt.subplots(len(SETUPS), 1, figsize=(8.4, 1.9 * len(SETUPS)))
        for ax, (n, g) in zip(axes, SETUPS):
            p = plans[(shape, fmt, n, g)]
            plot_device_map(p.model, p.device_map, max_memory=p.max_memory, ax=ax, hf_quantizer=p.hf_quantizer,
                            title=f"{shape} in {fmt} on {n} x {g} GiB: {'fits' if p.fits else 'does not fit'}")
        plt.show()

# %% [markdown]
# Check every plan before you rent the GPUs: the pre-flight check in planning mode accepts GPU ids this
# machine does not have. It checks the map and the weights against the budget (the KV cache and the
# reserve are the planner's part); a map that spills to disk is flagged only if the disk part breaks a
# rule (here it does not: whole layers on disk are legal, just slow).

# %%
passed = 0
for key, p in plans.items():
    r = preflight(p.model, p.device_map, p.max_memory, mode="plan", hf_quantizer=p.hf_quantizer)
    passed += r.ok
    if not r.ok:
        print(key, r)
print(f"plans checked: {len(plans)} | passed: {passed}")
big = plans[("llama-2-70b", "bf16", 2, 24)]
print("70B bf16 on 2 x 24 GiB:", preflight(big.model, big.device_map, big.max_memory, mode="plan"))

# %% [markdown]
# ## 5. A 4-bit plan is transformers' plan
#
# A 4-bit model is not a bf16 model divided by four. `from_pretrained(quantization_config=...)`
# replaces the `nn.Linear` layers (and GPT-2's `Conv1D`) with bitsandbytes layers, except those its
# quantizer skips: by default the output head and whatever is tied to it (`replace_with_bnb_linear` in
# `integrations/bitsandbytes.py`, `get_keys_to_not_convert` in `quantizers/base.py`). The embedding and
# the norms are not `Linear` layers. What is not quantized keeps the **load dtype** (`dtype=`, else the
# checkpoint's dtype; bf16 here), not the compute dtype. To plan what `from_pretrained` will do, prepare
# the meta model with transformers' own quantizer, as it does before it plans (transformers 5.24,
# `modeling_utils.py`), then size it with the quantizer. `helpers.planner.plan` (section 4) runs these
# same steps; here they are in full:

# %%
from transformers import BitsAndBytesConfig
from transformers.quantizers import AutoHfQuantizer


def prepare(config, quantization_config=None, dtype=torch.bfloat16):
    """The model as from_pretrained prepares it before planning: on the meta device, its Linear layers swapped."""
    with torch.device("meta"):  # ties declared by the config are applied by post_init
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    quantizer = None
    if quantization_config is not None:
        # pre_quantized=False: the checkpoint holds unquantized weights, quantized while loading
        quantizer = AutoHfQuantizer.from_config(quantization_config, pre_quantized=False)
        quantizer.preprocess_model(model=model, dtype=dtype, device_map="auto", checkpoint_files=None,
                                   use_kernels=False)
    return model.eval(), quantizer


qconfig = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=torch.bfloat16)
llama70, quantizer = prepare(shape_config("llama-2-70b"), qconfig)

# %% [markdown]
# Called on the 70B shape with an NF4 config, then sized by transformers' `compute_module_sizes`
# with the quantizer (the sizes the planner places modules with: section 4's *counted* column, 0.5 byte
# per 4-bit weight and no scales), beside the same shape in bf16:

# %%
from transformers.integrations.accelerate import compute_module_sizes as hf_module_sizes

print("q_proj:", type(llama70.model.layers[0].self_attn.q_proj).__name__,
      "| embed_tokens:", type(llama70.model.embed_tokens).__name__, "| lm_head:", type(llama70.lm_head).__name__,
      "| lm_head dtype:", llama70.lm_head.weight.dtype)
q_sizes, _ = hf_module_sizes(llama70, quantizer)
bf16_sizes, _ = hf_module_sizes(prepare(shape_config("llama-2-70b"))[0])
for name in ("model.embed_tokens", "model.layers.0", "lm_head", ""):
    print(f"{name or '(whole model)':<20} bf16 {bf16_sizes[name] / 2**30:7.3f} GiB -> NF4 "
          f"{q_sizes[name] / 2**30:7.3f} GiB  ({q_sizes[name] / bf16_sizes[name]:.3f} x)")
print(f"a global 0.25 x would predict {0.25 * bf16_sizes[''] / 2**30:.2f} GiB for the whole model")
for s in SHAPES:  # the smaller the model, the more its (unshrunk) embedding weighs
    nf4, bf16 = plans[(s, "nf4", 2, 24)].total_bytes, plans[(s, "bf16", 2, 24)].total_bytes
    print(f"{s:<12} NF4 / bf16 = {nf4 / bf16:.3f} (a global multiplier would say 0.250)")
assert q_sizes["model.embed_tokens"] == bf16_sizes["model.embed_tokens"], "the embedding is not quantized"

# %% [markdown]
# A decoder layer shrinks to 0.25 x (0.5 byte instead of 2 per weight); the embedding and head do not
# shrink at all (they stay bf16, the load dtype). Planning then follows
# `transformers.integrations.accelerate._get_device_map`: balance the budget, let the quantizer adjust
# it, place the modules:

# %%
def place(model, quantizer, max_memory):
    """The map from_pretrained(device_map="auto", max_memory=...) computes, and the caps it used."""
    no_split = model._no_split_modules
    with quiet_planning():  # "Device N is not available" for GPUs this machine lacks: expected
        caps = hf_balanced_memory(model, max_memory=dict(max_memory), no_split_module_classes=no_split,
                                  hf_quantizer=quantizer, low_zero=False)
        caps = quantizer.adjust_max_memory(caps)  # bitsandbytes: 90% of each, for buffers made while quantizing
        device_map = hf_infer_auto_device_map(model, max_memory=caps, no_split_module_classes=no_split,
                                              hf_quantizer=quantizer,
                                              no_placement_params=getattr(model, "_no_placement_params", None))
    return dict(device_map), {k: int(v) for k, v in caps.items()}

# %% [markdown]
# Checked against transformers' (private) function, and against section 4's `plan`:

# %%
from transformers.integrations.accelerate import _get_device_map

two_24 = {0: 24 * 2**30, 1: 24 * 2**30}
mine, caps = place(llama70, quantizer, two_24)
with quiet_planning():
    theirs = _get_device_map(llama70, "auto", dict(two_24), quantizer)
print("caps after balancing and the 90% cut (GiB):", {k: round(v / 2**30, 2) for k, v in caps.items()})
print("same as transformers' _get_device_map:", mine == theirs)
print("same as helpers.planner.plan:", mine == plans[("llama-2-70b", "nf4", 2, 24)].device_map)
assert mine == theirs == plans[("llama-2-70b", "nf4", 2, 24)].device_map, "the plan should be transformers' own"

# %% [markdown]
# And against `from_pretrained` itself, on the real checkpoint of section 1: we wrap the function it
# calls to place modules, so we can read the map it computed. With a budget too small for the whole
# 4-bit model (room for what is not a decoder layer and for half of the layers, in 4-bit sizes),
# `from_pretrained` then refuses to load a bitsandbytes model with modules on the CPU or disk
# (notebook 08, case 9), after it has computed its map, and before loading any weight. The refusal
# is shown whole: its remedy is at its end.

# %%
import transformers.integrations.accelerate as hf_accelerate

small_model, qsmall = prepare(config, qconfig)
small_sizes, _ = hf_module_sizes(small_model, qsmall)
small_layers = [n for n, m in small_model.named_modules() if type(m).__name__ in small_model._no_split_modules]
room = (small_sizes[""] - sum(small_sizes[n] for n in small_layers)
        + len(small_layers) // 2 * small_sizes[small_layers[0]])
SMALL = {0: room, "cpu": room} if N_GPUS else {"cpu": room}
seen = {}
original = hf_accelerate.infer_auto_device_map


def recording_infer_auto_device_map(*args, **kwargs):
    seen["map"] = original(*args, **kwargs)
    return seen["map"]


hf_accelerate.infer_auto_device_map = recording_infer_auto_device_map
try:
    with quiet_planning():
        refused(lambda: AutoModelForCausalLM.from_pretrained(path, quantization_config=qconfig, dtype=torch.bfloat16,
                                                             device_map="auto", max_memory=dict(SMALL)),
                ValueError)
finally:
    hf_accelerate.infer_auto_device_map = original

# %% [markdown]
# The remedy it names is real, but it does not do what the message says. In transformers 5.24
# (`quantizers/quantizer_bnb_4bit.py`) `llm_int8_enable_fp32_cpu_offload=True` acts in two places:
# - `_process_model_before_weight_loading`: with a `device_map` **dict**, the modules the dict maps to
#   `"cpu"` or `"disk"` are added to the modules it does not convert. They stay unquantized in the load
#   dtype (`dtype=`, bf16 here), not float32.
# - `validate_environment`: the flag switches the refusal above off.
#
# With `device_map="auto"` the first step sees the string `"auto"` (the map is computed later, in
# `_get_device_map`), so it keeps nothing unquantized; the refusal, checked on the computed map, is
# off all the same. Both, on the meta model prepared as `from_pretrained` prepares it, with the flag:

# %%
flagged = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=torch.bfloat16,
                             llm_int8_enable_fp32_cpu_offload=True)
flag_model, flag_quantizer = prepare(config, flagged)  # preprocess_model with device_map="auto", as from_pretrained


def n_4bit(m):
    return sum(type(x).__name__ == "Linear4bit" for x in m.modules())


say(f"4-bit layers with the flag and 'auto': {n_4bit(flag_model)} (without the flag: {n_4bit(small_model)}); "
    f"modules not converted: {sorted(flag_quantizer.modules_to_not_convert)} (without the flag: "
    f"{sorted(qsmall.modules_to_not_convert)})")
offloaded = sorted({str(d) for d in seen["map"].values()} & {"cpu", "disk"})
flag_quantizer.validate_environment(device_map=seen["map"])  # the map from_pretrained computed above: no error
say(f"validate_environment on from_pretrained's map, which has {' and '.join(offloaded)} entries: no refusal")
assert n_4bit(flag_model) == n_4bit(small_model) and offloaded, "with 'auto' the flag converts the same layers"

# %% [markdown]
# So with `"auto"` the flag lets 4-bit layers go to the CPU or the disk, which is not what the message
# promises. Tried while this notebook was written (not run here: a 4-bit load of the checkpoint takes
# 10 s or more on 2 cores), on a CPU-only machine with transformers 5.24, accelerate 1.15 and
# bitsandbytes 0.50: the bundled model loads with this budget and the flag, runs its first forward
# pass, and fails at the second with `NotImplementedError: Cannot copy out of meta tensor; no data!`.
# The remedy works with a `device_map` dict: notebook 08, case 9, runs it and measures it.
#
# `prepare` and `place` on the same config give the map `from_pretrained` computed:

# %%
planned, _ = place(small_model, qsmall, SMALL)
print("devices in from_pretrained's map:", sorted(set(map(str, seen["map"].values()))))
print("our plan equals from_pretrained's map:", planned == seen["map"])
assert planned == seen["map"], "prepare + place should reproduce from_pretrained's map"

# %% [markdown]
# ### Where transformers' accounting differs from the real bytes
#
# 1. **It counts 0.5 byte per 4-bit weight.** bitsandbytes also stores one float32 scale (`absmax`)
#    per block of 64 weights: 4/64 = 0.0625 byte more per weight (about 0.016 with double
#    quantization, which quantizes the scales too). Measured on one real weight matrix of the checkpoint
#    of section 1, quantized by bitsandbytes itself:

# %%
import bitsandbytes.functional as bnbF
from safetensors import safe_open

# the first weight the quantizer turned 4-bit, read from the checkpoint
name = next(n for n, m in small_model.named_modules() if type(m).__name__ == "Linear4bit") + ".weight"
index = os.path.join(path, "model.safetensors.index.json")
if os.path.exists(index):  # a sharded checkpoint: the index says which shard holds the tensor
    with open(index) as f:
        shard = json.load(f)["weight_map"][name]
else:
    shard = "model.safetensors"
with safe_open(os.path.join(path, shard), framework="pt") as f:
    w = f.get_tensor(name).to(torch.bfloat16)
for double in (False, True):
    packed, state = bnbF.quantize_4bit(w, blocksize=64, quant_type="nf4", compress_statistics=double)
    scales = state.absmax.numel() * state.absmax.element_size()
    if double:
        scales += state.state2.absmax.numel() * state.state2.absmax.element_size()
    real = (packed.numel() * packed.element_size() + scales) / w.numel()
    say(f"{name} {tuple(w.shape)}, double quant {double!s:<5}: {real:.4f} bytes/weight (transformers counts 0.5000)")

# %% [markdown]
# On the whole 70B plan that is a couple of GiB per GPU:

# %%
p70 = plans[("llama-2-70b", "nf4", 2, 24)]
for dev, n in p70.bytes_per_device.items():
    print(f"GPU {dev}: transformers counts {n / 2**30:.2f} GiB, "
          f"with the scales {p70.true_bytes_per_device[dev] / 2**30:.2f} GiB")

# %% [markdown]
# 2. **It cuts each budget to 90%** (`adjust_max_memory`: room for buffers made while quantizing). This
#    hides the first error on big GPUs, but it also means a model can be refused although its bytes
#    fit:

# %%
say({k: f"{v / 2**30:.1f} GiB" for k, v in quantizer.adjust_max_memory({0: 24 * 2**30, 1: 80 * 2**30}).items()})

total7 = plan("llama-2-7b", "nf4", 1, 80).total_bytes
gpu_gib = round(total7 / 2**30 + 0.2, 1)
tight = plan("llama-2-7b", "nf4", 1, gpu_gib, "sequential")
say(f"llama-2-7b NF4: {total7 / 2**30:.2f} GiB of weights (transformers' count) on one {gpu_gib} GiB GPU: "
      f"bytes fit: {total7 < gpu_gib * 2**30}, every module placed on the GPU: {tight.on_gpus}")

# %% [markdown]
# Neither figure holds the KV cache, the activations or the CUDA context. `plan`'s verdict adds them:
# the KV cache for its `context` and `batch`, a per-GPU reserve, and the peaks of prefill and loading
# (notebook 05 writes each term out).
#
# **Self-check.** Using the table in section 4, which setups would let you serve the 70B shape in
# NF4? (Notebook 05 asks the next questions: for how long a context, how many sequences at once, and what
# does a model that does not fit cost per token?)

# %% [markdown]
# ## Clean up
#
# Remove the offload folder this notebook made (and nothing else).

# %%
del model
shutil.rmtree(OFFLOAD)
print("offload folder removed:", not OFFLOAD.exists())

# %% [markdown]
# ## Summary
#
# 1. The manual recipe works on transformers 5 with two changes: `dtype=` instead of `torch_dtype=`,
#    and `tie_weights()` after `init_empty_weights()` (and, as ever, `eval()` for a model built from
#    its config). `infer_auto_device_map` with per-device
#    `max_memory` and the model's `_no_split_modules` gives the map; `load_checkpoint_in_model` and
#    `dispatch_model` load and hook it; the dispatched model generates the same tokens as the whole one.
# 2. `max_memory` keys are GPU ids, `"cpu"` and `"disk"` (unlimited, always last); `GiB` (in any
#    case, `"24Gib"` too) is 2^30, `GB` 10^9, and `Gb`/`gb` (a lowercase final `b` without the `i`)
#    means bits. The pre-flight check reads `max_memory` the same way (`helpers.budgets.parse_budget`),
#    warns about bits and refuses `"cuda:0"` keys and a string instead of a dict, naming the fix.
# 3. `sequential` fills GPU 0 first; `balanced` (= `"auto"`) spreads the model with a margin
#    (transformers' `get_balanced_memory`, which `from_pretrained` uses, can give a larger one than
#    accelerate's function of the same name, and so another map); `balanced_low_0` keeps GPU 0 light,
#    and needs GPU ids without gaps (`{0: ..., 2: ...}` fails with `KeyError: 1`).
# 4. Plans for any GPUs run on the meta device in a fraction of a second; for 4-bit, prepare the meta
#    model with transformers' quantizer: only its Linear layers shrink (not the head, nor what is tied to
#    it), and what is not quantized keeps the load dtype.
# 5. transformers counts 0.5 byte per 4-bit weight (the real cost is 0.5625, or about 0.516 with
#    double quantization) and plans with 90% of each budget; check maps with the pre-flight check.
#
# ## Exercises
#
# 1. Plan `llama-2-13b` in bf16 on 2 x 24 GiB. Does it fit? What is the smallest GPU memory (in whole
#    GiB) at which it fits on two GPUs, with `plan`'s default room for the KV cache (4,096 tokens,
#    batch 1) and the reserve? Put your answer in `smallest_gib` below and run the check.
# 2. In section 1.3, give the main device room for the whole model (`MAX_MEMORY[MAIN] = 2 * sizes[""]`)
#    instead. What does the map look like, and does `dispatch_model` still add hooks? *Self-check:*
#    `len(set(device_map.values())) == 1` and `hasattr(model.get_submodule(layers[0]), "_hf_hook")` is False.
# 3. Plan `llama-2-70b` in `int8` on 4 x 24 GiB and compare it with NF4. *Self-check:* take the embedding
#    and the head away (the same bytes in both): what is left of the int8 plan's `total_bytes` is twice
#    what is left of the NF4 one (1 byte against 0.5 per weight, as transformers counts them).
# 4. Write a map by hand for the model of section 1 that puts the `mlp` of one decoder layer (the cell
#    below prints which) on another device than the rest of that layer, every other module somewhere too,
#    and put it in `cut_map` below. The check runs `preflight` on it: its report should have one
#    `no-split-cut` finding, for that layer, and the part should sit apart from the rest of the layer.

# %%
smallest_gib = None  # exercise 1: a whole number of GiB per GPU
cut_map = None       # exercise 4: a dict {module name: device} for the model of section 1

CUT_LAYER = layers[len(layers) // 2]  # exercise 4's decoder layer
parts = [n for n, _ in small_model.get_submodule(CUT_LAYER).named_children()]
PART = "mlp" if "mlp" in parts else parts[-1]  # the part exercise 4 moves (every model here names one mlp)
say(f"exercise 4's layer: {CUT_LAYER} | its parts: {parts} | the part to move: {PART}")

# %%
def fits(g):
    """Whether llama-2-13b in bf16 fits two GPUs of `g` GiB."""
    return "fits" if plan("llama-2-13b", "bf16", 2, g).fits else "does not fit"


weights_13b = plan("llama-2-13b", "bf16", 2, 80).total_bytes
bytes_only = -(-weights_13b // (2 * 2**30))  # the mistake: room for the weights alone, no KV cache nor reserve
smallest = next(g for g in range(bytes_only, 200) if fits(g) == "fits")
_ = check_answer(smallest_gib, lambda g: fits(g) == "fits" and fits(g - 1) != "fits",
                 lambda g: f"it fits on 2 x {g} GiB and not on one GiB less.",
                 lambda g: f"on 2 x {g} GiB it {fits(g)}, on 2 x {g - 1} GiB it {fits(g - 1)}.",
                 "try plan('llama-2-13b', 'bf16', 2, g).fits for a few g.",
                 wrong_example=bytes_only if bytes_only != smallest else smallest + 1, label="Exercise 1")

# %%
section1 = prepare(config)[0]  # the model of section 1, on the meta device


def device_in(m, name):
    """The device map `m` gives a parameter: that of the longest key that prefixes its name (None: unplaced)."""
    keys = [k for k in m if k in ("", name) or name.startswith(k + ".")]
    return m[max(keys, key=len)] if keys else None


def devices_of(m, in_part):
    """The devices `m` gives CUT_LAYER's parameters in PART (in_part=True) or in the rest of the layer."""
    return {device_in(m, n) for n, _ in section1.get_submodule(CUT_LAYER).named_parameters(prefix=CUT_LAYER)
            if n.startswith(f"{CUT_LAYER}.{PART}.") == in_part}

# %%
def what_is_off(m):
    """'' when map `m` cuts CUT_LAYER's PART from the rest of it and places everything; else what is off."""
    kinds = preflight(section1, m).kinds()
    part, rest = devices_of(m, True), devices_of(m, False)
    if "unplaced" in kinds or None in part | rest:
        return "some modules have no device: start from {'': 0} so that everything is placed."
    if part & rest:
        return f"{CUT_LAYER}.{PART} shares a device with the rest of {CUT_LAYER}: give it a device of its own."
    if kinds.count("no-split-cut") != 1:
        return f"the check found {kinds}: cut only {CUT_LAYER}."
    return ""


other = layers[0] if layers[0] != CUT_LAYER else layers[-1]  # the slip: the part of another layer
_ = check_answer(cut_map, lambda m: not what_is_off(m),
                 f"the check reports one no-split-cut, {CUT_LAYER}: its {PART} on one device, the rest on another.",
                 what_is_off, f"start from {{'': 0}}, then add '{CUT_LAYER}.{PART}': 1.",
                 wrong_example={"": 0, f"{other}.{PART}": 1} if other != CUT_LAYER else {"": 0}, label="Exercise 4")

# %% [markdown]
# ## Further reading
#
# - [accelerate: big model inference](https://huggingface.co/docs/accelerate/usage_guides/big_modeling):
#   the guide this recipe comes from (`init_empty_weights`, `load_checkpoint_and_dispatch`, device maps).
# - [accelerate: the `infer_auto_device_map` / `dispatch_model` reference](https://huggingface.co/docs/accelerate/package_reference/big_modeling):
#   every argument of the functions used here.
# - [transformers: big model loading](https://huggingface.co/docs/transformers/main/en/big_models):
#   `device_map`, `max_memory` and offload in `from_pretrained`.
# - [transformers: bitsandbytes quantization](https://huggingface.co/docs/transformers/main/en/quantization/bitsandbytes):
#   `BitsAndBytesConfig`, CPU offload of quantized models.
# - [QLoRA paper (Dettmers et al., 2023)](https://arxiv.org/abs/2305.14314): NF4, blocks of 64 and
#   double quantization, the source of the 0.5625 and 0.516 bytes per weight.
