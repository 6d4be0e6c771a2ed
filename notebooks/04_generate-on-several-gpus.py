# ---
# jupyter:
#   jupytext:
#     text_representation:
#       extension: .py
#       format_name: percent
#       format_version: '1.3'
#       jupytext_version: 1.19.6
#   kernelspec:
#     display_name: Python 3
#     language: python
#     name: python3
# ---

# %% [markdown]
# # Generate on several GPUs
#
# A model that does not fit one GPU can be split across two with `device_map`: each GPU holds
# some of the decoder layers, and `generate` works as before. That split buys **memory**, not
# speed: the layers still run one after the other, so only one GPU works at any moment. When you
# want more tokens per second you run **one replica per GPU** (each GPU serves its own prompts),
# or split every layer across the GPUs (**tensor parallelism**). This notebook does all three,
# checks that they say what a single device says, and measures them on two H200 GPUs.
#
# **What you'll learn**
# 1. Split a model across GPUs with `device_map` (`"auto"`, `"balanced"`, a map of your own, and a
#    per-GPU budget such as `max_memory={0: "35GiB", 1: "35GiB"}`), where the inputs go, and why the
#    layers run one GPU at a time.
# 2. Generate for a batch with left padding and an attention mask, and check that the split model's
#    greedy output is identical to the single-device run.
# 3. Split a 4-bit (bitsandbytes NF4) model across GPUs, and why transformers refuses a 4-bit split onto
#    the CPU or disk.
# 4. Serve one replica per GPU with accelerate's `PartialState().split_between_processes` under `torchrun`,
#    and run transformers' own tensor parallelism, checked against a single GPU.
# 5. Read a measured comparison of the three on two H200 GPUs, and the price of CPU offload.
#
# **What you'll need**
# - Notebooks 02 (dispatch a checkpoint) and 03 (design a device map) first.
# - Two GPUs for the real thing. **Without GPUs the notebook still runs end to end** (about 30 s
#   on an idle 2-core CPU): it plans for GPUs 0 and 1 on the meta device, lets the CPU and the disk play the two
#   devices of the split, runs the replicas as two CPU processes, and runs tensor parallelism on a toy
#   model with CPU processes. GPU figures come from the workbook's reference run (`gpu-reference/`).

# %% tags=["parameters"]
MODEL = "bundled"  # "bundled" (SmolLM2-135M-Instruct), a local checkpoint folder, or a hub id
GPUS = None  # GPU ids to split over, e.g. [0, 1]; None: every visible GPU (plan for [0, 1] without GPUs)
NEW_TOKENS = 12  # greedy new tokens per prompt

# %%
import json
import os
import tempfile
import time
import warnings
from pathlib import Path

import matplotlib.pyplot as plt
import torch
from accelerate import infer_auto_device_map
from accelerate.utils import CustomDtype, get_balanced_memory
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, BitsAndBytesConfig
from transformers.utils import logging as hf_logging

from helpers import cache_dir, resolve_model
from helpers.hardware import bnb_backend, gpu_count, print_report
from helpers.multigpu import LaunchError, ROOT, reference_results, torchrun
from helpers.shapes import SHAPES, meta_model, n_params

hf_logging.set_verbosity_error()
# accelerate warns once per absent GPU while it plans for GPUs this machine lacks: expected here.
warnings.filterwarnings("ignore", message=".*is not available, available devices are.*")
os.environ.setdefault("NCCL_NVLS_ENABLE", "0")  # NVLink multicast stays off on the shared GPU machines
torch.manual_seed(0)

# %%
# NBVAL_IGNORE_OUTPUT
# The hardware report depends on the machine.
print_report()

# %% [markdown]
# ## 1. Plan a split over two GPUs
#
# We read the bundled model's config and build the model on the **meta device** (shapes, no bytes),
# as in notebook 02. With two GPUs we split over them; without, we plan for GPUs 0 and 1 anyway:
# `infer_auto_device_map` only needs a budget per device, not the devices.

# %%
path = resolve_model(MODEL)
n_gpu = gpu_count()
gpus = list(GPUS) if GPUS is not None else (list(range(n_gpu)) if n_gpu >= 2 else [0, 1])
real_gpus = n_gpu >= 2 and len(gpus) >= 2 and all(g < n_gpu for g in gpus)
dtype = torch.bfloat16 if real_gpus else torch.float32  # bf16 on GPUs, fp32 on the CPU
config = AutoConfig.from_pretrained(path)
meta = meta_model(config, dtype=dtype)
no_split = meta._no_split_modules  # ["LlamaDecoderLayer"]: a decoder layer stays whole on one device
weights = sum(p.numel() * p.element_size() for p in meta.parameters())
print(f"{config.model_type}: {n_params(meta) / 1e6:.1f} M parameters, {weights / 2**20:.0f} MiB in {dtype}")
print(f"GPUs: {gpus} ({'present' if real_gpus else 'absent: planning only'}); never split: {no_split}")

# %% [markdown]
# Four ways to ask for a split. `"auto"` and `"balanced"` are the same in transformers 5: budgets that
# spread the layers evenly over the GPUs (`get_balanced_memory`). `"balanced_low_0"` leaves GPU 0 light
# (room for `generate`'s work there). The starting material's form names GPU ids and a budget per GPU,
# `max_memory={0: "35GiB", 1: "35GiB"}` for a 65 GB model; we scale it to our model (60% of its weights
# per GPU, so it cannot fit one). And a map written by hand: layer name -> device.

# %%
def describe(device_map: dict) -> str:
    """One line per device: which modules it holds (decoder layers as ranges)."""
    per: dict = {}
    for name, dev in device_map.items():
        per.setdefault(dev, []).append(name)
    lines = []
    for dev, names in per.items():
        idx = [int(n.split(".")[-1]) for n in names if n.startswith("model.layers.")]
        other = [n.split(".")[-1] for n in names if not n.startswith("model.layers.")]
        layers = f"layers {min(idx)}-{max(idx)} ({len(idx)})" if idx else "no layers"
        lines.append(f"{str(dev):>5}: {layers}; {', '.join(other) or '-'}")
    return "\n".join(lines)


plan_for = {g: "139GiB" for g in gpus}  # an H200's usable memory, for planning
balanced = get_balanced_memory(meta, max_memory=plan_for, no_split_module_classes=no_split, dtype=dtype)
low_0 = get_balanced_memory(meta, max_memory=plan_for, no_split_module_classes=no_split, dtype=dtype, low_zero=True)
budget = f"{0.6 * weights / 2**20:.0f}MiB"
starting = {g: budget for g in gpus}  # the starting material's {0: "35GiB", 1: "35GiB"}, scaled
half = config.num_hidden_layers // 2
by_hand = {"model.embed_tokens": gpus[0], "lm_head": gpus[0], "model.rotary_emb": gpus[0]}
by_hand.update({f"model.layers.{i}": gpus[0] if i < half else gpus[1] for i in range(config.num_hidden_layers)})
by_hand["model.norm"] = gpus[1]
plans = {
    '"auto" / "balanced"': infer_auto_device_map(meta, max_memory=balanced, no_split_module_classes=no_split, dtype=dtype),
    '"balanced_low_0"': infer_auto_device_map(meta, max_memory=low_0, no_split_module_classes=no_split, dtype=dtype),
    f"max_memory={starting}": infer_auto_device_map(meta, max_memory=dict(starting), no_split_module_classes=no_split,
                                                    dtype=dtype),
    "by hand": by_hand,
}
for name, plan in plans.items():
    print(f"{name}\n{describe(plan)}\n")

# %% [markdown]
# The tied output head (`lm_head` shares the embedding's weights) sits on GPU 0 with the embedding:
# after the last layer on GPU 1 the hidden states travel back to GPU 0 for the head.
#
# `"balanced_low_0"` put everything on GPU 1: for a model this small next to an H200's budget, "keep GPU 0
# light" means "leave it empty". For a model near the GPUs' size it would fill GPU 1 and put the rest on GPU 0.
#
# **Self-check.** Every other plan uses both GPUs, and every plan keeps each decoder layer whole:

# %%
for name, plan in plans.items():
    if "low_0" not in name:
        assert set(plan.values()) == set(gpus), f"{name} does not use both GPUs: {set(plan.values())}"
    assert all(k.count(".") <= 2 for k in plan if k.startswith("model.layers.")), f"{name} cut a layer"
print("the plans use", gpus, "and keep decoder layers whole")

# %% [markdown]
# ## 2. Load the split and feed it inputs
#
# We load the hand-made map for real. With two GPUs it goes to GPUs 0 and 1. Without, the CPU plays GPU 0
# and the disk plays GPU 1 (weights in an offload folder, brought to the CPU layer by layer): the same
# code path, hooks and all. Then the same model whole on one device, as the reference.

# %%
stand_in = {gpus[0]: gpus[0], gpus[1]: gpus[1]} if real_gpus else {gpus[0]: "cpu", gpus[1]: "disk"}
real_map = {name: stand_in[dev] for name, dev in by_hand.items()}
(cache_dir() / "offload").mkdir(exist_ok=True)
offload = tempfile.mkdtemp(prefix="04-split-", dir=cache_dir() / "offload")  # ours: removed at the end
split = AutoModelForCausalLM.from_pretrained(path, dtype=dtype, device_map=real_map, offload_folder=offload)
on_disk = [m for m, d in split.hf_device_map.items() if d == "disk"]
if real_gpus:  # bytes per device, read now: the single-device copy loaded next also goes to GPU 0
    mem = {f"cuda:{g}": torch.cuda.memory_allocated(g) for g in gpus}
else:  # parameters in RAM; the layers left on disk are read from the checkpoint's own files
    mem = {"cpu": sum(p.numel() * p.element_size() for p in split.parameters() if p.device.type == "cpu"),
           "disk": sum(p.numel() * p.element_size() for n, p in meta.named_parameters()
                       if any(n.startswith(m + ".") for m in on_disk))}
single_device = gpus[0] if real_gpus else "cpu"
single = AutoModelForCausalLM.from_pretrained(path, dtype=dtype, device_map={"": single_device})
print("split :", sorted({str(v) for v in split.hf_device_map.values()}), "| single:", single_device)
print(describe(split.hf_device_map))

# %% [markdown]
# **Where do the inputs go?** To the device of the first module that sees them, the embedding.
# `model.device` names the device of the first parameter, which is the same here; the embedding's
# device says it directly. Every layer carries an accelerate hook that moves its inputs to its own
# device; weights kept on `meta` (offloaded) are brought in by the hook at every pass.

# %%
first = split.get_input_embeddings().weight.device
print("inputs go to:", first, "| model.device:", split.device)
for i in (0, config.num_hidden_layers - 1):
    layer = split.model.layers[i]
    print(f"layer {i:>2}: {type(layer._hf_hook).__name__}, runs on {layer._hf_hook.execution_device}, "
          f"weights kept on {layer.mlp.up_proj.weight.device} between passes")

# %% [markdown]
# ## 3. Why the layers run one GPU at a time
#
# Each decoder layer needs the previous layer's output. We time-stamp every layer's start and end in one
# forward pass: no layer starts before the one before it has finished, so GPU 1 waits while GPU 0 works,
# then GPU 0 waits. A split gives you the memory of two GPUs at about the speed of one.

# %%
stamps = []


def pre(module, args):
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    stamps.append(("start", module.layer_idx, args[0].device, time.perf_counter()))


def post(module, args, output):
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    hidden = output[0] if isinstance(output, tuple) else output
    stamps.append(("end", module.layer_idx, hidden.device, time.perf_counter()))


for layer in split.model.layers:
    layer.layer_idx = layer.self_attn.layer_idx
handles = [h for layer in split.model.layers
           for h in (layer.register_forward_pre_hook(pre), layer.register_forward_hook(post))]
tok = AutoTokenizer.from_pretrained(path)
with torch.inference_mode():
    split(**tok(["The capital of France is"], return_tensors="pt").to(first))
for h in handles:
    h.remove()
starts = [s for s in stamps if s[0] == "start"]
ends = [s for s in stamps if s[0] == "end"]
sequential = all(starts[i + 1][3] >= ends[i][3] for i in range(len(ends) - 1))
hops = [(a[1], b[1], a[2], b[2]) for a, b in zip(ends, ends[1:]) if a[2] != b[2]]  # output devices
placed = [str(split.hf_device_map[f"model.layers.{s[1]}"]) for s in starts]
print("layer order:", [s[1] for s in starts] == list(range(config.num_hidden_layers)))
print("each layer starts after the previous one ends:", sequential)
print("placement in run order:", " -> ".join(f"{d} x{placed.count(d)}" for d in dict.fromkeys(placed)))
print("hidden states changed device between layers:", [(a, b, str(x), str(y)) for a, b, x, y in hops] or "never (one CPU computes both)")

# %% [markdown]
# On the CPU stand-in both halves compute on the CPU (the "disk" layers only load their weights from
# disk), so the hidden states never change device; on two GPUs they cross from `cuda:0` to `cuda:1`
# once per forward pass, one small tensor of `batch x tokens x hidden`.
#
# **Self-check:** `sequential` must be `True`.

# %%
assert sequential, "a layer started before the previous one finished: not a plain device_map split?"

# %% [markdown]
# ### Memory per device after the load
#
# The bytes each device held right after the load (`mem`, read in the loading cell). On GPUs:
# `torch.cuda.memory_allocated`. On the CPU stand-in: the parameters in RAM, and the bytes of the layers
# left on disk (transformers reads a safetensors checkpoint's offloaded weights from its own files, so the
# offload folder stays empty).

# %%
for dev, b in mem.items():
    print(f"{dev:>7}: {b / 2**20:6.0f} MiB")
fig, ax = plt.subplots(figsize=(5, 3))
ax.bar(list(mem), [b / 2**20 for b in mem.values()], color=["tab:blue", "tab:orange", "tab:green"][: len(mem)])
ax.axhline(weights / 2**20, ls="--", color="grey", label="whole model")
ax.set_title(f"Split model: memory per device ({'GPUs' if real_gpus else 'CPU + disk stand-in'})")
ax.set_xlabel("device")
ax.set_ylabel("weights held (MiB)")
ax.legend()
plt.show()

# %% [markdown]
# ## 4. Generate a batch: left padding, an attention mask, and the single-device check
#
# Prompts of different lengths are padded to one length. A decoder-only model continues from the **last**
# position of each row, so the padding goes on the **left** and the attention mask tells the model which
# positions are padding. The inputs go to the embedding's device.

# %%
prompts = ["The capital of France is", "Water boils at", "The three primary colours are red,"]
tok.padding_side = "left"
batch = tok(prompts, return_tensors="pt", padding=True).to(first)
print(batch["input_ids"])
print(batch["attention_mask"])

# %%
gen = dict(max_new_tokens=NEW_TOKENS, do_sample=False, pad_token_id=tok.pad_token_id)
with torch.inference_mode():
    for m in (split, single):  # warm-up: the first generate of a process is the slowest
        m.generate(**batch.to(m.device), max_new_tokens=2, do_sample=False, pad_token_id=tok.pad_token_id)
    t0 = time.perf_counter()
    out_split = split.generate(**batch, **gen)
    t1 = time.perf_counter()
    out_single = single.generate(**batch.to(single.device), **gen)
    t2 = time.perf_counter()
new = out_split[:, batch["input_ids"].shape[1]:]
for p, ids in zip(prompts, new):
    print(f"{p!r} -> {tok.decode(ids, skip_special_tokens=True)!r}")
identical = torch.equal(out_split.cpu(), out_single.cpu())
print("split output identical to the single-device run:", identical)

# %% [markdown]
# **Self-check.** Greedy decoding on the split model gives exactly the tokens of the single-device run:
# the split moves tensors between devices, it does not change any arithmetic.

# %%
assert identical, "the split model's greedy output differs from the single-device run"

# %% [markdown]
# What goes wrong with padding on the **right**: the short prompts end in padding, and the model
# continues after it. transformers warns on stderr ("right-padding was detected"); the short rows'
# continuations drift from what the same prompt gives on its own.

# %%
tok.padding_side = "right"
right = tok(prompts, return_tensors="pt", padding=True).to(first)
with torch.inference_mode():
    out_right = split.generate(**right, **gen)
tok.padding_side = "left"
for p, ids in zip(prompts, out_right[:, right["input_ids"].shape[1]:]):
    print(f"{p!r} -> {tok.decode(ids, skip_special_tokens=True)!r}")
same_as_left = [torch.equal(a, b) for a, b in zip(out_right[:, right["input_ids"].shape[1]:].cpu(), new.cpu())]
print("same as left padding, per prompt:", same_as_left)

# %%
# NBVAL_IGNORE_OUTPUT
# Timings depend on the machine and its load.
if real_gpus:  # cheap on GPUs: warm-up, then medians of 3 (helpers.bench.time_generate)
    from helpers.bench import time_generate

    t_split = time_generate(split, batch.to(first), new_tokens=32, repeats=3)["tokens_per_s"]
    t_single = time_generate(single, batch.to(single.device), new_tokens=32, repeats=3)["tokens_per_s"]
    print(f"split : {t_split:.1f} tokens/s per sequence (batch {len(prompts)}, median of 3)")
    print(f"single: {t_single:.1f} tokens/s per sequence; split / single: {t_split / t_single:.2f}")
else:  # the CPU stand-in is slow: the one timed run above
    print(f"split : {t1 - t0:.2f} s for {NEW_TOKENS} tokens x {len(prompts)} prompts")
    print(f"single: {t2 - t1:.2f} s; split / single speed: {(t2 - t1) / (t1 - t0):.2f}")

# %% [markdown]
# The expectation (`shared/figures.md`): on two GPUs, about the speed of one (one GPU works at a time, plus
# one hop per token), less where per-layer overhead dominates, as it does for a model this small in eager mode:
# each layer's hook adds Python work and moves the shared inputs (position embeddings, mask) to its GPU.
# On the CPU stand-in the "disk" half re-reads its weights at every token, so the split is slower.

# %%
import shutil

import gc

del split, single, layer, m
gc.collect()  # accelerate's hooks hold reference cycles: collect them to free the memory now
shutil.rmtree(offload, ignore_errors=True)  # the offload folder this notebook made
if torch.cuda.is_available():
    torch.cuda.empty_cache()

# %% [markdown]
# ## 5. A 4-bit model split across GPUs
#
# bitsandbytes' 4-bit layers can be split across GPUs like any other. For the plan, the quantized weights
# count half a byte each: accelerate's `CustomDtype.INT4` for every Linear layer inside the blocks (the
# embedding and head stay in the compute dtype, bfloat16 on GPUs). We give each GPU 60% of the 4-bit model.

# %%
quantized = [f"{n}.weight" for n, m in meta.named_modules()
             if isinstance(m, torch.nn.Linear) and not n.startswith("lm_head")]
special = {n: CustomDtype.INT4 for n in quantized}
sizes_4bit = sum(p.numel() * (0.5 if n in special else 2) for n, p in meta.named_parameters())
budget_4bit = {g: f"{0.6 * sizes_4bit / 2**20:.0f}MiB" for g in gpus}
plan_4bit = infer_auto_device_map(meta, max_memory=dict(budget_4bit), no_split_module_classes=no_split,
                                  dtype=torch.bfloat16, special_dtypes=special)
print(f"{len(quantized)} Linear layers in 4-bit; model about {sizes_4bit / 2**20:.0f} MiB; budgets {budget_4bit}")
print(describe(plan_4bit))

# %% [markdown]
# With GPUs we load that plan. Without, we try the same split with the CPU and disk standing in, and
# transformers refuses: 4-bit layers on the CPU or disk of a dispatched model are not supported (the
# escape hatch, `llm_int8_enable_fp32_cpu_offload=True`, keeps the offloaded layers unquantized in
# float32). So on a CPU-only machine the plan above is what there is to see.

# %%
bnb = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=dtype)
map_4bit = {name: stand_in[dev] for name, dev in plan_4bit.items()}
before = {g: torch.cuda.memory_allocated(g) for g in gpus} if real_gpus else {}
loaded_4bit = False
try:
    model_4bit = AutoModelForCausalLM.from_pretrained(path, quantization_config=bnb, device_map=map_4bit,
                                                      offload_folder=tempfile.gettempdir())
except ValueError as e:
    print(f"{type(e).__name__}: {str(e).split('. ')[0]}.")
else:
    loaded_4bit = True
    lin = model_4bit.model.layers[-1].mlp.down_proj
    print("devices:", sorted({str(v) for v in model_4bit.hf_device_map.values()}))
    print(f"last layer's down_proj: {type(lin).__module__}.{type(lin).__name__}, weight {type(lin.weight).__name__} "
          f"on {lin.weight.device}; bitsandbytes backend: {bnb_backend()}")
    for g in gpus:
        print(f"cuda:{g}: {(torch.cuda.memory_allocated(g) - before[g]) / 2**20:.0f} MiB for the 4-bit model")
    with torch.inference_mode():
        out_4bit = model_4bit.generate(**batch.to(model_4bit.get_input_embeddings().weight.device), **gen)
    for p, ids in zip(prompts, out_4bit[:, batch["input_ids"].shape[1]:]):
        print(f"{p!r} -> {tok.decode(ids, skip_special_tokens=True)!r}")
    del model_4bit, lin
    gc.collect()

# %% [markdown]
# **Self-check.** On GPUs the quantized layers are bitsandbytes `Linear4bit` modules on `cuda`; without
# GPUs the load was refused, and the plan still used both GPU ids.

# %%
assert set(plan_4bit.values()) == set(gpus), "the 4-bit plan should use both GPUs"
assert loaded_4bit == real_gpus
print("4-bit split:", "loaded on GPUs" if real_gpus else "planned; the CPU/disk stand-in was refused")

# %% [markdown]
# ## 6. One replica per GPU: throughput
#
# When the model fits one GPU, the fastest way to serve many prompts is a whole copy per GPU, each
# answering its own share. `scripts/replicas.py` does that with accelerate:
#
# ```python
# state = PartialState(cpu=not torch.cuda.is_available())   # one process per GPU (or CPU process)
# assert state.num_processes == args.expect_world_size       # every process checks the world size
# model = AutoModelForCausalLM.from_pretrained(path, device_map={"": state.device})
# with state.split_between_processes(list(enumerate(prompts))) as mine:   # contiguous slices, rank 0 first
#     ... generate for `mine` with left padding ...
# results = gather_object(results)   # rank 0's answers, then rank 1's: prompt order kept
# state.destroy_process_group()
# ```
#
# It runs as separate processes started by `torchrun`, not with `notebook_launcher` (which forks this
# kernel and refuses to start once bitsandbytes is imported). Without a GPU, a plain `PartialState()` under
# `torchrun` was seen reporting "rank 0 of 1" in each process (each then did all the work); `cpu=True`
# starts a real gloo process group, and the world-size assertion catches the failure if it ever comes back.

# %%
nproc = len(gpus) if real_gpus else 2
with tempfile.TemporaryDirectory() as d:
    done = torchrun("scripts/replicas.py", nproc, ["--expect-world-size", nproc, "--model", path,
                                                    "--new-tokens", NEW_TOKENS, "--out", f"{d}/replicas.json"])
    replicas = json.loads(Path(d, "replicas.json").read_text())
for p in replicas["processes"]:
    print(f"rank {p['rank']} of {p['world_size']} on {p['device']} ({p['backend']}): prompts {p['prompt_indices']}")
for r in replicas["results"]:
    print(f"#{r['index']} (rank {r['rank']}) {r['prompt']!r} -> {r['completion']!r}")

# %% [markdown]
# **Self-check.** Each process saw its own rank and the same world size, and the answers came back in
# prompt order.

# %%
ranks = [p["rank"] for p in replicas["processes"]]
assert ranks == list(range(nproc)), f"ranks {ranks}: each process should see its own rank"
assert {p["world_size"] for p in replicas["processes"]} == {nproc}
assert [r["index"] for r in replicas["results"]] == list(range(len(replicas["results"])))
assert len({p["pid"] for p in replicas["processes"]}) == nproc, "one process per replica"
print(f"{nproc} processes, ranks {ranks}, answers in order")

# %% [markdown]
# ## 7. Tensor parallelism: every layer across the GPUs
#
# Tensor parallelism cuts each weight matrix: the query/key/value and MLP input projections by columns
# (each GPU computes some heads), the output projections by rows (partial sums, added up by an
# all-reduce). transformers ships the plan with the model (`base_model_tp_plan`); attention and key/value
# head counts must divide by the number of GPUs. The bundled model's 9 and 3 heads do not split over 2,
# so we use the **llama-1b shape** (32 and 4 heads) with **random weights**.
#
# The API moved: transformers 5.24 asks for `distributed_config=DistributedConfig(tp_size=N)`, and its older
# `from_pretrained(..., tp_plan="auto")` still works but warns that it is deprecated. The GPU machines' own
# release, 5.17, took `DistributedConfig(tp_size=N)` as well (the GPU reference ran the script with it, see
# below). `scripts/tensor_parallel.py` uses `DistributedConfig(tp_size=N)` where the installed release has that
# field, and falls back to `tp_plan="auto"` on releases that lack it:

# %%
import importlib.util

spec = importlib.util.spec_from_file_location("tensor_parallel", ROOT / "scripts" / "tensor_parallel.py")
tp_script = importlib.util.module_from_spec(spec)
spec.loader.exec_module(tp_script)
kwargs = tp_script.tp_load_kwargs(2)
print("this transformers asks for tensor parallelism with:", ", ".join(kwargs))
print("Llama's plan:", json.dumps(config.base_model_tp_plan, indent=1))
for name, shape in [("bundled", dict(num_attention_heads=config.num_attention_heads,
                                     num_key_value_heads=config.num_key_value_heads)), ("llama-1b", SHAPES["llama-1b"])]:
    h, kv = shape["num_attention_heads"], shape["num_key_value_heads"]
    print(f"{name:>8}: {h} heads, {kv} kv heads -> splits over 2 GPUs: {h % 2 == 0 and kv % 2 == 0}")
old = json.loads((ROOT / "gpu-reference" / "tp-system-transformers.json").read_text())
print(f"GPU reference with transformers {old['transformers']}: {old['api']}, logits check ok: {old['logits_check']['ok']}")

# %% [markdown]
# Each process loads its shards and computes the logits of fixed random token ids in float32; rank 0
# then loads the whole model on one device and compares. The shards change only the order in which
# partial sums are added, so the logits agree within 1e-3 (times the largest logit, if above 1).
#
# With two GPUs this runs on the llama-1b shape. **With fewer than two GPUs** the cell says so and runs
# the same script on two CPU processes (gloo) with a toy Llama of the same layout (2 layers, hidden 256,
# 8 heads, 4 key/value heads, random weights): the code path is the same, the sizes are not.

# %%
from helpers.multigpu import random_checkpoint
from helpers.shapes import random_model
from transformers import LlamaConfig

tmp = None
if real_gpus:
    tp_model = random_checkpoint("llama-1b", torch.bfloat16)  # RANDOM weights, built once on this machine
    tp_args = []
    print(f"{len(gpus)} GPUs: tensor parallel over {len(gpus)} on the llama-1b shape, RANDOM weights")
else:
    print(f"Tensor parallelism needs at least two GPUs; this machine has {n_gpu}. "
          "Running the same script on 2 CPU processes with a toy Llama (RANDOM weights) instead.")
    tmp = tempfile.mkdtemp(prefix="04-tp-toy-", dir=cache_dir())
    toy = LlamaConfig(hidden_size=256, intermediate_size=512, num_hidden_layers=2, num_attention_heads=8,
                      num_key_value_heads=4, vocab_size=1024)
    random_model(toy, dtype=torch.float32, seed=0).save_pretrained(tmp)
    tp_model, tp_args = tmp, ["--cpu"]
tp_n = len(gpus) if real_gpus else 2
with tempfile.TemporaryDirectory() as d:
    try:
        torchrun("scripts/tensor_parallel.py", tp_n, ["--checkpoint", tp_model, "--expect-world-size", tp_n,
                                                      "--out", f"{d}/tp.json", *tp_args])
        tp = json.loads(Path(d, "tp.json").read_text())
    except LaunchError as e:
        tp = None
        print(f"{type(e).__name__}: {' '.join(str(e).splitlines()[:2])}")
if tmp:
    shutil.rmtree(tmp)
if tp:
    print(f"model: {tp['model']}; {tp['world_size']} processes; api: {tp['api']}")
    print(f"q_proj: full {tp['q_proj_full_shape']}, shard per process {[r['q_proj_shard_shape'] for r in tp['per_rank']]}")

# %%
# NBVAL_IGNORE_OUTPUT
# The last digits of the difference depend on the machine's float arithmetic.
check = tp["logits_check"]
print(f"max |logit difference| {check['max_abs_diff']:.2e} (tolerance {check['tolerance']:.0e}); "
      f"top-1 agreement {check['top1_agreement']:.3f}")

# %% [markdown]
# **Self-check.** The tensor-parallel logits match the single-device run within the tolerance, and each
# process held half of every column-split weight.

# %%
assert tp is not None and tp["logits_check"]["ok"], "tensor-parallel logits differ from the single-device run"
assert all(r["q_proj_shard_shape"][0] * tp["world_size"] == tp["q_proj_full_shape"][0] for r in tp["per_rank"])
print("logits within tolerance:", tp["logits_check"]["ok"])

# %% [markdown]
# ## 8. The three compared on two H200 GPUs
#
# A split, replicas and tensor parallelism were measured on the workbook's reference machine by
# `scripts/gpu_bench.py` (random-weight llama-1b shape, bfloat16, eager `generate`, greedy, warm-up then
# medians of 3). The figures below are read from `gpu-reference/results.json`, the file that run wrote;
# the hardware and versions are printed beside them. The expectation (`shared/figures.md`): a split runs
# one GPU at a time, about **1.0x** one GPU; replicas double the throughput of a large batch and do nothing
# for a single prompt; tensor parallelism can beat one GPU only once per-layer overhead is gone (compiled
# or CUDA graphs): eager decoding of a 1B model is bound by that overhead.

# %%
ref = reference_results()
hw = ref["hardware"]
print(f"{len(hw['gpus'])} x {hw['gpus'][0][0]} ({hw['gpus'][0][1]} GiB), CUDA {hw['cuda']}; torch {hw['torch']}, "
      f"transformers {hw['transformers']}, accelerate {hw['accelerate']}, bitsandbytes {hw['bitsandbytes']}")
print(f"model: {ref['model']['label']}, {ref['model']['params'] / 1e9:.2f} B parameters, "
      f"{ref['model']['weight_bytes'] / 1e9:.2f} GB; {ref['new_tokens']} new tokens")


def rows_of(name):
    if name == "replicas":
        return {r["batch_total"]: r["total_tokens_per_s"] for r in ref["replicas"]["bench"]}
    sec = ref[name]
    return {r["batch"]: r["total_tokens_per_s"] for r in sec.get("rows", sec.get("bench", []))}


def gib_per_gpu(name):
    if name == "replicas":
        return [r["peak_bytes"] / 2**30 for r in ref["replicas"]["bench"][-1]["per_rank"]]
    if name == "tensor_parallel":
        return [r["peak_bytes"] / 2**30 for r in ref["tensor_parallel"]["per_rank"]]
    return [b / 2**30 for b in ref[name]["peak_bytes"]]


methods = {"one GPU": "single", "split (balanced)": "split", "replicas": "replicas", "tensor parallel": "tensor_parallel"}
batches = sorted(rows_of("single"))
base = rows_of("single")
table = []
for label, key in methods.items():
    tps = rows_of(key)
    table.append((label, *[tps[b] for b in batches], *[tps[b] / base[b] for b in batches], gib_per_gpu(key)))
head = "".join(f"{'tok/s b=' + str(b):>12}" for b in batches) + "".join(f"{'vs 1 GPU b=' + str(b):>14}" for b in batches)
print(f"\n{'method':<18}{head}   peak GiB per GPU")
for label, *vals in table:
    nums, ratios, mem = vals[: len(batches)], vals[len(batches): 2 * len(batches)], vals[-1]
    print(f"{label:<18}" + "".join(f"{v:>12.0f}" for v in nums) + "".join(f"{r:>13.2f}x" for r in ratios)
          + "   " + ", ".join(f"{m:.2f}" for m in mem))

# %%
fig, axes = plt.subplots(1, 2, figsize=(10, 3.5))
x = range(len(methods))
for k, b in enumerate(batches):
    axes[0].bar([i + 0.4 * k for i in x], [row[1 + k] for row in table], width=0.4, label=f"batch {b}")
axes[0].set_xticks([i + 0.2 for i in x], list(methods), rotation=15)
axes[0].set_ylabel("total tokens/s")
axes[0].set_title("Throughput (random-weight llama-1b, bf16, 2x H200)")
axes[0].legend()
axes[1].bar([i + 0.4 * k for i in x for k in range(2)], [row[-1][k] if len(row[-1]) > k else 0 for row in table for k in range(2)],
            width=0.4, color=["tab:blue", "tab:orange"] * len(methods))
axes[1].set_xticks([i + 0.2 for i in x], list(methods), rotation=15)
axes[1].set_ylabel("peak GiB (GPU 0 blue, GPU 1 orange)")
axes[1].set_title("Memory per GPU")
plt.tight_layout()
plt.show()

# %% [markdown]
# How the reference compares with the expectation, in figures read from the results file:

# %%
big = batches[-1]
split_ratio = rows_of("split")[batches[0]] / base[batches[0]]
rep_ratio = rows_of("replicas")[big] / base[big]
rep_1 = rows_of("replicas")[batches[0]] / base[batches[0]]
tp_ratio = rows_of("tensor_parallel")[batches[0]] / base[batches[0]]
limit = 4.3e12 / ref["model"]["weight_bytes"]
print(f"one GPU at batch {batches[0]}: {base[batches[0]]:.0f} tokens/s = {base[batches[0]] / limit:.1%} of the "
      f"bandwidth limit ({limit:.0f} tokens/s at 4.3 TB/s): eager decoding is bound by per-layer overhead, "
      f"and at batch {big} one GPU gives {base[big] / base[batches[0]]:.1f}x the tokens of batch {batches[0]}")
print(f"split vs one GPU at batch {batches[0]}: {split_ratio:.2f}x (expected about 1.0x)"
      + (": below it, because accelerate's hooks add Python work at every layer, and overhead is what bounds "
         "eager decoding here" if split_ratio < 0.9 else ""))
print(f"replicas vs one GPU: {rep_1:.2f}x at batch {batches[0]} (expected 1.0x: one replica idles), "
      f"{rep_ratio:.2f}x at batch {big} (expected up to 2x)"
      + (f": below 2x, because one GPU already serves batch {big} at almost the cost of batch 1 (overhead-bound), "
         "so halving each GPU's batch saves little, while the two processes' launch overheads compete for the host"
         if rep_ratio < 1.5 else ""))
print(f"tensor parallel vs one GPU at batch {batches[0]}: {tp_ratio:.2f}x (eager: expected at most 1x; it adds two "
      f"all-reduces per layer to the per-layer overhead)")
print(f"tensor-parallel logits check on the GPUs: max difference {ref['tensor_parallel']['logits_check']['max_abs_diff']:.1e} "
      f"(tolerance {ref['tensor_parallel']['logits_check']['tolerance']:.0e}), API {ref['tensor_parallel']['api']}")
nf4 = ref["split_nf4"]
print(f"NF4 split: {nf4['module_type']} with {nf4['weight_type']} on {nf4['weight_device']}, bitsandbytes backend "
      f"{nf4['bnb_backend']}; {nf4['rows'][0]['tokens_per_s_per_sequence']:.0f} tokens/s at batch 1")

# %% [markdown]
# ## 9. The price of CPU offload on a GPU
#
# Notebook 02 offloads layers to the CPU when a GPU is too small. On a GPU every offloaded layer is copied
# to the GPU **at every forward pass**, so each token pays `bytes offloaded / host-to-device rate`. The
# reference run kept 0 to 16 of the 22 decoder layers on the CPU (batch 1); the slope of seconds per token
# against bytes offloaded is the effective host-to-device rate, compared below with a plain copy.

# %%
off = ref["offload"]
xs = [r["bytes_offloaded"] / 1e9 for r in off["rows"]]
ys = [r["s_per_token"] * 1e3 for r in off["rows"]]
for r in off["rows"]:
    print(f"{r['layers_on_cpu']:>2} layers on the CPU ({r['bytes_offloaded'] / 1e9:.2f} GB): "
          f"{r['tokens_per_s_per_sequence']:.1f} tokens/s")
print(f"effective host-to-device rate (slope): {off['effective_h2d_GBps']:.1f} GB/s; a plain 1 GiB copy: "
      f"{ref['h2d']['pageable_GBps']:.1f} GB/s pageable, {ref['h2d']['pinned_GBps']:.1f} GB/s pinned")
fig, ax = plt.subplots(figsize=(5, 3.5))
ax.plot(xs, ys, "o", label="measured")
ax.plot(xs, [(off["fit_intercept_s"] + off["fit_s_per_byte"] * x * 1e9) * 1e3 for x in xs], "-",
        label=f"fit: {off['effective_h2d_GBps']:.1f} GB/s")
ax.set_title("CPU offload on one H200 (random llama-1b, bf16, batch 1)")
ax.set_xlabel("weights offloaded to the CPU (GB)")
ax.set_ylabel("time per token (ms)")
ax.legend()
plt.show()

# %% [markdown]
# ## Summary
#
# - A `device_map` split (`"auto"`/`"balanced"`, `"balanced_low_0"`, per-GPU budgets, or a map by hand) puts
#   whole decoder layers on each GPU; inputs go to the embedding's device; hooks move the hidden states.
#   The layers run one after the other: a split buys memory, at about the speed of one GPU.
# - Batches are padded on the left with an attention mask; greedy output of the split model is identical to
#   the single-device run.
# - A 4-bit model splits across GPUs like any other (plan its Linear layers at half a byte); transformers
#   refuses to put 4-bit layers of a dispatched model on the CPU or disk.
# - For throughput, run one replica per GPU under `torchrun` with `PartialState().split_between_processes`,
#   check the world size in every process, gather in order, tear the group down.
# - Tensor parallelism splits every layer (`DistributedConfig(tp_size=N)` in 5.24, `tp_plan="auto"` in 5.17);
#   it needs head counts that divide by the GPU count and pays an all-reduce per layer.
# - Offloading to the CPU costs its bytes over the host-to-device link at every token.
#
# ## Exercises
#
# 1. Plan the split with `max_memory={0: "200MiB", 1: "200MiB"}` (for float32). How many layers land on each
#    GPU, and what does accelerate do with the rest? *Self-check:* the map then holds `"cpu"` entries.
# 2. Move `lm_head` and `model.embed_tokens` to GPU 1 in the hand-made map and load it. What does transformers
#    do with the tied pair? *Self-check:* compare `split.hf_device_map["lm_head"]` with the embedding's device.
# 3. Run `scripts/replicas.py` with `--expect-world-size 3` under `torchrun --nproc_per_node 2`.
#    *Self-check:* every process stops with a message naming both numbers.
# 4. From the reference results, at which batch would two replicas overtake one GPU by 1.9x? Extend
#    `scripts/gpu_bench.py --batches` and measure on two GPUs. *Self-check:* the ratio grows with the batch.
#
# ## Further reading
#
# - [Big model inference](https://huggingface.co/docs/accelerate/usage_guides/big_modeling) (accelerate):
#   device maps, `max_memory`, offload, and why a split runs one device at a time.
# - [Distributed inference](https://huggingface.co/docs/accelerate/usage_guides/distributed_inference)
#   (accelerate): `split_between_processes` and gathering the results.
# - [Tensor parallelism](https://huggingface.co/docs/transformers/perf_infer_gpu_multi) (transformers): the
#   plans, `DistributedConfig`, launching with `torchrun`.
# - [torchrun](https://docs.pytorch.org/docs/stable/elastic/run.html) (PyTorch): the launcher's options.
# - [bitsandbytes multi-GPU and offload](https://huggingface.co/docs/transformers/quantization/bitsandbytes)
#   (transformers): 4-bit and 8-bit loading, `llm_int8_enable_fp32_cpu_offload`.
