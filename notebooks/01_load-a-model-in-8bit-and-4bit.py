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
# 2. Which modules become `Linear8bitLt` / `Linear4bit`, which stay as they are (in the load dtype), and
#    why a skip list must name the output head again.
# 3. How `get_memory_footprint()` compares with the predicted bytes, and what it leaves out.
# 4. How to measure the quality cost: perplexity and next-token KL divergence against fp32, what such
#    figures from a small model can and cannot tell you, and what published figures for 7B+ models say.
# 5. What changed in transformers 5 (`load_in_4bit=True` is gone as a keyword), and how to save and
#    reload a 4-bit model.
#
# **What you'll need**: notebook 00 done (it sets up the bundled model). A CPU is enough: bitsandbytes
# 0.50 runs 8-bit and 4-bit layers on the CPU. About 45 s on an idle 2-core CPU, section 9's
# timing included. On a GPU the same cells run the CUDA kernels (and the compute dtype switches to
# bf16). About 5 GB of RAM at the peak, measured as resident memory on the CPU (five models at once,
# and section 9's 1 GiB copy to measure the memory bandwidth).

# %% tags=["parameters"]
# The model: "bundled" (SmolLM2-135M-Instruct, offline), a local checkpoint directory, or a hub id.
MODEL = "bundled"

# %%
import textwrap

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, BitsAndBytesConfig

from helpers.checkpoints import resolve_model
from helpers.quiet import silence_known_warnings

silence_known_warnings()  # two routine bitsandbytes messages on CPU: see helpers/quiet.py

path = resolve_model(MODEL)
tokenizer = AutoTokenizer.from_pretrained(path)
ON_GPU = torch.cuda.is_available()
DEVICE_MAP = {"": 0} if ON_GPU else {"": "cpu"}
# The load dtype: what every module that is NOT quantized keeps (embedding, norms, head), in every model
# below. float32, like the reference model, so the formats differ only in their quantized layers.
LOAD_DTYPE = torch.float32
# The compute dtype asked for (bnb_4bit_compute_dtype): what a 4-bit layer dequantizes its weights to before
# the matrix product. bf16 on a GPU (the float32 default is slow there); float32 asked for on a CPU, where a
# CPU with AVX-512 BF16 computes 4-bit layers in bf16 whatever is asked (next cell).
COMPUTE_DTYPE = torch.bfloat16 if ON_GPU else torch.float32
MiB = 2**20
print("device map:", DEVICE_MAP, "| load dtype:", LOAD_DTYPE, "| compute dtype asked for:", COMPUTE_DTYPE)


def show(text):
    """Print text with each line wrapped at 107 characters, what one line of JupyterLab's output area holds."""
    print("\n".join(textwrap.fill(line, 107, subsequent_indent="  ") for line in text.split("\n")))

# %% [markdown]
# One fact about *this* CPU matters below. On a CPU with AVX-512 BF16 instructions, bitsandbytes 0.50
# repacks each 4-bit weight into a CPU-friendly layout at its first forward pass, storing the block
# scales in bf16 (`Linear4bit.forward` in `bitsandbytes/nn/modules.py`), and from then on multiplies in
# bf16: its fused kernel converts the input and the scales to bf16 whatever the compute dtype ("cpu fused
# op only support bf16 for now", `gemv_4bit` in `bitsandbytes/backends/cpu/ops.py`), and only the result
# is converted back. Other CPUs, and GPUs, dequantize to the compute dtype asked for. So 4-bit outputs
# differ a little from one CPU to another, and cells that print them are not compared by the test suite.
# The next cell prints which case this machine is.

# %%
# NBVAL_IGNORE_OUTPUT
# the instruction set differs between machines
from bitsandbytes.functional import has_avx512bf16

CPU_REPACKS_4BIT = (not ON_GPU) and bool(has_avx512bf16())
DTYPE_4BIT = torch.bfloat16 if CPU_REPACKS_4BIT else COMPUTE_DTYPE  # what the 4-bit products really run in
print("4-bit weights are repacked for AVX-512 BF16 at first use:", CPU_REPACKS_4BIT)
show(f"-> the 4-bit layers here multiply in {DTYPE_4BIT}" + (
    f", not the {COMPUTE_DTYPE} asked for: this machine ignores bnb_4bit_compute_dtype" if CPU_REPACKS_4BIT
    else ", the compute dtype asked for"))

# %% [markdown]
# ## 1. The reference: the model in fp32
#
# Our "full precision" reference is the model in float32. With the bundled model, remember from notebook
# 00 that its matrices were shipped in 4-bit Q4_1 and dequantized: every error below then measures how
# much *re-quantizing* those weights changes the outputs.

# %%
models = {"fp32": AutoModelForCausalLM.from_pretrained(path, dtype=LOAD_DTYPE, device_map=DEVICE_MAP)}
print(f"fp32 footprint: {models['fp32'].get_memory_footprint() / MiB:.1f} MiB")

# %% [markdown]
# ## 2. Describe the quantization with `BitsAndBytesConfig`
#
# - **LLM.int8** (`load_in_8bit=True`): weights in int8 with one scale per row; activations with a
#   column above `llm_int8_threshold` (default 6.0) are *outliers* and go through an fp16 matrix
#   product instead. `llm_int8_skip_modules` names modules to leave unquantized (the 4-bit formats
#   read it too); section 3 shows what giving it does to the defaults.
# - **NF4 / FP4** (`load_in_4bit=True`, `bnb_4bit_quant_type="nf4"` or `"fp4"`): 4-bit weights in
#   blocks of 64, each with an fp32 scale (`absmax`). NF4's 16 levels follow a normal distribution,
#   which fits trained weights better than FP4's.
# - **Double quantization** (`bnb_4bit_use_double_quant=True`): quantizes the `absmax` scales too.
# - **Compute dtype** (`bnb_4bit_compute_dtype`): the dtype the 4-bit weights are dequantized to for
#   each matrix product, on a GPU and on most CPUs; a CPU that repacks 4-bit weights multiplies in bf16
#   whatever it says (the cell above printed which this machine is).

# %%
configs = {
    "int8": BitsAndBytesConfig(load_in_8bit=True, llm_int8_threshold=6.0),
    "nf4": BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=COMPUTE_DTYPE),
    "nf4-dq": BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                                 bnb_4bit_compute_dtype=COMPUTE_DTYPE),
    "fp4": BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="fp4", bnb_4bit_compute_dtype=COMPUTE_DTYPE),
}
for name, cfg in configs.items():
    models[name] = AutoModelForCausalLM.from_pretrained(path, quantization_config=cfg, dtype=LOAD_DTYPE,
                                                        device_map=DEVICE_MAP)
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
import bitsandbytes as bnb

n_layers = models["nf4"].config.num_hidden_layers
quantized = [n for n, m in models["nf4"].named_modules() if isinstance(m, bnb.nn.Linear4bit)]
show(f"{len(quantized)} layers quantized in {n_layers} decoder blocks, {len(quantized) // n_layers} a block: "
     + ", ".join(n.split(".0.", 1)[1] for n in quantized if ".0." in n))
layer = models["nf4"].get_submodule(quantized[0])
w = layer.weight
print(quantized[0], "->", type(layer).__name__, "| weight:", type(w).__name__, tuple(w.shape), w.dtype)
print("  logical shape", tuple(w.quant_state.shape), "| blocksize", w.quant_state.blocksize,
      "| absmax per block:", tuple(w.quant_state.absmax.shape), w.quant_state.absmax.dtype)
assert w.numel() * 2 == w.quant_state.shape.numel(), "two 4-bit weights per byte"
head = models["nf4"].get_output_embeddings()
tied = head.weight is models["nf4"].get_input_embeddings().weight
print(f"output head: {type(head).__name__}, {head.weight.dtype} (the load dtype), tied to the embedding: {tied}")

# %% [markdown]
# Every linear layer inside the decoder blocks became a `Linear8bitLt` or `Linear4bit` (GPT-2's `Conv1D`
# layers too, though they are not `nn.Linear`); the output head stayed a plain `Linear`, and the
# embedding and the norms stayed as they were, all in the load dtype. A 4-bit weight is stored as packed
# bytes, two weights a byte, plus one scale per block of 64 weights.
#
# Why the head? When you leave `llm_int8_skip_modules` unset, transformers fills the list of modules not
# to convert itself: the output head, everything tied to it, and the model's last module
# (`get_keys_to_not_convert`, called by `get_modules_to_not_convert` in `transformers/quantizers/base.py`).
# A list you give **replaces** that default list; it is not added to it. So to keep more modules in full
# precision, for example the MLP's output projection (often the most sensitive layer), name the head again:

# %%
head_name = next(n for n, m in models["int8"].named_modules() if m is models["int8"].get_output_embeddings())
mlp_out = ".".join(quantized[len(quantized) // n_layers - 1].split(".")[-2:])  # block 0's last quantized layer
print("not converted by default:    ", sorted(models["int8"].hf_quantizer.modules_to_not_convert))
skip_cfg = BitsAndBytesConfig(load_in_8bit=True, llm_int8_skip_modules=[head_name, mlp_out])
skipped = AutoModelForCausalLM.from_pretrained(path, quantization_config=skip_cfg, dtype=LOAD_DTYPE,
                                               device_map=DEVICE_MAP)
print("not converted with the list: ", sorted(skipped.hf_quantizer.modules_to_not_convert))
print(module_types(skipped))
n_int8 = sum(isinstance(m, bnb.nn.Linear8bitLt) for m in skipped.modules())
assert n_int8 == len(quantized) - n_layers, f"{mlp_out} of each of the {n_layers} blocks should stay unquantized"
del skipped

# %% [markdown]
# And when the list leaves the head out? Here is the same list without it, loaded, then run once:

# %%
no_head = AutoModelForCausalLM.from_pretrained(
    path, quantization_config=BitsAndBytesConfig(load_in_8bit=True, llm_int8_skip_modules=[mlp_out]),
    dtype=LOAD_DTYPE, device_map=DEVICE_MAP)
h = no_head.get_output_embeddings()
h_tied = h.weight is no_head.get_input_embeddings().weight
print(f"{head_name}: {type(h).__name__}, weight a {type(h.weight).__name__} of {h.weight.dtype}, "
      f"{h.weight.numel() * h.weight.element_size() / MiB:.1f} MiB; tied to the embedding: {h_tied}")
try:
    with torch.inference_mode():
        no_head(**tokenizer("Alice was", return_tensors="pt").to(no_head.device))
    ran = "a forward pass runs"
except AttributeError as e:  # Linear8bitLt.forward reads weight.CB, which only an Int8Params has
    ran = f"a forward pass fails: {type(e).__name__}: {e}"
show("-> " + ("the head was quantized like any other layer; " if isinstance(h.weight, bnb.nn.Int8Params) else
             "the head became a Linear8bitLt around the embedding's tensor, which is never quantized; ") + ran)
del no_head, h

# %% [markdown]
# ## 4. Footprint: measured against predicted
#
# `get_memory_footprint()` sums the bytes of parameters and buffers. Compare it with notebook 00's
# predictor, which asks transformers' quantizer which weights it quantizes and charges each the real cost
# of its format (int8: one fp32 scale per row; NF4: one fp32 `absmax` per 64 weights); every other
# parameter keeps the load dtype (`dtype=LOAD_DTYPE` here).

# %%
from helpers.planner import predict_footprint


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


fmt_of = {"fp32": "fp32", "int8": "int8", "nf4": "nf4", "nf4-dq": "nf4-dq", "fp4": "nf4"}  # FP4 costs what NF4 does
predicted = {name: predict_footprint(models["fp32"], fmt_of[name], dtype=LOAD_DTYPE) for name in models}
print(f"{'model':<7} {'predicted':>10} {'footprint':>10} {'+ scales':>10}   (MiB)   saved vs fp32")
footprints = {}
for name, model in models.items():
    footprints[name] = model.get_memory_footprint()
    with_scales = footprints[name] + true_quant_bytes(model)
    saved = 1 - with_scales / footprints["fp32"]
    print(f"{name:<7} {predicted[name] / MiB:>10.1f} {footprints[name] / MiB:>10.1f} {with_scales / MiB:>10.1f}"
          f"   {100 * saved:10.0f}%")
emb = models["int8"].get_input_embeddings().weight
emb_params, emb_bytes = emb.numel(), emb.numel() * emb.element_size()
print(f"\nnot quantized: the embedding{' (and the head tied to it)' if tied else ''}, {emb_params:,d} parameters "
      f"in {emb.dtype}, {emb_bytes / MiB:.1f} MiB")
del emb

# %% [markdown]
# Two things to read here:
# - The modules that are not quantized stay in the load dtype (float32 here, as printed), not the compute
#   dtype: the embedding alone is the size printed under the table (an untied head is as large again),
#   which is why the savings in the last column fall short of the 75% (int8) and 87% (4-bit) that the
#   bytes per weight alone would suggest, the more so the larger the embedding's share of the model.
#   Loaded with `dtype=torch.bfloat16`, those parts halve.
# - `get_memory_footprint()` misses the quantization scales: bitsandbytes keeps them in the weight's
#   `quant_state` (4-bit) or `SCB` attribute (int8), not as parameters or buffers. Adding them back
#   ("+ scales") gives the prediction, less the model's buffers (which the predictor leaves out); the next
#   cell prints what difference remains, in bytes. With double quantization the measurement can be up to
#   4 bytes a layer larger: each layer's second-level scales (one float32 per 256 first-level blocks) are
#   rounded up to whole blocks, which the predictor's 4/(64 x 256) byte a weight does not do. For 4-bit
#   without double quantization the scales are 4/64 = 0.0625 byte per weight, 12.5% on top of the 0.5
#   byte that the footprint counts.

# %%
buffer_bytes = sum(b.numel() * b.element_size() for b in models["fp32"].buffers())
for name in ("int8", "nf4", "nf4-dq"):
    measured = footprints[name] + true_quant_bytes(models[name]) - buffer_bytes
    print(f"{name:<7} predicted - measured (scales added, buffers taken out): {predicted[name] - measured:,d} bytes")
    assert abs(predicted[name] - measured) < 4096, f"{name}: prediction and measurement disagree"
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
show(answers["fp32"].strip())

# %%
# NBVAL_IGNORE_OUTPUT
# quantized generations depend on the machine's bitsandbytes kernels, CPU or GPU (see above); fp32 is checked below
for name, text in answers.items():
    show(f"--- {name}\n{text.strip()}\n")

# %% [markdown]
# Compare each answer with fp32's, token by token: where a format picks one different token, everything
# after it changes. That is why we measure quality on fixed text next, not on generations.
#
# ## 6. Measure the quality cost
#
# Three measures on the opening of *Alice's Adventures in Wonderland* (public domain, shipped in
# `helpers/data/alice.txt`; all of it, a few hundred tokens, one forward pass per format):
# - **perplexity**: exp of the mean negative log-likelihood of each next token (lower is better), and its
#   ratio to fp32's;
# - **KL divergence** of each position's next-token distribution from fp32's (0 means identical);
# - **top-1 agreement**: how often the format's most likely next token is fp32's.
#
# Beside each, a 95% interval that treats the tokens as independent samples (they are not: see below).

# %%
import math
from importlib.resources import files

text = files("helpers").joinpath("data/alice.txt").read_text()
enc = tokenizer(text, return_tensors="pt").to(models["fp32"].device)
targets = enc["input_ids"][0, 1:]
n_pred = len(targets)
print(f"tokens in the text: {enc['input_ids'].shape[1]} (the whole file), so {n_pred} next-token predictions")


@torch.inference_mode()
def log_probs(model):
    logits = model(**enc).logits[0, :-1].float()
    return torch.log_softmax(logits, dim=-1)


ref = log_probs(models["fp32"])
ref_nll = -ref.gather(1, targets[:, None])[:, 0]

# %%
# NBVAL_IGNORE_OUTPUT
# 4-bit figures depend on the machine's bitsandbytes kernels (CPU or GPU); the ordering is checked in the next cell
quality = {}
for name, model in models.items():
    lp = ref if name == "fp32" else log_probs(model)
    diff = -lp.gather(1, targets[:, None])[:, 0] - ref_nll  # extra nats on each token, against fp32
    half = 1.96 * diff.std().item() / math.sqrt(n_pred)
    kl = torch.sum(ref.exp() * (ref - lp), dim=-1).mean().item()
    top1 = (lp.argmax(-1) == ref.argmax(-1)).float().mean().item()
    quality[name] = dict(ppl=math.exp(ref_nll.mean().item() + diff.mean().item()), kl=kl, top1=top1,
                         ratio=math.exp(diff.mean().item()), low=math.exp(diff.mean().item() - half),
                         high=math.exp(diff.mean().item() + half))
    q, agree = quality[name], 196 * math.sqrt(top1 * (1 - top1) / n_pred)
    print(f"{name:<7} perplexity {q['ppl']:9.2f} = x{q['ratio']:.3f} fp32's ({q['low']:.3f} to {q['high']:.3f})  "
          f"KL {kl:.4f} nats  same top-1 {100 * top1:5.1f}% (+-{agree:.1f})")

# %%
order = sorted(("int8", "nf4", "fp4"), key=lambda name: quality[name]["kl"])
print("KL divergence from fp32, smallest first:", " < ".join(order))
if MODEL == "bundled":  # a property of this model's trained weights; other checkpoints are only reported
    assert order == ["int8", "nf4", "fp4"], "8 bits should stay closest to fp32, and NF4 should beat FP4"

# %%
import matplotlib.pyplot as plt

names = [n for n in models if n != "fp32"]
fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(8.4, 3.2))  # 840 px: JupyterLab shows it unscaled
ax1.bar(names, [footprints[n] / MiB for n in names], color="tab:blue")
ax1.axhline(footprints["fp32"] / MiB, color="black", ls="--", label="fp32")
ax1.set_ylabel("get_memory_footprint (MiB)")
ax1.set_title("Memory")
ax1.legend()
ax2.bar(names, [quality[n]["kl"] for n in names], color="tab:red")
ax2.set_ylabel("mean KL from fp32 (nats)")
ax2.set_title(f"Quality cost ({n_pred} tokens of Alice, ch. 1)")
fig.suptitle(f"{MODEL} model: memory vs quality by format ({'GPU' if ON_GPU else 'CPU'}, bitsandbytes)")
fig.tight_layout()
plt.show()

# %% [markdown]
# **What these figures can show, and what they cannot.** They come from a few hundred next-token
# predictions on one short passage, by a 135M-parameter model (with the default `MODEL`) whose bundled
# weights were already 4-bit (Q4_1, notebook 00) before this notebook quantized them again.
# - They can show the **order** of the formats on this model (the cell above prints it), and that
#   re-quantizing changes some next-token choices, not only their probabilities (the top-1 agreement).
# - They cannot give the **size** of the cost for another model, or even for this one on other text. The
#   intervals treat the tokens as independent, which neighbouring tokens of one passage are not, so the
#   true uncertainty is wider. The reference is SmolLM2 after Q4_1 rounding, not its original bf16
#   weights, so the cost of going from the original weights to NF4 is not measured here at all. On a CPU
#   that repacks 4-bit weights (the check at the top), the 4-bit rows also hold the rounding of bf16
#   products, whatever compute dtype was asked for. And size matters: in the LLM.int8() paper's Table 1
#   (below), 8-bit cost its 125M model a little perplexity and its 6.7B and 13B models none.
# - On a random-weight checkpoint (`-p MODEL` with one), the perplexities sit near the vocabulary size and
#   mean nothing; the KL and the top-1 agreement still compare the formats with each other.
#
# For models of 7B parameters and more, read the published figures (sources and details in
# `docs/published-figures.md`):
#
# | source | models, data | 16/32-bit | 8-bit | 4-bit |
# | --- | --- | --- | --- | --- |
# | LLM.int8() ([arXiv:2208.07339](https://arxiv.org/abs/2208.07339)), Table 1 | fairseq-trained dense LMs, C4 validation perplexity, 6.7B / 13B | 32-bit 13.30 / 12.45 | LLM.int8() 13.24 / 12.45 | |
# | same table, the smallest model | 125M | 25.65 | 25.83 | |
# | QLoRA ([arXiv:2305.14314](https://arxiv.org/abs/2305.14314)), Table 2 | OPT, BLOOM, LLaMA, Pythia, 125M to 13B: mean Pile Common Crawl perplexity | | | Int4 34.34, FP4 (E2M1) 31.07, FP4 (E3M0) 29.48, NF4 + DQ 27.41 |
# | QLoRA, Table 4 | LLaMA 7B to 65B **finetuned with LoRA adapters** on Alpaca and FLAN v2: mean 5-shot MMLU accuracy (%) | BF16 53.0 | | FP4 52.2, NF4 + DQ 53.1 |
#
# LLM.int8() (what `load_in_8bit` runs) lost no C4 perplexity at 6.7B and 13B, a little at 125M; the
# paper also reports zero-shot accuracy of OPT models kept at 16-bit level up to 175B (its Figure 1).
# Table 2 of QLoRA ranks the 4-bit types the way this notebook does (NF4 ahead of FP4) but has no
# 16-bit row; its Table 4 shows NF4 matching bf16 after adapter finetuning, which is not plain
# inference. The QLoRA paper itself notes that 4-bit quantization for inference "leads to performance
# degradation relative to 16-bit" (section 4).

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
print(module_types(fixed))
del fixed

# %% [markdown]
# ## 8. Save a 4-bit model and load it back
#
# A 4-bit model saves its packed weights and scales, so the next load skips quantization and reads
# fewer bytes (compare the sizes printed below). We save into a temporary folder (deleted at the end of
# the cell), load it back *without* a `quantization_config` (it is stored in `config.json`), and check
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

fresh = AutoModelForCausalLM.from_pretrained(path, quantization_config=configs["nf4"], dtype=LOAD_DTYPE,
                                             device_map=DEVICE_MAP)
with tempfile.TemporaryDirectory(prefix="nf4-save-") as tmp:
    fresh.save_pretrained(tmp)  # before any forward pass: see the trap above
    del fresh
    saved = sum(f.stat().st_size for f in Path(tmp).glob("*.safetensors"))
    original = sum(f.stat().st_size for f in Path(path).glob("*.safetensors"))
    print(f"saved NF4 weights: {saved / MiB:.1f} MiB (the checkpoint loaded above: {original / MiB:.1f} MiB)")
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
# floating point (the compute dtype, or bf16 in a repacking CPU's fused kernel; as a separate step, or
# inside the kernel), and whether the bytes saved pay for that depends on the kernel, the batch size and
# the hardware.
#
# A rate means little without the most it could be. Decoding one token reads every weight once, so
# tokens/s at batch 1 is at most the memory bandwidth divided by the bytes a step reads
# (`helpers.measure.decode_limit`); we measure the bandwidth of this machine first (a 1 GiB copy).
# Then three timed repeats per format, batch 1, on this machine and this small model (your figures will
# differ; every sentence below is printed from them):

# %%
# NBVAL_IGNORE_OUTPUT
# timings depend on the machine and its load
from helpers.measure import decode_limit, memory_bandwidth, rate_text, time_generate

for name in ("int8", "nf4-dq", "fp4"):  # free what section 9 does not time, before the 1 GiB copy
    del models[name]
model = lp = None  # the loops of sections 4 and 6 left these names on the last model and its log-probs
bandwidth = memory_bandwidth("cuda" if ON_GPU else "cpu")
print(f"memory bandwidth of this {'GPU' if ON_GPU else 'CPU'}: {bandwidth / 1e9:.1f} GB/s (a 1 GiB copy, median of 5)")
speed = {}
for name in ("fp32", "nf4"):
    limit = decode_limit(models[name], bandwidth, batch=1, context=inputs["input_ids"].shape[1] + 16)
    speed[name] = time_generate(models[name], inputs, new_tokens=16, repeats=3, limit_tokens_per_s=limit)
    print(f"{name:<5} {rate_text(speed[name]['tokens_per_s'], limit, speed[name]['spread'])}")

# %%
# NBVAL_IGNORE_OUTPUT
# the verdict depends on the timings above
fp32_rate, nf4_rate = speed["fp32"], speed["nf4"]
low, high = nf4_rate["spread"][0] / fp32_rate["spread"][1], nf4_rate["spread"][1] / fp32_rate["spread"][0]
print(f"NF4 / fp32: the repeats allow any ratio from {low:.2f} to {high:.2f}")
noisy = [name for name, r in speed.items() if r["spread"][1] > 1.5 * r["spread"][0]]
for name in noisy:
    r = speed[name]
    show(f"{name}: its fastest repeat was {r['spread'][1] / r['spread'][0]:.2f}x its slowest, too wide a spread for "
         "its median to mean much: run this section again on an idle machine")
where = f"on this {'GPU' if ON_GPU else 'CPU'} at batch 1"
ratio = nf4_rate["tokens_per_s"] / fp32_rate["tokens_per_s"]
if low <= 1 <= high:
    print(f"-> no measurable difference between NF4 and fp32 {where}")
elif low > 1:
    print(f"-> {where}, NF4 decodes faster than fp32: {low:.2f}x to {high:.2f}x as fast"
          + ("" if noisy else f" (median {ratio:.2f}x)"))  # a median of noisy repeats is left out
else:
    print(f"-> {where}, NF4 decodes slower than fp32: {1 / high:.2f}x to {1 / low:.2f}x slower"
          + ("" if noisy else f" (median {1 / ratio:.2f}x)"))

# %% [markdown]
# A comparison is only as good as its repeats: when the two spreads overlap enough that the ratio could
# be 1, the cell says "no measurable difference" instead of a winner, and it says so when one format's
# repeats vary too much (more than 1.5x) for its median to mean much. And three repeats of a 135M model
# at batch 1 say little about a large model or a large batch. Notebook 04 times every format against
# this machine's limit, at batch 1 and 16; notebooks 06 and 07 time generation on GPUs; their measurements are committed per hardware tier in `gpu-reference/<tier>/results.json` (NF4
# on one GPU, and a 4-bit model split over two GPUs, among them), each beside its limit.
#
# ## Summary
# - One `BitsAndBytesConfig` describes the quantization: `load_in_8bit` (threshold, skipped modules)
#   or `load_in_4bit` (NF4/FP4, double quantization, compute dtype; a CPU with AVX-512 BF16 multiplies
#   4-bit layers in bf16 whatever the compute dtype says).
# - Only the linear layers inside the blocks are replaced (`Linear8bitLt`, `Linear4bit`); the embedding,
#   norms and output head keep the load dtype. A `llm_int8_skip_modules` list replaces the default skips,
#   so it must name the output head again.
# - `get_memory_footprint()` leaves out the scales; with them, the bytes match the prediction.
# - Quality, measured on this small model: int8 stays closest to fp32, NF4 beats FP4. How much a format
#   costs a 7B+ model is a question for larger evaluations (the published figures in section 6).
# - Memory saved is not speed gained: 4-bit layers unpack their weights at every product; measure speed
#   on your hardware (section 9, notebook 04).
# - transformers 5 accepts quantization options only through `quantization_config`; 4-bit models save
#   and reload as they are.
#
# ## Exercises
# 1. Does the compute dtype change the 4-bit results on this machine? Load the model in NF4 with the other
#    compute dtype (`bnb_4bit_compute_dtype=OTHER_DTYPE`, defined below: float32 where the set-up asked for
#    bfloat16, bfloat16 where it asked for float32) and measure the mean KL of its next-token distributions
#    from those of `models["nf4"]` (same weights, `COMPUTE_DTYPE`): section 6's measure with `models["nf4"]`
#    in fp32's place. Store it in `kl_other`. Is it 0 (the compute dtype is not used), or larger?
# 2. What fraction of the int8 model's footprint is the (unquantized) embedding? Store it in `frac`.
#    (Section 9 freed the int8 model; its footprint is in `footprints`, and the fp32 model's embedding is
#    the same tensor in the same dtype.)

# %%
OTHER_DTYPE = torch.float32 if COMPUTE_DTYPE == torch.bfloat16 else torch.bfloat16
kl_other = None  # e.g. reuse log_probs() on a new model
frac = None     # a number between 0 and 1

# %%
from helpers.exercises import check_answer

nf4_kl, lp_nf4 = quality["nf4"]["kl"], log_probs(models["nf4"])
other = AutoModelForCausalLM.from_pretrained(path, dtype=LOAD_DTYPE, device_map=DEVICE_MAP,
                                             quantization_config=BitsAndBytesConfig(
                                                 load_in_4bit=True, bnb_4bit_quant_type="nf4",
                                                 bnb_4bit_compute_dtype=OTHER_DTYPE))
lp_other = log_probs(other)
kl_expected = torch.sum(lp_nf4.exp() * (lp_nf4 - lp_other), dim=-1).mean().item()
kl_from_fp32 = torch.sum(ref.exp() * (ref - lp_other), dim=-1).mean().item()  # the likely slip: fp32 as reference
del other, lp_other, lp_nf4
check_answer(kl_other, lambda kl: abs(kl - kl_expected) <= 0.1 * kl_expected + 1e-6,
             lambda kl: f"{kl:.2g} nats: " + (
                 "the two compute dtypes give the same outputs, so this machine does not use bnb_4bit_compute_dtype"
                 + (" (it repacks 4-bit weights and multiplies in bf16: see the top of this notebook)"
                    if CPU_REPACKS_4BIT else "")
                 if kl_expected <= 1e-6 else f"the compute dtype changes the outputs, by {kl / nf4_kl:.1%} of "
                 f"the KL that NF4 itself costs ({nf4_kl:.4f} nats from fp32, section 6)"),
             lambda kl: "that is the new model's KL from fp32, not from models['nf4']." if
             abs(kl - kl_from_fp32) <= 0.1 * kl_from_fp32 else "not the KL between the two NF4 models.",
             "load with configs['nf4']'s options and bnb_4bit_compute_dtype=OTHER_DTYPE, then compare its "
             "log_probs() with log_probs(models['nf4']) as section 6 compares with fp32's.",
             wrong_example=kl_from_fp32, label="Exercise 1")
expected_frac = emb_bytes / footprints["int8"]
_ = check_answer(frac, lambda f: abs(f - expected_frac) <= 0.05 * expected_frac,
                 "The embedding is not quantized: it keeps its load dtype (printed in section 4).",
                 "divide the embedding's bytes (not its parameter count) by the footprint.",
                 "numel() x element_size() / get_memory_footprint().",
                 wrong_example=emb_params / footprints["int8"], label="Exercise 2")

# %% [markdown]
# ## Further reading
# - [transformers: bitsandbytes quantization](https://huggingface.co/docs/transformers/quantization/bitsandbytes) –
#   every `BitsAndBytesConfig` option.
# - [LLM.int8() blog post](https://huggingface.co/blog/hf-bitsandbytes-integration) – outliers and the
#   mixed-precision decomposition.
# - [4-bit and QLoRA blog post](https://huggingface.co/blog/4bit-transformers-bitsandbytes) – NF4,
#   double quantization and compute dtype.
# - [bitsandbytes documentation](https://huggingface.co/docs/bitsandbytes) – backends, including the CPU one.
