"""helpers.clip (notebook 09): OpenCLIP's shapes as CLIPConfig, the tower map, the footprints, CLIP's tokenizer."""

from __future__ import annotations

import hashlib

import pytest
import torch
from accelerate import infer_auto_device_map
from accelerate.utils import compute_module_sizes
from torch.utils.flop_counter import FlopCounterMode
from transformers import BitsAndBytesConfig, CLIPModel

from helpers.clip import (OPENCLIP_SHAPES, TEXT_TOWER, VOCAB_FILE, clip_config, clip_tokenizer,
                          predict_clip_footprint, tower_map)
from helpers.memory import linear_bytes_per_weight


def meta_clip(name: str) -> CLIPModel:
    with torch.device("meta"):
        return CLIPModel(clip_config(name)).eval()


def millions(model, prefixes=("",)) -> float:
    return round(sum(p.numel() for n, p in model.named_parameters() if n.startswith(prefixes)) / 1e6, 2)


@pytest.mark.parametrize("name", list(OPENCLIP_SHAPES))
def test_parameter_counts_match_openclips_published_ones(name):
    """docs/model_profile.csv of OpenCLIP: exact for the ViT models, per tower; EVA02-E-14 within 0.01 %."""
    model, pub = meta_clip(name), OPENCLIP_SHAPES[name]["published"]
    image, text = millions(model, ("vision_model", "visual_projection")), millions(model, TEXT_TOWER)
    total = millions(model)
    if OPENCLIP_SHAPES[name]["exact"]:
        assert (image, text, total) == (pub["image_mparams"], pub["text_mparams"], pub["mparams"])
    else:  # an EVA image tower (post-norm, no key bias, ...) sized as a CLIP ViT: its text tower is exact
        assert text == pub["text_mparams"]
        assert abs(total / pub["mparams"] - 1) < 1e-4 and abs(image / pub["image_mparams"] - 1) < 1e-4


@pytest.mark.parametrize("name", list(OPENCLIP_SHAPES))
def test_flop_per_image_and_text_match_openclips_profile(name):
    """OpenCLIP profiles with torch.utils.flop_counter (two FLOP per multiply-add): the same counter here."""
    model, pub = meta_clip(name), OPENCLIP_SHAPES[name]["published"]
    size = model.config.vision_config.image_size
    with torch.device("meta"), FlopCounterMode(display=False) as image:
        model.get_image_features(pixel_values=torch.empty(1, 3, size, size))
    with torch.device("meta"), FlopCounterMode(display=False) as text:
        model.get_text_features(input_ids=torch.zeros(1, 77, dtype=torch.long))
    assert round(image.get_total_flops() / 1e9, 2) == pub["image_gflops"]
    assert round(text.get_total_flops() / 1e9, 2) == pub["text_gflops"]


def test_unknown_shape_is_refused_with_the_known_names():
    with pytest.raises(ValueError, match="ViT-B-32"):
        clip_config("ViT-X-99")


def test_tower_map_covers_every_tensor_and_puts_each_tower_on_one_device():
    model = meta_clip("ViT-B-32")
    towers = tower_map("cpu", "disk")
    names = [n for n, _ in model.named_parameters()] + [n for n, _ in model.named_buffers()]
    for n in names:
        keys = [k for k in towers if n == k or n.startswith(k + ".")]
        assert len(keys) == 1, f"{n} is covered by {keys}"
        assert towers[keys[0]] == ("cpu" if n.split(".")[0] in TEXT_TOWER else "disk"), n


@pytest.mark.parametrize("name", ["ViT-B-32", "ViT-L-14"])
@pytest.mark.parametrize("text_dev, vision_dev", [(0, 1), (0, "cpu"), ("cpu", "disk")])
def test_infer_auto_device_map_gives_the_tower_map_once_text_projection_moves_back(name, text_dev, vision_dev):
    """Notebook 09's budget on each tier (two GPUs; one GPU and the CPU; the CPU and the disk): the text tower plus
    one image-tower layer on the first device, with CLIPModel's own no-split classes. accelerate splits at the
    towers, except text_projection, registered after the image tower."""
    model = meta_clip(name).to(torch.float32)
    sizes = compute_module_sizes(model)
    budget = {text_dev: sum(sizes[k] for k in TEXT_TOWER) + sizes["vision_model.encoder.layers.0"]}
    if vision_dev != "disk":
        budget[vision_dev] = sizes[""]
    planned = dict(infer_auto_device_map(model, max_memory=budget, no_split_module_classes=model._no_split_modules))
    towers = tower_map(text_dev, vision_dev)
    assert {k: d for k, d in planned.items() if towers[k] != d} == {"text_projection": vision_dev}
    assert {**planned, "text_projection": text_dev} == towers


@pytest.mark.parametrize("name", ["ViT-B-32", "EVA02-E-14"])
def test_footprints_follow_the_quantizer_and_the_byte_formulas(name):
    config = clip_config(name)
    n = sum(p.numel() for p in meta_clip(name).parameters())
    assert predict_clip_footprint(config, "bf16") == 2 * n
    assert predict_clip_footprint(config, "fp32") == 4 * n
    # every Linear weight but text_projection (the quantizer's default skip: the model's last module)
    model = meta_clip(name)
    linear = {f"{m}.weight": mod.weight for m, mod in model.named_modules()
              if isinstance(mod, torch.nn.Linear) and m != "text_projection"}
    other = 2 * (n - sum(w.numel() for w in linear.values()))
    for fmt in ("int8", "nf4"):
        expected = other + sum(w.numel() * linear_bytes_per_weight(fmt, w.shape[1]) for w in linear.values())
        assert predict_clip_footprint(config, fmt) == int(round(expected))
    assert predict_clip_footprint(config, "nf4") < predict_clip_footprint(config, "int8") < 2 * n


def test_footprint_matches_a_real_quantized_load(tmp_path):
    """A tiny CLIPModel saved and loaded in int8 and NF4: get_memory_footprint plus the scales = the prediction."""
    from transformers import CLIPConfig

    config = CLIPConfig(text_config=dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                         num_attention_heads=2, projection_dim=32),
                        vision_config=dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                           num_attention_heads=2, image_size=32, patch_size=16, projection_dim=32),
                        projection_dim=32)
    CLIPModel(config).save_pretrained(tmp_path)
    for fmt, q in {"int8": BitsAndBytesConfig(load_in_8bit=True),
                   "nf4": BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4")}.items():
        for dtype in (torch.float32, torch.bfloat16):  # the load dtype of the unquantized parts, biases included
            model = CLIPModel.from_pretrained(tmp_path, quantization_config=q, dtype=dtype, device_map={"": "cpu"})
            scales = 0
            for mod in model.modules():
                w = getattr(mod, "weight", None)
                for s in (getattr(w, "SCB", None), getattr(getattr(w, "quant_state", None), "absmax", None)):
                    scales += 0 if s is None else s.numel() * s.element_size()
            measured = model.get_memory_footprint(return_buffers=False) + scales
            assert measured == predict_clip_footprint(config, fmt, dtype=dtype), (fmt, dtype)


def test_vendored_vocabulary_is_the_open_clip_wheels_file():
    """helpers/data/LICENSE-openclip-bpe.txt names this checksum: the bytes of open_clip_torch 3.3.0's copy."""
    digest = hashlib.sha256(VOCAB_FILE.read_bytes()).hexdigest()
    assert digest == "924691ac288e54409236115652ad4aa250f48203de50a9e4722a6ecd48d6804a"
    assert digest in (VOCAB_FILE.parent / "LICENSE-openclip-bpe.txt").read_text()


def test_tokenizer_gives_the_ids_of_clips_own_tokenizer():
    tok = clip_tokenizer()
    assert len(tok) == 49408
    # openai/clip-vit-base-patch32's tokenizer: "a photo of a cat"
    assert tok("a photo of a cat")["input_ids"] == [49406, 320, 1125, 539, 320, 2368, 49407]
    ids = tok("Grace Hopper, 1984!")["input_ids"]
    assert tok.decode(ids, skip_special_tokens=True) == "grace hopper , 1 9 8 4 !"  # one token per digit


def test_missing_vocabulary_is_refused(tmp_path):
    with pytest.raises(FileNotFoundError):
        clip_tokenizer(tmp_path / "bpe_simple_vocab_16e6.txt.gz")


def test_planner_refuses_clip_naming_what_to_use_and_preflight_accepts_tensor_keys():
    """The planner sizes causal LMs only: a CLIPConfig gets a refusal that names helpers.clip; the pre-flight
    check accepts a map key naming a tensor that sits directly on a module (CLIPModel's logit_scale), as
    accelerate's infer_auto_device_map writes it."""
    import pytest

    from helpers.clip import clip_config
    from helpers.planner import predict_footprint
    from helpers.preflight import preflight
    import torch
    from transformers import CLIPModel

    config = clip_config("ViT-B-32")
    with pytest.raises(ValueError, match="helpers.clip.predict_clip_footprint"):
        predict_footprint(config, "nf4")
    with torch.device("meta"):
        model = CLIPModel(config)
    device_map = {"": "cpu", "logit_scale": "cpu"}
    assert "unknown-module" not in preflight(model, device_map, mode="plan").kinds()
