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
# # Run OpenCLIP's large models with the same tools
#
# The tools of notebooks 00 to 08 are not only for language models. OpenCLIP's largest models meet the same
# wall: ViT-bigG-14 has 2.54 billion parameters and EVA02-E-14 4.70 billion, too many for a small GPU in
# float32 (training bigG ran out of memory at batch 1 on a 40 GB GPU: OpenCLIP's issue 296). A CLIP model is
# two towers, an image encoder and a text encoder, that meet only in their final embeddings: they split across
# devices naturally. And encoding an image does one multiply-add per weight for each of its tokens (its
# patches and a class token: 50 for ViT-B-32, 257 for the /14 models), times the images in the batch, where
# decoding one token does one: with a batch it is bound by the matrix-multiply rate, not by memory bandwidth
# like decoding, so a quantized format that saves memory costs time here in a different way (section 6
# measures where the turn lies on your machine). This notebook sizes, splits, quantizes and times them.
#
# **What you'll learn**
# 1. Which route runs where: OpenCLIP's own package (`open_clip`) and transformers' `CLIPModel` built from
#    configs that match OpenCLIP's, and OpenCLIP's removed int8 route.
# 2. OpenCLIP's shapes from ViT-B-32 to ViT-bigG-14 and EVA02-E-14 on the meta device: parameters per tower,
#    bytes per format, FLOP per image, each checked against OpenCLIP's published figures.
# 3. Real images through the model's own preprocessing and real text through CLIP's tokenizer.
# 4. A device map over the two towers with `infer_auto_device_map`, loaded with `dispatch_model`, giving the
#    same embeddings as the model on one device; the pre-flight check on it.
# 5. 8-bit and 4-bit with bitsandbytes (footprint predicted and measured, cosine similarity of the embeddings
#    to full precision) and image throughput against batch size, set beside notebook 04's decode.
#
# **What you'll need**: notebooks 01 (bitsandbytes), 03 (device maps) and 04 (the two ceilings) first. A CPU
# is enough; on one GPU or two the same cells run there (section 4 splits the towers over two GPUs where there
# are two). About half a minute on an idle 2-core CPU (longer while other work shares it) and at most about
# 5 GB of RAM. No trained CLIP checkpoint can be had offline, so the model here has **random weights**: every
# figure that depends on the weights says so. Set
# `CLIP_CHECKPOINT` to a local folder of a trained `CLIPModel` (for example
# `laion/CLIP-ViT-B-32-laion2B-s34B-b79K`, downloaded beforehand) to run the same cells on it.

# %% tags=["parameters"]
MODEL = "bundled"  # the language model of notebooks 00 to 08; this notebook runs CLIP and does not read it
CLIP_SHAPE = "ViT-B-32"  # the OpenCLIP shape run for real (the larger ones are sized on the meta device)
CLIP_CHECKPOINT = None  # a local folder of a trained transformers CLIPModel of that shape; None: random weights
BATCHES = (1, 4, 16)  # image batches timed in section 6

# %%
import statistics
import tempfile
import textwrap
import time
import warnings

import torch

from helpers.quiet import silence_known_warnings

# before transformers' CLIP code is imported: it imports torchao, whose CUDA-only kernels cannot load on a CPU,
# and bitsandbytes logs routine messages on a CPU (helpers/quiet.py says why each is harmless)
silence_known_warnings()
from transformers import BitsAndBytesConfig, CLIPImageProcessorPil, CLIPModel, CLIPTokenizer

from helpers.clip import OPENCLIP_SHAPES, clip_config, clip_tokenizer, predict_clip_footprint, tower_map
from helpers.exercises import check_answer
from helpers.measure import memory_bandwidth
from helpers.preflight import preflight
from helpers.speed import matmul_rate

ON_GPU = torch.cuda.is_available()
DEVICE = "cuda" if ON_GPU else "cpu"
RUN_DTYPE = torch.bfloat16 if ON_GPU else torch.float32  # the full-precision reference, and what is timed
WEIGHTS = "random weights" if CLIP_CHECKPOINT is None else "trained weights"
GiB, MiB = 2**30, 2**20


def show(text):
    """Print text wrapped at 107 characters, what one line of JupyterLab's output area holds."""
    print("\n".join(textwrap.fill(line, 107, subsequent_indent="  ") for line in text.split("\n")))


def sync():
    if ON_GPU:
        torch.cuda.synchronize()


print(f"device: {DEVICE} | dtype: {RUN_DTYPE} | {CLIP_SHAPE} with {WEIGHTS}")

# %% [markdown]
# ## 1. Which library runs where
#
# OpenCLIP's own package, `open_clip_torch`, builds every model offline from its bundled JSON configs
# (`open_clip.create_model(name, pretrained=None)`) and ships CLIP's BPE vocabulary inside its wheel. But it
# imports `torchvision` on import, and the torchvision wheels on PyPI are CUDA builds: beside a CPU-only torch
# (this workbook's CPU set-up) `import torchvision` fails with `RuntimeError: operator torchvision::nms does not
# exist`. The workbook therefore does not depend on it. The route that runs on every tier is transformers'
# `CLIPModel` with configs that match OpenCLIP's (section 2 checks that they do); it is also how the LAION
# checkpoints are published (`laion/CLIP-ViT-H-14-laion2B-s32B-b79K` is a `CLIPModel`). Where `open_clip`
# imports, the next cell builds the same shape with it and compares the parameter counts.

# %%
# NBVAL_IGNORE_OUTPUT
# whether open_clip is installed, and imports, depends on the environment
try:
    import open_clip  # noqa: F401
except Exception as e:  # ImportError where it is not installed, RuntimeError where its torchvision cannot load
    open_clip = None
    show(f"open_clip does not import here: {type(e).__name__}: {e}")
if open_clip is not None:
    oc_model = open_clip.create_model(CLIP_SHAPE, pretrained=None, device="meta")
    with torch.device("meta"):
        ours = CLIPModel(clip_config(CLIP_SHAPE))
    n_oc, n_ours = (sum(p.numel() for p in m.parameters()) for m in (oc_model, ours))
    print(f"open_clip {CLIP_SHAPE}: {n_oc:,} parameters; CLIPModel with helpers.clip's config: {n_ours:,}")
    del oc_model, ours

# %% [markdown]
# OpenCLIP's training code offers an int8 route of its own, `--use-bnb-linear SwitchBackLinear`, which looks
# the class up in `bitsandbytes.nn.triton_based_modules`. That module was removed from bitsandbytes (0.50.2
# has none):

# %%
try:
    from bitsandbytes.nn.triton_based_modules import SwitchBackLinear  # noqa: F401
except ImportError as e:
    print(f"{type(e).__name__}: {e}")

# %% [markdown]
# Its replacement for inference is the one notebook 01 teaches: `BitsAndBytesConfig(load_in_8bit=True)`
# passed to `from_pretrained`, which section 5 uses on `CLIPModel`.
#
# ## 2. OpenCLIP's shapes on the meta device
#
# `helpers.clip.OPENCLIP_SHAPES` writes down the widths, layers, heads and MLP sizes of OpenCLIP's model
# configs (`src/open_clip/model_configs/*.json` in its repository) as `CLIPTextConfig` and `CLIPVisionConfig`
# fields, and beside them OpenCLIP's published sizes (`docs/model_profile.csv`). Built on the meta device,
# each costs no memory. The bytes per format are predicted as notebook 00 predicts them: transformers' own
# quantizer says which weights it quantizes (every `Linear` of both towers except `text_projection`, the
# model's last module), each costs its format's bytes with its scales, everything else stays in bf16.

# %%
rows = {}
for name, shape in OPENCLIP_SHAPES.items():
    config = clip_config(name)
    with torch.device("meta"):
        meta = CLIPModel(config)
    vision = sum(p.numel() for n, p in meta.named_parameters() if n.startswith(("vision_model", "visual_proj")))
    total = sum(p.numel() for p in meta.parameters())
    gb = {fmt: predict_clip_footprint(config, fmt) / GiB for fmt in ("bf16", "int8", "nf4")}
    rows[name] = dict(config=config, total=total, vision=vision, text=total - vision, **gb)
    pub = shape["published"]
    print(f"{name:<12} image {vision / 1e6:8.2f} M  text {(total - vision) / 1e6:7.2f} M  all {total / 1e6:8.2f} M "
          f"| OpenCLIP: {pub['image_mparams']:8.2f} {pub['text_mparams']:7.2f} {pub['mparams']:8.2f} M")
    if shape["exact"]:
        assert round(total / 1e6, 2) == pub["mparams"], f"{name}: the config should match OpenCLIP's count"
print("\nweights (GiB; quantized formats with their scales, the rest in bf16):")
for name, r in rows.items():
    print(f"{name:<12} bf16 {r['bf16']:5.2f}   int8 {r['int8']:5.2f}   nf4 {r['nf4']:5.2f}")

# %% [markdown]
# The four ViT models match OpenCLIP's counts to the last published digit, tower by tower. EVA02-E-14 does
# not quite: its image tower is timm's `eva02_enormous_patch14_clip_224` (`timm/models/eva.py`): the same
# width 1792, 64 layers, 16 heads and MLP of 15360 (GELU), but a norm after each residual branch instead of
# before it, no key bias, no norm before the blocks and a bias on its projection. `CLIPVisionConfig` cannot
# describe those, so its count is off by the small difference below; its matrices, its bytes to within that
# difference, and its FLOP are the same, which is all the planning needs. (It uses neither SwiGLU nor rotary
# positions: those are other EVA02 models.)

# %%
eva = rows["EVA02-E-14"]
pub = OPENCLIP_SHAPES["EVA02-E-14"]["published"]
print(f"EVA02-E-14 as CLIPVisionConfig: {eva['total'] / 1e6:.2f} M against OpenCLIP's {pub['mparams']:.2f} M: "
      f"{(eva['total'] / 1e6 - pub['mparams']):+.2f} M ({(eva['total'] / 1e6 / pub['mparams'] - 1) * 100:+.3f} %)")
for name, r in rows.items():
    print(f"{name:<12} image tower: {r['vision'] / r['total']:.0%} of the parameters")

# %% [markdown]
# The image tower holds most of every model (92 % of EVA02-E-14). Splitting by tower is natural, since the two
# towers never exchange activations before their embeddings, but it is not a balanced split: the text tower is
# the small half. A model too large for one device in its image tower alone needs that tower split by layers,
# which is what `infer_auto_device_map` does with the model's no-split classes (section 4).
#
# The cost of an image in FLOP follows from the shape, as for a prefill in notebook 04: with `T` = patches + 1
# tokens of width `d`, MLP width `f`, patch size `p` and embedding size `e`, a layer does `2T(4d² + 2df)` FLOP
# in its matrices and `4T²d` in attention; the patch embedding adds `2(T-1)·3p²·d` and the projection `2de`.
# OpenCLIP's `image_gflops` counts the same (with `torch.utils.flop_counter`, two FLOP per multiply-add):

# %%
def image_flops(config):
    """FLOP of the image tower for one image (two per multiply-add)."""
    v = config.vision_config
    p, d, f = v.patch_size, v.hidden_size, v.intermediate_size
    t = (v.image_size // p) ** 2 + 1
    blocks = v.num_hidden_layers * (2 * t * (4 * d * d + 2 * d * f) + 4 * t * t * d)
    return 2 * (t - 1) * 3 * p * p * d + blocks + 2 * d * config.projection_dim


for name, r in rows.items():
    pub = OPENCLIP_SHAPES[name]["published"]["image_gflops"]
    print(f"{name:<12} {image_flops(r['config']) / 1e9:8.2f} GFLOP per image (OpenCLIP: {pub:.2f})")
    assert round(image_flops(r["config"]) / 1e9, 2) == pub, f"{name}: the FLOP formula should match OpenCLIP's"

# %% [markdown]
# ## 3. The model, its preprocessing and its tokenizer
#
# The rest runs `CLIP_SHAPE` for real: built with random weights (seeded; or loaded from `CLIP_CHECKPOINT`)
# and saved once as a checkpoint, which sections 4 and 5 load from. Images go through transformers'
# `CLIPImageProcessorPil` with OpenCLIP's preprocessing for these models: resize the short side to the
# model's image size (bicubic), crop the centre, scale to 0..1 and normalize with OpenAI CLIP's mean and
# standard deviation. (The PIL processor is the one that runs on every tier: `CLIPImageProcessor` falls back
# to it where torchvision is missing.) The images are the photographs that ship with matplotlib.

# %%
if CLIP_CHECKPOINT is None:
    config = clip_config(CLIP_SHAPE)
    with torch.random.fork_rng():
        torch.manual_seed(0)
        model = CLIPModel(config).eval()
    size = config.vision_config.image_size
    processor = CLIPImageProcessorPil(
        size={"shortest_edge": size}, crop_size={"height": size, "width": size}, resample=3,  # 3: bicubic
        image_mean=[0.48145466, 0.4578275, 0.40821073], image_std=[0.26862954, 0.26130258, 0.27577711])
else:  # the checkpoint's own shape and preprocessing
    model = CLIPModel.from_pretrained(CLIP_CHECKPOINT, dtype=torch.float32).eval()
    config = model.config
    processor = CLIPImageProcessorPil.from_pretrained(CLIP_CHECKPOINT)
checkpoint = tempfile.TemporaryDirectory(prefix="clip-")
model.save_pretrained(checkpoint.name)
print(f"{CLIP_SHAPE}: {sum(p.numel() for p in model.parameters()) / 1e6:.2f} M parameters, {WEIGHTS}; "
      f"saved in float32 ({sum(p.numel() for p in model.parameters()) * 4 / MiB:.0f} MiB)")

# %%
from matplotlib import cbook
from PIL import Image

files = ["grace_hopper.jpg", "Minduka_Present_Blue_Pack.png", "logo2.png"]
images = [Image.open(cbook.get_sample_data(f)).convert("RGB") for f in files]
texts = ["a photo of a woman in a naval uniform", "a blue gift box", "the matplotlib logo"]
pixels = processor(images=images, return_tensors="pt")["pixel_values"]
for f, im in zip(files, images):
    print(f"{f:<30} {im.size[0]} x {im.size[1]} px")
print("pixel_values:", tuple(pixels.shape), pixels.dtype, f"mean {pixels.mean():.2f}, std {pixels.std():.2f}")

# %% [markdown]
# CLIP's tokenizer is a byte-level BPE with 49,408 tokens whose merges ship as a file inside OpenCLIP's
# wheel (`bpe_simple_vocab_16e6.txt.gz`, from OpenAI's CLIP; MIT). The workbook keeps a copy in `helpers/data/`
# (its origin and licenses beside it), and `helpers.clip.clip_tokenizer` builds transformers' `CLIPTokenizer`
# from it as OpenCLIP's own tokenizer reads it; with `CLIP_CHECKPOINT` the checkpoint's tokenizer is used.

# %%
tokenizer = clip_tokenizer() if CLIP_CHECKPOINT is None else CLIPTokenizer.from_pretrained(CLIP_CHECKPOINT)
tokens = tokenizer(texts, padding="max_length", max_length=77, return_tensors="pt")
print(f"{len(tokenizer):,} tokens in the vocabulary")
for t, ids, n in zip(texts, tokens["input_ids"], tokens["attention_mask"].sum(1)):
    show(f"{t!r}: {int(n)} tokens {ids[:int(n)].tolist()}")

# %% [markdown]
# One forward pass takes both: it encodes the images and the texts, normalizes both embeddings and returns
# each image's similarity to each text. With random weights these similarities mean nothing (the printed
# line says so); with a trained checkpoint in `CLIP_CHECKPOINT`, check that each image's best text is the one
# written for it.

# %%
def embed(m, device=DEVICE):
    """Normalized image and text embeddings of the three images and texts, as float32 on the CPU."""
    with torch.inference_mode():
        out = m(pixel_values=pixels.to(device, m.dtype), input_ids=tokens["input_ids"].to(device),
                attention_mask=tokens["attention_mask"].to(device))
    return out.image_embeds.float().cpu(), out.text_embeds.float().cpu(), out.logits_per_image.float().cpu()


model.to(DEVICE, RUN_DTYPE)
ref_image, ref_text, logits = embed(model)
print(f"embeddings: image {tuple(ref_image.shape)}, text {tuple(ref_text.shape)} ({RUN_DTYPE})")
show(f"best text per image ({WEIGHTS}): {[texts[i] for i in logits.argmax(1).tolist()]}")

# %% [markdown]
# ## 4. A device map over the two towers
#
# `CLIPModel._no_split_modules` names the blocks accelerate must keep whole: the two embedding modules and the
# encoder layer (`CLIPEncoderLayer`, shared by both towers). `infer_auto_device_map` fills devices in module
# order, text tower first, so a budget on the first device of the text tower plus one image-tower layer leaves
# the image tower for the second device: on its main devices, the first GPU and the CPU, accelerate keeps room
# free for the largest layer still to be placed (to bring an offloaded layer back), and once the text tower is
# placed that is an image-tower layer (`infer_auto_device_map`, `get_max_layer_size`). The devices
# are the same code on every tier: two GPUs where there are two; one GPU and the CPU (the image tower's
# weights then stay on the CPU and are brought to the GPU at each pass); on a CPU, the CPU and the disk (the
# image tower's weights are then read from an offload folder at each pass).

# %%
from accelerate import dispatch_model, infer_auto_device_map
from accelerate.utils import compute_module_sizes

n_gpus = torch.cuda.device_count()
TEXT_DEV, VISION_DEV = (0, 1) if n_gpus >= 2 else (0, "cpu") if n_gpus == 1 else ("cpu", "disk")
model = CLIPModel.from_pretrained(checkpoint.name, dtype=RUN_DTYPE).eval()  # a fresh copy, on the CPU
sizes = compute_module_sizes(model)
text_bytes = sum(sizes[k] for k in ("text_model", "text_projection", "logit_scale"))
budget = {TEXT_DEV: text_bytes + sizes["vision_model.encoder.layers.0"]}
if VISION_DEV != "disk":
    budget[VISION_DEV] = sizes[""]
print("no-split classes:", sorted(model._no_split_modules))
device_map = infer_auto_device_map(model, max_memory=budget, no_split_module_classes=model._no_split_modules)
show(f"infer_auto_device_map: {dict(device_map)}")

# %% [markdown]
# Nearly a tower split, but `text_projection` sits with the image tower: it is registered after the image
# tower in `CLIPModel.__init__`, and `infer_auto_device_map` never goes back to a device it has left. It is
# one small matrix, and accelerate's hooks would move the text features across to it; the tower map puts it
# back beside its tower, so each tower runs wholly on one device:

# %%
towers = tower_map(TEXT_DEV, VISION_DEV)
moved = {k: (device_map.get(k), d) for k, d in towers.items() if device_map.get(k) != d}
show(f"tower map: {towers}")
show(f"moved from infer_auto_device_map's map: {moved} ({sum(sizes[k] for k in moved) / MiB:.2f} MiB)")
offload = tempfile.TemporaryDirectory(prefix="clip-offload-")
report = preflight(model, towers, mode="run", loader="dispatch_model", offload_folder=offload.name)
print(report)
if "unknown-module" in report.kinds() and "logit_scale" in dict(model.named_parameters()):
    show("-> 'logit_scale' is a parameter of CLIPModel itself (one number), not a module. infer_auto_device_map "
         "writes such keys and dispatch_model places them (with a warning, next cell): this finding is a limit of "
         "the pre-flight check, not a problem of the map.")

# %% [markdown]
# `dispatch_model` puts each tower on its device (on a CPU, it writes the image tower's weights into the
# offload folder and reads them back at each pass). accelerate's own map check (`check_device_map`) warns about
# the `logit_scale` key, which its `infer_auto_device_map` wrote; the cell prints the warning on stdout. It is
# harmless: the check only warns, the key still counts as covering the parameter, and the hook
# `dispatch_model` puts on the model itself moves the model's own parameter to the main device (the first GPU;
# the CPU on a CPU), from where `CLIPModel` moves it to the text embeddings' device
# (`logit_scale.exp().to(text_embeds.device)`).

# %%
with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter("always")
    split = dispatch_model(model, device_map=towers, offload_dir=offload.name)
for w in caught:
    show(f"accelerate warns: {w.message}")
image, text, _ = embed(split, device=0 if ON_GPU else "cpu")
same = torch.equal(image, ref_image) and torch.equal(text, ref_text)
gap = max((image - ref_image).abs().max().item(), (text - ref_text).abs().max().item())
show(f"text tower's weights on {TEXT_DEV!r}, image tower's on {VISION_DEV!r}: embeddings "
      + ("identical, bit for bit, to the model on one device" if same else
         f"differ from the model on one device by at most {gap:.1e} (the devices' kernels differ)"))
assert gap < 1e-3, "the split model should give the same embeddings as the model on one device"
del split, model
offload.cleanup()

# %% [markdown]
# ## 5. 8-bit and 4-bit
#
# The same `BitsAndBytesConfig` as notebook 01, on `CLIPModel.from_pretrained`. The prediction is section
# 2's, with this load dtype for the unquantized parts; the measurement is `get_memory_footprint()` plus the
# quantization scales it does not count (LLM.int8's scale per row, NF4's absmax per block of 64).

# %%
def scale_bytes(m):
    """Bytes of the quantization scales stored beside the weights (int8: SCB per row; 4-bit: absmax)."""
    total = 0
    for module in m.modules():
        w = getattr(module, "weight", None)
        for s in (getattr(w, "SCB", None), getattr(getattr(w, "quant_state", None), "absmax", None)):
            total += 0 if s is None else s.numel() * s.element_size()
    return total


place = {"": 0} if ON_GPU else {"": "cpu"}
configs = {"int8": BitsAndBytesConfig(load_in_8bit=True),
           "nf4": BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=RUN_DTYPE)}
models = {"full": CLIPModel.from_pretrained(checkpoint.name, dtype=RUN_DTYPE, device_map=place).eval()}
for fmt, q in configs.items():
    models[fmt] = CLIPModel.from_pretrained(checkpoint.name, quantization_config=q, dtype=RUN_DTYPE,
                                            device_map=place).eval()
    predicted = predict_clip_footprint(config, fmt, dtype=RUN_DTYPE)
    measured = models[fmt].get_memory_footprint(return_buffers=False) + scale_bytes(models[fmt])
    print(f"{fmt}: predicted {predicted / MiB:.1f} MiB, measured {measured / MiB:.1f} MiB (scales included); "
          f"unquantized: {sorted(models[fmt].hf_quantizer.modules_to_not_convert)}")
    assert abs(measured / predicted - 1) < 0.01, "the prediction should match the load within 1 %"

# %%
# NBVAL_IGNORE_OUTPUT
# 4-bit rounding on a CPU depends on its instruction set (notebook 01, the repack for AVX-512 BF16)
for fmt in configs:
    image, text, _ = embed(models[fmt])
    cos_i = torch.nn.functional.cosine_similarity(image, ref_image).min().item()
    cos_t = torch.nn.functional.cosine_similarity(text, ref_text).min().item()
    print(f"{fmt}: cosine similarity to {RUN_DTYPE} ({WEIGHTS}), lowest of three: image {cos_i:.4f}, "
          f"text {cos_t:.4f}")

# %% [markdown]
# ## 6. Image throughput against batch size
#
# Notebook 04 measured two ceilings, and this section measures them again here. A pass that reads every
# weight once can run at most `bandwidth / weight bytes` times a second; a pass of `F` FLOP at most
# `matrix-multiply rate / F` times. Decoding one token does two FLOP per weight it reads. Encoding an image does
# two per weight for each of its `T` tokens (50 for ViT-B-32, 257 for the /14 models), and a batch of `b`
# images reads each weight once for `2bT` FLOP. Which ceiling binds follows from that ratio of FLOP to bytes
# read, the arithmetic intensity, set against the ridge `rate / bandwidth`: below the ridge memory sets the
# pace, above it compute. The cells measure the bandwidth (a 1 GiB copy, read plus written, median of 5) and
# the matrix-multiply rate in the dtype the model runs in and in bf16, as notebook 04 does (with its helpers,
# `helpers.measure.memory_bandwidth` and `helpers.speed.matmul_rate`); then they time
# image encoding at each batch (a warm-up, then the median of 3 repeats with their spread), each beside the
# lower of its two ceilings.

# %%
# NBVAL_IGNORE_OUTPUT
# rates depend on the machine and its load
per_image = image_flops(config)
bandwidth = memory_bandwidth(DEVICE)  # a 1 GiB copy, read plus written, median of 5 (notebook 04)
ceilings = {}  # dtype -> (median FLOP/s, (lowest, highest)) of an n x n matrix product, median of 5
for dtype in dict.fromkeys([RUN_DTYPE, torch.bfloat16]):
    measured = matmul_rate(DEVICE, dtype)
    ceilings[dtype] = (measured["flops_per_s"], measured["spread"])
vision_params = sum(p.numel() for n, p in models["full"].named_parameters()
                    if n.startswith(("vision_model", "visual_proj")))
show(f"memory bandwidth: {bandwidth / 1e9:,.1f} GB/s (median of 5)")
for dtype, (rate, (lo, hi)) in ceilings.items():
    show(f"matrix multiply in {str(dtype)[6:]}: {rate / 1e9:,.0f} GFLOP/s (median of 5; repeats {lo / 1e9:,.0f} to "
         f"{hi / 1e9:,.0f}): ridge at {rate / bandwidth:,.1f} FLOP per byte; at most {rate / per_image:,.1f} "
         f"images/s ({per_image / 1e9:.2f} GFLOP each)")

# %%
def time_images(m, batch, repeats=3):
    """Images per second of m.get_image_features at this batch: warm-up, then median and spread of repeats."""
    x = pixels.repeat(batch // len(pixels) + 1, 1, 1, 1)[:batch].to(DEVICE, m.dtype)
    rates = []
    with torch.inference_mode():
        m.get_image_features(pixel_values=x)  # warm-up
        for _ in range(repeats):
            sync()
            t0 = time.perf_counter()
            m.get_image_features(pixel_values=x)
            sync()
            rates.append(batch / (time.perf_counter() - t0))
    return {"rate": statistics.median(rates), "spread": (min(rates), max(rates)), "batch": batch}


def image_limit(batch, dtype):
    """(images/s, what binds): the lower of the matrix-multiply ceiling and the weight reads of one pass."""
    compute = ceilings[dtype][0] / per_image
    memory = batch * bandwidth / (vision_params * dtype.itemsize)  # the image tower's weights, read once per pass
    return (compute, "matrix-multiply rate") if compute <= memory else (memory, "weight reads")


def image_rate_text(r, dtype=RUN_DTYPE):
    """Images/s with the spread of the repeats and, for an unquantized dtype, its share of that dtype's limit."""
    text = f"{r['rate']:,.1f} images/s (repeats {r['spread'][0]:,.1f} to {r['spread'][1]:,.1f})"
    if dtype in ceilings:
        limit, binds = image_limit(r["batch"], dtype)
        text += f", {r['rate'] / limit:.0%} of its {str(dtype)[6:]} limit ({limit:,.1f} images/s, {binds})"
    return text

# %%
# NBVAL_IGNORE_OUTPUT
# rates depend on the machine and its load
sweep = {b: time_images(models["full"], b) for b in BATCHES}
for b, r in sweep.items():
    show(f"batch {b:>3}: {image_rate_text(r)}")
best = max(sweep.values(), key=lambda r: r["rate"])
tied = [b for b, r in sweep.items() if r is not best and r["spread"][1] >= best["spread"][0]]
if tied:
    show(f"-> batch {best['batch']} gave the most images/s, but its repeats overlap those of batch "
         f"{', '.join(map(str, tied))}: no measurable difference between them.")
else:
    show(f"-> batch {best['batch']} gave the most images/s, beyond the spread of every other batch: "
         f"{best['rate'] / sweep[BATCHES[0]]['rate']:.1f}x the images/s of batch {BATCHES[0]}.")
if any(r["rate"] > 1.05 * image_limit(b, RUN_DTYPE)[0] for b, r in sweep.items()):
    show("-> some rates exceed the limit measured above: the load of other processes on this machine changed "
         "between the two measurements. Rerun both cells when the machine is idle.")

# %%
import matplotlib.pyplot as plt

fig, ax = plt.subplots(figsize=(7, 3.6))
ax.errorbar(list(sweep), [r["rate"] for r in sweep.values()],
            yerr=[[r["rate"] - r["spread"][0] for r in sweep.values()],
                  [r["spread"][1] - r["rate"] for r in sweep.values()]], marker="o", label="measured")
ax.plot(list(sweep), [image_limit(b, RUN_DTYPE)[0] for b in sweep], "k:",
        label="limit: lower of matmul rate / FLOP and bandwidth / weight bytes")
ax.set(xscale="log", yscale="log", xlabel="images per batch", ylabel="images / s",
       title=f"{CLIP_SHAPE} image encoding, {str(RUN_DTYPE)[6:]} on {DEVICE} (any weights: same time)")
ax.set_xticks(list(sweep), [str(b) for b in sweep])
ax.legend(loc="lower right")
plt.show()

# %% [markdown]
# Beside notebook 04's decode: a decode step at batch 1 reads every weight once for two FLOP, so its intensity
# is 2 FLOP over the bytes of one weight (1 FLOP per byte in bf16), whatever the model. The image tower's is
# its FLOP per image times the batch, over its weight bytes. The cell sets both against this machine's ridge:

# %%
# NBVAL_IGNORE_OUTPUT
# the ridge depends on the machine
FORMAT_BATCH = max(BATCHES) if ON_GPU else 2  # the format comparison below; on a CPU a small batch keeps it short
for dtype, (rate, _) in ceilings.items():
    ridge = rate / bandwidth
    intensity = {"decode, batch 1 (notebook 04)": 2 / dtype.itemsize}
    intensity.update({f"{CLIP_SHAPE} images, batch {b}": per_image * b / (vision_params * dtype.itemsize)
                      for b in sorted({*BATCHES, FORMAT_BATCH})})
    show(f"{str(dtype)[6:]}, ridge at {ridge:,.1f} FLOP per byte: " + "; ".join(
        f"{k}: {v:,.1f}, {'compute' if v > ridge else 'memory'}-bound" for k, v in intensity.items()))

# %% [markdown]
# Decode sits below the ridge on any machine: its one FLOP per byte is far under the matrix-multiply rate over
# the bandwidth of a CPU or a GPU. Image encoding rises above the ridge as the batch grows; where it crosses
# depends on the machine (a GPU's ridge is far higher than a CPU's), and the lines above say where for this
# one. What that means for the formats: a quantized layer changes the arithmetic, not only the bytes. LLM.int8
# casts each layer's input to fp16 and quantizes it to int8 on the fly, multiplies int8 by int8 (bitsandbytes'
# `int8_linear_matmul`: on a CPU with AVX-512, torch's own int8 matrix product) and redoes the input columns
# beyond its outlier threshold in the input's own dtype (`MatMul8bitLt` and `int8_mixed_scaled_mm`). NF4
# dequantizes its blocks to the compute dtype before each product (on a CPU with AVX-512 BF16 a fused kernel
# computes in bf16 instead, whatever the compute dtype: notebook 01). In a memory-bound decode the bytes a
# format saves can pay for those extra passes (notebook 04 measured whether they do); in a compute-bound pass
# there are no saved reads to pay for them, and what is left is whether the format's product is faster or
# slower than the reference's. The cell times each format at `FORMAT_BATCH` images (with bf16 beside float32
# where float32 is the reference), the spread of the repeats first:

# %%
# NBVAL_IGNORE_OUTPUT
# rates depend on the machine, its load and its instruction set
if RUN_DTYPE != torch.bfloat16:
    models["bf16"] = CLIPModel.from_pretrained(checkpoint.name, dtype=torch.bfloat16, device_map=place).eval()
rates = {fmt: time_images(m, FORMAT_BATCH) for fmt, m in models.items()}
full = rates["full"]
dtypes = {"full": RUN_DTYPE, "bf16": torch.bfloat16}  # the quantized formats get no dtype ceiling
for fmt, r in rates.items():
    lo, hi = r["spread"][0] / full["spread"][1], r["spread"][1] / full["spread"][0]
    verdict = ("the reference" if fmt == "full" else "no measurable difference from it" if lo <= 1 <= hi else
               f"{r['rate'] / full['rate']:.2f}x it (repeats allow {lo:.2f}x to {hi:.2f}x)")
    show(f"{fmt:<5} batch {FORMAT_BATCH}: {image_rate_text(r, dtypes.get(fmt))} | {verdict}")
faster = [f for f, r in rates.items() if r["spread"][0] > full["spread"][1]]
slower = [f for f, r in rates.items() if r["spread"][1] < full["spread"][0]]
show(f"-> measurably faster than the {str(RUN_DTYPE)[6:]} reference here at batch {FORMAT_BATCH}: "
     f"{', '.join(faster) or 'none'}; measurably slower: {', '.join(slower) or 'none'}")
if "int8" in rates:
    show(f"-> int8's time also depends on how many input columns hold a value beyond its outlier threshold (6.0), which depends on "
         f"the weights: these are {WEIGHTS}.")

# %% [markdown]
# Read the ratios for this machine (the full-precision reference is float32 on a CPU, bf16 on a GPU). What
# follows for a compute-bound pass:
# - **Batch** until the images/s stop rising (the sweep above): each batch reuses the weights for more
#   images; once the pass is compute-bound a larger batch only adds latency.
# - **Quantize to fit, and time it before counting on speed.** 8-bit and 4-bit let a model that does not fit
#   run at all (ViT-bigG-14: 4.73 GiB in bf16, 1.42 GiB in NF4, section 2); how fast it then encodes images
#   is set by the format's matrix product on this device, not by its bytes.
#
# Can you run the large shapes here, and how fast at most? Their weights from section 2 against this device's
# memory, and their FLOP per image against the bf16 matrix-multiply rate measured above (the ceiling of a
# compute-bound batch; the measured share of it at batch 1 and at a larger batch is in the sweep above):

# %%
# NBVAL_IGNORE_OUTPUT
# the memory and the rate are this machine's
import psutil

room = torch.cuda.get_device_properties(0).total_memory if ON_GPU else psutil.virtual_memory().available
rate = ceilings[torch.bfloat16][0]
show(f"{'GPU 0 holds' if ON_GPU else 'free RAM here:'} {room / GiB:.1f} GiB; bf16 matrix multiply: "
     f"{rate / 1e9:,.0f} GFLOP/s. Weights only: leave room for {'the CUDA context and ' if ON_GPU else ''}"
     "the activations of a batch.")
for name, r in rows.items():
    fits = [fmt for fmt in ("bf16", "int8", "nf4") if r[fmt] * GiB < room]
    most = rate / image_flops(r["config"])
    show(f"{name:<12} weights fit in {', '.join(fits) or 'none of bf16, int8, nf4'}; at most "
         f"{f'{most:,.0f}' if most >= 100 else f'{most:.3g}'} images/s at the bf16 ceiling")

# %% [markdown]
# ## 7. The planner and the pre-flight check
#
# The pre-flight check (section 4) takes any `torch.nn.Module` and map: it checked the tower map against
# `CLIPModel` before `dispatch_model` ran. The planner of notebook 03 (`helpers.planner.predict_footprint`
# and `plan`) was written for causal language models; the cell asks it for this model's NF4 footprint and
# sets its answer beside `helpers.clip.predict_clip_footprint`, which asks the same question of the same
# quantizer for `CLIPModel` and which section 5 measured right.

# %%
from helpers.planner import predict_footprint

ours = predict_clip_footprint(config, "nf4")
try:
    theirs = predict_footprint(config, "nf4")
except ValueError as e:  # the planner sizes causal language models only, and says what to use instead
    show(f"helpers.planner.predict_footprint refuses: {type(e).__name__}: {e}")
    show(f"helpers.clip.predict_clip_footprint: {ours / MiB:.1f} MiB in NF4.")
else:
    show(f"helpers.planner.predict_footprint: {theirs / MiB:.1f} MiB in NF4; helpers.clip.predict_clip_footprint: "
         f"{ours / MiB:.1f} MiB" + (" (the same)" if theirs == ours else ""))

# %% [markdown]
#
# ## Summary
#
# 1. OpenCLIP's package needs a torchvision that imports beside your torch; transformers' `CLIPModel` with
#    OpenCLIP's shapes runs everywhere, and OpenCLIP's `SwitchBackLinear` int8 route is gone from bitsandbytes
#    (use `BitsAndBytesConfig(load_in_8bit=True)`).
# 2. The ViT shapes match OpenCLIP's parameter and FLOP counts exactly; EVA02-E-14's image tower is an EVA
#    block, sized here to within 0.002 %.
# 3. The images went through OpenCLIP's preprocessing (`CLIPImageProcessorPil` with OpenAI's mean and std),
#    the text through CLIP's BPE tokenizer.
# 4. `infer_auto_device_map` with `_no_split_modules` splits the towers once `text_projection` is moved back;
#    `dispatch_model` then gives the embeddings of the model on one device.
# 5. 8-bit and 4-bit match their predicted footprint. Image encoding turns compute-bound as the batch grows
#    (decode never does): batch it, quantize to fit, and time each format, since in a compute-bound pass its
#    matrix product on your device, not its bytes, sets the speed.
#
# ## Exercises
#
# 1. Run the notebook with `CLIP_SHAPE = "ViT-L-14"`: how do the images/s and the share of the limit change
#    with 18x the FLOP per image, and from which batch is it compute-bound?
# 2. Which share of EVA02-E-14's bf16 bytes lies in its image tower? On two GPUs of 8 GiB each, does the
#    tower split fit (the image tower on one GPU)? Answer the share as a fraction (e.g. 0.5):

# %%
share = None  # your answer: the image tower's share of EVA02-E-14's bf16 bytes, a fraction
eva = rows["EVA02-E-14"]
truth = eva["vision"] / eva["total"]
check_answer(share, lambda a: abs(a - truth) < 0.01,
             right=f"{truth:.2f}; its image tower alone is {truth * eva['bf16']:.1f} GiB in bf16, more than one "
                   f"8 GiB GPU holds, so it must be split by layers (or quantized: NF4 brings the whole model to "
                   f"{eva['nf4']:.1f} GiB)",
             wrong="the image tower is vision_model and visual_projection: section 2 printed its share of each "
                   "model (answer a fraction, not a percentage)",
             not_yet="section 2 printed the image tower's share of each model", wrong_example=1 - truth,
             label="Exercise 2")

# %% [markdown]
# ## Further reading
#
# - OpenCLIP's repository, `docs/model_profile.csv` (the published sizes checked here) and
#   `src/open_clip/model_configs/` (the shapes): https://github.com/mlfoundations/open_clip
# - transformers' CLIP documentation, for `CLIPModel`, `CLIPImageProcessor` and `CLIPTokenizer`:
#   https://huggingface.co/docs/transformers/model_doc/clip
# - accelerate's big-model inference guide, for `infer_auto_device_map`, no-split classes and
#   `dispatch_model`: https://huggingface.co/docs/accelerate/usage_guides/big_modeling
# - The LAION checkpoints in transformers' format, to set `CLIP_CHECKPOINT` to (download once):
#   https://huggingface.co/laion/CLIP-ViT-B-32-laion2B-s34B-b79K
