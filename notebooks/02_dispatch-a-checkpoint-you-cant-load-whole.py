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
# The usual way to load a model (build it with random weights, then copy the checkpoint in) needs the
# memory for the model at least once, often twice. For a model bigger than your GPU, or your RAM, that
# is a dead end. accelerate's big-model inference avoids it: build the model **empty** on the meta
# device, decide where each part goes (GPUs, CPU RAM, disk), then stream the checkpoint straight
# there. Parts that live on the CPU or disk are brought to the main device layer by layer, at every
# forward pass, by hooks. This notebook does all of it on the bundled model, watches the hooks at work,
# checks that the result generates exactly what the model loaded whole does, and measures what
# offload costs.
#
# **What you'll learn**
# 1. What the meta device is, and how `init_empty_weights` builds a model that takes almost no memory.
# 2. Why a model with tied embeddings needs `tie_weights()` after that.
# 3. How `load_checkpoint_and_dispatch` loads with `device_map="auto"` and with an explicit
#    `max_memory`, offloading part of the model to disk, and how to read the map it used.
# 4. Which hooks accelerate adds and what they do at each forward pass.
# 5. What offload costs: tokens/s with none, half and all of the decoder layers on disk.
#
# **What you'll need**: notebook 00 done (it builds the bundled model). A CPU is enough. On a machine
# without a GPU the main device is the CPU, so "offload" here means **disk** offload; offloading to
# CPU RAM only exists when a GPU is the main device (notebook 04 reads its cost from the GPU reference runs). About 40
# s on an idle 2-core CPU, most of it in section 7's timings.

# %% tags=["parameters"]
# The model: "bundled" (SmolLM2-135M-Instruct, offline), a local checkpoint directory, or a hub id.
MODEL = "bundled"
# The dtype the model is loaded in.
DTYPE = "bfloat16"

# %%
import gc
import json
import os
import shutil

import matplotlib.pyplot as plt
import torch
from accelerate import infer_auto_device_map, init_empty_weights, load_checkpoint_and_dispatch
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

from helpers.checkpoints import offload_folder, resolve_model
from helpers.devicemap import device_label, device_map_of, map_table, placement, plot_device_map
from helpers.hardware import print_report
from helpers.measure import rss_bytes, sync
from helpers.preflight import preflight
from helpers.quiet import silence_known_warnings
from helpers.text import say
from helpers.units import mib

# routine library messages and, in quiet runs only, accelerate's loading bar: see helpers/quiet.py
silence_known_warnings()

path = resolve_model(MODEL)
dtype = getattr(torch, DTYPE)
N_GPUS = torch.cuda.device_count()
MAIN = 0 if N_GPUS else "cpu"  # the main device: where layers run and inputs go
print("main device:", MAIN, "| offload to:", "CPU RAM or disk" if N_GPUS else "disk (the CPU is the main device)")

# %%
# NBVAL_IGNORE_OUTPUT
# the machine and versions behind this notebook's timings
print_report()

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
# `init_empty_weights()` makes every parameter created inside it a meta tensor. Build the bundled model
# from its config that way, and measure the process's resident memory (RSS) before and after. The
# first build imports the model's code, so we build once before measuring.

# %%
config = AutoConfig.from_pretrained(path)
with init_empty_weights():
    AutoModelForCausalLM.from_config(config, dtype=dtype)  # warm-up: imports the model code
gc.collect()

rss_before = rss_bytes()
with init_empty_weights():
    empty = AutoModelForCausalLM.from_config(config, dtype=dtype)
rss_empty = rss_bytes() - rss_before
# bytes of the real (tied) weights: the empty model has lost its tie (section 2), so count the head once
would_take = sum(p.numel() * p.element_size() for n, p in empty.named_parameters()
                 if not (config.tie_word_embeddings and n == "lm_head.weight"))

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
# `init_empty_weights()` leaves buffers on the CPU (`include_buffers=False`): the rotary embedding's
# `inv_freq` is computed from the config, not read from the checkpoint, and is tiny.
#
# For comparison, the same model loaded whole with `from_pretrained`. We keep it: it is the reference
# that every dispatched model below must match token for token.

# %%
rss_before = rss_bytes()
whole = AutoModelForCausalLM.from_pretrained(path, dtype=dtype, device_map="auto")
rss_whole = rss_bytes() - rss_before
tokenizer = AutoTokenizer.from_pretrained(path)
messages = [{"role": "user", "content": "What is the capital of France?"}]
inputs = tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_tensors="pt",
                                       return_dict=True).to(MAIN)
NEW_TOKENS = 16
with torch.inference_mode():
    reference = whole.generate(**inputs, max_new_tokens=NEW_TOKENS, do_sample=False)
print(repr(tokenizer.decode(reference[0, inputs["input_ids"].shape[1]:], skip_special_tokens=True)))

# %%
# NBVAL_IGNORE_OUTPUT
# RSS (and, on a GPU, where the weights went) depends on the machine
print(f"loaded whole: +{mib(rss_whole)} MiB of RSS (weights: {mib(would_take)} MiB); empty: +{mib(rss_empty)} MiB")

# %% [markdown]
# **Self-check.** What does `empty.model.embed_tokens.weight.sum()` return, and why can't you print its
# values? (It returns a meta tensor: the sum's shape, with no value to show.)

# %% [markdown]
# ## 2. Tied weights: why `tie_weights()` matters
#
# SmolLM2 uses the same matrix for its input embedding and its output head (`tie_word_embeddings`).
# Its checkpoint stores it once, under `model.embed_tokens.weight`: there is no `lm_head.weight` key.
# `from_pretrained` ties the two parameters; a model built inside `init_empty_weights()` is not tied:

# %%
with open(os.path.join(path, "model.safetensors.index.json")) as f:
    keys = set(json.load(f)["weight_map"])
print("config.tie_word_embeddings:", config.tie_word_embeddings)
print("'lm_head.weight' in the checkpoint:", "lm_head.weight" in keys)
print("the model declares the tie:", empty.all_tied_weights_keys)
print("empty model tied:", empty.lm_head.weight is empty.model.embed_tokens.weight,
      "| loaded whole tied:", whole.lm_head.weight is whole.model.embed_tokens.weight)

# %% [markdown]
# Untied, the head is a second, separate meta tensor. Three things then go wrong: accelerate counts
# the head twice when sizing the model, a device map may put the two on different devices, and, since
# the checkpoint has no key for the head, nothing ever fills it. The pre-flight check sees it before
# anything loads, from what the model declares:

# %%
from accelerate.utils import compute_module_sizes

print(f"size as accelerate counts it: {mib(compute_module_sizes(empty)[''])} MiB")
print(preflight(empty, {"": MAIN}, checkpoint=path, mode="run"))

# %% [markdown]
# And loading anyway fails at the end, when accelerate moves the model to its device and finds a head
# with no data:

# %%
# accelerate warns first, on stderr: "The model weights are not tied. Please use the `tie_weights` method ...":
# the lost tie of section 2, noticed while it plans; it loads anyway, and fails
try:
    load_checkpoint_and_dispatch(empty, path, device_map={"": MAIN}, dtype=dtype)
except NotImplementedError as e:
    print(f"{type(e).__name__}: {str(e).split('!')[0]}!")
del empty
_ = gc.collect()

# %% [markdown]
# The fix is one call after building the empty model. It makes the head the embedding's parameter
# again, so it is counted, placed and loaded once:

# %%
with init_empty_weights():
    model = AutoModelForCausalLM.from_config(config, dtype=dtype)
model.tie_weights()
print("tied:", model.lm_head.weight is model.model.embed_tokens.weight,
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
# before it uses anything else. `no_split_module_classes` names the blocks it must keep whole (the decoder layers:
# notebook 03 explains why).

# %%
model = load_checkpoint_and_dispatch(model, path, device_map="auto", no_split_module_classes=model._no_split_modules,
                                     dtype=dtype)
auto_where = placement(model, model.hf_device_map)  # which parts sit on which device
for dev, parts in auto_where.items():
    print(f"{device_label(dev):>6}: {parts}")
hooked = sum(hasattr(m, "_hf_hook") for m in model.modules())
with torch.inference_mode():
    out = model.generate(**inputs, max_new_tokens=NEW_TOKENS, do_sample=False)
assert torch.equal(out, reference), "the dispatched model should generate the reference tokens"
print("same tokens as the model loaded whole")

# %%
# printed from the map above, which depends on the machine: one device on a CPU or one GPU, two on two GPUs
if len(auto_where) == 1:
    print(f"One device, {device_label(next(iter(auto_where)))}, holds the whole model: dispatch_model "
          + ("only moved it there, with no hooks." if not hooked else f"added {hooked} hooks."))
else:
    print(f"{len(auto_where)} devices share the model: dispatch_model added {hooked} hooks, which move the "
          "activations from one device to the next (section 5).")
del model
_ = gc.collect()

# %% [markdown]
# **Reading the map where there is no `hf_device_map`.** accelerate's `dispatch_model` always sets
# `model.hf_device_map`. `from_pretrained` sets it only when the map spans several devices or offloads:
# our `whole` model (loaded with `device_map="auto"` too) has one on a machine with several GPUs, where
# it is split between them, and none where it went to a single device (the CPU, or one GPU). There, read
# the device of its parameters instead. `device_map_of` (from `helpers.devicemap`) does whichever applies:

# %%
print("whole has hf_device_map:", hasattr(whole, "hf_device_map"))
print("its parameters are on:", sorted({str(p.device) for p in whole.parameters()}))
print("device_map_of(whole), by device:", placement(whole, device_map_of(whole)))

# %% [markdown]
# ## 4. An explicit `max_memory`: part of the model is offloaded
#
# Now pretend the main device has room for only about half of the model: give it a budget with
# `max_memory`. What does not fit goes to the next device: CPU RAM on a GPU machine (as far as its budget
# allows), then `"disk"`: into an **offload folder**, which must be given.
# This folder is the notebook's own, made fresh under the workbook's cache and removed at the end.
#
# First compute the map the same way `load_checkpoint_and_dispatch` will, and check it before loading
# (run mode: every device in it must exist here).

# %%
# On a GPU: GPU 0 gets 150 MiB, CPU RAM 60 MiB (CPU offload), the rest goes to disk; other GPUs get
# nothing (a device missing from max_memory is not used). Without a GPU: the CPU (the main device)
# gets 150 MiB, the rest goes to disk.
MAX_MEMORY = {0: "150MiB", "cpu": "60MiB"} if N_GPUS else {"cpu": "150MiB"}

OFFLOAD = offload_folder("02-dispatch")  # a new, empty folder of ours: removed at the end

with init_empty_weights():
    model = AutoModelForCausalLM.from_config(config, dtype=dtype)
model.tie_weights()
# accelerate converts the size strings of the dict it is given in place: pass it a copy
planned = infer_auto_device_map(model, max_memory=dict(MAX_MEMORY), no_split_module_classes=model._no_split_modules)
print(preflight(model, planned, MAX_MEMORY, mode="run", checkpoint=path))

# %%
model = load_checkpoint_and_dispatch(model, path, device_map="auto", max_memory=dict(MAX_MEMORY),
                                     no_split_module_classes=model._no_split_modules, dtype=dtype,
                                     offload_folder=OFFLOAD / "max-memory")
assert model.hf_device_map == dict(planned), "load_checkpoint_and_dispatch used the map we checked"
map_table(model, model.hf_device_map)

# %%
plot_device_map(model, model.hf_device_map, max_memory=MAX_MEMORY,
                title=f"Bundled model, {DTYPE}, max_memory={MAX_MEMORY}")
plt.show()

# %% [markdown]
# What is in the offload folder: one `.dat` file per offloaded tensor (a raw array, read with numpy's
# memory map) and an `index.json` with each tensor's dtype and shape. Note the dtype: accelerate writes
# the tensors **as the checkpoint stores them** (float32 here), not in the `dtype` we asked for; they
# are converted each time they are read back. So the disk holds, and every forward reads, twice the
# bytes of the bf16 weights:

# %%
folder = OFFLOAD / "max-memory"
index = json.loads((folder / "index.json").read_text())
on_disk = sum(f.stat().st_size for f in folder.glob("*.dat"))
table = map_table(model, model.hf_device_map).set_index("device")
print(f"{len(index)} tensors offloaded, dtypes in the index: {sorted({v['dtype'] for v in index.values()})}")
print(f".dat files: {mib(on_disk)} MiB | the same tensors in {DTYPE}: {mib(table.loc['disk', 'bytes'])} MiB")

# %% [markdown]
# ## 5. The hooks: what happens at each forward pass
#
# `dispatch_model` wraps the `forward` of modules with an `AlignDevicesHook` (the original is kept as
# `module._old_forward`; the hook is `module._hf_hook`). Which module gets which hook:

# %%
def describe_hook(name):
    hook = getattr(model.get_submodule(name), "_hf_hook", None)
    if hook is None:
        return f"{name or '(the model)':<33} no hook"
    return f"{name or '(the model)':<33} {type(hook).__name__}: {hook.execution_device!r}, {hook.offload}, {hook.io_same_device}"


first_disk = next(k for k, v in model.hf_device_map.items() if v == "disk" and k.split(".")[-1].isdigit())
print(f"{'module':<33} hook: execution_device, offload, io_same_device")
for name in ["", "model.embed_tokens", "model.layers.0", first_disk, first_disk + ".self_attn.q_proj", "lm_head"]:
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
leaf = model.get_submodule(first_disk + ".self_attn.q_proj")
hook = leaf._hf_hook
x = torch.randn(1, 1, leaf.in_features, dtype=dtype, device=MAIN)
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
print(repr(tokenizer.decode(out[0, inputs["input_ids"].shape[1]:], skip_special_tokens=True)))
assert torch.equal(out, reference), "offloaded and whole models should generate the same tokens"
print(f"same {NEW_TOKENS} tokens as the model loaded whole, with {sum(v == 'disk' for v in model.hf_device_map.values())} "
      "modules on disk")
del model
_ = gc.collect()

# %% [markdown]
# ## 7. What offload costs
#
# Same model, three maps: none, half and all of the decoder layers on disk; the embedding (tied to
# the head), the final norm and the rotary embedding stay on the main device. We write these maps by
# hand: a map is just a dict. Each is checked, loaded, and timed: we time single decoding steps (one
# forward pass with the KV cache, batch 1: one new token each) and take the median of a few, which is
# cheap and robust to a busy machine. (`time_generate` from `helpers.measure` times whole `generate`
# calls instead, with the time to first token; with layers on disk it takes much longer to run.)

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


with init_empty_weights():
    model = AutoModelForCausalLM.from_config(config, dtype=dtype)
model.tie_weights()
N_LAYERS = config.num_hidden_layers
maps = {k: map_with_layers_on_disk(model, k) for k in (0, N_LAYERS // 2, N_LAYERS)}
disk_bytes = {}
for k, dm in maps.items():
    report = preflight(model, dm, mode="run", checkpoint=path)
    assert report.ok, report
    disk_bytes[k] = report.bytes_per_device.get("disk", 0)
    say(f"{k:>2} layers on disk: {mib(disk_bytes[k]):6.1f} MiB of {DTYPE} weights read per forward pass")
say("(the .dat files hold them as float32: twice those bytes)")
say("entries of the all-on-disk map:", len(maps[N_LAYERS]))
say("e.g.", dict(list(maps[N_LAYERS].items())[:4]))

# %%
import inspect
import statistics
import time


@torch.inference_mode()
def decode_step_seconds(model, inputs, steps=5):
    """Median seconds of one decoding step (one forward pass with the KV cache = one new token)."""
    # the KV cache argument is `cache` in transformers 5.24 (`past_key_values`, deprecated, before)
    kv = "cache" if "cache" in inspect.signature(type(model).forward).parameters else "past_key_values"
    out = model(**inputs, use_cache=True)  # the prefill; it also warms the caches
    times = []
    for _ in range(steps):
        token = out.logits[:, -1:].argmax(-1)
        sync()  # wait for the GPUs (a no-op on a CPU) before and after: the clock measures finished work
        t0 = time.perf_counter()
        out = model(input_ids=token, use_cache=True, **{kv: out[kv]})
        sync()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


# %%
STEPS = 5
step_s, file_bytes = {}, {}
for k, dm in maps.items():
    with init_empty_weights():
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    model.tie_weights()
    model = load_checkpoint_and_dispatch(model, path, device_map=dm, dtype=dtype,
                                         offload_folder=OFFLOAD / f"cost-{k}")
    step_s[k] = decode_step_seconds(model, inputs, steps=STEPS)
    # no folder is made when nothing is on disk: glob then finds nothing
    file_bytes[k] = sum(f.stat().st_size for f in (OFFLOAD / f"cost-{k}").glob("*.dat"))
    del model
    _ = gc.collect()
print("timed:", sorted(step_s))

# %%
# NBVAL_IGNORE_OUTPUT
# timings depend on the machine, its load and its disk cache
for k, t in step_s.items():
    extra = t - step_s[0]
    rate = f", {file_bytes[k] / extra / 1e9:.2f} GB/s of offload files read and converted" if k and extra > 0 else ""
    say(f"{k:>2} of {N_LAYERS} layers on disk: {1 / t:6.2f} tokens/s ({1000 * t:6.1f} ms/token{rate})")
say(f"slowdown with all layers on disk: {step_s[N_LAYERS] / step_s[0]:.1f} x")

# %%
# NBVAL_IGNORE_OUTPUT
# a plot of the timings above (machine-dependent)
ks = list(step_s)
fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(8.4, 3.4))  # 840 px: JupyterLab shows it unscaled
ax1.bar([str(k) for k in ks], [1 / step_s[k] for k in ks], color="tab:blue")
ax1.set_xlabel(f"decoder layers on disk (of {N_LAYERS})")
ax1.set_ylabel("decode speed (tokens/s)")
ax1.set_title("Generation speed vs layers on disk")
ax2.plot([disk_bytes[k] / 2**20 for k in ks], [1000 * step_s[k] for k in ks], "o-")
ax2.set_xlabel(f"weights offloaded to disk (MiB, {DTYPE})")
ax2.set_ylabel("time per token (ms)")
ax2.set_title("Time per token vs bytes on disk")
fig.suptitle(f"Disk offload, bundled model in {DTYPE}, batch 1, median of {STEPS} decoding steps, main device: {MAIN}")
fig.tight_layout()
plt.show()

# %% [markdown]
# Each layer on disk adds time to every token, because every token reads every offloaded weight again
# (from the page cache if the files fit in RAM, as here, otherwise from the disk itself) and converts
# it to the model's dtype. Nothing is kept between tokens. The right-hand plot shows the time per
# token against the MiB of weights offloaded: its slope is the time each offloaded MiB adds to every token
# (the rate printed above counts the offload files' bytes instead). On a real big
# model the bytes per token are gigabytes: disk offload makes a model *run*, not run fast. Prefer, in
# order: a smaller format (notebook 01), more GPUs (notebook 04), CPU offload on a GPU machine, and
# disk offload last.
#
# **Self-check.** From your timings, estimate the cost of one layer on disk (ms per token) and
# predict the speed with 10 layers on disk; then measure it with `map_with_layers_on_disk(model, 10)`.

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
# 3. `load_checkpoint_and_dispatch` loads shard by shard onto a map: `device_map="auto"` fills the free
#    memory; `max_memory` caps each device; what does not fit goes to the next device (CPU RAM on a GPU
#    machine, then an offload folder on disk). Read the
#    map from `hf_device_map`, or from the parameters' devices where `from_pretrained` set none.
# 4. accelerate's `AlignDevicesHook`s move inputs to each module's device and, for offloaded modules, load
#    the weights before each forward and drop them after.
# 5. Offload is exact (same tokens) but every token pays for every offloaded byte again.
#
# ## Exercises
#
# 1. Give the main device a budget of 80 MiB and nothing else (`max_memory={MAIN: "80MiB"}`), and plan
#    the map with `infer_auto_device_map` as in section 4. How many decoder layers stay on the main
#    device? Set `layers_in_memory` below and run the check.
# 2. Build the empty model with `with torch.device("meta"):` instead of `init_empty_weights()`. Is the
#    head tied without calling `tie_weights()`? Set `head_tied` to `True` or `False` (test it with
#    `model.lm_head.weight is model.model.embed_tokens.weight`).
# 3. Time 10 layers on disk (section 7) and compare with your prediction from the slope. *Self-check:*
#    within about 20% of a straight line between the 0 and 15 layer points.
# 4. Load with `dtype=torch.float32` instead. How does the offload folder's size compare with the disk
#    part of the map now? *Self-check:* equal, since the checkpoint is float32.

# %%
layers_in_memory = None  # exercise 1: a whole number
head_tied = None  # exercise 2: True or False

# %%
from helpers.devicemap import device_of
from helpers.exercises import check_answer

with init_empty_weights():
    model = AutoModelForCausalLM.from_config(config, dtype=dtype)
model.tie_weights()
plan_80 = infer_auto_device_map(model, max_memory={MAIN: "80MiB"}, no_split_module_classes=model._no_split_modules)
kept = sum(device_of(f"model.layers.{i}", plan_80) != "disk" for i in range(N_LAYERS))
with torch.device("meta"):
    meta_built = AutoModelForCausalLM.from_config(config, dtype=dtype)
tied_on_meta = meta_built.lm_head.weight is meta_built.model.embed_tokens.weight
del model, meta_built

check_answer(layers_in_memory, kept,
             "The tied embedding takes most of the 80 MiB, and accelerate keeps room for the largest offloaded "
             "layer, so only a few layers fit.",
             "plan on a fresh empty model with tie_weights() called, as in section 4.",
             "count the layers whose device in the plan is not 'disk'.", label="Exercise 1")
_ = check_answer(head_tied, tied_on_meta,
                 "Under torch.device('meta') the model is built normally, so transformers ties it." if tied_on_meta
                 else "Under torch.device('meta') the tie is lost too: call tie_weights().",
                 "test `model.lm_head.weight is model.model.embed_tokens.weight`.",
                 "build it under torch.device('meta') and test the identity.", label="Exercise 2")

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
