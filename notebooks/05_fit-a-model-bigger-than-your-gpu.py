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
# # Fit a model bigger than your GPU
#
# The question that brings most people to this workbook: **can I run Llama-3.1-70B on my 24 GiB GPU, and how
# fast?** Its weights alone are several times such a GPU in bf16, and still more than it in 4-bit NF4 (section 2
# prints both), so no format fits whole. What does run is a split: as much of the model as fits on the GPU, whole decoder layers in CPU RAM, and perhaps the
# rest on disk. Whatever is not on the GPU has to travel to it for every token, so the answer to "how fast" is
# a transfer rate, not the GPU's speed. This notebook plans such a split with room for everything that must fit
# (weights, KV cache, the prefill's activations, the load's peak, and the RAM and disk of the offloaded part),
# runs each recipe on a stand-in whose budget is a third of the model, measures what a token costs here, and
# ends with the decision for the 70B case, printed from the numbers.
#
# **What you'll learn**
# 1. How big the KV cache gets (a formula, checked against a real cache; sliding windows), and how to plan any
#    model (a config, a checkpoint folder) with room for it: the longest context that fits; an interactive planner.
# 2. Everything a plan must count: weights per format with their scales, KV cache, reserve, the prefill's
#    activation peak (a formula checked against measurements here), the peak while loading in 4-bit, and the RAM
#    and disk of the offloaded part; which of them binds.
# 3. The recipes, run on a stand-in: NF4 on the GPU with whole layers on the CPU
#    (`llm_int8_enable_fp32_cpu_offload` and a `device_map` dict), the rest on disk, and a long context with the
#    KV cache offloaded or quantized; their greedy tokens against the model loaded whole.
# 4. What each token costs: bytes offloaded per token over transfer rates measured here, prediction beside
#    measurement; then the table for Llama-3.1-70B and a 32B model on one 24 GiB GPU with 64 GiB of RAM.
# 5. What to pick instead (computing on the CPU, fewer bits, a second GPU, a smaller model), with published
#    figures and their sources.
#
# **What you'll need**: notebooks 02 (offload, hooks) and 03 (device maps, the 4-bit plan) first. A CPU is
# enough: plans run on the meta device, the recipes on the bundled model, and what only a GPU can show is said
# where it comes. About 40 s on an idle 2-core CPU (most of it loading and timing the stand-ins; several times
# that on a busy one), and at most about 3 GB of RAM. On a GPU machine the same cells put the stand-in's budget on GPU 0 and offload to CPU RAM
# and disk.

# %% tags=["parameters"]
# The model: "bundled" (SmolLM2-135M-Instruct, offline), a local checkpoint directory, or a hub id.
MODEL = "bundled"
# The dtype the recipes load the model in.
DTYPE = "bfloat16"
# The learner's machine in the question: one GPU of GPU_GIB and RAM_GIB of CPU RAM.
GPU_GIB, RAM_GIB = 24, 64
# Prompt lengths (tokens) of the prefill measurement, and new tokens per recipe.
PROMPTS = (64, 128, 256)
NEW_TOKENS = 8

# %%
import gc
import inspect
import json
import shutil
import statistics
import subprocess
import sys
import textwrap
import time
from importlib.resources import files
from pathlib import Path

import matplotlib.pyplot as plt
import torch
import transformers
from accelerate.utils import compute_module_sizes
from safetensors import safe_open
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, BitsAndBytesConfig

from helpers.checkpoints import offload_folder, resolve_model
from helpers.exercises import check_answer
from helpers.measure import allocation_peak, memory_bandwidth
from helpers.memory import kv_cache_bytes, load_peak_bytes, prefill_peak_bytes
from helpers.offload import disk_read_rate
from helpers.planner import plan, show_plan
from helpers.quiet import silence_known_warnings
from helpers.reference import reference_results

silence_known_warnings()  # routine library messages, and accelerate's loading bar in quiet runs: helpers/quiet.py

# %%
path = resolve_model(MODEL)
dtype = getattr(torch, DTYPE)
ON_GPU = torch.cuda.is_available()
MAIN = 0 if ON_GPU else "cpu"  # the device the stand-in's budget stands for: GPU 0, or the CPU without a GPU
GiB, MiB = 2**30, 2**20
print(f"transformers {transformers.__version__}, torch {torch.__version__}, GPUs here: {torch.cuda.device_count()}")


def say(*parts):
    """print(*parts), wrapped at words: 107 characters a line, what a JupyterLab output line holds."""
    print(textwrap.fill(" ".join(map(str, parts)), 107, subsequent_indent="  "))


def sync():
    """Wait for the GPU's queued work, so that a clock read after it counts the work; a no-op on a CPU."""
    if ON_GPU:
        torch.cuda.synchronize()

# %% [markdown]
# ## 1. Plan any model with room for the KV cache
#
# Weights are not all a GPU holds while it generates. Every decoder layer keeps the key and the value of every
# token it has seen, so that the next token can attend to them without recomputing them: the **KV cache**. Per
# token of context it takes
#
# $$2 \text{ (a key and a value)} \times \text{layers} \times \text{KV heads}
#   \times \text{head dim} \times \text{bytes per value}$$
#
# where *KV heads* is `num_key_value_heads` (grouped-query attention shares each key/value head among several
# query heads, so it can be far below `num_attention_heads`) and *head dim* is `hidden_size /
# num_attention_heads` unless the config sets `head_dim`. It grows linearly with the context and with the batch
# (sequences in flight). `helpers.memory.kv_cache_bytes(config, tokens, batch, bytes_per_value)` computes it,
# layer by layer (section 1.2 says why).
#
# ### 1.1 The formula against a real cache
#
# Written out for this notebook's model, then checked against the cache `generate` really built: with
# `return_dict_in_generate=True` it returns it as `cache`, a `DynamicCache` holding one layer of key
# and value tensors per decoder layer. (A config without `num_key_value_heads`, such as GPT-2's, has one KV head
# per query head.) The model loaded whole here is also the reference of section 3's recipes.

# %%
config = AutoConfig.from_pretrained(path)
kv_heads = getattr(config, "num_key_value_heads", None) or config.num_attention_heads
n_layers = config.num_hidden_layers
head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
per_token = 2 * n_layers * kv_heads * head_dim * dtype.itemsize
say(f"2 x {n_layers} layers x {kv_heads} KV heads (for {config.num_attention_heads} query heads) x head dim "
    f"{head_dim} x {dtype.itemsize} bytes = {per_token:,} bytes per token")

tokenizer = AutoTokenizer.from_pretrained(path)
messages = [{"role": "user", "content": "What is the capital of France?"}]
inputs = tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_tensors="pt",
                                       return_dict=True).to(MAIN)
whole = AutoModelForCausalLM.from_pretrained(path, dtype=dtype, device_map={"": MAIN})
with torch.inference_mode():
    gen = whole.generate(**inputs, max_new_tokens=NEW_TOKENS, do_sample=False, return_dict_in_generate=True)
cache = gen.cache
measured = sum(t.numel() * t.element_size() for layer in cache.layers for t in (layer.keys, layer.values))
tokens = cache.get_seq_length()
say(f"{type(cache).__name__}, {len(cache.layers)} layers: {tokens} tokens cached of the {gen.sequences.shape[1]} "
    f"in the sequence, {measured:,} bytes | kv_cache_bytes: {kv_cache_bytes(config, tokens):,} bytes")
assert measured == kv_cache_bytes(config, tokens, bytes_per_value=dtype.itemsize) == per_token * tokens
assert tokens == gen.sequences.shape[1] - 1, "the last generated token is fed back only to make the next one"

# %% [markdown]
# The cache holds one token fewer than the sequence: the last token generated has not been fed back yet (it
# would be, to make the next one).
#
# ### 1.2 Long contexts, and sliding windows
#
# The formula needs only the config, so it prices contexts no machine here could hold. Two shapes of
# `helpers.shapes.SHAPES`, one sequence at 4k, 32k and 128k tokens, in bf16; the 70B shape uses grouped-query
# attention, the 7B shape does not (the table prints their KV heads):

# %%
from helpers.shapes import shape_config

CONTEXTS = (4096, 32768, 131072)
print(f"{'shape':<13} {'layers':>6} {'KV heads':>8} {'per token':>11}" + "".join(f"{t:>12,}" for t in CONTEXTS))
for name in ("llama-2-7b", "llama-3.1-70b"):
    c = shape_config(name)
    row = "".join(f"{kv_cache_bytes(c, t) / GiB:>8.2f} GiB" for t in CONTEXTS)
    print(f"{name:<13} {c.num_hidden_layers:>6} {c.num_key_value_heads:>8} {kv_cache_bytes(c, 1) / MiB:>7.3f} MiB{row}")
l7, l70 = shape_config("llama-2-7b"), shape_config("llama-3.1-70b")
say(f"max_position_embeddings: llama-2-7b {l7.max_position_embeddings:,}, llama-3.1-70b "
    f"{l70.max_position_embeddings:,} (their published configs, as helpers.shapes writes them)")
assert kv_cache_bytes(l70, 131072) == 32 * kv_cache_bytes(l70, 4096), "the cache grows linearly with the context"
assert kv_cache_bytes(l7, 4096, batch=8) == 8 * kv_cache_bytes(l7, 4096), "... and with the batch"
assert kv_cache_bytes(l7, 4096) > kv_cache_bytes(l70, 4096), "more KV heads outweigh more layers"

# %% [markdown]
# At 128k tokens the cache of one 70B sequence is 40 GiB, more than the whole 24 GiB GPU of our question: at long
# contexts the cache rivals the weights. The 7B shape's cache is the larger at every length: without grouped-query
# attention it keeps a key/value head per query head. The formula does not ask whether a model was trained for
# that length; the planner refuses a context above the config's `max_position_embeddings` (section 2.4).
#
# A **sliding window** caps the cache. A layer with `sliding_window` attends only to the last `sliding_window`
# tokens, so its cache stops growing there. Mistral 7B's published fields with and without the window (v0.1 sets
# `sliding_window=4096`; v0.2 and later set none); configs that list `layer_types` (Gemma 2 and 3 alternate
# sliding and full layers) window only their `"sliding_attention"` layers, and `kv_cache_bytes` counts each layer
# by its type:

# %%
from transformers import MistralConfig

MISTRAL_7B = dict(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
                  num_key_value_heads=8, vocab_size=32000, max_position_embeddings=32768)
windowed = MistralConfig(**MISTRAL_7B, sliding_window=4096)  # Mistral 7B v0.1
full = MistralConfig(**MISTRAL_7B, sliding_window=None)  # Mistral 7B v0.2 and later: no window
for t in (1024, 4096, 16384, 32768):
    print(f"{t:>6,} tokens: window 4096 {kv_cache_bytes(windowed, t) / GiB:5.2f} GiB | "
          f"no window {kv_cache_bytes(full, t) / GiB:5.2f} GiB")
assert kv_cache_bytes(windowed, 32768) == kv_cache_bytes(windowed, 4096) == kv_cache_bytes(full, 4096)

# %% [markdown]
# Does a real cache stop growing? A toy Mistral with random weights and an 8-token window, generating more and
# more tokens:

# %%
toy_config = MistralConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                           num_key_value_heads=2, vocab_size=100, sliding_window=8)
torch.manual_seed(0)
toy = AutoModelForCausalLM.from_config(toy_config, dtype=torch.bfloat16).eval()  # random weights
prompt = torch.ones(1, 5, dtype=torch.long)
held = {}
for new in (1, 10, 40):
    out = toy.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=new, min_new_tokens=new,
                       do_sample=False, return_dict_in_generate=True, pad_token_id=0)
    c, seen = out.cache, out.cache.get_seq_length()
    held[seen] = sum(t.numel() * t.element_size() for layer in c.layers for t in (layer.keys, layer.values))
    print(f"{seen:>2} tokens seen: {type(c.layers[0]).__name__} keeps {c.layers[0].keys.shape[-2]} per layer, "
          f"{held[seen]:,} bytes | kv_cache_bytes: {kv_cache_bytes(toy_config, seen):,}")
assert len({n for s, n in held.items() if s >= toy_config.sliding_window}) == 1, "past the window it stops growing"
assert all(kv_cache_bytes(toy_config, s) >= n for s, n in held.items()), "the formula should never count less"

# %% [markdown]
# Past the window the cache stays the same size: transformers keeps `sliding_window - 1` tokens per layer (the
# token being processed completes the window), and the formula counts `sliding_window`, one token per layer on
# the safe side.
#
# ### 1.3 A Mistral-7B-shaped config on two 16 GiB GPUs
#
# `helpers.planner.plan` (notebook 03 built its steps: transformers' own quantizer and placement) takes any
# transformers config of a decoder-only model, not only the named shapes (`MistralConfig(...)`, `Qwen2Config`,
# `GemmaConfig`, `GPT2Config`, `BloomConfig`, ...), and `context` and `batch`. Here the Mistral 7B fields without a
# window (`full` above) in bf16 on two 16 GiB GPUs, for one sequence of 4,096 tokens and for eight. The verdict
# counts, on each GPU, its weights, the KV cache of the layers it holds, the reserve (the summary's "reserve" line
# says where that was measured; `reserve_gib=` plans with your own) and the terms of section 2. `max_context` is
# the longest context that still fits at that batch.

# %%
p1 = plan(full, "bf16", n_gpus=2, gib_per_gpu=16, context=4096, batch=1)
p8 = plan(full, "bf16", n_gpus=2, gib_per_gpu=16, context=4096, batch=8)
print(p1.summary())
print()
for p in (p1, p8):
    why = " (the config's max_position_embeddings: memory is not the limit)" if p.max_context_capped else ""
    kv = " + ".join(f"{n / GiB:.2f}" for n in p.kv_bytes_per_device.values())
    say(f"batch {p.batch}: {'fits' if p.fits else 'does not fit'} (KV cache {kv} GiB at 4,096 tokens); "
        f"longest context that fits: {p.max_context:,} tokens{why}")

# %%
# Self-check: at batch 8 the longest context fits and one token more does not (unless the config's limit set it)
edge = plan(full, "bf16", 2, 16, context=p8.max_context, batch=8)
beyond = plan(full, "bf16", 2, 16, context=p8.max_context + 1, batch=8)
print(f"{p8.max_context:,} tokens x 8: fits {edge.fits} | {p8.max_context + 1:,} tokens x 8: fits {beyond.fits}")
assert edge.fits and (p8.max_context_capped or not beyond.fits), "max_context should be the edge of fitting"
assert p1.max_context >= p8.max_context, "more sequences leave room for shorter contexts"
on_gpu0 = [k for k, d in p8.device_map.items() if k.startswith("model.layers.") and d == 0]
per_layer = kv_cache_bytes(full, 4096, batch=8) // full.num_hidden_layers  # no window: every layer alike
assert p8.kv_bytes_per_device[0] == per_layer * len(on_gpu0), "each layer's cache sits on its GPU"

# %% [markdown]
# A checkpoint folder works the same (`plan` reads only its `config.json`: here this notebook's model), and so
# does a hub id on a machine that is online (only the config is fetched). Offline, as the workbook runs by
# default, `plan` refuses a hub id with a `ValueError` that says what to pass instead:

# %%
print(plan(path, "bf16", n_gpus=1, gib_per_gpu=4).summary())

# %%
# NBVAL_IGNORE_OUTPUT
# needs the internet: offline (the workbook's default) a ValueError, online (HF_HUB_OFFLINE=0) the plan
try:
    print(plan("Qwen/Qwen2.5-7B-Instruct", "bf16", n_gpus=2, gib_per_gpu=16).summary())
except ValueError as e:  # shown whole: its remedy is at its end
    say(f"ValueError: {e}")

# %% [markdown]
# ### 1.4 An interactive planner
#
# `helpers.planner.show_plan` takes the same arguments as `plan`, prints the plan and draws it; this is the plain
# view the widget below shows (widget output is not stored or checked, so the same view is called here in a
# checked cell). At 32k tokens for eight sequences the weights still fit, but the KV cache does not, and the
# verdict says which GPUs run over:

# %%
shown = show_plan(full, "bf16", n_gpus=2, gib_per_gpu=16, context=32768, batch=8)
plt.show()
assert shown.on_gpus and not shown.fits, "the weights fit, the cache for 8 x 32k tokens does not"

# %% [markdown]
# Pick a model shape (or type a checkpoint folder, such as the bundled model's, or a hub id in the "or" box), a
# format, the number of GPUs, the memory per GPU, the CPU RAM, the context, the prompt and the batch; the map, the
# GPU, CPU and disk bars, the verdict and the predicted seconds per token update as you change them (run the
# notebook yourself: a stored copy shows no widget). It opens on this notebook's question.

# %%
# NBVAL_IGNORE_OUTPUT
# widget output lives in widget state, which is not stored nor compared; show_plan above is its checked twin
from helpers.planner_widget import planner_widget

planner_widget("llama-3.1-70b", "nf4", n_gpus=1, gib_per_gpu=GPU_GIB, context=4096, batch=1, cpu_gib=RAM_GIB)

# %% [markdown]
# ## 2. The question: what must fit
#
# Llama-3.1-70B (its published config, `helpers.shapes`) on one `GPU_GIB` GiB GPU with `RAM_GIB` GiB of RAM, for
# one sequence of 4,096 tokens, in bf16 and in NF4. The planner places the modules as `from_pretrained` would
# (notebook 03): what does not fit the GPU goes to the CPU's RAM (`cpu_gib=`), then to disk. `offload=True` asks
# it to accept such a plan as "runs with offload" when the GPU's part fits, and to predict what a token costs.
#
# ### 2.1 The plan, and what "weights" means
#
# "Weights" is two numbers for a 4-bit format. transformers places modules with its own count, **0.5 byte per
# 4-bit weight**; bitsandbytes also stores one float32 scale per 64 weights, so the memory really taken is 0.5625
# byte per weight (**weights with NF4 scales**). The placement uses the first, the verdict the second, and the
# summary labels each. Its seconds per token use the planner's default rates (its line names them); section 4
# measures this machine's.

# %%
alone = {fmt: plan("llama-3.1-70b", fmt, 1, 200) for fmt in ("bf16", "nf4")}  # one GPU big enough: the bytes alone
say(f"llama-3.1-70b: bf16 weights {alone['bf16'].total_true_bytes / GiB:.1f} GiB; NF4 weights with NF4 scales "
    f"{alone['nf4'].total_true_bytes / GiB:.1f} GiB, {alone['nf4'].total_bytes / GiB:.1f} GiB in transformers' count "
    f"(0.5 byte per 4-bit weight; the embedding and the head stay bf16 in both)")
asked = {fmt: plan("llama-3.1-70b", fmt, 1, GPU_GIB, cpu_gib=RAM_GIB, context=4096, offload=True)
         for fmt in ("bf16", "nf4")}
for fmt, p in asked.items():
    say(f"on one {GPU_GIB} GiB GPU with {RAM_GIB} GiB of RAM, {fmt}: {p.verdict()}")
print()
print(asked["nf4"].summary())

# %% [markdown]
# ### 2.2 The prefill's activations, measured
#
# Reading a prompt runs every layer over all its tokens at once, and the activations of that pass live beside the
# weights and the cache: the **prefill peak**. It grows with the prompt (and the batch), the hidden size and the
# MLP's intermediate size, so one reserve measured on a small model at one length cannot stand for it.
# `helpers.memory.prefill_peak_bytes(config, prompt, batch, bytes_per_value)` counts, per prompt token, what is
# alive at the largest moment of transformers' Llama forward (its docstring derives each term): the embedding
# output and the layer's input (`2h` values), the rotary `cos`/`sin` (`2 x head dim`), and in the MLP, the largest
# phase, the residual and the normed input (`2h`) beside `act(gate)`, `up` and their product (`3i`); plus the
# logits of the last position only, since `generate` asks for no more (`logits_to_keep=1`). With `sdpa`, the
# default attention, no `prompt x prompt` score matrix is ever held.
#
# Measured here at three prompt lengths: one forward pass as `generate`'s prefill makes it (cache on, logits of
# the last position). `helpers.measure.allocation_peak` runs it and returns the peak of the bytes torch allocated
# during it: on a GPU from the CUDA allocator's own peak counter, on the CPU (where torch keeps none) from
# `torch.profiler` with `profile_memory=True`, which records every allocation and free. That counts tensors, not
# what the C library's allocator keeps around them, so it does not move with the rest of the process. The peak,
# minus the KV cache the pass leaves (section 1's formula), is the prefill's activation peak. Both in MiB:

# %%
# NBVAL_IGNORE_OUTPUT
# the bytes allocated depend on torch's kernels for this processor (the check below holds them to the formula)
text_ids = tokenizer(files("helpers").joinpath("data/alice.txt").read_text() * 16, return_tensors="pt")["input_ids"]
limit = getattr(config, "max_position_embeddings", None) or getattr(config, "n_positions", None) or 10**9
measured_peaks = {}
for n in [n for n in PROMPTS if n <= min(limit, text_ids.shape[1])]:
    cache_bytes = kv_cache_bytes(config, n, bytes_per_value=dtype.itemsize)
    ids = text_ids[:, :n].to(MAIN)
    with torch.inference_mode():
        _, peak = allocation_peak(lambda: whole(input_ids=ids, use_cache=True, logits_to_keep=1),
                                  "cuda" if ON_GPU else "cpu")
    measured_peaks[n] = peak - cache_bytes
    formula = prefill_peak_bytes(config, n, bytes_per_value=dtype.itemsize)
    say(f"{n:>5} tokens: measured {measured_peaks[n] / MiB:6.2f} MiB, formula {formula / MiB:6.2f} MiB, measured / "
        f"formula {measured_peaks[n] / formula:.2f} (the KV cache, {cache_bytes / MiB:.2f} MiB, taken out)")
off = [n for n, m in measured_peaks.items()
       if not 0.8 <= m / prefill_peak_bytes(config, n, bytes_per_value=dtype.itemsize) <= 1.25]
if config.model_type in ("llama", "mistral", "qwen2"):  # the forward the formula was derived from
    assert not off, "the prefill formula should hold within -20% and +25% of the measurement"
elif off:
    say(f"The formula follows Llama's forward; for this {config.model_type} model it is an estimate, off by more "
        f"than -20%/+25% at {off} tokens.")

# %% [markdown]
# ### 2.3 The peak while loading in 4-bit
#
# `from_pretrained(..., quantization_config=BitsAndBytesConfig(load_in_4bit=True, ...))` quantizes while it loads:
# each weight is read from the checkpoint in the load dtype and packed on its device. For a while both forms
# exist, so memory peaks above the 4-bit model it ends with. `helpers.memory.load_peak_bytes` counts that peak in
# tensors: the quantized model plus the temporaries of the one weight being quantized (transformers 5.24 quantizes
# one tensor at a time; its docstring says where). The planner adds it to each GPU's check, and counts the
# tensors a load passes through host RAM (`load_host_bytes`) beside the offloaded weights.
#
# We measure it the only way that sees everything the loader touches: a fresh Python process (bitsandbytes
# imported before the baseline, so the library is not counted) loads the model in NF4 (on GPU 0 on a GPU machine,
# on the CPU otherwise) while a thread samples its resident memory every 2 ms (`/proc/self/status`: `RssAnon`,
# memory the process allocated, and `RssFile`, pages of files it mapped). It reports, above what it held just
# before the load, the anonymous memory at its peak and once loaded, beside the model's footprint (and on a GPU,
# the CUDA allocator's peak).

# %%
CHILD = """
import json, sys, threading, time
import bitsandbytes  # imported before the baseline: the load is measured, not the library
import torch
from transformers import AutoModelForCausalLM, BitsAndBytesConfig

def rss():  # resident memory (bytes): anonymous (tensors, the allocator's pools) and file-backed (mapped files)
    fields = dict(line.split(":") for line in open("/proc/self/status") if line.startswith("Rss"))
    return {k: int(v.split()[0]) * 1024 for k, v in fields.items()}

path, device = sys.argv[1], sys.argv[2]
nf4 = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=torch.bfloat16)
before, peak, done = rss(), {"RssAnon": 0, "RssFile": 0}, threading.Event()

def sample():
    while not done.is_set():
        now = rss()
        peak.update({k: max(peak[k], now[k]) for k in peak})
        time.sleep(0.002)

threading.Thread(target=sample, daemon=True).start()
m = AutoModelForCausalLM.from_pretrained(path, dtype=torch.bfloat16, device_map={"": device}, quantization_config=nf4)
done.set()
gpu = torch.cuda.max_memory_allocated() if torch.cuda.is_available() else 0
print(json.dumps({"anon": peak["RssAnon"] - before["RssAnon"], "after": rss()["RssAnon"] - before["RssAnon"],
                  "file": peak["RssFile"] - before["RssFile"], "gpu": gpu, "footprint": m.get_memory_footprint()}))
"""

# %%
# NBVAL_IGNORE_OUTPUT
# process memory depends on the machine, its allocator and its libraries
child = subprocess.run([sys.executable, "-c", CHILD, str(path), "cuda:0" if ON_GPU else "cpu"], capture_output=True,
                       text=True, timeout=600, check=True)
load = json.loads(child.stdout.strip().splitlines()[-1])
emb, head = whole.get_input_embeddings().weight, whole.get_output_embeddings().weight
largest = max(p.numel() for p in whole.parameters() if p.dim() == 2 and p is not emb and p is not head)
formula = load_peak_bytes(load["footprint"], largest, "nf4", "cuda" if ON_GPU else "cpu")
say(f"NF4 quantized while loading, in a fresh process: anonymous memory {load['anon'] / MiB:.0f} MiB above the "
    f"baseline at its peak, {load['after'] / MiB:.0f} MiB once loaded; mapped file pages {load['file'] / MiB:.0f} "
    f"MiB at their peak" + (f"; GPU peak {load['gpu'] / MiB:.0f} MiB" if ON_GPU else "")
    + f" | the loaded model's footprint {load['footprint'] / MiB:.0f} MiB; load_peak_bytes {formula / MiB:.0f} MiB")
if ON_GPU:
    say(f"on the GPU, measured / formula: {load['gpu'] / formula:.2f}")
else:
    transient, kept = load["anon"] - load["after"], load["after"] - load["footprint"]
    say(f"the load's transient (peak minus once loaded): {transient / MiB:.1f} MiB measured, "
        f"{(formula - load['footprint']) / MiB:.1f} MiB in the formula; once loaded the process holds {kept / MiB:.0f} "
        f"MiB beyond the model's footprint, which no tensor of the model holds and the formula does not count "
        f"(peak / formula: {load['anon'] / formula:.2f})")

# %% [markdown]
# Read the two CPU figures apart. The **transient** (the peak above what the process holds once loaded) is the
# loader's own peak, and it is what `load_peak_bytes` counts above the footprint (a transient shorter than the 2 ms
# between samples can be missed). What the process **keeps** beyond the footprint is not the loader's: modules
# imported during the load, and freed memory that the C library's allocator (glibc) keeps for reuse instead of
# returning it. How much it keeps depends on the allocator's thresholds and on the sizes of the tensors;
# `MALLOC_MMAP_THRESHOLD_` and `MALLOC_TRIM_THRESHOLD_` set in the environment before Python starts make glibc
# return freed blocks at once, and `helpers.measure.load_peak_rss` measures with them set (its docstring gives the
# figures). Mapped file pages are the checkpoint read in place: the kernel can drop them.
#
# So the plan counts the load peak in tensors, on each GPU (there the CUDA allocator's peak is the figure to
# compare) and in host RAM beside the offloaded weights (section 2.4). **It does not count what the C allocator
# keeps**: on a CPU load, the "holds ... beyond the model's footprint" figure above; leave that much RAM free
# beyond the plan, or set the two thresholds.

# %% [markdown]
# ### 2.4 Every term, and which binds
#
# The NF4 plan's terms: on the GPU the weights with scales, the KV cache of its layers, the reserve and the
# prefill peak (for a `prompt` of `min(context, 4096)` tokens unless given), with the load's peak beside them; on
# the host the weights offloaded to RAM and to disk, and the RAM and disk they need (in RAM, the load's peak on the
# host too). The term that **binds** is the one to change first. Read the `cpu` line of the summary above: the
# layers offloaded in an NF4 plan are charged in bf16, since with `llm_int8_enable_fp32_cpu_offload=True` and a map
# dict transformers leaves the modules mapped to `"cpu"` or `"disk"` unquantized, in the load dtype (section 3.1
# shows it on a real load): the RAM part takes 2 bytes a weight instead of 0.5625, 3.6 times its 4-bit bytes,
# and so does what crosses for each token.

# %%
def show_terms(p):
    """One plan's terms, in GiB: on each GPU, then on the host; its binding term and verdict."""
    for d in range(p.n_gpus):
        say(f"GPU {d}: weights with scales {p.true_bytes_per_device.get(d, 0) / GiB:.2f} + KV cache "
            f"{p.kv_bytes_per_device.get(d, 0) / GiB:.2f} + reserve {p.reserve_bytes / GiB:.2f} + prefill "
            f"{p.prefill_bytes_per_device.get(d, 0) / GiB:.2f} (prompt {p.prompt:,}) = "
            f"{p.needed_bytes_per_device[d] / GiB:.2f} of {p.max_memory[d] / GiB:g} GiB; load peak "
            f"{p.load_peak_bytes.get(d, 0) / GiB:.2f}")
    say(f"host: weights in RAM {p.cpu_bytes / GiB:.2f}, on disk {p.disk_bytes / GiB:.2f}; RAM needed "
        f"{p.ram_needed_bytes / GiB:.2f} of {RAM_GIB}, disk needed {p.disk_needed_bytes / GiB:.2f} GiB")
    say(f"binding: {p.binding} | {p.verdict()}")


show_terms(asked["nf4"])
print()
long_prompt = plan("llama-3.1-70b", "nf4", 1, GPU_GIB, cpu_gib=RAM_GIB, context=32768, prompt=32768, offload=True)
show_terms(long_prompt)
assert long_prompt.prefill_bytes_per_device[0] > asked["nf4"].prefill_bytes_per_device[0], "a longer prompt, more"

# %% [markdown]
# A 32k-token prompt read at once needs far more activation memory than one of 4,096 tokens, and the plan makes
# room for it on the GPU (compare the two plans' GPU lines: what leaves the GPU crosses for every token). A
# context longer than the model was configured for is refused outright, whatever the memory: the verdict's first
# words say so and the binding term is `max_position_embeddings`:

# %%
too_long = plan("llama-3.1-70b", "nf4", 1, GPU_GIB, cpu_gib=RAM_GIB, offload=True,
                context=l70.max_position_embeddings + 1)
say(too_long.verdict())
assert not too_long.fits and not too_long.runs and too_long.binding == "max_position_embeddings"

# %% [markdown]
# ## 3. Recipes that run, on a stand-in
#
# A stand-in has the problem of the 70B case at a size this machine can run: the budget of the main device
# (GPU 0 on a GPU machine; without a GPU, the CPU plays the GPU) is **a third of the model's bytes**. On a GPU
# machine the CPU RAM takes another third and the disk the rest; without a GPU there is no slower memory than
# the main device's RAM but the disk, so the rest goes to disk. Each recipe's greedy tokens are compared with the
# same format loaded whole on the main device. First the budget, from the model's own sizes
# (`compute_module_sizes` counts a tied weight once):

# %%
sizes = compute_module_sizes(whole)  # {module name: bytes}, "" the whole model
layers = [n for n, m in whole.named_modules() if type(m).__name__ in whole._no_split_modules]
not_layers = sizes[""] - sum(sizes[n] for n in layers)
third = sizes[""] // 3
# accelerate keeps room on the main device for the largest offloaded layer, brought there at each pass
room = max(third, not_layers + 2 * max(sizes[n] for n in layers))
BUDGET = {MAIN: room, "cpu": third} if ON_GPU else {MAIN: room}
say(f"the model: {sizes[''] / MiB:.1f} MiB ({len(layers)} decoder layers of {sizes[layers[0]] / MiB:.2f} MiB, "
    f"{not_layers / MiB:.1f} MiB of embedding, head and norms) | max_memory: "
    + ", ".join(f"{d!r}: {n / MiB:.1f} MiB" for d, n in BUDGET.items()) + " | the rest: disk")
if room > third:
    say(f"This model's embedding, head and norms alone are {not_layers / sizes[''] :.0%} of it: the main device's "
        "budget is raised from a third to hold them, one decoder layer and the layer brought in at each pass.")

# %% [markdown]
# ### 3.1 NF4 on the GPU, whole decoder layers on the CPU
#
# The recipe for the 70B case: the first decoder layers in 4-bit on the GPU, whole later layers on the CPU. A
# `device_map` dict says where each goes, and `BitsAndBytesConfig(..., llm_int8_enable_fp32_cpu_offload=True)`
# lets `from_pretrained` accept `"cpu"` (and `"disk"`) entries beside a quantized model. In transformers 5.24 the
# flag does two things (`quantizers/quantizer_bnb_4bit.py`): `validate_environment` no longer refuses a dict map
# with `"cpu"` or `"disk"` in it, and `_process_model_before_weight_loading` adds every module the dict sends there
# to the modules not converted: **they stay unquantized, in the load dtype** (`dtype=`, here bf16), not in 4-bit
# and not in float32 as the flag's name says. The map, built by hand: what is not a decoder layer and the first
# third of the layers on the main device, the other layers on the offload device.

# %%
OFFLOAD_TO = "cpu" if ON_GPU else "disk"  # without a GPU the CPU is the main device: the disk takes the rest
top = sorted({n.rsplit(".", 1)[0] for n in layers})[0]  # "model.layers"
parent = top.rsplit(".", 1)[0]  # "model"
nf4_map = {c: MAIN for c, _ in whole.named_children() if c != parent}  # the head (tied or not)
nf4_map.update({f"{parent}.{c}": MAIN for c, _ in whole.get_submodule(parent).named_children()
                if f"{parent}.{c}" != top})  # embedding, final norm, ...
on_main = max(1, len(layers) // 3)
nf4_map.update({n: MAIN if i < on_main else OFFLOAD_TO for i, n in enumerate(layers)})


def device_in(m, name):
    """The device map `m` gives a parameter or module: that of the longest key that prefixes its name."""
    return m[max((k for k in m if k in ("", name) or name.startswith(k + ".")), key=len)]


nf4 = dict(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=dtype)
say(f"{len(nf4_map)} entries: decoder layers 0 to {on_main - 1} and everything else on {MAIN!r}, layers "
    f"{on_main} to {len(layers) - 1} on {OFFLOAD_TO!r}")

# %% [markdown]
# Without the flag, `from_pretrained` refuses such a map before it loads a weight (notebook 08, case 9); the
# message is shown whole, its remedy is at its end:

# %%
OFFLOAD = offload_folder("05-recipes")  # a new, empty folder of this notebook's: removed at the end
try:
    AutoModelForCausalLM.from_pretrained(path, dtype=dtype, device_map=nf4_map,
                                         quantization_config=BitsAndBytesConfig(**nf4), offload_folder=OFFLOAD)
except ValueError as e:
    say(f"ValueError: {e}")

# %% [markdown]
# With the flag, the same map loads. The cell counts the 4-bit layers and, per device of the map, the dtypes and
# bytes of its weights (a 4-bit weight counted as packed, its scales left out; an offloaded weight sits on the meta
# device in the model, with its dtype, while its data waits in RAM or on disk):

# %%
flagged = BitsAndBytesConfig(**nf4, llm_int8_enable_fp32_cpu_offload=True)
hybrid = AutoModelForCausalLM.from_pretrained(path, dtype=dtype, device_map=nf4_map, quantization_config=flagged,
                                              offload_folder=OFFLOAD)
n_4bit = sum(type(m).__name__ == "Linear4bit" for m in hybrid.modules())
held = {}  # {device of the map: {dtype: bytes}}
for name, p in hybrid.named_parameters():
    dev = device_in(nf4_map, name)
    held.setdefault(dev, {}).setdefault(str(p.dtype), 0)
    held[dev][str(p.dtype)] += p.numel() * p.element_size()
say(f"4-bit layers: {n_4bit} | modules not converted: {len(hybrid.hf_quantizer.modules_to_not_convert)}")
for dev, by_dtype in held.items():
    say(f"  {dev!r}: " + ", ".join(f"{t.replace('torch.', '')} {n / MiB:.1f} MiB" for t, n in by_dtype.items()))
assert not any("uint8" in t for t in held.get(OFFLOAD_TO, {})), "an offloaded layer in 4-bit?"

# %% [markdown]
# So the layers on the offload device are bf16: with this flag a layer does not wait in RAM in 4-bit to be
# copied to the GPU; it waits, and is copied, in the load dtype: 2 bytes a weight instead of NF4's 0.5625. (Where
# no layer is left to convert, as on a CPU-only machine, transformers logs "You are loading your model using eetq
# but no linear modules were found in your model": `replace_with_bnb_linear` in `integrations/bitsandbytes.py`
# words it so. It is bitsandbytes, and it means no layer is in 4-bit.) On a GPU, the greedy tokens against the
# same format loaded whole (NF4 everywhere on GPU 0):

# %%
if n_4bit:  # a GPU: the 4-bit part is real; compare with NF4 loaded whole on the GPU
    with torch.inference_mode():
        hybrid_out = hybrid.generate(**inputs, max_new_tokens=NEW_TOKENS, do_sample=False)
        nf4_whole = AutoModelForCausalLM.from_pretrained(path, dtype=dtype, device_map={"": MAIN},
                                                         quantization_config=BitsAndBytesConfig(**nf4))
        ref_out = nf4_whole.generate(**inputs, max_new_tokens=NEW_TOKENS, do_sample=False)
    same = (hybrid_out[0, -NEW_TOKENS:] == ref_out[0, -NEW_TOKENS:]).tolist()
    first = same.index(False) + 1 if False in same else None
    say(f"NF4 on GPU 0 + bf16 layers on 'cpu' against NF4 loaded whole: {sum(same)} of {NEW_TOKENS} greedy tokens "
        "the same" + (f", the first difference at new token {first}: the offloaded layers compute in bf16, not "
                      "NF4, so this is a slightly different model (closer to bf16)" if first else ""))
    del nf4_whole
else:
    say("No GPU here: the flag left every module unquantized, the map's 'cpu' part too (the CPU is the main "
        "device), so this is the bf16 model with layers on disk, not the recipe. The 4-bit part needs a GPU; the "
        "offload it costs is staged in bf16 in section 3.2 and timed in section 4.")
del hybrid
_ = gc.collect()

# %% [markdown]
# What one GPU measured of this recipe, on every machine (on a GPU beside the run's own figures above): the
# committed reference `gpu-reference/one-gpu/offload.json`, made by `gpu-reference/tools/offload_check.py` on
# **random weights** of the llama-1b shape, with whole decoder layers off the GPU (the cell says which). Its
# reference for the recipe is NF4 with the same layers left unquantized, loaded whole on the GPU: the offloaded
# layers are bf16, so only that model can give the same tokens. Seconds per new token are end to end (the prefill
# included).

# %%
OFFLOAD_REF = json.loads((Path(inspect.getfile(reference_results)).parents[1] / "gpu-reference" / "one-gpu"
                          / "offload.json").read_text())  # committed: one GPU's measurements, random weights
rec, n_new, n_prompt = OFFLOAD_REF["recipes"], OFFLOAD_REF["new_tokens"], OFFLOAD_REF["prompt_tokens"]
FLAG, ON_DISK = (f"nf4 + layers on {d} (llm_int8_enable_fp32_cpu_offload)" for d in ("CPU", "disk"))
UNQUANTIZED = "nf4, those layers unquantized, whole"  # the recipe's reference: same layers in bf16, loaded whole
REF_LABEL = f"{OFFLOAD_REF['gpu']}, {OFFLOAD_REF['date']}, RANDOM weights of the llama-1b shape"
say(f"The committed reference ({REF_LABEL}): {OFFLOAD_REF['recipes_note'].split(';')[0]}.")
(ref_name, vs), = rec[FLAG]["against"].items()
say(f"with the flag, the CPU part held {', '.join(t.replace('torch.', '') for t in rec[FLAG]['cpu_part_dtypes'])}; "
    f"greedy tokens against '{ref_name}': " + (f"all {n_new} identical" if vs["identical"] else
    f"{vs['differing']} of {n_new} differ, the first at new token {vs['first_difference'] + 1}"))
same_nf4 = sum(a == b for a, b in zip(rec[FLAG]["tokens"][n_prompt:], rec["nf4 whole"]["tokens"][n_prompt:]))
say(f"against 'nf4 whole' (every layer in 4-bit): {same_nf4} of {n_new} the same")
for name in ("nf4 whole", UNQUANTIZED, FLAG, ON_DISK):
    r = rec[name]
    say(f"  {name}: {r['s_per_token'] * 1e3:.0f} ms a token (repeats {r['spread_s'][0] / n_new * 1e3:.0f} to "
        f"{r['spread_s'][1] / n_new * 1e3:.0f}), peak GPU memory {r['peak_gpu_bytes'] / GiB:.2f} GiB")
refusal = rec["nf4 + layers on CPU, without the flag"].get("error", "")
say("without the flag: " + ("refused, with the ValueError shown above" if refusal.startswith(
    "ValueError: Some modules are dispatched") else refusal or "it loaded"))

# %% [markdown]
# ### 3.2 The rest offloaded, to RAM and disk
#
# The same budget given to `from_pretrained` as `max_memory` with `device_map="auto"`: it fills the main device,
# then the CPU (on a GPU machine), then the disk. For a safetensors checkpoint transformers does not copy the
# disk part into the offload folder: accelerate's hooks read each offloaded weight from the checkpoint's own
# files at every pass (`OffloadedWeightsLoader` in `accelerate/utils/offload.py`, a `safe_open` per weight), so
# the folder stays empty; a checkpoint in another format would be written there. Those reads are what the disk
# costs per token.

# %%
offloaded = AutoModelForCausalLM.from_pretrained(path, dtype=dtype, device_map="auto", max_memory=dict(BUDGET),
                                                 offload_folder=OFFLOAD)
where = {}
for name, dev in offloaded.hf_device_map.items():
    where.setdefault(str(dev), []).append(name)
for dev, names in where.items():
    n = [x for x in names if x in layers]
    say(f"{dev!r}: {len(n)} decoder layer{'' if len(n) == 1 else 's'}" + (f" ({n[0]} to {n[-1]})" if n else "")
        + f" and {len(names) - len(n)} other entries")
print("files in the offload folder:", sorted(f.name for f in OFFLOAD.iterdir() if not f.name.startswith(".")))
with torch.inference_mode():
    off_out = offloaded.generate(**inputs, max_new_tokens=NEW_TOKENS, do_sample=False)
print(f"same {NEW_TOKENS} greedy tokens as the model loaded whole:", torch.equal(off_out.cpu(), gen.sequences.cpu()))
assert torch.equal(off_out.cpu(), gen.sequences.cpu()), "offload moves the same weights: the tokens must not change"

# %% [markdown]
# ### 3.3 A long context: the KV cache offloaded or quantized
#
# At 32k tokens the 70B cache is 10 GiB a sequence (section 1.2): with the GPU full of weights, the cache needs a
# plan of its own. `generate` offers two (transformers 5.24, `generation/utils.py`, where it prepares its cache):
# - `cache_implementation="offloaded"`: a `DynamicCache(offloading=True)`; each layer's keys and values wait in CPU
#   RAM and are brought to the GPU, a layer ahead, while the layer before runs. It moves tensors between a GPU
#   and the CPU with CUDA streams: a GPU technique.
# - `cache_implementation="quantized"` with `cache_config={"backend": "fp8"}`: a `QuantizedCache` whose layers
#   (`Fp8QuantizedLayer`, `cache_utils.py`) keep keys and values as `float8_e4m3fn`, one byte a value instead of
#   two, with one scale per tensor fixed at the prefill; each step dequantizes them to attend. The `fp8` backend
#   needs no extra package (`"quanto"` and `"hqq"` do) and refuses the group-wise options (`nbits`,
#   `q_group_size`, ...). The prefill attends to the exact keys; the decode steps to rounded ones.
#
# A longer prompt makes the cache matter: the start of the bundled text, as many tokens as `PROMPTS` allows.

# %%
LONG = min(max(PROMPTS), limit - NEW_TOKENS, text_ids.shape[1])
long_inputs = {"input_ids": text_ids[:, :LONG].to(MAIN), "attention_mask": torch.ones(1, LONG, dtype=torch.long,
                                                                                      device=MAIN)}
pad = whole.generation_config.pad_token_id


def held_bytes(c):
    """Bytes of every tensor a cache's layers hold (in attributes, or in tuples of them), whatever their names."""
    out = 0
    for layer in c.layers:
        for v in vars(layer).values():
            for t in v if isinstance(v, (tuple, list)) else (v,):
                out += t.numel() * t.element_size() if isinstance(t, torch.Tensor) else 0
    return out


FP8 = dict(cache_implementation="quantized", cache_config={"backend": "fp8"})
with torch.inference_mode():
    caches = {name: whole.generate(**long_inputs, max_new_tokens=NEW_TOKENS, do_sample=False, pad_token_id=pad,
                                   return_dict_in_generate=True, **kw)
              for name, kw in (("plain", {}), ("fp8", FP8))}
for name, g in caches.items():
    say(f"{name:>5}: {type(g.cache).__name__} of {type(g.cache.layers[0]).__name__}, "
        f"{g.cache.get_seq_length():,} tokens, {held_bytes(g.cache) / MiB:.2f} MiB held")

# %% [markdown]
# The fp8 cache holds about half the bytes. Its greedy tokens, against the plain cache's, and its time: each
# `generate` of `NEW_TOKENS` tokens after the long prompt, three repeats of each, interleaved (a busy moment of
# the machine slows both alike), compared through the spread of the repeats first:

# %%
plain_new = caches["plain"].sequences[0, LONG:].tolist()
fp8_new = caches["fp8"].sequences[0, LONG:].tolist()
same = [a == b for a, b in zip(plain_new, fp8_new)]
first = same.index(False) + 1 if False in same else None
saved = 1 - held_bytes(caches["fp8"].cache) / held_bytes(caches["plain"].cache)
say(f"fp8 cache: {saved:.0%} fewer bytes held; {sum(same)} of {len(same)} greedy tokens the same as the plain "
    "cache's" + (f", the first difference at new token {first} (after it the texts go their own ways)" if first
                 else ""))
del caches
_ = gc.collect()

# %%
# NBVAL_IGNORE_OUTPUT
# timings depend on the machine and its load
runs = {"plain": [], "fp8": []}
with torch.inference_mode():
    for _ in range(3):
        for name, kw in (("plain", {}), ("fp8", FP8)):
            sync()
            t0 = time.perf_counter()
            whole.generate(**long_inputs, max_new_tokens=NEW_TOKENS, min_new_tokens=NEW_TOKENS, do_sample=False,
                           pad_token_id=pad, **kw)
            sync()
            runs[name].append(time.perf_counter() - t0)
lo, hi = min(runs["fp8"]) / max(runs["plain"]), max(runs["fp8"]) / min(runs["plain"])
say(f"a {LONG}-token prompt and {NEW_TOKENS} new tokens: plain {statistics.median(runs['plain']):.2f} s (repeats "
    f"{min(runs['plain']):.2f} to {max(runs['plain']):.2f}), fp8 {statistics.median(runs['fp8']):.2f} s (repeats "
    f"{min(runs['fp8']):.2f} to {max(runs['fp8']):.2f}); fp8 / plain: repeats {lo:.2f}x to {hi:.2f}x: "
    + ("no measurable difference" if lo <= 1 <= hi else f"fp8 is {'slower' if lo > 1 else 'faster'}"))

# %% [markdown]
# The offloaded cache, on a GPU, with the peak of GPU memory during `generate` for each cache; without a GPU the
# same call fails, and the error says why:

# %%
if ON_GPU:
    peaks = {}
    for name, kw in (("plain", {}), ("offloaded", {"cache_implementation": "offloaded"})):
        torch.cuda.reset_peak_memory_stats()
        with torch.inference_mode():
            out = whole.generate(**long_inputs, max_new_tokens=NEW_TOKENS, do_sample=False, pad_token_id=pad, **kw)
        peaks[name] = torch.cuda.max_memory_allocated()
        say(f"{name:>9}: peak {peaks[name] / MiB:.1f} MiB on the GPU; tokens the same as the plain cache's: "
            f"{torch.equal(out[0, LONG:].cpu(), torch.tensor(plain_new))}")
else:
    try:
        whole.generate(**long_inputs, max_new_tokens=2, do_sample=False, pad_token_id=pad,
                       cache_implementation="offloaded")
    except (AssertionError, RuntimeError) as e:
        say(f"{type(e).__name__}: {e}")
    say("The offloaded cache moves each layer's keys and values between a GPU and the CPU on CUDA streams: it "
        "needs a GPU (run this cell on one to see the memory it saves).")

# %% [markdown]
# What one GPU measured of the three caches, from the same committed reference (random weights, a long prompt):
# the peak of GPU memory above the weights during `generate`, the time, and the greedy tokens against the
# dynamic cache's. Offloading should change no token: by the installed code it copies the same bf16 keys and
# values to the CPU and back (`CacheLayerMixin.offload` and `prefetch` in `cache_utils.py`, `.to(...,
# non_blocking=True)`), and `Cache.update` orders those copies against the computation (`wait_stream` in both
# directions). The cell says whether it did.

# %%
kv = OFFLOAD_REF["kv"]
dyn = kv["dynamic"]
say(f"The committed reference ({REF_LABEL}): a prompt of {kv['prompt']:,} tokens, {kv['new_tokens']} new tokens, greedy")
for name in ("dynamic", "offloaded", "quantized fp8"):
    r, vs = kv[name], kv[name].get("against_dynamic")
    if "error" in r:
        say(f"{name}: failed there: {r['error']}")
        continue
    lo, hi = r["spread_s"][0] / dyn["spread_s"][1], r["spread_s"][1] / dyn["spread_s"][0]
    say(f"{name:>13}: peak {r['peak_above_weights_bytes'] / MiB:,.0f} MiB above the weights, {r['s']:.2f} s (repeats "
        f"{r['spread_s'][0]:.2f} to {r['spread_s'][1]:.2f})" + ("" if vs is None else
        f"; / dynamic: {lo:.2f}x to {hi:.2f}x: " + ("no measurable difference" if lo <= 1 <= hi else
        "slower" if lo > 1 else "faster") + "; tokens: " + ("all the same as the dynamic cache's" if vs["identical"]
        else f"{vs['differing']} of {len(r['tokens'])} differ, the first at new token {vs['first_difference'] + 1}")))
if not kv["offloaded"].get("against_dynamic", {"identical": True})["identical"]:
    say("Why the offloaded cache's tokens differ is not established: by its code it moves the same values. Random "
        "weights can leave the top logits of a step nearly tied, so a difference in the last bit of a sum (another "
        "kernel or order of operations, or run-to-run nondeterminism, which the file does not measure: it never "
        "compares the dynamic cache with itself) can change one greedy token, and the text goes its own way "
        "after it. A rerun comparing the dynamic cache with itself would tell.")

# %% [markdown]
# ## 4. What each token costs
#
# accelerate's hooks copy each offloaded layer's weights to the main device for its forward pass, **at every
# token**, and free them after. So a decode step costs, beyond the model's own step on the main device,
#
# $$\frac{\text{bytes in CPU RAM}}{\text{host-to-device rate}} + \frac{\text{bytes on disk}}{\text{disk read rate}}$$
#
# (bytes on disk also cross to the GPU; on a GPU they add their host-to-device time too). The rates are this
# machine's; the next cell measures them.
#
# ### 4.1 The rates, measured here
#
# - **Disk read rate**: `helpers.offload.disk_read_rate` writes a file of random bytes in this notebook's offload
#   folder, flushes it to disk, asks the operating system to drop it from its page cache
#   (`os.posix_fadvise(..., POSIX_FADV_DONTNEED)`), reads it back timed, and removes it: the **cold** rate. Read
#   from the page cache instead (**warm**), a file costs a memory copy: the CPU's copy bandwidth, measured with a
#   copy of 1 GiB (`helpers.measure.memory_bandwidth`), counts the bytes read and written, so a copy moves half
#   that figure's bytes a second.
# - **Host to device** (a GPU only): copies of 1 GiB from ordinary (pageable) CPU memory and from pinned memory
#   to the GPU (the cell's `h2d`); accelerate's hooks copy from pageable memory. Without a
#   GPU, the committed one-GPU reference's figures are printed instead, labelled as that machine's.

# %%
# NBVAL_IGNORE_OUTPUT
# the rates depend on the machine, its disk and its load (on a CPU the host-to-device figures are the committed ones)
REF = reference_results("one-gpu")  # the committed one-GPU reference: hardware, versions and measurements
REF_MACHINE = f"{REF['hardware']['gpus'][0][0]}, torch {REF['hardware']['torch']}, CUDA {REF['hardware']['cuda']}"
disk = disk_read_rate(OFFLOAD, mib=128, repeats=3)
cold = disk["read_Bps"]
cpu_bandwidth = memory_bandwidth("cpu")  # bytes read plus written a second, in a copy of 1 GiB
warm = cpu_bandwidth / 2  # a page-cache read is a copy: half the bytes of the copy's read-plus-written rate
if ON_GPU:
    def h2d(pinned, n=GiB):
        """Bytes a second copied from RAM (page-locked, or ordinary pageable) to GPU 0: median of 3 after one."""
        src, dst, took = torch.ones(n, dtype=torch.uint8), torch.empty(n, dtype=torch.uint8, device=0), []
        src = src.pin_memory() if pinned else src
        for _ in range(4):
            sync()
            t0 = time.perf_counter()
            dst.copy_(src, non_blocking=pinned)
            sync()
            took.append(time.perf_counter() - t0)
        return n / statistics.median(took[1:])

    pageable, pinned, h2d_from = h2d(False), h2d(True), "measured here"
    gpu_bandwidth, gpu_from = memory_bandwidth("cuda"), "measured here"
else:
    pageable, pinned = REF["h2d"]["pageable_GBps"] * 1e9, REF["h2d"]["pinned_GBps"] * 1e9
    h2d_from = gpu_from = f"the committed one-GPU reference, {REF_MACHINE}: not this machine, which has no GPU"
    gpu_bandwidth = REF["bandwidth"]["GBps"] * 1e9

# %%
# NBVAL_IGNORE_OUTPUT
# the rates of the cell above
say(f"disk read rate, cold: {cold / 1e9:.2f} GB/s (median of 3 reads of 128 MiB"
    + ("" if disk["evicted"] else "; the file system here cannot drop the file from RAM: this is not the disk's "
       "rate") + f"); warm, from the page cache: {warm / 1e9:.1f} GB/s (this CPU's copy bandwidth "
    f"{cpu_bandwidth / 1e9:.1f} GB/s, halved)")
say(f"host to device: pageable {pageable / 1e9:.2f} GB/s, pinned {pinned / 1e9:.1f} GB/s; GPU memory "
    f"{gpu_bandwidth / 1e9:,.0f} GB/s ({h2d_from}). The one-GPU reference also fitted an effective "
    f"{REF['offload']['effective_h2d_GBps']:.1f} GB/s from its timed CPU-offload runs.")

# %% [markdown]
# ### 4.2 Prediction beside measurement, on the stand-ins
#
# The prediction for the offloaded stand-in of section 3.2: the step of the model loaded whole, measured, plus its
# offloaded bytes over the rates just measured (the disk part twice: read cold, as when the page cache cannot hold
# it, and warm, from the page cache). A weight on disk is read as the checkpoint stores it: accelerate's
# `OffloadedWeightsLoader.__getitem__` opens its file (`safe_open`), reads the tensor in the checkpoint's dtype and
# converts it (`tensor.to(dtype)`) at every pass, so a float32 checkpoint reads twice the bytes of the bf16 layer it
# becomes, and the conversion costs a pass over both. Then the steps themselves, timed one decode step at a time (a
# forward pass with the cache, batch 1), one untimed step first, then `STEPS` timed, the two models interleaved so a
# busy moment slows both alike: the median and the spread of the repeats.

# %%
STEPS = 5
KV = "cache" if "cache" in inspect.signature(type(whole).forward).parameters else "past_key_values"  # 5.24: cache
offloaded_bytes = {}
for name, p in offloaded.named_parameters():
    dev = str(device_in(offloaded.hf_device_map, name))
    offloaded_bytes[dev] = offloaded_bytes.get(dev, 0) + p.numel() * p.element_size()  # meta tensors keep dtypes
# what a pass reads from disk: each disk weight in the dtype its checkpoint file stores (the safetensors headers)
STORED = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2}
stored = {}  # {checkpoint tensor name: bytes per value}
for shard in sorted(Path(path).glob("*.safetensors")):
    with safe_open(shard, "pt") as f:
        stored.update({k: STORED.get(f.get_slice(k).get_dtype(), 2) for k in f.keys()})
prefix = whole.base_model_prefix + "."  # some checkpoints name their tensors without it
disk_read = sum(p.numel() * stored.get(n, stored.get(n.removeprefix(prefix), p.element_size()))
                for n, p in offloaded.named_parameters() if str(device_in(offloaded.hf_device_map, n)) == "disk")

# %%
@torch.inference_mode()
def step_times(models):
    """Seconds of STEPS decode steps of each model (interleaved, after one untimed step): {name: [seconds]}."""
    outs = {k: m(**inputs, use_cache=True) for k, m in models.items()}  # the prefills
    times = {k: [] for k in models}
    for i in range(STEPS + 1):
        for k, m in models.items():
            token = outs[k].logits[:, -1:].argmax(-1)
            sync()
            t0 = time.perf_counter()
            outs[k] = m(input_ids=token, use_cache=True, **{KV: outs[k][KV]})
            sync()
            if i:  # the first step is untimed
                times[k].append(time.perf_counter() - t0)
    return times

# %%
# NBVAL_IGNORE_OUTPUT
# timings depend on the machine, its disk and its load
times = step_times({"whole": whole, "offloaded": offloaded})
med = {k: statistics.median(v) for k, v in times.items()}
away = {d: n for d, n in offloaded_bytes.items() if d != str(MAIN)}  # bytes read from elsewhere at every step
cross = away.get("cpu", 0) + away.get("disk", 0)  # what travels to a GPU (nothing to cross without one)
to_gpu = cross / pageable if ON_GPU else 0.0
convert = (disk_read + away.get("disk", 0)) / cpu_bandwidth if disk_read != away.get("disk", 0) else 0.0
predicted = {"cold": med["whole"] + to_gpu + disk_read / cold + convert,
             "warm": med["whole"] + to_gpu + disk_read / warm + convert}
say("offloaded per step: " + ", ".join(f"{d} {n / MiB:.1f} MiB" for d, n in away.items())
    + (f"; the disk part is read from the checkpoint as {disk_read / MiB:.1f} MiB (its stored dtype), then converted"
       if disk_read != away.get("disk", 0) else ""))
for k in times:
    say(f"{k:>9}: {med[k] * 1e3:7.1f} ms a step (repeats {min(times[k]) * 1e3:.1f} to {max(times[k]) * 1e3:.1f})")
say(f"predicted for the offloaded stand-in: {predicted['cold'] * 1e3:.1f} ms with the disk read cold, "
    f"{predicted['warm'] * 1e3:.1f} ms with it in the page cache; measured / predicted (warm): "
    f"{min(times['offloaded']) / predicted['warm']:.2f}x to {max(times['offloaded']) / predicted['warm']:.2f}x")
n_away = sum(str(device_in(offloaded.hf_device_map, n)) != str(MAIN) for n, _ in offloaded.named_parameters())
extra = min(times["offloaded"]) - predicted["warm"]  # beyond the prediction even in the fastest repeat
if extra > 0:
    say(f"Even the fastest offloaded step took {extra * 1e3:.1f} ms more than the warm prediction, "
        f"{extra / n_away * 1e3:.2f} ms for each of the {n_away} offloaded weights. The prediction counts bytes "
        "only; the hooks also do work per weight (for a weight on disk, open its checkpoint file and read the "
        "header; for every weight, make the tensor and free it after the layer ran), and on a busy machine the "
        f"load adds to it (the whole model's own steps ranged {min(times['whole']) * 1e3:.0f} to "
        f"{max(times['whole']) * 1e3:.0f} ms).")

# %% [markdown]
# The stand-in's disk part comes back from the page cache (the checkpoint was just read, and it is small beside
# this machine's RAM), so the warm prediction is the one to hold it to. Where a model's disk part is larger than
# the RAM left for the page cache (the 70B plan at 32k tokens below), every token pays the cold rate.
#
# The same comparison on one GPU, from the committed reference of section 3.1 (random weights): each recipe
# with layers off the GPU against the same format loaded whole, the extra time a token (end to end, the spread of
# the repeats first) beside the file's prediction, the bytes off the GPU over the pageable host-to-device rate
# measured there (for the disk recipe that counts the copy to the GPU only, not the read), and the rate the
# measured extra implies.

# %%
pageable_ref = OFFLOAD_REF["h2d"]["pageable_Bps"]
say(f"The committed reference ({REF_LABEL}): host to device, pageable {pageable_ref / 1e9:.2f} GB/s, pinned "
    f"{OFFLOAD_REF['h2d']['pinned_Bps'] / 1e9:.1f} GB/s")
for name, base in ((FLAG, UNQUANTIZED), (ON_DISK, UNQUANTIZED), ("bf16, layers on CPU", "bf16 whole")):
    r, b = rec[name], rec[base]
    moved = r["bytes_on_cpu"] + r["bytes_on_disk"]
    extra = r["s_per_token"] - b["s_per_token"]
    lo, hi = (r["spread_s"][0] - b["spread_s"][1]) / n_new, (r["spread_s"][1] - b["spread_s"][0]) / n_new
    pred = r["predicted_extra_s_per_token_pageable"]
    say(f"{name}: {moved / GiB:.2f} GiB off the GPU; against '{base}': {extra * 1e3:.0f} ms more a token (repeats "
        f"{lo * 1e3:.0f} to {hi * 1e3:.0f}); predicted {pred * 1e3:.0f} ms; "
        + ("the prediction is inside the spread" if lo <= pred <= hi else f"measured / predicted {extra / pred:.2f}x")
        + f"; the effective rate: {moved / extra / 1e9:.2f} GB/s")

# %% [markdown]
# ### 4.3 The table: Llama-3.1-70B and a 32B model on one 24 GiB GPU with 64 GiB of RAM
#
# The same formula, on plans for the question's machine (`GPU_GIB` and `RAM_GIB`, at the top): the planner places
# the weights in NF4 (scales included) on the GPU with room for the KV cache, the reserve and the prefill, the
# next layers in RAM, the rest on disk. Its bytes per place, and the seconds per token they predict, with every
# assumption printed:

# %%
# NBVAL_IGNORE_OUTPUT
# the predictions use the rates of 4.1
RATES = {"gpu_bandwidth": gpu_bandwidth, "h2d_rate": pageable, "disk_rate": cold,
         "source": f"GPU memory and host to device: {gpu_from}; disk read cold, measured here"}
say(f"rates: GPU memory {gpu_bandwidth / 1e9:,.0f} GB/s, host to device (pageable) {pageable / 1e9:.2f} GB/s, disk "
    f"{cold / 1e9:.2f} GB/s ({RATES['source']})")
table = {(s, c): plan(s, "nf4", 1, GPU_GIB, cpu_gib=RAM_GIB, context=c, offload=True, rates=RATES)
         for s in ("llama-3.1-70b", "qwen2.5-32b") for c in (4096, 32768)}
print(f"{'NF4 on 1 GPU':<14} {'context':>7} {'GPU':>6} {'RAM':>6} {'disk':>6} GiB {'s/token':>8}  verdict (binding)")
for (s, c), p in table.items():
    gpu = sum(n for d, n in p.true_bytes_per_device.items() if isinstance(d, int))
    sec = p.seconds_per_token.get("seconds_per_token")
    print(f"{s:<14} {c:>7,} {gpu / GiB:6.1f} {p.cpu_bytes / GiB:6.1f} {p.disk_bytes / GiB:6.1f}     "
          f"{f'{sec:8.3g}' if sec else '       -'}  {'fits' if p.fits else 'runs' if p.runs else 'no'} ({p.binding})")
say("assumptions: " + next(iter(table.values())).seconds_per_token.get("assumptions", ""))

# %% [markdown]
# ## 5. What to pick instead
#
# Offload works, and the table says what it costs. Four other routes, with numbers:
#
# 1. **Compute the offloaded layers on the CPU** instead of copying them to the GPU. A layer computed where its
#    weights live never crosses the bus: its bytes are read at the CPU's memory bandwidth (measured in 4.1), not
#    at the host-to-device rate, though the CPU's arithmetic is slower, and they stay in 4-bit (transformers'
#    offload holds them in bf16, section 3.1). This is llama.cpp's partial offload:
#    `-ngl N` (`--n-gpu-layers`) puts N layers on the GPU and runs the rest on the CPU. A published sweep
#    ([InventiveHQ, "The VRAM offload cliff"](https://inventivehq.com/blog/vram-offload-cliff-gpu-layers-benchmark),
#    llama.cpp, Qwen2.5-Coder-14B in Q4_K_M, 48 layers, an RTX 5060 Ti): 2.89 tokens/s with no layer on the GPU,
#    12.5 tokens/s with 40 of 48, 43.18 tokens/s with all; the time is set by the layers left on the CPU.
#    transformers has no such mode: `device_map` entries on `"cpu"` are copied to the GPU (section 3).
# 2. **Fewer bits a weight.** AQLM at 2 bits, for this very model: the card of
#    [ISTA-DASLab/Meta-Llama-3.1-70B-Instruct-AQLM-PV-2Bit-1x16](https://huggingface.co/ISTA-DASLab/Meta-Llama-3.1-70B-Instruct-AQLM-PV-2Bit-1x16)
#    (1 codebook of 16 bits, groups of 8, fine-tuned with PV-Tuning) gives a model size of 21.9 GB against 141 GB
#    in fp16, and MMLU (5-shot) 0.7814 against 0.8213 (ARC-Challenge 0.5478 against 0.6246). The method's paper
#    ([arXiv:2401.06118](https://arxiv.org/abs/2401.06118), the abstract of its first version) puts Llama-2-70B at
#    2 bits at a WikiText-2 perplexity of 3.94, and Llama-2-7B 1.81 points above FP16 (6.93). It needs the `aqlm`
#    package and its kernels (transformers' `AqlmConfig`), outside this workbook.
# 3. **A second GPU** (notebook 06): two 24 GiB GPUs hold the NF4 weights with no offload at all.
# 4. **A smaller model**: the 32B row of the table.
#
# The same arithmetic for each, on the question's machine:

# %%
# NBVAL_IGNORE_OUTPUT
# the figures follow the rates measured in section 4
big = table[("llama-3.1-70b", 4096)]
away_70b = big.cpu_bytes + big.disk_bytes  # held in bf16 (llm_int8_enable_fp32_cpu_offload): what crosses
offload_s = big.seconds_per_token.get("seconds_per_token")
gpu_part = sum(n for d, n in big.true_bytes_per_device.items() if isinstance(d, int))
away_4bit = alone["nf4"].total_true_bytes - gpu_part  # the same layers kept in NF4 with scales, where they are
on_cpu_s = big.seconds_per_token.get("gpu_s", 0) + away_4bit / cpu_bandwidth  # read once a token by this CPU
aqlm = 21.9e9  # the AQLM-PV card's 21.9 GB (its fp16 figure, 141 GB, is the bf16 131.4 GiB of section 2.1 in GB)
aqlm_room = GPU_GIB * GiB - aqlm - kv_cache_bytes(l70, 4096) - big.reserve_bytes - big.prefill_bytes_per_device[0]
two = plan("llama-3.1-70b", "nf4", 2, GPU_GIB, context=4096, rates=RATES)
small = table[("qwen2.5-32b", 4096)]
say("1. offload (section 3's recipe), NF4 at 4,096 tokens: " + (f"{offload_s:.2f} s a token predicted, "
    f"{away_70b / GiB:.1f} GiB crossing for each token" if big.runs else big.verdict()))
say(f"2. the same layers computed on the CPU instead, kept in 4-bit ({away_4bit / GiB:.1f} GiB with NF4's scales) as "
    f"llama.cpp keeps them: at least {on_cpu_s:.2f} s a token, the time to read them at this machine's memory "
    f"bandwidth ({cpu_bandwidth / 1e9:.1f} GB/s, 4.1); the CPU's arithmetic on them can only add to it")
say(f"3. Llama-3.1-70B at about 2 bits (AQLM-PV): {aqlm / GiB:.1f} GiB of weights; with the KV cache of 4,096 tokens, "
    f"the reserve and the prefill of a 4,096-token prompt it {'fits' if aqlm_room >= 0 else 'does not fit'} one "
    f"{GPU_GIB} GiB GPU ({abs(aqlm_room) / GiB:.1f} GiB {'to spare' if aqlm_room >= 0 else 'short'})")
say(f"4. two {GPU_GIB} GiB GPUs, NF4: {two.verdict()}")
say(f"5. qwen2.5-32b, NF4, one {GPU_GIB} GiB GPU, 4,096 tokens: {small.verdict()}")

# %%
# NBVAL_IGNORE_OUTPUT
# the decision follows the figures above
options = []
if aqlm_room >= 0:
    options.append("at about 2 bits (AQLM-PV) it fits the GPU whole, for a published quality cost (MMLU 0.821 "
                   "to 0.781)")
if two.fits:
    options.append(f"a second {GPU_GIB} GiB GPU holds it in NF4 (notebook 06)")
if small.fits:
    options.append("a 32B model fits in NF4 with no offload at all")
if big.fits:
    run_as_asked = f"fits the GPU: {offload_s:.3g} s a token"
elif big.runs:
    run_as_asked = (f"runs only with offload: {offload_s:.1f} s a token copying the offloaded layers to the GPU "
                    f"(transformers); computing them in 4-bit on this CPU (llama.cpp's route) at least {on_cpu_s:.1f} "
                    "s, its memory bandwidth alone")
else:
    run_as_asked = f"does not run: {big.verdict()}"

say(f"Decision for Llama-3.1-70B on one {GPU_GIB} GiB GPU with {RAM_GIB} GiB of RAM: in NF4 it {run_as_asked}. "
    + (f"To run without offload instead: {'; or '.join(options)}." if options else
       "None of the other routes fits this GPU: offload is the way, or more GPU memory."))

# %% [markdown]
# ## Clean up
#
# Free the models and remove the offload folder this notebook made (and nothing else).

# %%
del whole, offloaded
gc.collect()
shutil.rmtree(OFFLOAD)
print("offload folder removed:", not OFFLOAD.exists())

# %% [markdown]
# ## Summary
#
# 1. The KV cache takes 2 x layers x KV heads x head dim x bytes per value per token, times the batch (exactly
#    what `generate`'s cache holds); a sliding window caps it. `plan` takes any config (or a checkpoint folder, or
#    a hub id when online) and gives the longest context that fits (`max_context`); the widget explores plans.
# 2. A plan counts, per GPU, the weights with their scales (transformers places modules with its own count, 0.5
#    byte per 4-bit weight: both are labelled), the KV cache of the layers there, the reserve, the prefill's
#    activation peak (a formula checked against the allocations measured here) and the load's peak in tensors
#    (not the freed memory a C allocator keeps: section 2.3); and on the host, the RAM and disk of the offloaded
#    part. It names the term that binds, and refuses a context above the
#    config's `max_position_embeddings`.
# 3. NF4 with whole layers on the CPU runs through `llm_int8_enable_fp32_cpu_offload=True` and a `device_map`
#    dict, but the offloaded layers stay in the load dtype, not 4-bit; without a GPU there is no 4-bit part at all.
#    Offload to RAM and disk moves the same weights, so greedy tokens do not change. The fp8 KV cache halves the
#    cache's bytes and can change greedy tokens; the offloaded cache is a GPU technique.
# 4. Each token pays the bytes offloaded over the host-to-device rate (pageable memory, as accelerate copies)
#    and the disk part, as the checkpoint stores it, over the disk's read rate, cold when the page cache cannot
#    hold it, plus the hooks' work per weight. Printed here beside the measured step, then for 70B and 32B on one 24 GiB GPU.
# 5. Computing the offloaded layers on the CPU (llama.cpp's `-ngl`), fewer bits, a second GPU or a smaller model
#    can each beat offload; section 5 printed the decision for the 70B case from the numbers.
#
# ## Exercises
#
# 1. A model this notebook did not plan: the Qwen2-style shape in the cell below (about 15B parameters), in NF4
#    on one 8 GiB GPU with 32 GiB of RAM, one sequence of 8,192 tokens, run with offload. How many GiB of its
#    weights does the plan hold off the GPU, in RAM and on disk together, in the form they are held there? Put it
#    in `offloaded_gib`.
# 2. Without calling `kv_cache_bytes`, work out the KV cache (GiB, bf16) of the `llama-3.1-70b` shape for 8
#    sequences of 32,768 tokens (its fields: `shape_config("llama-3.1-70b")`). Put it in `kv_gib`.
# 3. In section 3.2, give the main device half the model instead of a third (`BUDGET[MAIN] = sizes[""] // 2`) and
#    run sections 3.2 and 4.2 again: does the measured step shrink as the prediction says?

# %%
from transformers import Qwen2Config

offloaded_gib = None  # exercise 1: GiB of weights off the GPU
kv_gib = None  # exercise 2: GiB of KV cache

SHAPE_15B = Qwen2Config(hidden_size=5120, intermediate_size=13824, num_hidden_layers=48, num_attention_heads=40,
                        num_key_value_heads=8, vocab_size=152064, max_position_embeddings=32768,
                        tie_word_embeddings=False)

# %%
p15 = plan(SHAPE_15B, "nf4", 1, 8, cpu_gib=32, context=8192, offload=True)
right = sum(n for d, n in p15.true_bytes_per_device.items() if d in ("cpu", "disk")) / GiB
in_4bit = plan(SHAPE_15B, "nf4", 1, 100).total_true_bytes / GiB - p15.true_bytes_per_device[0] / GiB
naive = in_4bit  # the slip: the offloaded layers counted in 4-bit (they are held in bf16, section 3.1)
tolerance = 0.03 * right + 0.05
_ = check_answer(offloaded_gib, lambda g: abs(g - right) <= tolerance, f"{right:.1f} GiB off the GPU.",
                 lambda g: f"{g} GiB; the plan gives {right:.1f}: use true_bytes_per_device's 'cpu' and 'disk' "
                           "entries (the GPU keeps room for the KV cache, the reserve and the prefill, and the "
                           "layers it offloads are held in bf16, not 4-bit).",
                 "p = plan(SHAPE_15B, 'nf4', 1, 8, cpu_gib=32, context=8192, offload=True), then its "
                 "true_bytes_per_device.",
                 wrong_example=naive if abs(naive - right) > tolerance else 2 * right + 1, label="Exercise 1")

# %%
l70 = shape_config("llama-3.1-70b")
expected_gib = kv_cache_bytes(l70, 32768, batch=8) / GiB
with_query_heads = expected_gib * l70.num_attention_heads / l70.num_key_value_heads  # the likely slip
_ = check_answer(kv_gib, lambda g: abs(g - expected_gib) < 0.05 * expected_gib, f"{expected_gib:.1f} GiB.",
                 lambda g: f"{g} GiB; count KV heads (num_key_value_heads), not query heads, "
                           "and multiply by tokens and sequences.",
                 "2 x layers x KV heads x head dim x 2 bytes, per token and sequence.",
                 wrong_example=with_query_heads, label="Exercise 2")

# %% [markdown]
# ## Further reading
#
# - [transformers: bitsandbytes, offload between CPU and GPU](https://huggingface.co/docs/transformers/main/en/quantization/bitsandbytes):
#   `llm_int8_enable_fp32_cpu_offload` and a custom `device_map` (section 3.1 shows what it really keeps).
# - [transformers: KV cache strategies](https://huggingface.co/docs/transformers/main/en/kv_cache): the offloaded
#   and quantized caches of section 3.3, and the others `generate` offers.
# - [accelerate: big model inference](https://huggingface.co/docs/accelerate/usage_guides/big_modeling): offload to
#   CPU and disk, and the hooks that copy weights at every pass.
# - [llama.cpp](https://github.com/ggml-org/llama.cpp): GGUF models, `-ngl` partial offload that computes the
#   layers left on the CPU where they are.
# - [AQLM (Egiazarian et al., 2024)](https://arxiv.org/abs/2401.06118): 2-bit additive quantization, the
#   lower-bit route of section 5.
# - Notebook 06 for the second GPU; notebook 08 for the failures offload and 4-bit maps run into.
