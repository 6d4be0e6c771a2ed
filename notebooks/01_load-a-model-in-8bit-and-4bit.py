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
# # Load a model in 8-bit and 4-bit
#
# Quantization is the cheapest way to fit a model into less memory: store each weight of the big
# matrices in 8 or 4 bits instead of 16 or 32. With bitsandbytes and transformers it is one argument
# to `from_pretrained`. This notebook loads the same model in fp32, LLM.int8, NF4 and FP4, looks at
# what changed inside, measures the memory saved against the prediction of notebook 00, and measures
# (not describes) what the rounding costs in output quality.
#
# **What you'll learn**
# 1. How to write a `BitsAndBytesConfig` for LLM.int8 (outlier threshold, skipped modules), NF4 and FP4,
#    double quantization and the compute dtype.
# 2. Which modules become `Linear8bitLt` / `Linear4bit`, and which stay as they are.
# 3. How `get_memory_footprint()` compares with the predicted bytes, and what it leaves out.
# 4. How to measure the quality cost: perplexity and next-token KL divergence against fp32.
# 5. What changed in transformers 5 (`load_in_4bit=True` is gone as a keyword), and how to save and
#    reload a 4-bit model.
#
# **What you'll need**: notebook 00 done (it sets up the bundled model). A CPU is enough: bitsandbytes
# 0.50 runs 8-bit and 4-bit layers on the CPU. About 1 minute on an idle 2-core CPU, section 9's
# timing included. On a GPU the same cells run the CUDA kernels (and the compute dtype switches to
# bf16).

# %% tags=["parameters"]
# The model: "bundled" (SmolLM2-135M-Instruct, offline), a local checkpoint directory, or a hub id.
MODEL = "bundled"

# %%
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, BitsAndBytesConfig

from helpers.checkpoints import resolve_model
from helpers.memory import predict_footprint
from helpers.quiet import silence_known_warnings
from helpers.text import say
from helpers.units import mib

silence_known_warnings()  # two routine bitsandbytes messages on CPU: see helpers/quiet.py

path = resolve_model(MODEL)
tokenizer = AutoTokenizer.from_pretrained(path)
ON_GPU = torch.cuda.is_available()
DEVICE_MAP = {"": 0} if ON_GPU else {"": "cpu"}
# The compute dtype: what a 4-bit layer dequantizes its weights to before the matrix product.
# bf16 on a GPU (the float32 default is slow there); float32 on a CPU, where this notebook's
# reference model is float32 too.
COMPUTE_DTYPE = torch.bfloat16 if ON_GPU else torch.float32
print("device map:", DEVICE_MAP, "| compute dtype:", COMPUTE_DTYPE)

# %% [markdown]
# One fact about *this* CPU matters below. On a CPU with AVX-512 BF16 instructions, bitsandbytes 0.50
# repacks each 4-bit weight into a CPU-friendly layout at its first forward pass, storing the block
# scales in bf16; other CPUs use its plain kernels. So 4-bit outputs differ a little from one CPU to
# another, and cells that print them are not compared by the test suite.

# %%
# NBVAL_IGNORE_OUTPUT
# the instruction set differs between machines
from bitsandbytes.functional import has_avx512bf16

CPU_REPACKS_4BIT = (not ON_GPU) and bool(has_avx512bf16())
print("4-bit weights are repacked for AVX-512 BF16 at first use:", CPU_REPACKS_4BIT)

# %% [markdown]
# ## 1. The reference: the model in fp32
#
# Remember from notebook 00: the bundled model's matrices were shipped in 4-bit Q4_1 and dequantized.
# Our "full precision" reference is that float32 model, and every error below measures how much
# *re-quantizing* those weights changes the outputs.

# %%
models = {"fp32": AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32, device_map=DEVICE_MAP)}
print(f"fp32 footprint: {mib(models['fp32'].get_memory_footprint()):.1f} MiB")

# %% [markdown]
# ## 2. Describe the quantization with `BitsAndBytesConfig`
#
# - **LLM.int8** (`load_in_8bit=True`): weights in int8 with one scale per row; activations with a
#   column above `llm_int8_threshold` (default 6.0) are *outliers* and go through an fp16 matrix
#   product instead. `llm_int8_skip_modules` names modules to keep in full precision (for a causal
#   LM transformers always keeps the output head).
# - **NF4 / FP4** (`load_in_4bit=True`, `bnb_4bit_quant_type="nf4"` or `"fp4"`): 4-bit weights in
#   blocks of 64, each with an fp32 scale (`absmax`). NF4's 16 levels follow a normal distribution,
#   which fits trained weights better than FP4's.
# - **Double quantization** (`bnb_4bit_use_double_quant=True`): quantizes the `absmax` scales too.
# - **Compute dtype** (`bnb_4bit_compute_dtype`): the dtype the 4-bit weights are dequantized to for
#   each matrix product.

# %%
configs = {
    "int8": BitsAndBytesConfig(load_in_8bit=True, llm_int8_threshold=6.0),
    "nf4": BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=COMPUTE_DTYPE),
    "nf4-dq": BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                                 bnb_4bit_compute_dtype=COMPUTE_DTYPE),
    "fp4": BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="fp4", bnb_4bit_compute_dtype=COMPUTE_DTYPE),
}
for name, cfg in configs.items():
    models[name] = AutoModelForCausalLM.from_pretrained(path, quantization_config=cfg, device_map=DEVICE_MAP)
print("loaded:", ", ".join(models))

# %% [markdown]
# ## 3. Look inside: which modules were replaced?

# %%
from collections import Counter


def module_types(model):
    """Count the leaf modules that hold weights, by class name and device type."""
    counts = Counter()
    for _, module in model.named_modules():
        w = getattr(module, "weight", None)
        if isinstance(w, torch.nn.Parameter) and not list(module.children()):
            counts[f"{type(module).__name__} on {w.device.type}"] += 1
    return dict(sorted(counts.items()))


for name, model in models.items():
    print(f"{name:<7}", module_types(model))

# %%
layer = models["nf4"].model.layers[0].self_attn.q_proj
w = layer.weight
print(type(layer).__name__, "| weight:", type(w).__name__, tuple(w.shape), w.dtype)
print("  logical shape", tuple(w.quant_state.shape), "| blocksize", w.quant_state.blocksize,
      "| absmax per block:", tuple(w.quant_state.absmax.shape), w.quant_state.absmax.dtype)
assert w.numel() * 2 == w.quant_state.shape.numel(), "two 4-bit weights per byte"

# %% [markdown]
# Every `nn.Linear` inside the 30 decoder blocks (7 per block: q, k, v, o, gate, up, down) became a
# `Linear8bitLt` or `Linear4bit`; the output head stayed an `nn.Linear` (it is tied to the embedding,
# which stays an `nn.Embedding`), and the norms stayed as they were. A 576 x 576 weight is stored as
# 165,888 bytes of packed 4-bit values plus one scale per block of 64 weights.
#
# `llm_int8_skip_modules` lets you keep more modules in full precision, for example the MLP's
# down projection, often the most sensitive layer:

# %%
import bitsandbytes as bnb

skip_cfg = BitsAndBytesConfig(load_in_8bit=True, llm_int8_skip_modules=["lm_head", "down_proj"])
skipped = AutoModelForCausalLM.from_pretrained(path, quantization_config=skip_cfg, device_map=DEVICE_MAP)
print(module_types(skipped))
n_int8 = sum(isinstance(m, bnb.nn.Linear8bitLt) for m in skipped.modules())
n_layers = skipped.config.num_hidden_layers
assert n_int8 == n_layers * 6, f"down_proj of each of the {n_layers} blocks should stay in full precision"
del skipped

# %% [markdown]
# ## 4. Footprint: measured against predicted
#
# `get_memory_footprint()` sums the bytes of parameters and buffers. Compare it with notebook 00's
# predictor, which charges the real cost of each format (int8: one fp32 scale per row;
# NF4: one fp32 `absmax` per 64 weights).

# %%
def true_quant_bytes(model):
    """Bytes of the quantization scales that are not parameters or buffers (absmax, SCB)."""
    total = 0
    for module in model.modules():
        w = getattr(module, "weight", None)
        qs = getattr(w, "quant_state", None)
        if qs is not None:
            total += qs.absmax.numel() * qs.absmax.element_size()
            if qs.nested:
                total += qs.state2.absmax.numel() * qs.state2.absmax.element_size()
        scb = getattr(w, "SCB", None)
        if scb is not None:
            total += scb.numel() * scb.element_size()
    return total


fmt_of = {"fp32": "fp32", "int8": "int8", "nf4": "nf4", "nf4-dq": "nf4-dq", "fp4": "nf4"}
print(f"{'model':<7} {'predicted':>10} {'footprint':>10} {'+ scales':>10}   (MiB)   saved vs fp32")
footprints = {}
for name, model in models.items():
    predicted = predict_footprint(models["fp32"], fmt_of[name], dtype_bytes=4)
    footprints[name] = model.get_memory_footprint()
    with_scales = footprints[name] + true_quant_bytes(model)
    saved = 1 - with_scales / models["fp32"].get_memory_footprint()
    print(f"{name:<7} {mib(predicted):>10.1f} {mib(footprints[name]):>10.1f} {mib(with_scales):>10.1f}   {100 * saved:10.0f}%")
emb = models["int8"].model.embed_tokens.weight
print(f"\nnot quantized: the (tied) embedding, {emb.numel():,d} parameters in {emb.dtype}, "
      f"{mib(emb.numel() * emb.element_size()):.1f} MiB")

# %% [markdown]
# Two things to read here:
# - The non-quantized parts stay in the load dtype (float32 here, as printed): the tied embedding
#   alone is the size printed under the table, which is why the savings in the last column are far
#   from the 75% (int8) and 87% (4-bit) that the bytes per weight alone would suggest. Loaded with
#   `dtype=torch.bfloat16`, those parts halve.
# - `get_memory_footprint()` misses the quantization scales: bitsandbytes keeps them in the weight's
#   `quant_state` (4-bit) or `SCB` attribute (int8), not as parameters or buffers. Adding them back
#   ("+ scales") gives the prediction to within a few hundred bytes. For 4-bit without double
#   quantization that is 4/64 = 0.0625 byte per weight, 12.5% on top of the 0.5 byte that the footprint counts.

# %%
for name in ("int8", "nf4", "nf4-dq"):
    predicted = predict_footprint(models["fp32"], fmt_of[name], dtype_bytes=4)
    measured = footprints[name] + true_quant_bytes(models[name])
    assert abs(predicted - measured) < 4096, f"{name}: prediction and measurement disagree"
print("predictions match the measured bytes, scales included, to within 4 KiB")

# %% [markdown]
# ## 5. Same prompt, four formats
#
# Greedy decoding (`do_sample=False`) makes each model's answer deterministic, so differences come
# from the weights alone.

# %%
messages = [{"role": "user", "content": "Give me three tips for staying focused while studying."}]
inputs = tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_tensors="pt",
                                       return_dict=True).to(models["fp32"].device)
answers = {}
with torch.inference_mode():
    for name in ("fp32", "int8", "nf4", "fp4"):
        out = models[name].generate(**inputs, max_new_tokens=32, do_sample=False)
        answers[name] = tokenizer.decode(out[0, inputs["input_ids"].shape[1]:], skip_special_tokens=True)
print("fp32 (line breaks added to fit the output area):")
say(answers["fp32"].strip())

# %%
# NBVAL_IGNORE_OUTPUT
# quantized generations depend on the machine's bitsandbytes kernels, CPU or GPU (see above); fp32 is checked below
for name, text in answers.items():
    say(f"--- {name}\n{text.strip()}\n")

# %% [markdown]
# Compare each answer with fp32's, token by token: where a format picks one different token, everything
# after it changes. That is why we measure quality on fixed text next, not on generations.
#
# ## 6. Measure the quality cost
#
# Two measures on the opening of *Alice's Adventures in Wonderland* (public domain, shipped in
# `helpers/data/alice.txt`):
# - **perplexity**: exp of the mean negative log-likelihood of each next token (lower is better);
# - **KL divergence** of each position's next-token distribution from fp32's (0 means identical).

# %%
from importlib.resources import files

text = files("helpers").joinpath("data/alice.txt").read_text()
enc = tokenizer("\n\n".join(text.split("\n\n")[:2]), return_tensors="pt")  # the first two paragraphs
enc = enc.to(models["fp32"].device)
print("tokens in the text:", enc["input_ids"].shape[1])


@torch.inference_mode()
def log_probs(model):
    logits = model(**enc).logits[0, :-1].float()
    return torch.log_softmax(logits, dim=-1)


# NBVAL_IGNORE_OUTPUT
# 4-bit figures depend on the machine's bitsandbytes kernels (CPU or GPU); the ordering is checked in the next cell
ref = log_probs(models["fp32"])
targets = enc["input_ids"][0, 1:]
quality = {}
for name, model in models.items():
    lp = ref if name == "fp32" else log_probs(model)
    ppl = torch.exp(-lp.gather(1, targets[:, None]).mean()).item()
    kl = torch.sum(ref.exp() * (ref - lp), dim=-1).mean().item()
    top1 = (lp.argmax(-1) == ref.argmax(-1)).float().mean().item()
    quality[name] = dict(ppl=ppl, kl=kl, top1=top1)
    print(f"{name:<7} perplexity {ppl:6.2f}   KL from fp32 {kl:.4f} nats   same top-1 token as fp32 {100 * top1:5.1f}%")

# %%
assert quality["int8"]["kl"] < quality["nf4"]["kl"], "8 bits should stay closer to fp32 than 4 bits"
assert quality["nf4"]["kl"] < quality["fp4"]["kl"], "NF4 should fit trained weights better than FP4"
print("int8 < NF4 < FP4 in KL divergence, as expected")

# %%
import matplotlib.pyplot as plt

names = [n for n in models if n != "fp32"]
fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(8.4, 3.2))  # 840 px: JupyterLab shows it unscaled
ax1.bar(names, [mib(footprints[n]) for n in names], color="tab:blue")
ax1.axhline(mib(footprints["fp32"]), color="black", ls="--", label="fp32")
ax1.set_ylabel("get_memory_footprint (MiB)")
ax1.set_title("Memory")
ax1.legend()
ax2.bar(names, [quality[n]["kl"] for n in names], color="tab:red")
ax2.set_ylabel("mean KL from fp32 (nats)")
ax2.set_title("Quality cost (Alice, ch. 1)")
fig.suptitle(f"{MODEL} model: memory vs quality by format ({'GPU' if ON_GPU else 'CPU'}, bitsandbytes)")
fig.tight_layout()
plt.show()

# %% [markdown]
# ## 7. The removed keyword: `load_in_4bit=True`
#
# Older tutorials (and the material this workbook started from) pass `load_in_4bit=True` or
# `load_in_8bit=True` straight to `from_pretrained`. transformers 5 removed those keywords: the
# options live in `BitsAndBytesConfig` only.

# %%
try:
    AutoModelForCausalLM.from_pretrained(path, load_in_4bit=True)
    print("accepted (an older transformers)")
except TypeError as e:
    print(f"{type(e).__name__}: {e}")

# %%
# The working form: the same request through quantization_config.
fixed = AutoModelForCausalLM.from_pretrained(
    path, quantization_config=BitsAndBytesConfig(load_in_4bit=True), device_map=DEVICE_MAP)
print(type(fixed.model.layers[0].mlp.up_proj).__name__)
del fixed

# %% [markdown]
# ## 8. Save a 4-bit model and load it back
#
# A 4-bit model saves its packed weights and scales, so the next load skips quantization and reads
# fewer bytes (compare the sizes printed below). We save into a temporary folder inside the workbook's cache (ours to
# delete), load it back *without* a `quantization_config` (it is stored in `config.json`), and check
# that it answers exactly as before.
#
# **A trap found while writing this notebook** (bitsandbytes 0.50.2, transformers 5.24): on a CPU that
# repacks 4-bit weights at first use (AVX-512 BF16, above), `save_pretrained` on a model that has
# already run a forward pass wrote a checkpoint that generated garbage, and left the model in memory
# broken too. Saving a freshly loaded model, before any forward pass, works everywhere; that is what
# we do here. (A related fix for `.to()` on repacked weights is bitsandbytes pull request 2083.)

# %%
import tempfile
from pathlib import Path

from helpers.checkpoints import cache_dir

fresh = AutoModelForCausalLM.from_pretrained(path, quantization_config=configs["nf4"], device_map=DEVICE_MAP)
with tempfile.TemporaryDirectory(dir=cache_dir(), prefix="nf4-save-") as tmp:
    fresh.save_pretrained(tmp)  # before any forward pass: see the trap above
    del fresh
    saved = sum(f.stat().st_size for f in Path(tmp).glob("*.safetensors"))
    original = sum(f.stat().st_size for f in Path(path).glob("*.safetensors"))
    print(f"saved NF4 weights: {mib(saved):.1f} MiB (fp32 checkpoint: {mib(original):.1f} MiB)")
    reloaded = AutoModelForCausalLM.from_pretrained(tmp, device_map=DEVICE_MAP)
    print("quantization read back from config.json:", reloaded.config.quantization_config.bnb_4bit_quant_type)
    with torch.inference_mode():
        out = reloaded.generate(**inputs, max_new_tokens=32, do_sample=False)
    again = tokenizer.decode(out[0, inputs["input_ids"].shape[1]:], skip_special_tokens=True)
    del reloaded
print("same answer after reload:", again == answers["nf4"])
assert again == answers["nf4"], "a reloaded 4-bit model should give the same greedy answer"

# %% [markdown]
# ## 9. On a GPU, and what about speed?
#
# The same cells run unchanged on a CUDA machine: `DEVICE_MAP` becomes `{"": 0}`, bitsandbytes runs
# its CUDA kernels, and the compute dtype becomes bf16. The unquantized parts stay in the load dtype
# there too (load with `dtype=torch.bfloat16` to halve the embedding).
#
# What this notebook measures is memory saved and quality lost. Fewer bytes per weight does not by
# itself mean faster generation: every 4-bit matrix product must turn its packed weights back into
# the compute dtype (as a separate step, or inside the kernel), and whether the bytes saved pay for
# that depends on the kernel, the batch size and the hardware. One quick measurement, batch 1, on this machine and this small model (your figures
# will differ; the sentence is printed from them):

# %%
# NBVAL_IGNORE_OUTPUT
# timings depend on the machine and its load
from helpers.measure import time_generate

speed = {}
for name in ("fp32", "nf4"):
    speed[name] = time_generate(models[name], inputs, new_tokens=16, repeats=2)["tokens_per_s"]
ratio = speed["nf4"] / speed["fp32"]
print(f"on this {'GPU' if ON_GPU else 'CPU'}, batch 1: fp32 {speed['fp32']:.1f} tokens/s, NF4 {speed['nf4']:.1f} "
      "tokens/s: NF4 is " + (f"{ratio:.1f}x as fast as fp32" if ratio >= 1 else f"{1 / ratio:.1f}x slower than fp32"))

# %% [markdown]
# One run of a 135M model at batch 1 says little about a large model or a large batch. Notebooks 04 and
# 05 time generation on GPUs; their measurements are committed per hardware tier in
# `gpu-reference/<tier>/results.json` (NF4 on one GPU, and a 4-bit model split over two GPUs, among them).
#
# ## Summary
# - One `BitsAndBytesConfig` describes the quantization: `load_in_8bit` (threshold, skipped modules)
#   or `load_in_4bit` (NF4/FP4, double quantization, compute dtype).
# - Only the Linear layers inside the blocks are replaced (`Linear8bitLt`, `Linear4bit`); the embedding,
#   norms and output head stay in full precision.
# - `get_memory_footprint()` leaves out the scales; with them, the bytes match the prediction.
# - Quality, measured: int8 stays closest to fp32, NF4 beats FP4.
# - Memory saved is not speed gained: 4-bit layers unpack their weights at every product; measure speed
#   on your hardware (section 9, notebooks 04 and 05).
# - transformers 5 accepts quantization options only through `quantization_config`; 4-bit models save
#   and reload as they are.
#
# ## Exercises
# 1. Load the model in NF4 with the other compute dtype (`bnb_4bit_compute_dtype=OTHER_DTYPE`, defined
#    below: float32 where section 1 chose bfloat16, bfloat16 where it chose float32) and measure its KL
#    from fp32. Is it larger or smaller than with `COMPUTE_DTYPE`? Store the value in `kl_other`.
# 2. What fraction of the int8 model's footprint is the (unquantized) embedding? Store it in `frac`.

# %%
OTHER_DTYPE = torch.float32 if COMPUTE_DTYPE == torch.bfloat16 else torch.bfloat16
kl_other = None  # e.g. reuse log_probs() on a new model
frac = None     # a number between 0 and 1

# %%
from helpers.exercises import check_answer

emb = models["int8"].model.embed_tokens.weight
expected_frac = emb.numel() * emb.element_size() / footprints["int8"]
nf4_kl = quality["nf4"]["kl"]
check_answer(kl_other, lambda kl: 0 < kl < 10,
             lambda kl: f"a plausible KL. {OTHER_DTYPE} compute " + ("adds error" if kl > nf4_kl
                                                                    else "did not add measurable error")
                        + f" against {COMPUTE_DTYPE} ({kl:.4f} vs {nf4_kl:.4f} nats)",
             "a KL divergence from fp32 is a small positive number of nats (see section 6).",
             "load with configs['nf4']'s options and bnb_4bit_compute_dtype=OTHER_DTYPE, then use log_probs() "
             "as in section 6.", label="Exercise 1")
_ = check_answer(frac, lambda f: abs(f - expected_frac) < 0.01,
                 "The embedding is not quantized: it keeps its load dtype (printed in section 4).",
                 "divide the embedding's bytes (not its parameter count) by the footprint.",
                 "numel() x element_size() / get_memory_footprint().", label="Exercise 2")

# %% [markdown]
# ## Further reading
# - [transformers: bitsandbytes quantization](https://huggingface.co/docs/transformers/quantization/bitsandbytes) –
#   every `BitsAndBytesConfig` option.
# - [LLM.int8() blog post](https://huggingface.co/blog/hf-bitsandbytes-integration) – outliers and the
#   mixed-precision decomposition.
# - [4-bit and QLoRA blog post](https://huggingface.co/blog/4bit-transformers-bitsandbytes) – NF4,
#   double quantization and compute dtype.
# - [bitsandbytes documentation](https://huggingface.co/docs/bitsandbytes) – backends, including the CPU one.
