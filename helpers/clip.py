"""OpenCLIP's shapes as transformers ``CLIPConfig`` objects, the two-tower device map, CLIP's tokenizer (notebook 09).

OpenCLIP (``open_clip_torch``) describes each model in a JSON file (``src/open_clip/model_configs/NAME.json``
in github.com/mlfoundations/open_clip): the image tower's width, layers, head width, MLP ratio and patch size,
the text tower's width, heads and layers, and the shared embedding size. :data:`OPENCLIP_SHAPES` writes those
values down as transformers' ``CLIPTextConfig`` / ``CLIPVisionConfig`` fields (heads = width / head_width,
intermediate = width x mlp_ratio, GELU as in OpenCLIP's non-"quickgelu" models), and beside them the published
size of each model from OpenCLIP's ``docs/model_profile.csv``: parameters in all and per tower (millions) and
GFLOP per image (counted by ``torch.utils.flop_counter``, two per multiply-add). transformers' ``CLIPModel``
built from these configs has exactly OpenCLIP's parameter and FLOP counts for the ViT models
(``tests/test_clip.py`` checks it): it is how the LAION checkpoints are also published
(``laion/CLIP-ViT-H-14-laion2B-s32B-b79K``, ...).

EVA02-E-14 is not a plain CLIP ViT: its image tower is timm's ``eva02_enormous_patch14_clip_224`` (width 1792,
64 layers, 16 heads, MLP 15360, GELU; residual post-norm in each block, a query and a value bias but no key
bias, no norm before the blocks, a bias on its projection: ``timm/models/eva.py``). ``CLIPVisionConfig`` takes
the same widths and so the same matrix sizes and FLOP, but not those details: its parameter count is 0.12 M
(0.002 %) above the published one, and the entry says so (``exact=False``).

:func:`tower_map` is the device map that puts each tower whole on one device; :func:`clip_tokenizer` builds
transformers' ``CLIPTokenizer`` from CLIP's BPE vocabulary (``helpers/data/bpe_simple_vocab_16e6.txt.gz``, MIT,
the file OpenCLIP's wheel ships), without ``open_clip`` and offline.
"""

from __future__ import annotations

import gzip
import os
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch
    from transformers import CLIPConfig, CLIPTokenizer

OPENCLIP_SHAPES = {
    "ViT-B-32": dict(
        embed_dim=512, image_size=224, patch_size=32,
        vision=dict(hidden_size=768, num_hidden_layers=12, num_attention_heads=12, intermediate_size=3072),
        text=dict(hidden_size=512, num_hidden_layers=12, num_attention_heads=8, intermediate_size=2048),
        published=dict(mparams=151.28, image_mparams=87.85, text_mparams=63.43, image_gflops=8.82,
                       text_gflops=5.96), exact=True),
    "ViT-L-14": dict(
        embed_dim=768, image_size=224, patch_size=14,
        vision=dict(hidden_size=1024, num_hidden_layers=24, num_attention_heads=16, intermediate_size=4096),
        text=dict(hidden_size=768, num_hidden_layers=12, num_attention_heads=12, intermediate_size=3072),
        published=dict(mparams=427.62, image_mparams=303.97, text_mparams=123.65, image_gflops=162.03,
                       text_gflops=13.3), exact=True),
    "ViT-H-14": dict(  # head_width 80: 1280 / 80 = 16 heads
        embed_dim=1024, image_size=224, patch_size=14,
        vision=dict(hidden_size=1280, num_hidden_layers=32, num_attention_heads=16, intermediate_size=5120),
        text=dict(hidden_size=1024, num_hidden_layers=24, num_attention_heads=16, intermediate_size=4096),
        published=dict(mparams=986.11, image_mparams=632.08, text_mparams=354.03, image_gflops=334.59,
                       text_gflops=47.09), exact=True),
    "ViT-bigG-14": dict(  # head_width 104: 16 heads; mlp_ratio 4.9231: int(1664 * 4.9231) = 8192
        embed_dim=1280, image_size=224, patch_size=14,
        vision=dict(hidden_size=1664, num_hidden_layers=48, num_attention_heads=16, intermediate_size=8192),
        text=dict(hidden_size=1280, num_hidden_layers=32, num_attention_heads=20, intermediate_size=5120),
        published=dict(mparams=2539.57, image_mparams=1844.91, text_mparams=694.66, image_gflops=967.5,
                       text_gflops=97.86), exact=True),
    "EVA02-E-14": dict(  # timm eva02_enormous_patch14_clip_224; text tower as ViT-H-14's
        embed_dim=1024, image_size=224, patch_size=14,
        vision=dict(hidden_size=1792, num_hidden_layers=64, num_attention_heads=16, intermediate_size=15360),
        text=dict(hidden_size=1024, num_hidden_layers=24, num_attention_heads=16, intermediate_size=4096),
        published=dict(mparams=4704.59, image_mparams=4350.56, text_mparams=354.03, image_gflops=2264.33,
                       text_gflops=47.09), exact=False),
}
"""OpenCLIP model name -> transformers CLIP fields and OpenCLIP's published sizes (``docs/model_profile.csv``)."""

TEXT_TOWER = ("text_model", "text_projection", "logit_scale")
VISION_TOWER = ("vision_model", "visual_projection")
"""The top-level names of ``CLIPModel`` (transformers 5.24) that belong to each tower; ``logit_scale`` (one
number, the temperature of the image-text similarity) goes with the text tower."""


def clip_config(name: str) -> CLIPConfig:
    """The transformers ``CLIPConfig`` of OpenCLIP model ``name`` (a key of :data:`OPENCLIP_SHAPES`).

    Raises:
        ValueError: an unknown name; the message lists the known ones.

    Notebook 09 builds each on the meta device and checks its size against OpenCLIP's.
    """
    from transformers import CLIPConfig

    if name not in OPENCLIP_SHAPES:
        raise ValueError(f"unknown OpenCLIP shape {name!r}; choose one of {', '.join(OPENCLIP_SHAPES)}")
    s = OPENCLIP_SHAPES[name]
    e = s["embed_dim"]
    vision = dict(s["vision"], image_size=s["image_size"], patch_size=s["patch_size"], hidden_act="gelu",
                  projection_dim=e)
    text = dict(s["text"], hidden_act="gelu", projection_dim=e, max_position_embeddings=77, vocab_size=49408)
    return CLIPConfig(text_config=text, vision_config=vision, projection_dim=e)


def tower_map(text_device: int | str, vision_device: int | str) -> dict:
    """The device map that puts each tower of a ``CLIPModel`` whole on one device.

    ``{"text_model": t, "text_projection": t, "logit_scale": t, "vision_model": v, "visual_projection": v}``:
    every parameter of ``CLIPModel`` (transformers 5.24) is under one of these keys. Notebook 09 gets the same
    map from ``infer_auto_device_map`` once ``text_projection`` is moved back beside its tower.
    """
    return {**{k: text_device for k in TEXT_TOWER}, **{k: vision_device for k in VISION_TOWER}}


def predict_clip_footprint(config: CLIPConfig, fmt: str, dtype: torch.dtype | None = None) -> int:
    """Weight bytes of a ``CLIPModel`` of ``config`` loaded in ``fmt`` (scales included), nothing allocated.

    The same rule as :func:`helpers.planner.predict_footprint` (written for causal LMs; notebook 09 asks it about
    a ``CLIPConfig`` and prints its answer beside this one): the model is built on the meta device,
    transformers' own quantizer (``AutoHfQuantizer``, as ``from_pretrained`` prepares it) says which weights it
    quantizes, each costs :func:`helpers.memory.linear_bytes_per_weight`,
    every other parameter keeps the load dtype ``dtype`` (default: bf16 for the quantized formats, the
    format's own otherwise). Buffers are left out (``get_memory_footprint()`` adds them).

    Raises:
        ValueError: an unknown format.

    Notebook 09.
    """
    import torch
    from transformers import BitsAndBytesConfig, CLIPModel
    from transformers.quantizers import AutoHfQuantizer

    from .memory import FORMATS, QUANTIZED, linear_bytes_per_weight

    if fmt not in FORMATS:
        raise ValueError(f"unknown format {fmt!r}; choose one of {', '.join(FORMATS)}")
    if dtype is None:
        dtype = {"fp32": torch.float32, "fp16": torch.float16}.get(fmt, torch.bfloat16)
    with torch.device("meta"):
        model = CLIPModel(config).to(dtype)
    if fmt not in QUANTIZED:
        return sum(p.numel() * p.element_size() for p in model.parameters())
    q = (BitsAndBytesConfig(load_in_8bit=True) if fmt == "int8" else
         BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=fmt == "nf4-dq"))
    quantizer = AutoHfQuantizer.from_config(q, pre_quantized=False)
    quantizer.preprocess_model(model=model, dtype=dtype, device_map="auto", checkpoint_files=None, use_kernels=False)
    # the layers preprocess_model put in keep torch's default dtype on the meta device (their biases: float32);
    # a load casts every unquantized floating-point parameter to the load dtype (CLIPModel keeps none in fp32)
    size = torch.empty(0, dtype=dtype).element_size()
    total = 0.0
    for name, p in model.named_parameters():
        if quantizer.param_needs_quantization(model, name):
            total += p.numel() * linear_bytes_per_weight(fmt, p.shape[-1])
        else:
            total += p.numel() * (size if p.is_floating_point() else p.element_size())
    return int(round(total))


VOCAB_FILE = Path(__file__).resolve().parent / "data" / "bpe_simple_vocab_16e6.txt.gz"
"""CLIP's BPE merges (OpenAI CLIP and OpenCLIP, MIT), the bytes of the open_clip_torch 3.3.0 wheel's copy:
``helpers/data/LICENSE-openclip-bpe.txt`` gives its origin, checksum and licenses."""


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2's and CLIP's byte -> printable character table (the byte-level BPE alphabet)."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, map(chr, cs)))


def clip_tokenizer(path: str | os.PathLike = VOCAB_FILE) -> CLIPTokenizer:
    """transformers' ``CLIPTokenizer`` built from CLIP's BPE file, as OpenCLIP's ``SimpleTokenizer`` reads it.

    The vocabulary is the 256 byte characters, the same with ``</w>``, one token per merge (the file's first
    48,894), then ``<|startoftext|>`` (49406) and ``<|endoftext|>`` (49407): the ids of the LAION checkpoints'
    tokenizer (``tests/test_clip.py`` checks them against openai/clip-vit-base-patch32's).

    Args:
        path: the ``bpe_simple_vocab_16e6.txt.gz`` file; default: the workbook's copy, :data:`VOCAB_FILE`.

    Raises:
        FileNotFoundError: no such file.

    Notebook 09.
    """
    from transformers import CLIPTokenizer

    lines = gzip.open(path).read().decode("utf-8").split("\n")
    merges = [tuple(line.split()) for line in lines[1:49152 - 256 - 2 + 1]]
    chars = list(_bytes_to_unicode().values())
    tokens = chars + [c + "</w>" for c in chars] + ["".join(m) for m in merges] + ["<|startoftext|>", "<|endoftext|>"]
    return CLIPTokenizer(vocab={t: i for i, t in enumerate(tokens)}, merges=merges, model_max_length=77)
