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
# # Dispatch a checkpoint you can't load whole
#
# Loading a model whole puts all of its weights in the memory of the device you load it to; section 1
# measures how much that takes. For a model bigger than your GPU, or your RAM, that is a dead end.
# accelerate's big-model inference avoids it: build the model **empty** on the meta device, decide
# where each part goes (GPUs, CPU RAM, disk), then stream the checkpoint straight there. Parts that
# live on the CPU or disk are brought to the main device layer by layer, at every forward pass, by
# hooks. This notebook does all of it on the bundled model (or the one you pass as `MODEL`), watches
# the hooks at work, checks that the result generates exactly what the model loaded whole does, and
# measures what offload costs.
#
# **What you'll learn**
# 1. What the meta device is, and how `init_empty_weights` builds a model that takes almost no memory.
# 2. Why a model with tied embeddings needs `tie_weights()` after that (and every model `eval()`).
# 3. How `load_checkpoint_and_dispatch` loads with `device_map="auto"` and with an explicit
#    `max_memory`, offloading part of the model to disk, and how to read the map it used.
# 4. Which hooks accelerate adds and what they do at each forward pass.
# 5. What offload costs: the time per token with none, some and all of the decoder layers on disk,
#    against what this machine's memory could deliver.
#
# **What you'll need**: notebook 00 done (it builds the bundled model). A CPU is enough. On a machine
# without a GPU the main device is the CPU, so "offload" here means **disk** offload; offloading to
# CPU RAM only exists when a GPU is the main device (notebook 06 reads its cost from the GPU reference
# runs). About 35 s on an idle 2-core CPU, most of it in section 7's timings.

# %% tags=["parameters"]
# The model: "bundled" (SmolLM2-135M-Instruct, offline), a local checkpoint directory, or a hub id.
MODEL = "bundled"
# The dtype the model is loaded in.
DTYPE = "bfloat16"

# %%
import gc
import inspect
import json
import os
import shutil
import statistics
import textwrap
import time

import accelerate
import matplotlib.pyplot as plt
import psutil
import torch
import transformers
from accelerate import infer_auto_device_map, init_empty_weights, load_checkpoint_and_dispatch
from accelerate.utils import compute_module_sizes
from safetensors import safe_open
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

from helpers.checkpoints import offload_folder, resolve_model
from helpers.exercises import check_answer
from helpers.measure import decode_limit, memory_bandwidth, rate_text
from helpers.preflight import preflight
from helpers.quiet import silence_known_warnings

# routine library messages and, in quiet runs only, accelerate's loading bar: see helpers/quiet.py
silence_known_warnings()

# %%
path = resolve_model(MODEL)
dtype = getattr(torch, DTYPE)
N_GPUS = torch.cuda.device_count()
MAIN = 0 if N_GPUS else "cpu"  # the main device: where layers run and inputs go
print("main device:", MAIN, "| offload to:", "CPU RAM or disk" if N_GPUS else "disk (the CPU is the main device)")


def rss():
    """Resident memory of this process in bytes: what it holds in RAM."""
    return psutil.Process().memory_info().rss


def mib(n):
    """Bytes as MiB, one decimal."""
    return f"{n / 2**20:.1f}"


def say(*parts):
    """print(*parts), wrapped at words: 107 characters a line, what a JupyterLab output line holds."""
    print(textwrap.fill(" ".join(map(str, parts)), 107, subsequent_indent="  "))

# %%
# NBVAL_IGNORE_OUTPUT
# the machine and versions behind this notebook's timings
say(f"torch {torch.__version__}, transformers {transformers.__version__}, accelerate {accelerate.__version__}, "
    f"{os.cpu_count()} CPU cores, {N_GPUS} GPU(s)" + (f": {torch.cuda.get_device_name(0)}" if N_GPUS else ""))

# %% [markdown]
# ## 1. The meta device: shapes without bytes
#
# A tensor on the `meta` device has a shape and a dtype but no storage. Operations on it compute the
# result's shape (so a whole model can be "run" for its shapes), but there is nothing to read:

# %%
big = torch.empty(50_000, 50_000, device="meta")
print(big.shape, big.dtype, f"| would take {big.numel() * big.element_size() / 2**30:.1f} GiB")
print("a product on meta:", (big @ big).shape)
try:
    big.cpu()
except NotImplementedError as e:
    print(f"{type(e).__name__}: {e}")

# %% [markdown]
# `init_empty_weights()` makes every parameter created inside it a meta tensor. Build the model from
# its config that way, and measure the process's resident memory (RSS) before and after. The first
# build imports the model's code, so we build once before measuring.

# %%
config = AutoConfig.from_pretrained(path)
with init_empty_weights():
    AutoModelForCausalLM.from_config(config, dtype=dtype)  # warm-up: imports the model code
gc.collect()

rss_before = rss()
with init_empty_weights():
    empty = AutoModelForCausalLM.from_config(config, dtype=dtype)
rss_empty = rss() - rss_before
# the model declares which parameters are copies of another ({"lm_head.weight": "model.embed_tokens.weight"}
# for a tied head): the empty model has lost those ties (section 2), so count each tied pair once
TIES = dict(empty.all_tied_weights_keys)
would_take = sum(p.numel() * p.element_size() for n, p in empty.named_parameters() if n not in TIES)

# %%
# NBVAL_IGNORE_OUTPUT
# RSS depends on the machine and the allocator
print(f"empty model: +{mib(rss_empty)} MiB of RSS; its weights would take {mib(would_take)} MiB in {DTYPE}")

# %%
print("parameters on the meta device:", sum(p.device.type == "meta" for p in empty.parameters()),
      "of", len(list(empty.parameters())))
print("buffers stay real:", {n: str(b.device) for n, b in empty.named_buffers()})
assert rss_empty < 0.05 * would_take, "the empty model should cost almost nothing"

# %% [markdown]
# `init_empty_weights()` leaves buffers on the CPU (`include_buffers=False`): buffers such as a rotary
# embedding's `inv_freq` are computed from the config, not read from the checkpoint, and are small.
#
# For comparison, the same model loaded whole with `from_pretrained`. We keep it: it is the reference
# that every dispatched model below must match token for token. The memory it took is measured where
# the weights go: the process's RSS on a CPU, the GPUs' allocated memory (its peak) on a GPU machine.

# %%
gpu_before = sum(torch.cuda.memory_allocated(i) for i in range(N_GPUS))
for i in range(N_GPUS):
    torch.cuda.reset_peak_memory_stats(i)
rss_before = rss()
whole = AutoModelForCausalLM.from_pretrained(path, dtype=dtype, device_map="auto")
rss_whole = rss() - rss_before
gpu_peak = sum(torch.cuda.max_memory_allocated(i) for i in range(N_GPUS)) - gpu_before
tokenizer = AutoTokenizer.from_pretrained(path)
messages = [{"role": "user", "content": "What is the capital of France?"}]
inputs = tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_tensors="pt",
                                       return_dict=True).to(MAIN)
NEW_TOKENS = 16
with torch.inference_mode():
    reference = whole.generate(**inputs, max_new_tokens=NEW_TOKENS, do_sample=False)
say(repr(tokenizer.decode(reference[0, inputs["input_ids"].shape[1]:], skip_special_tokens=True)))

# %%
# NBVAL_IGNORE_OUTPUT
# memory measured on this machine: RSS on a CPU, the GPUs' peak on a GPU machine
took, where = (gpu_peak, "GPU memory at its peak") if N_GPUS else (rss_whole, "RSS")
say(f"loaded whole: +{mib(took)} MiB of {where} for {mib(would_take)} MiB of weights in {DTYPE}: "
    f"{took / would_take:.1f} x the weights (the empty model: +{mib(rss_empty)} MiB of RSS)")
say("about once the weights: transformers 5 builds the model on the meta device first (as init_empty_weights "
    "did above) and reads the checkpoint into it; but all of it lands in one place." if took < 1.5 * would_take else
    "more than the weights: the memory measured also counts what the load touched and the process still holds "
    "(the checkpoint's mapped pages, the allocator's free blocks).")

# %% [markdown]
# **Self-check.** What does `empty.get_input_embeddings().weight.sum()` return, and why can't you print
# its values? (It returns a meta tensor: the sum's shape, with no value to show.)

# %% [markdown]
# ## 2. Tied weights: why `tie_weights()` matters
#
# SmolLM2, the bundled model, uses the same matrix for its input embedding and its output head
# (`tie_word_embeddings`). Its checkpoint stores it once, under `model.embed_tokens.weight`: there is no
# `lm_head.weight` key. `from_pretrained` ties the two parameters; a model built inside
# `init_empty_weights()` is not tied. The model in use here:

# %%
index = os.path.join(path, "model.safetensors.index.json")  # a sharded checkpoint lists its keys here
if os.path.exists(index):
    with open(index) as f:
        keys = set(json.load(f)["weight_map"])
else:  # one file: its header lists them
    with safe_open(os.path.join(path, "model.safetensors"), framework="pt") as f:
        keys = set(f.keys())
say("config.tie_word_embeddings:", config.tie_word_embeddings, "| the model declares the ties:", TIES)
for copy in TIES:
    print(f"{copy!r} in the checkpoint:", copy in keys)
print("empty model tied:", empty.get_output_embeddings().weight is empty.get_input_embeddings().weight,
      "| loaded whole tied:", whole.get_output_embeddings().weight is whole.get_input_embeddings().weight)
if not TIES:
    say("This model declares no tie (its head has weights of its own), so nothing below can lose one: "
        "section 2's failures need a tied model such as the bundled one.")

# %% [markdown]
# Untied, the head of a tied model is a second, separate meta tensor. Three things then go wrong:
# accelerate counts the head twice when sizing the model, a device map may put the two on different
# devices, and, since the checkpoint has no key for the head, nothing ever fills it. The pre-flight
# check sees it before anything loads, from what the model declares:

# %%
print(f"size as accelerate counts it: {mib(compute_module_sizes(empty)[''])} MiB "
      f"(the weights: {mib(would_take)} MiB)")
print(preflight(empty, {"": MAIN}, checkpoint=path, mode="run"))

# %% [markdown]
# And loading anyway fails at the end, when accelerate moves the model to its device and finds a head
# with no data (a model without ties loads):

# %%
# accelerate warns first, on stderr: "The model weights are not tied. Please use the `tie_weights` method ...":
# the lost tie of section 2, noticed while it plans; it loads anyway, and fails
try:
    load_checkpoint_and_dispatch(empty, path, device_map={"": MAIN}, dtype=dtype)
    print("loaded: this model has no tie to lose" if not TIES else "loaded, although a tie was lost")
except NotImplementedError as e:
    say(f"{type(e).__name__}: {e}")
del empty
_ = gc.collect()

# %% [markdown]
# The fix is one call after building the empty model. It makes the head the embedding's parameter
# again, so it is counted, placed and loaded once. One more call matters for every model built from
# its config: `from_config` returns it in training mode, with dropout on (GPT-2's config sets a dropout
# of 0.1), while `from_pretrained` calls `model.eval()` (`modeling_utils.py`); a model built empty
# must be put in eval mode too, or it will not generate what the model loaded whole does. The three
# steps, as a function the rest of the notebook uses:

# %%
def empty_model():
    """The model built empty on the meta device, tied and in eval mode: ready to plan and load."""
    with init_empty_weights():
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    model.tie_weights()  # the head is the embedding's parameter again (a no-op for a model without ties)
    return model.eval()  # dropout off, as from_pretrained leaves a model


model = empty_model()
print("tied:", model.get_output_embeddings().weight is model.get_input_embeddings().weight,
      f"| size as accelerate counts it: {mib(compute_module_sizes(model)[''])} MiB")
assert preflight(model, {"": MAIN}, checkpoint=path, mode="run").ok

# %% [markdown]
# ## 3. `load_checkpoint_and_dispatch` with `device_map="auto"`
#
# With `device_map="auto"`, accelerate looks at the memory of each device it can use (every GPU, then
# CPU RAM; the disk takes what is left), computes a map, loads each shard of the checkpoint straight
# onto its device, and dispatches the model. With several GPUs, `"auto"` first **balances** the model
# over them (`get_balanced_memory` caps each GPU near an equal share), so even a model that would fit
# on GPU 0 alone is divided between the GPUs; with one GPU (or none) it fills that GPU (or the CPU)
# before it uses anything else. `no_split_module_classes` names the blocks it must keep whole (the
# decoder layers: notebook 03 explains why).
#
# The map it used is `model.hf_device_map`, a plain dict `{module name: device}`; a name covers every
# module under it, and `""` covers the whole model. Two small functions read it:

# %%
def device_of(name, device_map):
    """The device of a module or tensor: that of the longest map key that is a prefix of its name."""
    parts = name.split(".")
    for i in range(len(parts), -1, -1):  # "model.layers.3.mlp", "model.layers.3", ..., "" (the whole model)
        if ".".join(parts[:i]) in device_map:
            return device_map[".".join(parts[:i])]
    return None


def show_map(device_map):
    """Print a device map's keys grouped by device."""
    groups = {}
    for name, dev in device_map.items():
        groups.setdefault(dev, []).append(repr(name))
    for dev, names in groups.items():
        shown = ", ".join(names) if len(names) <= 4 else f"{names[0]}, {names[1]}, ..., {names[-1]}"
        print(f"{dev!r:>6}: {len(names):>2} key(s): {shown}")

# %%
model = load_checkpoint_and_dispatch(model, path, device_map="auto", no_split_module_classes=model._no_split_modules,
                                     dtype=dtype)
show_map(model.hf_device_map)
hooked = sum(hasattr(m, "_hf_hook") for m in model.modules())
with torch.inference_mode():
    out = model.generate(**inputs, max_new_tokens=NEW_TOKENS, do_sample=False)
assert torch.equal(out, reference), "the dispatched model should generate the reference tokens"
print("same tokens as the model loaded whole")

# %%
# printed from the map above, which depends on the machine: one device on a CPU or one GPU, two on two GPUs
devices = sorted(set(model.hf_device_map.values()), key=str)
if len(devices) == 1:
    print(f"One device, {devices[0]!r}, holds the whole model: dispatch_model "
          + ("only moved it there, with no hooks." if not hooked else f"added {hooked} hooks."))
else:
    say(f"{len(devices)} devices share the model: dispatch_model added {hooked} hooks, which move the "
        "activations from one device to the next (section 5).")
del model
_ = gc.collect()

# %% [markdown]
# **Reading the map where there is no `hf_device_map`.** accelerate's `dispatch_model` always sets
# `model.hf_device_map`. `from_pretrained` sets it only when the map spans several devices or offloads:
# our `whole` model (loaded with `device_map="auto"` too) has one on a machine with several GPUs, where
# it is split between them, and none where it went to a single device (the CPU, or one GPU). There, read
# the device of its parameters instead:

# %%
print("whole has hf_device_map:", hasattr(whole, "hf_device_map"))
print("its parameters are on:", sorted({str(p.device) for p in whole.parameters()}))
first = next(whole.parameters()).device
whole_map = getattr(whole, "hf_device_map", None) or {"": first.index if first.type == "cuda" else first.type}
show_map(whole_map)

# %% [markdown]
# ## 4. An explicit `max_memory`: part of the model is offloaded
#
# Now pretend the main device has room for only about half of the decoder layers: give it a budget
# with `max_memory`, computed from the model's own sizes so that it works for any model: everything
# that is not a decoder layer (embedding, head, norms), half of the layers, and one layer more, because
# accelerate keeps room on the main device for the largest offloaded layer, which is brought there at
# each forward pass. What does not fit goes to the next device: CPU RAM on a GPU machine (as far as
# its budget allows), then `"disk"`: into an **offload folder**, which must be given. This folder is
# the notebook's own, made fresh under the workbook's cache and removed at the end.

# %%
model = empty_model()
sizes = compute_module_sizes(model)  # bytes of each module (and of "", the whole model), a tied weight once
layers = [n for n, m in model.named_modules() if type(m).__name__ in model._no_split_modules]
N_LAYERS, LAYER = len(layers), max(sizes[n] for n in layers)
rest = sizes[""] - sum(sizes[n] for n in layers)  # what is not a decoder layer
budget = rest + (N_LAYERS // 2 + 1) * LAYER
# On a GPU: GPU 0 gets that budget, CPU RAM room for about a quarter of the layers (CPU offload), the
# rest goes to disk; other GPUs get nothing (a device missing from max_memory is not used). Without a
# GPU: the CPU (the main device) gets that budget, the rest goes to disk.
MAX_MEMORY = {0: budget, "cpu": (N_LAYERS // 4 + 1) * LAYER} if N_GPUS else {"cpu": budget}
print(f"{N_LAYERS} decoder layers of {mib(LAYER)} MiB, {mib(rest)} MiB besides them:",
      {dev: f"{mib(n)} MiB" for dev, n in MAX_MEMORY.items()})

# %% [markdown]
# First compute the map the same way `load_checkpoint_and_dispatch` will, and check it before loading
# (run mode: every device in it must exist here).

# %%
OFFLOAD = offload_folder("02-dispatch")  # a new, empty folder of ours: removed at the end

# accelerate converts the size strings of the dict it is given in place: pass it a copy
planned = infer_auto_device_map(model, max_memory=dict(MAX_MEMORY), no_split_module_classes=model._no_split_modules)
report = preflight(model, planned, MAX_MEMORY, mode="run", checkpoint=path)
print(report)
assert report.ok and "disk" in report.bytes_per_device, "the budget should send part of the model to disk"

# %%
model = load_checkpoint_and_dispatch(model, path, device_map="auto", max_memory=dict(MAX_MEMORY),
                                     no_split_module_classes=model._no_split_modules, dtype=dtype,
                                     offload_folder=OFFLOAD / "max-memory")
assert model.hf_device_map == dict(planned), "load_checkpoint_and_dispatch used the map we checked"
show_map(model.hf_device_map)
for dev in dict.fromkeys(model.hf_device_map.values()):
    on_it = [n for n in layers if device_of(n, model.hf_device_map) == dev]
    print(f"decoder layers on {dev!r}: {len(on_it)} of {N_LAYERS}")

# %% [markdown]
# What is in the offload folder: one `.dat` file per offloaded tensor (a raw array, read with numpy's
# memory map) and an `index.json` with each tensor's dtype and shape. Note the dtype: accelerate writes
# the tensors **as the checkpoint stores them**, not in the `dtype` we asked for; they are converted
# each time they are read back. The cell says what that means for the bytes on disk, for this
# checkpoint:

# %%
folder = OFFLOAD / "max-memory"
offload_index = json.loads((folder / "index.json").read_text())
on_disk = sum(f.stat().st_size for f in folder.glob("*.dat"))
stored = sorted({v["dtype"] for v in offload_index.values()})
FILE_RATIO = on_disk / report.bytes_per_device["disk"]  # bytes in the files per byte of weights in DTYPE
print(f"{len(offload_index)} tensors offloaded, dtypes in the index: {stored}")
say(f".dat files: {mib(on_disk)} MiB | the same tensors in {DTYPE}: {mib(report.bytes_per_device['disk'])} MiB: "
    f"the disk holds, and every forward reads, {FILE_RATIO:.1f} x the bytes of the {DTYPE} weights")

# %% [markdown]
# ## 5. The hooks: what happens at each forward pass
#
# `dispatch_model` wraps the `forward` of modules with an `AlignDevicesHook` (the original is kept as
# `module._old_forward`; the hook is `module._hf_hook`). Which module gets which hook:

# %%
def describe_hook(name):
    hook = getattr(model.get_submodule(name), "_hf_hook", None)
    label = name or "(the model)"
    if hook is None:
        return f"{label:<34} no hook"
    return f"{label:<34} {type(hook).__name__}: {hook.execution_device!r}, {hook.offload}, {hook.io_same_device}"


module_names = {m: n for n, m in model.named_modules()}
first_disk = next(n for n in layers if device_of(n, model.hf_device_map) == "disk")  # the first layer on disk
leaf_name = next(f"{first_disk}.{n}" for n, m in model.get_submodule(first_disk).named_modules()
                 if getattr(getattr(m, "_hf_hook", None), "offload", False) and getattr(m, "weight", None) is not None
                 and m.weight.dim() == 2)  # its first offloaded weight matrix
print(f"{'module':<34} hook: execution_device, offload, io_same_device")
for name in ["", module_names[model.get_input_embeddings()], layers[0], first_disk, leaf_name,
             module_names[model.get_output_embeddings()]]:
    print(describe_hook(name))

# %% [markdown]
# - **The model** gets a hook with `io_same_device=True`: outputs go back to the device the inputs came from.
# - **Modules in memory**, and each offloaded decoder layer as a whole, get a hook that moves their
#   inputs to their execution device (on several GPUs, this is what carries activations from GPU 0 to
#   GPU 1). Their weights stay where they are.
# - **Offloaded modules** get a hook on each leaf module with `offload=True`. At every forward it
#   1. `pre_forward`: reads the leaf's weights from its `weights_map` (CPU RAM for a module offloaded to
#      the CPU, the offload folder for one on disk) and puts them on the execution device;
#   2. runs the original `forward`;
#   3. `post_forward`: puts the weights back on the meta device, freeing their memory.
#
# Calling the hook's two steps by hand shows the weight appear and vanish:

# %%
leaf = model.get_submodule(leaf_name)
hook = leaf._hf_hook
n_in = leaf.in_features if isinstance(leaf, torch.nn.Linear) else leaf.weight.shape[0]  # GPT-2's Conv1D: (in, out)
x = torch.randn(1, 1, n_in, dtype=dtype, device=MAIN)
print("before pre_forward: ", leaf.weight.device, tuple(leaf.weight.shape))
args, kwargs = hook.pre_forward(leaf, x)
print("after pre_forward:  ", leaf.weight.device, leaf.weight.dtype)
y = leaf._old_forward(*args, **kwargs)
hook.post_forward(leaf, y)
print("after post_forward: ", leaf.weight.device)
assert leaf.weight.device.type == "meta"

# %% [markdown]
# The same happens for every offloaded leaf at every forward pass of every generated token: that is the
# cost we measure in section 7.
#
# **Self-check.** Why must an offloaded module's weights go back to `meta` after its forward? (Otherwise
# after one pass every offloaded layer would be in memory, and the model would no longer fit.)

# %% [markdown]
# ## 6. The dispatched model generates the same tokens
#
# Offload moves bytes, it does not change the arithmetic: greedy decoding must give exactly the tokens
# of the model loaded whole.

# %%
with torch.inference_mode():
    out = model.generate(**inputs, max_new_tokens=NEW_TOKENS, do_sample=False)
say(repr(tokenizer.decode(out[0, inputs["input_ids"].shape[1]:], skip_special_tokens=True)))
assert torch.equal(out, reference), "offloaded and whole models should generate the same tokens"
on_disk_entries = sum(v == "disk" for v in model.hf_device_map.values())
print(f"same {NEW_TOKENS} tokens as the model loaded whole, with {on_disk_entries} map entries on disk")
del model
_ = gc.collect()

# %% [markdown]
# ## 7. What offload costs
#
# Same model, five maps: 0, a quarter, half, three quarters and all of the decoder layers on disk;
# everything else (the embedding, the head, the norms) stays on the main device. We write these maps
# by hand: a map is just a dict. Each is checked and loaded:

# %%
def map_with_layers_on_disk(model, n_on_disk, main=MAIN):
    """Decoder layers: the last n_on_disk on disk, the others on main. Every other module on main."""
    layers = [n for n, m in model.named_modules() if type(m).__name__ in model._no_split_modules]
    layer_list = layers[0].rsplit(".", 1)[0]  # "model.layers"
    parent = layer_list.rsplit(".", 1)[0]  # "model"
    device_map = {c: main for c, _ in model.named_children() if c != parent}  # "lm_head"
    device_map.update({f"{parent}.{c}": main for c, _ in model.get_submodule(parent).named_children()
                       if f"{parent}.{c}" != layer_list})  # "model.embed_tokens", "model.norm", ...
    device_map.update({n: "disk" if i >= len(layers) - n_on_disk else main for i, n in enumerate(layers)})
    return device_map


model = empty_model()
maps = {k: map_with_layers_on_disk(model, k) for k in sorted({round(q * N_LAYERS / 4) for q in range(5)})}
disk_bytes = {}
for k, dm in maps.items():
    check = preflight(model, dm, mode="run", checkpoint=path)
    assert check.ok, check
    disk_bytes[k] = check.bytes_per_device.get("disk", 0)
    print(f"{k:>2} layers on disk: {mib(disk_bytes[k]):>6} MiB of {DTYPE} weights read per forward pass")
print(f"(the .dat files hold {FILE_RATIO:.1f} x those bytes: section 4) | entries of the all-on-disk map:",
      len(maps[N_LAYERS]))
print("e.g.", dict(list(maps[N_LAYERS].items())[:3]))

# %% [markdown]
# Then timed. We time single decoding steps (one forward pass with the KV cache, batch 1: one new
# token each), several per map, **interleaved**: step 1 of every map, then step 2 of every map, and so
# on, so that a busy moment of the machine slows every map alike instead of one of them. One untimed
# round goes first: the first step after all the loads can be many times slower than the next ones.
# Each map's repeats give its median and its spread (fastest to slowest). The ceiling they are set
# against is the machine's: a decoding step reads every weight at least once, so no step can be faster
# than the weights' bytes over the main device's memory bandwidth (`helpers.measure.decode_limit`, with
# the bandwidth measured here by `memory_bandwidth`: a copy of 1 GiB).

# %%
bandwidth = memory_bandwidth(MAIN)  # bytes/s, read + written, of the main device
LIMIT = decode_limit(whole, bandwidth, batch=1, context=inputs["input_ids"].shape[1])  # tokens/s at most
KV = "cache" if "cache" in inspect.signature(type(whole).forward).parameters else "past_key_values"  # 5.24: cache


def sync():
    """Wait for the GPU (a no-op on a CPU): the clock must measure finished work."""
    if N_GPUS:
        torch.cuda.synchronize()


@torch.inference_mode()
def decode_step(model, out):
    """One decoding step after `out` (one new token); returns the model's output and the seconds it took."""
    token = out.logits[:, -1:].argmax(-1)
    sync()
    t0 = time.perf_counter()
    out = model(input_ids=token, use_cache=True, **{KV: out[KV]})
    sync()
    return out, time.perf_counter() - t0

# %%
STEPS = 7
loaded, outs = {}, {}
for k, dm in maps.items():
    loaded[k] = load_checkpoint_and_dispatch(empty_model(), path, device_map=dm, dtype=dtype,
                                             offload_folder=OFFLOAD / f"cost-{k}")
    with torch.inference_mode():
        outs[k] = loaded[k](**inputs, use_cache=True)  # the prefill
for k, m in loaded.items():  # one untimed round: the first step after all the loads can be many times slower
    outs[k], _ = decode_step(m, outs[k])
times = {k: [] for k in loaded}
for _ in range(STEPS):
    for k, m in loaded.items():  # interleaved: step i of every map, then step i + 1
        outs[k], seconds = decode_step(m, outs[k])
        times[k].append(seconds)
del loaded, outs
_ = gc.collect()
print("timed:", {k: len(ts) for k, ts in times.items()}, "steps per map")

# %%
# NBVAL_IGNORE_OUTPUT
# timings depend on the machine, its load and its disk cache
ms = {k: [1000 * t for t in ts] for k, ts in times.items()}
say(f"main device: {MAIN}, memory bandwidth {bandwidth / 1e9:.1f} GB/s: no decoding step can take less than "
    f"{1000 / LIMIT:.1f} ms")
for k, ts in times.items():
    med = statistics.median(ts)
    say(f"{k:>2} of {N_LAYERS} on disk: {statistics.median(ms[k]):7.1f} ms/token (repeats {min(ms[k]):.1f} to "
        f"{max(ms[k]):.1f}), {rate_text(1 / med, LIMIT, (1 / max(ts), 1 / min(ts)))}")
none, every = ms[0], ms[N_LAYERS]
low, high = min(every) / max(none), max(every) / min(none)  # the ratio's range over the repeats
verdict = "no measurable difference" if low <= 1 <= high else f"all on disk is {'slower' if low > 1 else 'faster'}"
say(f"time per token, all layers on disk / none: repeats {low:.2f}x to {high:.2f}x, median "
    f"{statistics.median(every) / statistics.median(none):.2f}x: {verdict}")

# %% [markdown]
# Every token reads every offloaded weight again (from the page cache if the files fit in RAM,
# otherwise from the disk itself) and converts it to the model's dtype: nothing is kept between
# tokens. Does each offloaded MiB then add the same time to every token? The cell fits a straight line
# through the medians and gives its slope only if the line passes through the repeats (fastest to
# slowest) of every map; where it does not, it says so and gives only what the repeats support:

# %%
# NBVAL_IGNORE_OUTPUT
# a fit of this machine's timings
xs = [disk_bytes[k] / 2**20 for k in ms]
fit = statistics.linear_regression(xs, [statistics.median(v) for v in ms.values()])
misses = [k for k, x in zip(ms, xs) if not min(ms[k]) <= fit.intercept + fit.slope * x <= max(ms[k])]
LINE_HOLDS = verdict != "no measurable difference" and not misses  # a slope worth reading
per_mib = [(min(every) - max(none)) / xs[-1], (max(every) - min(none)) / xs[-1]]  # none -> all, from the repeats
if LINE_HOLDS:
    say(f"a straight line passes through the repeats of all {len(ms)} maps: {fit.intercept:.1f} ms + "
        f"{fit.slope:.3f} ms per MiB on disk ({fit.slope * LAYER / 2**20:.2f} ms per decoder layer): on this run "
        "each offloaded MiB adds the same time to every token, and the line predicts the maps in between.")
elif verdict == "no measurable difference":
    say("none and all layers on disk show no measurable difference (above): their repeats overlap, so a cost of "
        "zero fits them as well as any, and this run gives no cost per MiB (the offloaded bytes cost less than the "
        "timings vary, or other work on the machine disturbed them): time again on an idle machine.")
else:
    say(f"no straight line passes through the repeats: the least-squares line through the medians misses those "
        f"of {len(misses)} of the {len(ms)} maps ({', '.join(f'{k} layers on disk' for k in misses)}), so this run "
        f"gives no cost per MiB and predicts nothing between the maps. What its repeats do support: all layers "
        f"on disk / none is {low:.2f}x to {high:.2f}x ({verdict}), {per_mib[0]:.2f} to {per_mib[1]:.2f} ms per "
        "offloaded MiB on average between the two. Other work on the same machine changes timings from one "
        "step to the next: time again on an idle machine before you read a cost per MiB from them.")

# %%
# NBVAL_IGNORE_OUTPUT
# a plot of the timings above (machine-dependent)
fig, ax = plt.subplots(figsize=(8.4, 3.6))  # 840 px: JupyterLab shows it unscaled
med = [statistics.median(v) for v in ms.values()]
spread = [[m - min(v) for m, v in zip(med, ms.values())], [max(v) - m for m, v in zip(med, ms.values())]]
ax.errorbar(xs, med, yerr=spread, fmt="o", capsize=4, label="median, bars: fastest to slowest repeat")
if LINE_HOLDS:  # drawn only where it passes through every map's repeats (the cell above)
    ax.plot([0, max(xs)], [fit.intercept, fit.intercept + fit.slope * max(xs)], "--", color="0.4",
            label="straight line through the medians")
ax.set_xlabel(f"weights offloaded to disk (MiB, {DTYPE})")
ax.set_ylabel("time per token (ms)")
ax.set_title(f"Disk offload: time per token, batch 1, {STEPS} interleaved steps per map, main device: {MAIN}")
ax.legend(loc="upper left")
fig.tight_layout()
plt.show()

# %% [markdown]
# On a real big model the bytes per token are gigabytes: disk offload makes a model *run*, not run fast.
# Prefer, in order: a smaller format (notebook 01), more GPUs (notebook 06), CPU offload on a GPU
# machine, and disk offload last.

# %% [markdown]
# ## Clean up
#
# Remove the offload folder this notebook made (nothing else is touched).

# %%
shutil.rmtree(OFFLOAD)
print("offload folder removed:", not OFFLOAD.exists())

# %% [markdown]
# ## Summary
#
# 1. A meta tensor has a shape and dtype but no bytes; `init_empty_weights()` builds a whole model that
#    way for almost no memory.
# 2. A model with tied embeddings built empty is not tied; call `model.tie_weights()` before planning or
#    loading, or the head is counted twice, may be placed apart from the embedding, and is never loaded.
#    And `model.eval()`: `from_config` builds in training mode, with dropout on.
# 3. `load_checkpoint_and_dispatch` loads shard by shard onto a map: `device_map="auto"` fills the free
#    memory; `max_memory` caps each device; what does not fit goes to the next device (CPU RAM on a GPU
#    machine, then an offload folder on disk). Read the map from `hf_device_map` (a dict: the longest
#    key that prefixes a name gives its device), or from the parameters' devices where
#    `from_pretrained` set none.
# 4. accelerate's `AlignDevicesHook`s move inputs to each module's device and, for offloaded modules, load
#    the weights before each forward and drop them after.
# 5. Offload is exact (same tokens) but every token pays for every offloaded byte again; time it with
#    repeats, interleaved, and compare only what lies outside their spread.
#
# ## Exercises
#
# 1. Give the main device a budget of a third of the model's bytes and nothing else
#    (`max_memory={MAIN: would_take // 3}`), and plan the map with `infer_auto_device_map` as in
#    section 4. How many decoder layers stay on the main device? Set `layers_in_memory` below.
# 2. Build the empty model with `with torch.device("meta"):` instead of `init_empty_weights()`. Is the
#    head tied without calling `tie_weights()`? Set `head_tied` to `True` or `False` (test it with
#    `model.get_output_embeddings().weight is model.get_input_embeddings().weight`).
# 3. From section 7's repeats, what is the smallest ratio "time per token with all decoder layers on
#    disk / with none" that they allow? That is the most a claim "offload costs at least ...x" may say.
#    Set `least_ratio`. Then, if section 7 printed a straight line, predict with it the time per token
#    with a third of the layers on disk, and measure it: load `map_with_layers_on_disk(model,
#    N_LAYERS // 3)` and time a few `decode_step`s (where it printed none, there is nothing to predict).
# 4. Load with `dtype=torch.float32` instead. How does the offload folder's size compare with the disk
#    part of the map now? *Self-check:* equal when the checkpoint stores float32 (section 4 printed the
#    dtypes in the offload index).

# %%
layers_in_memory = None  # exercise 1: a whole number
head_tied = None  # exercise 2: True or False
least_ratio = None  # exercise 3: a ratio, e.g. 1.5

# %%
model = empty_model()
plan_third = infer_auto_device_map(model, max_memory={MAIN: would_take // 3},
                                   no_split_module_classes=model._no_split_modules)
kept = sum(device_of(n, plan_third) != "disk" for n in layers)
embedding_on_disk = device_of(next(n for n, m in model.named_modules() if m is model.get_input_embeddings()),
                              plan_third) == "disk"
with torch.device("meta"):
    meta_built = AutoModelForCausalLM.from_config(config, dtype=dtype)
tied_on_meta = meta_built.get_output_embeddings().weight is meta_built.get_input_embeddings().weight
del model, meta_built

check_answer(layers_in_memory, kept,
             f"{kept} of {N_LAYERS}: " + (
                 "the embedding, first in model order, does not fit the budget, so accelerate moves on to the disk "
                 "for it and for everything after it." if embedding_on_disk else
                 "accelerate fills the main device in model order and keeps room on it for the largest layer it "
                 "offloads, so fewer layers fit than the budget alone would hold."),
             "plan on a fresh empty model with tie_weights() called, as in section 4.",
             "count the layers whose device in the plan is not 'disk' (device_of from section 3).",
             wrong_example=kept + 1, label="Exercise 1")  # forgetting the room kept for an offloaded layer
_ = check_answer(head_tied, tied_on_meta,
                 "Under torch.device('meta') the model is built normally, so transformers ties it." if tied_on_meta
                 else "Under torch.device('meta') this model's head is not tied: "
                 + ("call tie_weights()." if TIES else "it declares no tie."),
                 "test `model.get_output_embeddings().weight is model.get_input_embeddings().weight`.",
                 "build it under torch.device('meta') and test the identity.",
                 wrong_example=not tied_on_meta, label="Exercise 2")

# %%
median_ratio = statistics.median(every) / statistics.median(none)  # the mistake: the medians' ratio


def close(answer, value):
    return abs(answer - value) <= 0.01  # section 7 prints ratios with 2 decimals


_ = check_answer(least_ratio, lambda a: close(a, low),
                 f"{low:.2f}x: the fastest repeat with all layers on disk over the slowest with none. "
                 + ("It is above 1: offload is slower beyond the noise." if low > 1 else
                    "It is not above 1: this run cannot claim that offload costs anything."),
                 lambda a: f"{a}x; the repeats allow as little as {low:.2f}x: divide the fastest time with all "
                           "layers on disk by the slowest with none.",
                 "section 7 printed the ratio's range over the repeats.",
                 wrong_example=median_ratio if not close(median_ratio, low) else high + 1, label="Exercise 3")

# %% [markdown]
# ## Further reading
#
# - [accelerate: big model inference](https://huggingface.co/docs/accelerate/usage_guides/big_modeling):
#   the guide to `init_empty_weights`, `load_checkpoint_and_dispatch` and device maps.
# - [accelerate: hooks reference](https://huggingface.co/docs/accelerate/package_reference/big_modeling):
#   `dispatch_model`, `AlignDevicesHook`, `cpu_offload` and `disk_offload`.
# - [PyTorch: the meta device](https://pytorch.org/docs/stable/meta.html): what works on meta tensors and
#   `to_empty()`.
# - [transformers: big model loading](https://huggingface.co/docs/transformers/main/en/big_models):
#   `device_map`, `max_memory` and `offload_folder` in `from_pretrained`.
