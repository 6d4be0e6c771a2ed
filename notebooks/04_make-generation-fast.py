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
# # Make generation fast, and know the limit
#
# A model that fits is not yet a model that is fast. Before trying to make `generate` faster, measure how fast
# it could possibly be on this machine: decoding one token at a small batch reads every weight once from
# memory, so the memory bandwidth sets a ceiling on tokens per second, and no setting can beat it. Reading a
# prompt (the prefill) does many multiply-adds per weight read, so there the ceiling is the matrix-multiply
# rate. This notebook measures both ceilings here, then times the ways up that transformers offers (a static
# KV cache, compilation, larger batches, smaller weight formats) and prints each rate as a share of its
# ceiling, so you see which ways pay on this machine and how much room is left.
#
# **What you'll learn**
# 1. Measure this machine's limits: memory bandwidth (a copy of 1 GiB or more) and matrix-multiply rate; count the bytes
#    one decode step reads (weights, a tied head once, the KV cache) and the FLOP a prefill needs; draw both on
#    a roofline.
# 2. Time `generate`'s paths, each with its warm-up or compile time and its share of the limit: eager, the
#    static cache (`cache_implementation="static"`), on a GPU the compile `generate` does itself and inductor's
#    tuned setting, on a CPU an explicit `torch.compile` and whether it pays back; check that a compiled graph
#    really ran, and that the greedy tokens match eager's.
# 3. Sweep the batch from 1 to 64 and find where decode stops being bound by reading the weights.
# 4. Compare weight formats at batch 1 and 16: bf16, LLM.int8 (threshold 6.0 and 0.0), NF4 with and without
#    double quantization, and torchao's int8 (and on a GPU int4) weight-only through `TorchAoConfig`; and what
#    they cost at load time.
# 5. Read the committed benchmark of this machine's tier (`./workbook.sh bench`) beside your own figures.
#
# **What you'll need**
# - Notebook 01 (bitsandbytes formats) and notebook 03, section 6 (the KV cache's size), first.
# - Hardware: a CPU is enough; on a GPU the same cells run its kernels and the compiled paths that need CUDA.
#   About 3 minutes on an idle 2-core CPU (the explicit `torch.compile` of section 2 is up to about a minute of
#   it, less where the compiler's disk cache holds an earlier run's work: set `COMPILE_ON_CPU = False` to skip it), and at most about 4 GB of RAM (the 1 GiB copy needs 2 GiB).

# %% tags=["parameters"]
MODEL = "bundled"  # "bundled" (SmolLM2-135M-Instruct), a local checkpoint folder, or a hub id
NEW_TOKENS = 16  # new tokens per timed run; decode rate = (NEW_TOKENS - 1) / (t(NEW_TOKENS) - t(1))
REPEATS = 3  # timed repeats per figure: medians, with the spread of the repeats
BATCHES = (1, 2, 4, 8, 16, 32, 64)  # the batch sweep of section 3
PROMPT_LENGTHS = None  # prompt tokens timed to the first token (1.4); None: 8 to 128 on a CPU, 64 to 4,096 on a GPU
COMPILE_ON_CPU = True  # section 2's explicit torch.compile on a CPU (up to a minute on 2 cores); False skips it

# %%
import gc
import inspect
import os
import shutil
import statistics
import tempfile
import textwrap
import time
from importlib.metadata import version
from importlib.resources import files
from pathlib import Path

import matplotlib.pyplot as plt
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, BitsAndBytesConfig, TorchAoConfig

from helpers.checkpoints import resolve_model
from helpers.measure import compare_rates, rate_text, time_generate
from helpers.quiet import silence_known_warnings
from helpers.reference import speed_results
from helpers.speed import compiled_graphs, roofline

silence_known_warnings()  # routine library messages; on a CPU, torchao's CUDA-only kernels that cannot load
ON_GPU = torch.cuda.is_available()
DEVICE = "cuda" if ON_GPU else "cpu"
DEVICE_MAP = {"": 0} if ON_GPU else {"": "cpu"}
DTYPE = torch.bfloat16  # the dtype models are served in; every format below loads its unquantized parts in it
MiB = 2**20

# %%
def sync():
    """Wait for the GPU's queued work, so a clock read after it counts the work; nothing to wait for on a CPU."""
    if ON_GPU:
        torch.cuda.synchronize()


def show(text):
    """Print text wrapped at 107 characters, what one line of JupyterLab's output area holds."""
    print("\n".join(textwrap.fill(line, 107, subsequent_indent="  ") for line in text.split("\n")))


def pct(share):
    """A share as a percentage: whole percents from 10%, one decimal below (0.4%, not 0%)."""
    return f"{share:.0%}" if share >= 0.095 else f"{share:.1%}"

# %%
# NBVAL_IGNORE_OUTPUT
# versions and devices depend on the machine
print(", ".join(f"{p} {version(p)}" for p in ("torch", "transformers", "torchao", "bitsandbytes")),
      f"| device: {torch.cuda.get_device_name(0) if ON_GPU else f'CPU, {torch.get_num_threads()} threads'}")

# %% [markdown]
# ## 1. The limit, measured here
#
# ### 1.1 Memory bandwidth
#
# Generating one token for one sequence multiplies one vector by every weight matrix of the model: each weight
# is read from memory once and used for one multiply and one add. A processor does far more multiply-adds per
# second than memory delivers weights, so the step waits for memory. Its shortest time is the bytes it reads
# divided by the **memory bandwidth**, and tokens/s can never exceed bandwidth / bytes per step.
#
# We measure the bandwidth the way the STREAM benchmark's "copy" does: copy a buffer of 1 GiB (4 GiB on a GPU,
# whose copy of 1 GiB takes under a millisecond, too short to time well) and count the bytes read plus the bytes
# written over the time, median of 5 copies after one untimed copy. A smaller buffer would fit the CPU's caches
# and overstate the rate. (This is what `helpers.measure.memory_bandwidth` does for the other notebooks and for
# the benchmark of section 6.)

# %%
# NBVAL_IGNORE_OUTPUT
# the bandwidth depends on the machine and its load
def copy_rates(device, gib=1, repeats=5):
    """Bytes/s of copying `gib` GiB on `device`, one figure a repeat: bytes read plus bytes written over the time."""
    src = torch.ones(gib * 2**30, dtype=torch.uint8, device=device)
    dst = torch.empty_like(src)
    dst.copy_(src)  # untimed: the first touch of every page
    rates = []
    for _ in range(repeats):
        sync()
        t0 = time.perf_counter()
        dst.copy_(src)
        sync()
        rates.append(2 * src.numel() / (time.perf_counter() - t0))
    return rates


gib = 4 if ON_GPU else 1
rates = copy_rates(DEVICE, gib)
bandwidth = statistics.median(rates)
gc.collect()
print(f"memory bandwidth: {bandwidth / 1e9:.1f} GB/s (a {gib} GiB copy, median of 5; repeats "
      f"{min(rates) / 1e9:.1f} to {max(rates) / 1e9:.1f} GB/s)")

# %% [markdown]
# ### 1.2 Matrix-multiply rate
#
# The other ceiling is arithmetic: how many floating-point operations (FLOP) a second the device does on a large
# matrix product in bf16, the dtype we run the model in. An `n x n` product costs `2 n^3` FLOP (a multiply and
# an add for each of `n` terms of `n^2` outputs). `n` is 2048 on a CPU and 8192 on a GPU, large enough to keep
# every core busy; one untimed product first, then the median of 5 (as `helpers.speed.matmul_rate` does).
#
# Dividing the two ceilings gives the **ridge**: the FLOP a step must do per byte it reads before compute, not
# memory, sets its pace.

# %%
# NBVAL_IGNORE_OUTPUT
# the matrix-multiply rate depends on the machine and its load
n = 8192 if ON_GPU else 2048
a, b = (torch.randn(n, n, device=DEVICE).to(DTYPE) for _ in range(2))
a @ b  # untimed: kernel choice, caches
mm_rates = []
for _ in range(5):
    sync()
    t0 = time.perf_counter()
    a @ b
    sync()
    mm_rates.append(2 * n**3 / (time.perf_counter() - t0))
del a, b
flops_per_s = statistics.median(mm_rates)
ridge = flops_per_s / bandwidth
print(f"matrix multiply ({n} x {n}, {DTYPE}): {flops_per_s / 1e9:,.0f} GFLOP/s (median of 5; repeats "
      f"{min(mm_rates) / 1e9:,.0f} to {max(mm_rates) / 1e9:,.0f})")
print(f"ridge: {ridge:.0f} FLOP per byte read. A step that does fewer is bound by memory, one that does more by compute.")

# %% [markdown]
# ### 1.3 Bytes one decode step reads
#
# We load the model in bf16 and count what one decode step must read at the least:
# - every weight once: the parameters and buffers, each tensor once, so a head **tied** to the embedding (the same
#   matrix) counts once, and the head reads all of it;
# - an **untied** input embedding is only looked up: one row a sequence, not the whole matrix;
# - the **KV cache**: each layer reads the keys and values of every token so far. Notebook 03 (section 6) wrote
#   its size: 2 (a key and a value) x layers x KV heads x head dim x bytes per value, per token and sequence.
#
# Bytes are counted as stored. A torchao weight (section 4) is a tensor subclass whose dtype says bfloat16 while
# it holds int8 data and scales; `__tensor_flatten__` names the tensors it really holds. (This is the count
# `helpers.measure.decode_bytes` makes for the other notebooks and the benchmark.)

# %%
path = resolve_model(MODEL)
tok = AutoTokenizer.from_pretrained(path)
model = AutoModelForCausalLM.from_pretrained(path, dtype=DTYPE, device_map=DEVICE_MAP)
config = model.config.get_text_config()
pad_id = model.generation_config.pad_token_id  # what time_generate passes too
PROMPT = "The capital of France is"
inputs = tok([PROMPT], return_tensors="pt").to(DEVICE)
prompt_len = inputs["input_ids"].shape[1]
print(f"{config.model_type}: {sum(p.numel() for p in model.parameters()) / 1e6:.1f} M parameters in {DTYPE}; "
      f"the prompt {PROMPT!r} is {prompt_len} tokens")


def stored_bytes(t):
    """Bytes a tensor holds; for a tensor subclass (torchao), the bytes of the tensors it is made of."""
    if hasattr(t, "__tensor_flatten__"):
        return sum(stored_bytes(getattr(t, name)) for name in t.__tensor_flatten__()[0])
    return t.numel() * t.element_size()


def kv_bytes(tokens, batch=1):
    """The KV cache of `tokens` tokens for `batch` sequences, in the model's dtype (notebook 03, section 6)."""
    kv_heads = getattr(config, "num_key_value_heads", None) or config.num_attention_heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    return 2 * config.num_hidden_layers * kv_heads * head_dim * DTYPE.itemsize * tokens * batch

# %%
def step_bytes(m, batch, context):
    """The fewest bytes one decode step of `batch` sequences reads with `context` tokens cached."""
    emb, head = m.get_input_embeddings().weight, m.get_output_embeddings()
    total = sum(stored_bytes(t) for t in [*m.parameters(), *m.buffers()])  # parameters() yields a tied matrix once
    if head is None or head.weight is not emb:  # untied: the lookup reads one row a sequence
        total -= stored_bytes(emb) - batch * emb.shape[1] * emb.element_size()
    return total + kv_bytes(context, batch)


def limit(m, batch, context):
    """The most total tokens/s decoding allows: batch x bandwidth / bytes a step reads (an upper bound)."""
    return batch * bandwidth / step_bytes(m, batch, context)


with torch.inference_mode():
    cache = model(**inputs, use_cache=True).cache  # a DynamicCache: one key and one value tensor a layer
real = sum(stored_bytes(t) for layer in cache.layers for t in (layer.keys, layer.values))
print(f"the cache of the {prompt_len}-token prompt: {real:,} bytes; the formula: {kv_bytes(prompt_len):,} bytes")
assert real == kv_bytes(prompt_len), "notebook 03's formula should give the real cache's bytes"
tied = model.get_output_embeddings().weight is model.get_input_embeddings().weight
show(f"one decode step reads {step_bytes(model, 1, 0) / MiB:.1f} MiB of weights (the head {'tied: counted once' if tied else 'untied'}), "
     f"plus {kv_bytes(1) / 1024:.1f} KiB of KV cache per token of context and sequence")

# %% [markdown]
# Those bytes over the bandwidth give the **decode limit**. For the limit of a timed run we count the cache at
# the middle of the run (the prompt plus half the new tokens): a run's steps read, on average, the cache of that
# many tokens. Everything else a step moves (activations, the logits, a static cache's empty slots) only adds
# bytes, so the limit is an upper bound as far as the copy's rate is the memory's: a stream that only reads can
# run somewhat faster than a copy, which also writes, so a rate near 100% means the memory is saturated, not
# beaten. A rate above the limit is a measuring error (or a model small enough to sit in a cache), and
# `rate_text` refuses to print one.

# %%
# NBVAL_IGNORE_OUTPUT
# the limit follows the bandwidth measured above
context = prompt_len + NEW_TOKENS // 2
print(f"decode limit at batch 1: {bandwidth / 1e9:.1f} GB/s / {step_bytes(model, 1, context) / MiB:.1f} MiB a step "
      f"= {limit(model, 1, context):,.0f} tokens a second at most")

# %% [markdown]
# ### 1.4 Prefill: the compute-bound side
#
# The first token needs the whole prompt: one forward pass over all its tokens. Each weight is still read once,
# but now used for 2 FLOP **per prompt token**, so the FLOP per byte grow with the prompt, and past the ridge the
# matrix-multiply rate, not the bandwidth, sets the time. Its FLOP floor: 2 FLOP per weight of a matrix product
# and token, plus causal attention, `2 x layers x tokens^2 x heads x head dim` (scores and the weighted sum, over
# half the square). `generate` asks the model for the logits of the last position only (`logits_to_keep=1`,
# where the model's `forward` takes it), so the head's product counts once, not once a token; a model that
# returns every position's logits pays it per token. (`helpers.speed.prefill_flops`, which the benchmark uses, counts it the
# same way; `all_logits=True` counts the head for every token, as a forward returning all logits needs.)
#
# We time `generate` for one new token (the time to first token) at a few prompt lengths cut from the bundled
# text, and set it beside both floors: FLOP over the matrix-multiply rate, bytes over the bandwidth.

# %%
from transformers.pytorch_utils import Conv1D  # GPT-2's linear layers

in_products = sum(m.weight.numel() for m in model.modules() if isinstance(m, (torch.nn.Linear, Conv1D)))
head_weights = model.get_output_embeddings().weight.numel()
q_dim = config.num_attention_heads * (getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads)
last_only = "logits_to_keep" in inspect.signature(model.forward).parameters


def prefill_floor(tokens, batch=1):
    """FLOP of a prefill: 2 a weight and token (the head once where only the last logits are asked), attention."""
    head_rows = 1 if last_only else tokens
    return batch * (2 * (in_products - head_weights) * tokens + 2 * head_weights * head_rows
                    + 2 * config.num_hidden_layers * tokens**2 * q_dim)


def step_flops(batch, context):
    """FLOP of one decode step: 2 a weight of a matrix product and sequence, attention over `context` tokens."""
    return batch * (2 * in_products + 4 * config.num_hidden_layers * context * q_dim)


show(f"{in_products / 1e6:.1f} M weights in matrix products (the head's {head_weights / 1e6:.1f} M among them); "
     f"generate computes the last position's logits only: {last_only}")

# %%
# NBVAL_IGNORE_OUTPUT
# times to first token depend on the machine and its load
lengths = PROMPT_LENGTHS or ((64, 256, 1024, 4096) if ON_GPU else (8, 32, 128))
max_positions = getattr(config, "max_position_embeddings", None)  # GPT-2's n_positions; None for ALiBi (Bloom)
text_ids = tok(files("helpers").joinpath("data/alice.txt").read_text() * 16, return_tensors="pt")["input_ids"]
lengths = [n for n in lengths if (not max_positions or n <= max_positions) and n <= text_ids.shape[1]]
prefill = {}
with torch.inference_mode():
    for n in lengths:
        ids = text_ids[:, :n].to(DEVICE)
        kw = dict(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=1, pad_token_id=pad_id)
        model.generate(**kw)  # untimed warm-up
        times = []
        for _ in range(REPEATS):
            sync()
            t0 = time.perf_counter()
            model.generate(**kw)
            sync()
            times.append(time.perf_counter() - t0)
        s = statistics.median(times)
        by_flop, by_bytes = prefill_floor(n) / flops_per_s, step_bytes(model, 1, n) / bandwidth
        prefill[n] = {"seconds": s, "flops": prefill_floor(n)}
        show(f"{n:>4} tokens: {s * 1e3:.4g} ms (repeats {min(times) * 1e3:.4g} to {max(times) * 1e3:.4g}); floors "
             f"{by_flop * 1e3:.3g} ms of FLOP, {by_bytes * 1e3:.3g} ms of bytes: {pct(max(by_flop, by_bytes) / s)} of "
             f"the larger, the {'FLOP' if by_flop >= by_bytes else 'bytes'} floor")

# %% [markdown]
# On the roofline, a prompt much shorter than the ridge (in tokens, about the ridge's FLOP per byte, since a bf16
# weight is 2 bytes used for 2 FLOP a token) has the floor of one decode step: the bytes floor is the larger. A
# prompt longer than that is bound by compute, and its floor grows with its length. The last figure says how close
# each prefill came to its larger floor (for a compute-bound prompt, the share of the matrix-multiply rate it
# reached); what it leaves is the work a forward pass does besides reading weights and large products
# (attention's softmax, norms, many small kernels, `generate`'s own steps). Section 3 reaches the compute side
# from the other end: decoding many sequences at once.
#
# ## 2. `generate`'s paths, against the limit
#
# - **Eager** `generate`: the default `DynamicCache` grows by one token a step, and each step runs the model's
#   Python code and launches its many small kernels one by one.
# - **Static cache**, `generate(..., cache_implementation="static")`: the keys and values are allocated once for
#   `max_length - 1` tokens (prompt plus `max_new_tokens`, minus one), so every decode step has the same shapes.
#   A later call gets the larger of its own length and the longest asked for before (`_prepare_static_cache` in
#   `transformers/generation/utils.py` keeps it on the model), so a shorter call does not change the shapes;
#   `generation_config.max_cache_len` sizes it for the worst case from the start.
# - **Compiled.** With a static cache on a `cuda` (or `xpu`, `neuron`, `tpu`) device, `generate` compiles the
#   forward itself: `_valid_auto_compile_criteria` checks the device type, the cache, the quantizer (section 4) and
#   that nothing is offloaded (a map with the CPU beside a GPU, or the disk, as in notebook 02, never compiles),
#   then the decode steps run `get_compiled_call(generation_config.compile_config)`, a `torch.compile` of the
#   model's `__call__` with `CompileConfig()`'s defaults (`fullgraph=False`, `dynamic=None`,
#   `mode="reduce-overhead"`: CUDA graphs); the prefill runs uncompiled. It compiles again when a shape changes: a
#   new batch size, or a `max_new_tokens` (or prompt) that needs a longer cache than any call before. With
#   `dynamic=None` the first change recompiles with that dimension made dynamic (torch's
#   `automatic_dynamic_shapes`), so a third batch size usually compiles nothing more, though CUDA graphs are
#   recorded once for each size. `generate(..., disable_compile=True)` keeps the static cache and skips the compile:
#   on a GPU that is the `static` path, and `static+compile` the compiled one. On a CPU `generate` does not compile
#   by itself, so `static` is the cache alone there too, and we compile by hand: `model.forward =
#   torch.compile(model.forward)`, with the static cache (this compiles the prefill too). The compiler keeps what it
#   built in a cache on disk (under the system's temporary folder), so on a machine that compiled this model before,
#   it compiles faster.
# - **Tuned**, on a GPU: `torch._inductor.config.coordinate_descent_tuning = True`, the setting gpt-fast uses: the
#   compiler tunes the block sizes (and warps) of the Triton kernels it generates, one at a time, timing each try
#   and keeping the fastest. It applies to graphs compiled after it is set, so we drop the graphs compiled so far
#   (`torch.compiler.reset()`). The cell keeps a copy of inductor's settings and section 4 puts them back.
#
# A compiled graph is checked against what it was compiled for, the grad mode included: `time_generate` times
# under `torch.inference_mode()`, so the warm-up runs under it too, or the timed runs would compile again.
# `measure` warms a path up (timing it: for a compiled path, the compile), times it with `time_generate`, and
# counts the graphs `torch.compile` made during each (`helpers.speed.compiled_graphs`).

# %%
def measure(m, batch, path, fmt="bf16", **kw):
    """Warm up one path (its compile, where it compiles), then time it; a record of its rate beside its limit."""
    batch_inputs = tok([PROMPT] * batch, return_tensors="pt").to(DEVICE)
    ctx = prompt_len + NEW_TOKENS // 2
    lim, before = limit(m, batch, ctx), compiled_graphs()
    with torch.inference_mode():  # the mode time_generate times in
        sync()
        t0 = time.perf_counter()
        out = m.generate(**batch_inputs, max_new_tokens=NEW_TOKENS, min_new_tokens=NEW_TOKENS, do_sample=False,
                         pad_token_id=pad_id, **kw)
        sync()
    warmup_s, in_warmup = time.perf_counter() - t0, compiled_graphs() - before
    r = time_generate(m, batch_inputs, NEW_TOKENS, repeats=REPEATS, warmup=0, limit_tokens_per_s=lim / batch, **kw)
    return {"path": path, "format": fmt, "batch": batch, "tokens_per_s": r["total_tokens_per_s"],
            "spread": (r["spread"][0] * batch, r["spread"][1] * batch), "limit": lim, "warmup_s": warmup_s,
            "graphs_in_warmup": in_warmup, "graphs_in_repeats": compiled_graphs() - before - in_warmup,
            "tokens": out[0, prompt_len:].tolist(), "bytes": step_bytes(m, batch, ctx),
            "flops": step_flops(batch, ctx), "seconds": batch / r["total_tokens_per_s"]}


def show_rate(rec, what=("path",)):
    """One line (wrapped where long): the record's `what` fields, its warm-up, its total tokens/s beside the limit."""
    show(f"{', '.join(str(rec[k]) for k in what)} (warm-up {rec['warmup_s']:.1f} s): "
         + rate_text(rec["tokens_per_s"], rec["limit"], rec["spread"]))

# %%
# NBVAL_IGNORE_OUTPUT
# timings depend on the machine and its load
import torch._inductor.config as inductor_config

inductor_before = inductor_config.get_config_copy()  # put back after section 4 (torchao's configs change it too)
STATIC = dict(cache_implementation="static")
paths = {"eager": measure(model, 1, "eager")}
paths["static"] = measure(model, 1, "static", **STATIC, disable_compile=True)  # the static cache alone
if ON_GPU:  # generate compiles the decode steps itself
    for name, tuned in (("static+compile", False), ("static+tuned", True)):
        inductor_config.coordinate_descent_tuning = tuned  # True: gpt-fast's setting; False: the default
        torch.compiler.reset()  # forget the graphs compiled so far: the next compile uses the setting
        paths[name] = measure(model, 1, name, **STATIC)
elif COMPILE_ON_CPU:
    model.forward = torch.compile(model.forward)  # by hand: generate compiles only on a GPU-like device
    paths["compile"] = measure(model, 1, "compile", **STATIC)
    del model.forward  # the model's own forward again
    torch.compiler.reset()  # free the compiled graphs
for rec in paths.values():
    show_rate(rec)

# %% [markdown]
# **Self-check: did a compiled graph really run?** A path counts as compiled only where graphs were compiled
# during its warm-up and none during its timed repeats (a graph compiled there would put its compile time into
# the rate, and mean the warm-up's graph did not fit the timed runs). `eager` and `static` must compile nothing,
# `static+compile`, `static+tuned` (on a GPU) and `compile` (on a CPU) must compile.

# %%
expected = {"eager": False, "static": False, "static+compile": True, "static+tuned": True, "compile": True}
for name, rec in paths.items():
    rose, again = rec["graphs_in_warmup"] > 0, rec["graphs_in_repeats"] > 0
    print(f"{name:<12} graphs compiled during the warm-up: {'yes' if rose else 'none'}; "
          f"during the timed repeats: {'yes' if again else 'none'}")
    assert rose == expected[name], f"{name}: a compile was expected {'' if expected[name] else 'not '}to happen"
    assert not again, f"{name} compiled again while it was timed: its rate holds a compile"
if not ON_GPU and not COMPILE_ON_CPU:
    print("COMPILE_ON_CPU is False: no compiled path was run on this CPU")

# %% [markdown]
# **Same tokens?** Greedy decoding picks the most likely token at each step, so two paths that compute the same
# numbers pick the same tokens. A compiled graph fuses operations and may add in another order; in bf16 (8
# significant bits) that rounds differently, and where two tokens are nearly tied the pick can flip, after which
# the two texts go their own ways. The cell counts, for each path, how many of its greedy tokens match eager's.

# %%
# NBVAL_IGNORE_OUTPUT
# compiled kernels round differently on different processors
for name, rec in paths.items():
    same = [x == y for x, y in zip(rec["tokens"], paths["eager"]["tokens"])]
    first = same.index(False) + 1 if False in same else None
    show(f"{name}: {sum(same)} of {NEW_TOKENS} greedy tokens match eager's"
         + (f" (the first difference at new token {first}; the rest follows from it)" if first else ""))
show("eager's text: " + repr(tok.decode(paths["eager"]["tokens"], skip_special_tokens=True)))

# %% [markdown]
# **Which path pays?** Each comparison gives the spread of the repeats first; a ratio whose range holds 1 is "no
# measurable difference". A compile is a cost paid once: it pays back after compile seconds / seconds saved per
# token, if it saves any.

# %%
# NBVAL_IGNORE_OUTPUT
# the verdicts follow the timings above
eager = paths["eager"]
faster = [p for p, r in paths.items() if r["spread"][0] > eager["spread"][1]]  # beyond the spread of the repeats
for name, rec in paths.items():
    if name != "eager":
        show(compare_rates(rec, eager, name, "eager"))
best = max(paths, key=lambda p: paths[p]["tokens_per_s"])
compiled = [p for p, r in paths.items() if r["graphs_in_warmup"]]
show(f"The highest median at batch 1 is {best}'s, {pct(paths[best]['tokens_per_s'] / paths[best]['limit'])} of the "
     "limit. " + (f"Measurably faster than eager: {', '.join(faster)}." if faster else
                  "No path was measurably faster than eager here: a static cache alone saves no work (it fixes the "
                  "shapes a compile needs), and " + ("no compiled path shortened the step beyond the spread."
                                                     if compiled else "no compiled path was run.")))
for name in compiled:  # does its compile pay back?
    rec = paths[name]
    cost = max(rec["warmup_s"] - eager["warmup_s"], 0)  # the compile, beyond an ordinary first run
    (e_lo, e_hi), (r_lo, r_hi) = eager["spread"], rec["spread"]
    if name in faster:
        saved = 1 / eager["tokens_per_s"] - 1 / rec["tokens_per_s"]  # seconds saved per token (batch 1)
        show(f"{name}: the compile took {cost:.0f} s and saves {saved * 1e3:.2f} ms a token (medians): it pays back "
             f"after about {cost / saved:,.0f} tokens ({cost / (1 / e_lo - 1 / r_hi):,.0f} to "
             f"{cost / (1 / e_hi - 1 / r_lo):,.0f} over the spread of the repeats).")
    else:
        show(f"{name}: the compile took {cost:.0f} s and saved no measurable time a token (its repeats "
             f"{'are all slower than' if r_hi < e_lo else 'overlap'} eager's): on this machine it does not pay back.")

# %% [markdown]
# ## 3. Batch: share the weights between sequences
#
# A decode step reads every weight once, whatever the batch: with 2 sequences the same bytes give 2 tokens.
# While reading weights (and fixed per-step costs) is what takes the time, doubling the batch nearly doubles
# the total tokens/s and the limit grows with it. Each sequence adds its own FLOP and its own KV cache, so at
# some batch the step's time starts to grow: there decode stops being bound by what a step costs whatever its
# batch (reading the weights, and the fixed work of running a step). We sweep the batch with eager `generate` (on
# every machine, so the figures compare across machines; a compiled path would add a compile at new batch sizes,
# and on a GPU a CUDA-graph recording for each: exercise 2).

# %%
# NBVAL_IGNORE_OUTPUT
# timings depend on the machine and its load
sweep = {}
for b in BATCHES:
    sweep[b] = rec = measure(model, b, "eager")
    lo, hi = rec["spread"]
    print(f"batch {b:>2}, per sequence: " + rate_text(rec["tokens_per_s"] / b, rec["limit"] / b, (lo / b, hi / b)))
    if b > 1:
        print(f"{'in all:':>23} " + rate_text(rec["tokens_per_s"], rec["limit"], rec["spread"]))

# %%
# NBVAL_IGNORE_OUTPUT
# the turn follows the timings above
b0 = min(sweep)  # the smallest batch swept (1)
lo0, hi0 = sweep[b0]["spread"]
steps = {}  # a step's time at batch b over batch b0's: (lowest, highest over the repeats, median)
for b, rec in sweep.items():
    lo, hi = rec["spread"]
    steps[b] = (b * lo0 / (b0 * hi), b * hi0 / (b0 * lo), b * sweep[b0]["tokens_per_s"] / (b0 * rec["tokens_per_s"]))
    print(f"batch {b:>2}: a step takes {1e3 * b / rec['tokens_per_s']:6.1f} ms, x{steps[b][2]:.2f} batch {b0}'s "
          f"(repeats x{steps[b][0]:.2f} to x{steps[b][1]:.2f})")
share0 = sweep[b0]["tokens_per_s"] / sweep[b0]["limit"]
show(f"At batch {b0} a step reached {pct(share0)} of the bandwidth limit: " + (
    "reading the weights is most of its time." if share0 >= 0.5 else "most of its time is not reading the weights "
    "but the fixed work of a step (Python, many small kernels), which a batch shares as it shares the weights."))
turn = next((b for b in steps if all(steps[c][0] > 1.5 for c in steps if c >= b)), None)  # and every batch after
if turn:
    below = max((b for b in steps if b0 < b < turn), default=None)
    show(f"From batch {turn} on, a step takes over 1.5x batch {b0}'s even in the repeats most favourable to it: its "
         "time grows with the batch, so the work of each sequence (FLOP, KV cache), not what every step costs, sets "
         "its pace." + (f" Below it, batch {below} took x{steps[below][2]:.2f} batch {b0}'s time for {below // b0}x "
                        "the tokens." if below else ""))
else:
    top = max(steps, key=lambda b: steps[b][2])
    show(f"Up to batch {max(sweep)}, no step took over 1.5x batch {b0}'s beyond the spread of the repeats: "
         + (f"the medians grew (x{steps[top][2]:.2f} at batch {top}), but the repeats vary too much to tell; run "
            "the section again on an idle machine." if steps[top][2] > 1.5 else
            "more sequences came almost free, each step bound by what it costs whatever its batch."))

# %%
# NBVAL_IGNORE_OUTPUT
# the ceilings follow the bandwidth and matmul rate measured in section 1
ctx = prompt_len + NEW_TOKENS // 2
roof = next((b for b in (2**k for k in range(16))
             if step_flops(b, ctx) / flops_per_s >= step_bytes(model, b, ctx) / bandwidth), None)
show(f"The ceilings measured in section 1 put the turn at batch {roof}: there a step's FLOP at the matmul rate "
     "take as long as its bytes at the bandwidth." if roof else "The ceilings put the turn beyond batch 32,768.")

# %%
bs = list(sweep)
fig, ax = plt.subplots(figsize=(6, 4))
ax.plot(bs, [sweep[b]["tokens_per_s"] for b in bs], "o-", label="measured, all sequences")
ax.plot(bs, [sweep[b]["tokens_per_s"] / b for b in bs], "s-", label="measured, per sequence")
ax.plot(bs, [sweep[b]["limit"] for b in bs], "k--", label="limit: bandwidth / bytes a step")
ax.plot(bs, [flops_per_s * b / step_flops(b, ctx) for b in bs], "k:", label="limit: matmul rate / FLOP a step")
ax.set_xscale("log", base=2)
ax.set_yscale("log")
ax.set_xlabel("batch (sequences decoded together)")
ax.set_ylabel("tokens/s")
ax.set_title(f"Eager decode against batch ({config.model_type}, {DTYPE}, {DEVICE})")
ax.legend(fontsize=8)
plt.show()

# %% [markdown]
# ### The roofline
#
# One picture for sections 1 to 3. The x axis is a step's **arithmetic intensity**, its FLOP per byte read; the
# y axis the FLOP/s it reached. The ceiling is the bandwidth times the intensity (the slope on the left) up to
# the ridge, and the matrix-multiply rate after it. Each measured step is a point: decode at batch 1 sits far
# left (about 1 FLOP per byte in bf16), a larger batch moves it right, a long prefill further still. A point's
# distance below the ceiling is the share of the limit it did not reach.

# %%
points = [{"label": f"decode, {name}, batch 1", **{k: rec[k] for k in ("flops", "bytes", "seconds")}}
          for name, rec in paths.items()]
points += [{"label": f"decode, eager, batch {b}", **{k: sweep[b][k] for k in ("flops", "bytes", "seconds")}}
           for b in (4, 16, 64) if b in sweep]
points += [{"label": f"prefill, {n} tokens", "flops": prefill[n]["flops"], "bytes": step_bytes(model, 1, n),
            "seconds": prefill[n]["seconds"]} for n in (min(prefill), max(prefill))]
fig, ax = plt.subplots(figsize=(7, 5))
roofline(ax, bandwidth, flops_per_s, points)
plt.show()

# %% [markdown]
# ## 4. Formats: fewer bytes a weight
#
# A smaller weight format reads fewer bytes a step, so its limit is higher; whether the rate follows depends on
# the kernel that turns the packed weights back into numbers to multiply. We load the model in each format,
# the unquantized parts in bf16, and time it at batch 1 and 16:
# - **LLM.int8** (bitsandbytes, notebook 01) with the default outlier threshold 6.0, and 0.0 (no outlier
#   columns kept in the activations' dtype, bf16 here: every product in int8);
# - **NF4**, with and without **double quantization** (bitsandbytes 4-bit);
# - **torchao int8 weight-only**, `TorchAoConfig(Int8WeightOnlyConfig())`, transformers' own config for torchao
#   (`TorchAoConfig(quant_type)` takes a torchao `AOBaseConfig` instance in 5.24); and on a GPU **int4
#   weight-only**, `Int4WeightOnlyConfig(int4_packing_format="tile_packed_to_4d")`, the layout of the tinygemm
#   kernel. torchao quantizes `nn.Linear` weights only, and int4 only those whose inputs its group size (128)
#   divides: the cell says how many it converted. torchao's configs also change inductor's settings for the rest of
#   the process when they quantize (`set_inductor_config=True`, their default: `recommended_inductor_config_setter`
#   in `torchao/quantization/utils.py` sets `coordinate_descent_tuning` and four more settings to True).
#
# On a GPU, bf16 and torchao run `static+tuned` (section 2's static cache, compiled by `generate` with the tuned
# setting). transformers never compiles a bitsandbytes model: `_valid_auto_compile_criteria` does
# `can_compile &= self.hf_quantizer.is_compileable`, `HfQuantizer.is_compileable`
# (`transformers/quantizers/base.py`) returns False, and the bitsandbytes quantizers (`quantizer_bnb_4bit.py`,
# `quantizer_bnb_8bit.py`) do not override it; torchao's quantizer returns True. So the bitsandbytes formats run
# eagerly, and the cell prints each model's `hf_quantizer.is_compileable`; each format is then compared with bf16
# on the same path (eager with eager, compiled with compiled). On a CPU every format runs eagerly (nothing
# compiles there). bf16 is timed again here rather than taken from the sweep, so that a change in the machine's
# load between sections does not pass for a difference between formats. After the last format the cell puts
# inductor's settings back as they were before section 2. A format that fails to load or run is reported with its
# error, whole, and the others go on.
#
# The limits count what a model holds as parameters and buffers. bitsandbytes keeps its scales beside the
# weights, not as parameters (NF4: one per 64 weights; int8: one per row), so its limits leave them out and are a
# little high: still upper bounds.

# %%
from torchao.quantization import Int4WeightOnlyConfig, Int8WeightOnlyConfig

nf4 = dict(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=DTYPE)
FORMATS = {"int8-t6": BitsAndBytesConfig(load_in_8bit=True, llm_int8_threshold=6.0),
           "int8-t0": BitsAndBytesConfig(load_in_8bit=True, llm_int8_threshold=0.0),
           "nf4": BitsAndBytesConfig(**nf4),
           "nf4-dq": BitsAndBytesConfig(**nf4, bnb_4bit_use_double_quant=True),
           "torchao-int8wo": TorchAoConfig(Int8WeightOnlyConfig())}
if ON_GPU:
    FORMATS["torchao-int4wo"] = TorchAoConfig(Int4WeightOnlyConfig(int4_packing_format="tile_packed_to_4d"))
else:
    show("torchao int4 weight-only is not run on a CPU: its tile_packed_to_4d layout is for tinygemm's CUDA "
         "kernel, and Int4TilePackedTo4dTensor.from_hp (torchao/quantization/quantize_/workflows/int4/) asks "
         "torch.cuda.get_device_capability() for 8.0 or newer before it packs a weight.")


layer_weights = sum(isinstance(m, (torch.nn.Linear, Conv1D)) for m in model.modules()) - 1  # all but the head


def quantized(m):
    """How many weights a quantizer replaced: bitsandbytes' Int8Params / Params4bit, or a torchao tensor subclass."""
    return sum(type(p).__name__ in ("Int8Params", "Params4bit") or hasattr(p, "__tensor_flatten__")
               for p in m.parameters())

# %%
# NBVAL_IGNORE_OUTPUT
# timings depend on the machine and its load
def run_format(m, fmt, b):
    """Time model `m` in format `fmt` at batch `b`: on a GPU compiled where transformers compiles it, else eager."""
    if ON_GPU and m.hf_quantizer.is_compileable:
        return measure(m, b, "static+tuned", fmt, **STATIC)
    return measure(m, b, "eager", fmt)


bf16 = {("eager", b): measure(model, b, "eager") for b in (1, 16)}  # again, beside the formats (see above)
if ON_GPU:  # bf16 compiled too: what torchao's compiled formats are compared with
    bf16.update({("static+tuned", b): measure(model, b, "static+tuned", **STATIC) for b in (1, 16)})
formats, compileable, partly = {}, {}, {}
for fmt, qc in FORMATS.items():
    try:
        q = AutoModelForCausalLM.from_pretrained(path, dtype=DTYPE, device_map=DEVICE_MAP, quantization_config=qc)
        compileable[fmt], done = q.hf_quantizer.is_compileable, quantized(q)
        if done < layer_weights:
            partly[fmt] = f"{done} of the {layer_weights} weights of the decoder layers quantized"
            show(f"{fmt}: {partly[fmt]}" + ("" if done else ": not timed"))
        for b in (1, 16) if done else ():
            formats[fmt, b] = run_format(q, fmt, b)
        del q
    except (RuntimeError, ValueError, AssertionError, NotImplementedError) as e:
        show(f"{fmt}: failed here, not timed. {type(e).__name__}: {e}")
    gc.collect()
inductor_config.load_config(inductor_before)  # inductor's settings as before section 2 (torchao changed them too)
for rec in [*bf16.values(), *formats.values()]:
    show_rate(rec, ("format", "path", "batch"))
show("hf_quantizer.is_compileable: " + ", ".join(f"{f} {c}" for f, c in compileable.items()))

# %% [markdown]
# What the numbers say on this machine, printed from them: at each batch, each format's bytes a step and share of
# its limit, its rate against bf16's on the same path (the spread of the repeats first), and which formats are
# faster or slower than bf16 beyond that spread.

# %%
# NBVAL_IGNORE_OUTPUT
# the verdicts follow the timings above
for b in (1, 16):
    rows = {fmt: rec for (fmt, bb), rec in formats.items() if bb == b}
    refs = [r for (_, bb), r in bf16.items() if bb == b]
    show(f"batch {b}: bf16 reads {refs[0]['bytes'] / MiB:.1f} MiB a step; "
         + ", ".join(f"{r['path']} {pct(r['tokens_per_s'] / r['limit'])} of its limit" for r in refs))
    gains, losses = [], []
    for fmt, rec in rows.items():
        ref = bf16[rec["path"], b]  # bf16 on the same path
        show(f"  {fmt}, {rec['path']}: {rec['bytes'] / MiB:.1f} MiB a step ({rec['bytes'] / ref['bytes']:.2f}x "
             f"bf16's), {pct(rec['tokens_per_s'] / rec['limit'])} of its limit"
             + (f" ({partly[fmt]})" if fmt in partly else "") + "; "
             + compare_rates(rec, ref, fmt, f"bf16 {rec['path']}"))
        if rec["spread"][0] > ref["spread"][1]:
            gains.append(fmt)
        elif rec["spread"][1] < ref["spread"][0]:
            losses.append(fmt)
    top = max([*rows.values(), *refs], key=lambda r: r["tokens_per_s"])
    show(f"-> batch {b}: faster than bf16 on the same path beyond the spread: {', '.join(gains) or 'none'}; slower: "
         f"{', '.join(losses) or 'none'}; the rest: no measurable difference. The highest median: {top['format']}, "
         f"{top['path']}, {pct(top['tokens_per_s'] / top['limit'])} of its limit.")

# %% [markdown]
# ### What the limit says about a model you have not loaded
#
# The same arithmetic answers "can I run this model here, and how fast?" before you download it. Its weights
# must fit the device's memory, with room left for the KV cache, the activations and the runtime (notebook 03's
# planner counts them all; notebook 06 splits a model that one GPU cannot hold), and at batch 1 a step reads
# every weight, so tokens/s can never exceed the bandwidth over the weights' bytes. The cell prints both for a
# few published sizes, on this device's memory and the bandwidth measured in section 1. Bytes a weight: 2 in
# bf16, 1 in int8 (plus a scale a row, left out), half a byte in NF4 plus a 4-byte scale per 64 weights. Every
# weight is counted in the format, while bitsandbytes keeps the embedding and the head in bf16: a real int8 or
# NF4 model is somewhat larger and its limit somewhat lower.

# %%
# NBVAL_IGNORE_OUTPUT
# the limits follow this machine's memory and the bandwidth measured in section 1
memory = (torch.cuda.get_device_properties(0).total_memory if ON_GPU
          else os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES"))
SIZES = {"Llama-3.2-1B": 1.24e9, "Llama-3.1-8B": 8.03e9, "Qwen2.5-32B": 32.5e9, "Llama-3.1-70B": 70.6e9}
PER_WEIGHT = {"bf16": 2, "int8": 1, "nf4": 0.5 + 4 / 64}  # bytes a weight
show(f"This {'GPU' if ON_GPU else 'machine'}: {memory / 1e9:.0f} GB of memory, {bandwidth / 1e9:.0f} GB/s measured.")
for name, params in SIZES.items():
    show(f"{name}: " + "; ".join(
        f"{fmt} {params * per / 1e9:.1f} GB, " + (f"at most {bandwidth / (params * per):,.1f} tokens a second"
                                                  if params * per < memory else "more than the memory")
        for fmt, per in PER_WEIGHT.items()))
fastest = max(paths.values(), key=lambda r: r["tokens_per_s"] / r["limit"])
show(f"At batch 1 the best path of section 2, {fastest['path']}, reached "
     f"{pct(fastest['tokens_per_s'] / fastest['limit'])} of its limit on this notebook's model. Take it as a rough "
     "guide for another model: fixed per-step costs weigh less in a larger model's step, and its kernels may run "
     "closer to, or further from, the bandwidth.")

# %% [markdown]
# ## 5. Load time
#
# Speed also counts at start-up. Three loads, each repeated: the checkpoint loaded in bf16 (read in the dtype it
# is stored in, converted where that is not bf16: the cell prints its bytes a weight on disk); the same checkpoint
# quantized to NF4 while it loads (every weight read in full, then packed); and that NF4 model saved with
# `save_pretrained` and loaded again (already packed: fewer bytes to read, nothing to quantize). The saved copy
# goes to a temporary folder this notebook makes and removes.

# %%
# NBVAL_IGNORE_OUTPUT
# load times depend on the machine, its disk and its load
def load_seconds(src, **kw):
    """Median seconds (and spread) of REPEATS loads of `src`; each model is freed before the next."""
    times = []
    for _ in range(REPEATS):
        t0 = time.perf_counter()
        m = AutoModelForCausalLM.from_pretrained(src, dtype=DTYPE, device_map=DEVICE_MAP, **kw)
        sync()
        times.append(time.perf_counter() - t0)
        del m
        gc.collect()
    return statistics.median(times), min(times), max(times)


saved = Path(tempfile.mkdtemp(prefix="04-nf4-"))
try:
    AutoModelForCausalLM.from_pretrained(path, dtype=DTYPE, device_map=DEVICE_MAP,
                                         quantization_config=FORMATS["nf4"]).save_pretrained(saved)
    loads = {"checkpoint, in bf16": (path, {}),
             "NF4, quantized while loading": (path, {"quantization_config": FORMATS["nf4"]}),
             "NF4, saved and loaded again": (saved, {})}
    weights = sum(p.numel() for p in model.parameters())
    for name, (src, kw) in loads.items():
        disk = sum(f.stat().st_size for f in Path(src).glob("*.safetensors"))
        s, lo, hi = load_seconds(src, **kw)
        show(f"{name:<29} {s:5.2f} s (repeats {lo:.2f} to {hi:.2f}), {disk / MiB:6.1f} MiB read from disk, "
             f"{disk / weights:.2f} bytes a weight")
finally:
    shutil.rmtree(saved)  # the folder this notebook made

# %% [markdown]
# ## 6. The benchmark of this machine's tier
#
# `./workbook.sh bench` runs the same measurements as a script (`tools/bench.py`) and writes every figure, each
# beside the limit measured in the same run, into `build/bench/speed.json`. The workbook commits one run per tier:
# the 2-core CPU machine's under `cpu-reference/speed/` (the bundled model), one GPU's under
# `gpu-reference/one-gpu/speed/` (random-weight Llama shapes of 1.1B and 8B parameters). The cell reads the file
# of this machine's tier and prints its figures; where it measured the same model, format, path and batch as this
# notebook, the two are compared (the spread of the repeats first).

# %%
# NBVAL_IGNORE_OUTPUT
# this run's figures beside the committed file's
tier = "one-gpu" if ON_GPU else "cpu"
bench = speed_results(tier)
mine = {(r["format"], r["path"], r["batch"]): r for r in [*paths.values(), *sweep.values(), *bf16.values(),
                                                          *formats.values()]}
if bench is None:
    show(f"No benchmark is committed for the {tier} tier yet: `./workbook.sh bench` on such a machine writes one "
         "(build/bench/speed.json) to commit.")
else:
    show(f"[{tier}] bandwidth {bench['bandwidth']['bytes_per_s'] / 1e9:.1f} GB/s, matmul "
         f"{bench['matmul']['flops_per_s'] / 1e9:,.0f} GFLOP/s (this run: {bandwidth / 1e9:.1f} GB/s, "
         f"{flops_per_s / 1e9:,.0f} GFLOP/s)")
    for rec in bench["records"]:
        show(f"[{tier}] {rec['shape']}, {rec['format']}, {rec['path']}, batch {rec['batch']}: "
             + rate_text(rec["tokens_per_s"], rec["limit_tokens_per_s"], tuple(rec["spread"])))
        own = mine.get((rec["format"], rec["path"], rec["batch"]))
        if own and MODEL == "bundled" and rec["shape"] == "smollm2-135m":  # the same model: compared
            show("   this run: " + rate_text(own["tokens_per_s"], own["limit"], own["spread"]))
            show("   " + compare_rates(own, rec, "this run", "committed"))
    for r in bench.get("refused", []):
        show(f"[{tier}] refused: {r.get('shape')}, {r.get('format')}, {r.get('path')}: {r['reason']}")
top = max(mine.values(), key=lambda r: r["tokens_per_s"] / r["limit"])
show(f"This run ({config.model_type}, {MODEL}): the highest median share of its limit was {top['format']}, {top['path']}, "
     f"batch {top['batch']}: " + rate_text(top["tokens_per_s"], top["limit"], top["spread"])
     + ". Another model's rates compare through their shares of the limit, not their tokens/s.")

# %% [markdown]
# ## Summary
#
# - Decoding at a small batch reads every weight once a token: tokens/s can never exceed **bandwidth / bytes a
#   step** (weights as stored, a tied head once, an untied embedding a row a sequence, the KV cache). A prefill
#   does 2 FLOP per weight and prompt token, so a long prompt is bound by the **matrix-multiply rate** instead;
#   the ridge between them, FLOP/s over bytes/s, says which side a step is on (the roofline).
# - `cache_implementation="static"` fixes the shapes; on a GPU `generate` then compiles the decode steps itself
#   (`CompileConfig`, "reduce-overhead") and compiles again when a shape changes, a new batch size or a longer
#   cache, until dynamo makes that dimension dynamic (`disable_compile=True` keeps the cache alone). On a CPU it
#   compiles nothing by itself: `torch.compile(model.forward)` does, at a cost paid once (section 2 printed it),
#   worth it only if it saves time per token. Check that a compiled graph ran (`compiled_graphs` rose in the
#   warm-up, not in the timed runs) and compare the greedy tokens with eager's.
# - A larger batch shares each weight read, and each step's fixed work, between sequences: total tokens/s grows
#   with the batch while a step's time stays flat, and stops growing as fast where the per-sequence work takes
#   over (section 3 printed where, here).
# - Smaller formats raise the limit; the rate follows only where the kernel unpacks cheaply. transformers never
#   compiles a bitsandbytes model (`is_compileable` is False); torchao's int8 and int4 weight-only can be.
#   Quantizing while loading costs time at every start; a saved 4-bit checkpoint loads as it is.
# - Every rate is printed beside its limit, and two rates are compared through the spread of their repeats;
#   `./workbook.sh bench` records the same figures for a machine, and the tiers' committed runs are read here.
#
# ## Exercises
#
# 1. Recompiles. On a GPU, run `measure(model, 1, "again", cache_implementation="static")`: sections 2 and 4
#    compiled this shape already, so `graphs_in_warmup` is 0. Set `NEW_TOKENS = 64` and run it again: the static
#    cache must grow, its shapes change, and `generate` compiles again. Set `NEW_TOKENS = 16` and run it once
#    more: nothing compiles, the cache keeps its longest length. On a CPU, set `model.forward =
#    torch.compile(model.forward)` first (section 2): its first run compiles, then the counts go the same way.
# 2. Move the batch sweep to the static cache (`measure(model, b, "static", **STATIC)`; on a GPU `generate`
#    compiles it). On a GPU, print each batch's `rec["graphs_in_warmup"]` and `rec["warmup_s"]`: which sizes
#    compile, which only take longer to warm up (CUDA graphs recorded), and why (section 2's list)?
# 3. The executable self-checks below. (a) How many tokens/s could a 7B-parameter model in bf16 decode at most at
#    batch 1 on this machine's bandwidth (`bandwidth`, measured in section 1; leave the KV cache out)? Set
#    `answer_7b`. (b) How many bytes does one decode step of this notebook's model read at batch 8 with 1,024
#    tokens of context? Use the weights and the KV cache per token printed in section 1.3; set `answer_bytes`.

# %%
from helpers.exercises import check_answer

answer_7b = None  # tokens/s
answer_bytes = None  # bytes
right_7b = bandwidth / (7e9 * 2)  # 2 bytes a bf16 weight
_ = check_answer(answer_7b, lambda a: abs(a - right_7b) <= 0.05 * right_7b,
                 f"about {right_7b:.1f} tokens/s: {bandwidth / 1e9:.1f} GB/s over 14 GB a step",
                 lambda a: f"you said {a}; a bf16 weight is 2 bytes, and a step reads all 7e9 of them",
                 "bandwidth / (parameters x bytes per parameter)", wrong_example=bandwidth / 7e9, label="(a)")
right_bytes = step_bytes(model, 8, 1024)
one_cache = step_bytes(model, 8, 0) + kv_bytes(1024)  # the mistake: one sequence's cache, not eight
tolerance = min(0.02 * right_bytes, kv_bytes(1024, 8) / 4)  # rounding of the printed figures, not a missing cache
_ = check_answer(answer_bytes, lambda a: abs(a - right_bytes) <= tolerance,
                 f"{right_bytes / MiB:.1f} MiB: the weights once, and the KV cache of 1,024 tokens for each of the 8",
                 lambda a: f"you said {a / MiB:.1f} MiB; the weights are read once for the batch, the cache once a sequence",
                 "weights + 8 x 1,024 x KV bytes per token", wrong_example=one_cache, label="(b)")

# %% [markdown]
# ## Further reading
#
# - [gpt-fast](https://github.com/pytorch-labs/gpt-fast) (PyTorch): a few hundred lines of plain PyTorch that
#   decode fast with a static KV cache, `torch.compile`, int8/int4 weight-only quantization and speculative
#   decoding; the tuned path of section 2 copies its `coordinate_descent_tuning` setting.
# - [Optimizing inference](https://huggingface.co/docs/transformers/llm_optims) (transformers): the static cache,
#   `torch.compile` in `generate`, and other ways to speed decoding up.
# - [torchao](https://docs.pytorch.org/ao/stable/) (PyTorch's architecture-optimization library): its quantization
#   configs (`Int8WeightOnlyConfig`, `Int4WeightOnlyConfig`), their kernels, and how transformers loads them.
# - [Roofline: an insightful visual performance model for multicore architectures](https://doi.org/10.1145/1498765.1498785)
#   (Williams, Waterman and Patterson, Communications of the ACM, 2009): the paper behind the roofline plot.
# - Notebook 01 for the bitsandbytes formats themselves; notebooks 06 and 07 for speed on several GPUs.
