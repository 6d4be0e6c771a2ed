"""Real users' failures (docs/users-cases.md): what notebook 08's own asserts do not check under nbval.

Notebook 08 reproduces eleven cases and asserts, for each, the failure, the
pre-flight finding and the fixed recipe. These tests keep the rest: where the
offload index puts a tied head (case 3), that the quantized CPU recipe
generates (cases 7 and 9), the NF4 scales that ``get_memory_footprint`` leaves
out (case 7), that exercise 1's check needs the checkpoint to see case 3's
mistake, the 8-bit forms of case 9, including
``llm_int8_enable_fp32_cpu_offload`` with nothing but disk, what that flag does
in transformers 5.24 (it only leaves the modules a dict map sends to "cpu" or
"disk" unconverted, in the load dtype; with a string map it does nothing), and
that a skeleton built with ``from_config`` stays in training mode through
``load_checkpoint_and_dispatch``.
"""

from __future__ import annotations

import importlib.util
import json

import pytest
import torch
from accelerate import init_empty_weights, load_checkpoint_and_dispatch
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, BitsAndBytesConfig

from helpers.checkpoints import resolve_model
from helpers.devicemap import device_map_of
from helpers.preflight import preflight



pytestmark = pytest.mark.usefixtures("quiet_accelerate")
NEW = 4


@pytest.fixture(scope="module")
def path():
    return resolve_model("bundled")


@pytest.fixture(scope="module")
def config(path):
    return AutoConfig.from_pretrained(path)


@pytest.fixture(scope="module")
def inputs(path):
    return AutoTokenizer.from_pretrained(path)("The capital of France is", return_tensors="pt")


@pytest.fixture(scope="module")
def reference(path, inputs):
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    return model.generate(**inputs, max_new_tokens=NEW, do_sample=False)


def greedy(model, inputs):
    return model.generate(**inputs, max_new_tokens=NEW, do_sample=False)


def empty_model(config, tie: bool):
    with init_empty_weights():
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    if tie:
        model.tie_weights()
    return model


def hand_map(embed, head, layers="cpu", n=30, disk_from=None):
    dm = {"model.embed_tokens": embed}
    dm.update({f"model.layers.{i}": ("disk" if disk_from is not None and i >= disk_from else layers) for i in range(n)})
    dm.update({"model.norm": "cpu", "model.rotary_emb": "cpu", "lm_head": head})
    return dm


def test_case3_offload_index_holds_layers_not_the_tied_head(config, path, inputs, reference, tmp_path):
    # the fix: the tied pair stays in memory; decoder layers go to disk instead
    fixed = hand_map("cpu", "cpu", disk_from=25)
    assert preflight(empty_model(config, tie=True), fixed, checkpoint=path).ok
    model = load_checkpoint_and_dispatch(empty_model(config, tie=True), path, device_map=fixed, offload_folder=tmp_path)
    index = json.loads((tmp_path / "index.json").read_text())
    assert "lm_head.weight" not in index and "model.layers.29.mlp.up_proj.weight" in index
    assert torch.equal(greedy(model, inputs), reference)


def test_case7_and_9_quantized_recipe_generates_on_cpu(path, inputs):
    model = AutoModelForCausalLM.from_pretrained(
        path, quantization_config=BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_compute_dtype=torch.float32),
        device_map={"": "cpu"}, max_memory={"cpu": "1GiB"})
    assert model.is_quantized and preflight(model, device_map_of(model), {"cpu": "1GiB"}).ok
    assert greedy(model, inputs).shape[1] == inputs["input_ids"].shape[1] + NEW


def test_case7_nf4_footprint_leaves_out_the_absmax_scales(path):
    # notebook 08 adds the scales to get_memory_footprint (parameters and buffers): one float32 absmax per 64 weights
    model = AutoModelForCausalLM.from_pretrained(
        path, quantization_config=BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_compute_dtype=torch.float32),
        device_map={"": "cpu"})
    layers = [m for m in model.modules() if type(m).__name__ == "Linear4bit"]
    weights = sum(m.weight.quant_state.shape.numel() for m in layers)
    scales = sum(m.weight.quant_state.absmax.nbytes for m in layers)
    assert scales == weights // 64 * 4
    stored = sum(t.nbytes for t in list(model.parameters()) + list(model.buffers()))
    assert model.get_memory_footprint() == stored  # the scales are neither parameters nor buffers


def test_exercise1_tied_pair_on_disk_is_caught_only_with_the_checkpoint(config, path):
    # notebook 08's exercise 1 checks with checkpoint=: without it, case 3's mistake passes
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    on_disk = hand_map("disk", "disk") | {f"model.layers.{i}": 0 if i < 15 else 1 for i in range(30)}
    budget = {0: "400MB", 1: "400MB", "cpu": "1GB"}
    assert preflight(model, on_disk, budget).ok
    assert preflight(model, on_disk, budget, checkpoint=path).kinds() == ["tied-missing"]


def test_case9_int8_with_too_little_room_and_fp32_offload_to_disk(config):
    from transformers.integrations.accelerate import infer_auto_device_map as hf_infer
    from transformers.quantizers import AutoHfQuantizer

    if importlib.util.find_spec("bitsandbytes") is None:
        pytest.skip("bitsandbytes not installed")
    bnb = BitsAndBytesConfig(load_in_8bit=True)  # notebook 08 asserts the 4-bit form
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    quantizer = AutoHfQuantizer.from_config(bnb)
    quantizer.preprocess_model(model, device_map="auto")
    small = quantizer.adjust_max_memory({"cpu": 100 * 10**6})
    plan = hf_infer(model, max_memory=small, no_split_module_classes=model._no_split_modules, hf_quantizer=quantizer)
    report = preflight(model, plan, small, hf_quantizer=quantizer)
    assert "quantized-offload" in report.kinds(), str(report)
    assert preflight(model, {"": "cpu"}, {"cpu": 100 * 10**6}, hf_quantizer=quantizer).kinds() == ["over-budget"]
    assert preflight(model, {"": "cpu"}, {"cpu": "1GiB"}, hf_quantizer=quantizer).ok
    bnb.llm_int8_enable_fp32_cpu_offload = True
    assert preflight(model, {"": "disk"}, hf_quantizer=quantizer).kinds() == ["quantized-offload"]


def _linear_classes(model, device_map):
    """{device the map gives: set of class names} over the model's linear layers."""
    out = {}
    for name, module in model.named_modules():
        if type(module).__name__ in ("Linear", "Conv1D", "Linear4bit", "Linear8bitLt"):
            key = max((k for k in device_map if k == "" or name == k or name.startswith(k + ".")), key=len)
            out.setdefault(device_map[key], set()).add(type(module).__name__)
    return out


def _prepared(config, quantization_config, device_map):
    """The meta skeleton as from_pretrained prepares it for ``device_map`` before loading (no GPU needed)."""
    from transformers.quantizers import AutoHfQuantizer

    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
    AutoHfQuantizer.from_config(quantization_config, pre_quantized=False).preprocess_model(
        model, dtype=torch.bfloat16, device_map=device_map)
    return model


@pytest.mark.parametrize("load_in", ["4bit", "8bit"])
def test_case9_fp32_cpu_offload_only_leaves_what_a_dict_map_offloads_unconverted(config, load_in):
    # transformers 5.24, quantizer_bnb_*bit.py, _process_model_before_weight_loading: with the flag and a dict map,
    # every key mapped to "cpu" or "disk" joins the modules not converted; nothing else changes
    if importlib.util.find_spec("bitsandbytes") is None:
        pytest.skip("bitsandbytes not installed")
    quantized = "Linear4bit" if load_in == "4bit" else "Linear8bitLt"
    flag = BitsAndBytesConfig(**{f"load_in_{load_in}": True}, llm_int8_enable_fp32_cpu_offload=True)
    gpu_map = hand_map(0, 0, layers=0, disk_from=20)
    gpu_map.update({f"model.layers.{i}": "cpu" for i in range(10, 20)})
    assert _linear_classes(_prepared(config, flag, gpu_map), gpu_map) == {
        0: {quantized, "Linear"}, "cpu": {"Linear"}, "disk": {"Linear"}}  # the head ("Linear" on 0) is never converted
    assert _linear_classes(_prepared(config, flag, {"": "cpu"}), {"": "cpu"}) == {"cpu": {"Linear"}}  # nothing at all
    auto = _prepared(config, flag, "auto")  # a string: the flag is applied before "auto" becomes a map
    assert _linear_classes(auto, {"": "auto"}) == {"auto": {quantized, "Linear"}}


def test_case9_refusal_names_the_flag_and_a_custom_device_map():
    from transformers.quantizers import AutoHfQuantizer

    if importlib.util.find_spec("bitsandbytes") is None:
        pytest.skip("bitsandbytes not installed")
    quantizer = AutoHfQuantizer.from_config(BitsAndBytesConfig(load_in_4bit=True), pre_quantized=False)
    with pytest.raises(ValueError) as refusal:
        quantizer.validate_environment(device_map={"model": 0, "lm_head": "cpu"})
    assert "`llm_int8_enable_fp32_cpu_offload=True` and pass a custom `device_map`" in str(refusal.value)
    quantizer.validate_environment(device_map={"": "cpu"})  # everything on the CPU is not refused
    quantizer.quantization_config.llm_int8_enable_fp32_cpu_offload = True
    quantizer.validate_environment(device_map={"model": 0, "lm_head": "cpu"})  # the flag switches the refusal off


@pytest.mark.parametrize("offload_to", ["cpu", "disk"])
def test_case9_fp32_cpu_offload_recipe_on_a_cpu_loads_nothing_quantized_in_the_load_dtype(path, inputs, tmp_path,
                                                                                           offload_to):
    # without a GPU the main device is the CPU: the whole map is "cpu" (or "cpu" and "disk"), so nothing is converted
    if importlib.util.find_spec("bitsandbytes") is None:
        pytest.skip("bitsandbytes not installed")
    if torch.cuda.is_available():
        pytest.skip("the CPU form of the recipe: on a GPU the main device would be the GPU")
    device_map = hand_map("cpu", "cpu", disk_from=15 if offload_to == "disk" else None)
    bnb = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_compute_dtype=torch.float32,
                             llm_int8_enable_fp32_cpu_offload=True)
    model = AutoModelForCausalLM.from_pretrained(path, quantization_config=bnb, device_map=device_map,
                                                 dtype=torch.bfloat16, offload_folder=tmp_path)
    assert model.is_quantized  # so it says, yet:
    assert {type(m).__name__ for m in model.modules() if isinstance(m, torch.nn.Linear)} == {"Linear"}
    assert {m.weight.dtype for m in model.modules() if isinstance(m, torch.nn.Linear)} == {torch.bfloat16}
    assert greedy(model, inputs).shape[1] == inputs["input_ids"].shape[1] + NEW


def test_skeleton_from_config_stays_in_training_mode_through_load_checkpoint_and_dispatch(config, path):
    # from_pretrained calls model.eval(); the manual route does not, so dropout (GPT-2: 0.1) stays on in generate
    model = load_checkpoint_and_dispatch(empty_model(config, tie=True), path, device_map={"": "cpu"})
    assert model.training
    assert not AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).training
