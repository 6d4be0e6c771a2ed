"""Real users' failures (docs/users-cases.md), one test per case.

Each test checks that the pre-flight check flags the broken form (where a check
can) and that the fixed recipe works, on the bundled SmolLM2-135M (tied
embeddings, no ``lm_head.weight`` in its checkpoint), on CPU. Case 8 plans for
two hypothetical GPUs on the meta device.
"""

from __future__ import annotations

import importlib.util
import json

import pytest
import torch
from accelerate import infer_auto_device_map, init_empty_weights, load_checkpoint_and_dispatch
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


TWO_GPUS = {0: "200MB", 1: "200MB", "cpu": "2GB"}


def test_case1_ties_lost_on_meta(config, path):
    lost = empty_model(config, tie=False)
    plan = infer_auto_device_map(lost, max_memory=TWO_GPUS, no_split_module_classes=lost._no_split_modules)
    report = preflight(lost, plan, TWO_GPUS, checkpoint=path)
    assert {"tie-lost", "tied-split"} <= set(report.kinds()), str(report)
    # fixed: tie after the context, or build under torch.device("meta")
    fixed = empty_model(config, tie=True)
    with torch.device("meta"):
        direct = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    for model in (fixed, direct):
        assert model.lm_head.weight is model.model.embed_tokens.weight
        plan = infer_auto_device_map(model, max_memory=TWO_GPUS, no_split_module_classes=model._no_split_modules)
        assert plan["lm_head"] == plan["model.embed_tokens"]
        assert preflight(model, plan, TWO_GPUS, checkpoint=path).ok


def test_case2_tie_forgotten_before_loading(config, path, inputs, reference):
    report = preflight(empty_model(config, tie=False), {"": "cpu"}, checkpoint=path)
    assert report.kinds() == ["tie-lost"] and "Cannot copy out of meta tensor" in report.findings[0].message
    model = load_checkpoint_and_dispatch(empty_model(config, tie=True), path, device_map={"": "cpu"})
    assert torch.equal(greedy(model, inputs), reference)


def test_case3_tied_head_on_disk(config, path, inputs, reference, tmp_path):
    broken = hand_map("disk", "disk")
    report = preflight(empty_model(config, tie=True), broken, checkpoint=path)
    assert report.kinds() == ["tied-missing"] and "KeyError: 'lm_head.weight'" in report.findings[0].message
    assert "tied-split" in preflight(empty_model(config, tie=True), hand_map("cpu", "disk"), checkpoint=path).kinds()
    # fixed: the tied pair stays in memory; decoder layers go to disk instead
    fixed = hand_map("cpu", "cpu", disk_from=25)
    assert preflight(empty_model(config, tie=True), fixed, checkpoint=path).ok
    model = load_checkpoint_and_dispatch(empty_model(config, tie=True), path, device_map=fixed, offload_folder=tmp_path)
    index = json.loads((tmp_path / "index.json").read_text())
    assert "lm_head.weight" not in index and "model.layers.29.mlp.up_proj.weight" in index
    assert torch.equal(greedy(model, inputs), reference)


def test_case4_tied_pair_split_the_other_way(config, path, inputs, reference, tmp_path):
    report = preflight(empty_model(config, tie=True), hand_map("disk", "cpu"), checkpoint=path)
    assert report.kinds() == ["tied-split"]
    fixed = hand_map("cpu", "cpu", disk_from=25)
    model = AutoModelForCausalLM.from_pretrained(path, device_map=fixed, offload_folder=tmp_path, dtype=torch.float32)
    assert torch.equal(greedy(model, inputs), reference)


def test_case5_no_hf_device_map_on_one_device(path):
    model = AutoModelForCausalLM.from_pretrained(path, device_map="auto", dtype=torch.float32)
    dm = device_map_of(model)
    if torch.cuda.device_count() == 0:
        assert not hasattr(model, "hf_device_map")
        assert dm == {"": "cpu"}
    assert preflight(model, dm, mode="run").ok


def test_case6_moving_an_offloaded_model(path, inputs, tmp_path):
    dm = hand_map("cpu", "cpu", disk_from=25)
    model = AutoModelForCausalLM.from_pretrained(path, device_map=dm, offload_folder=tmp_path, dtype=torch.float32)
    with pytest.raises(RuntimeError, match="offloaded to cpu or disk"):
        model.to(torch.bfloat16)
    # fixed: choose the dtype (and the devices) when loading
    model = AutoModelForCausalLM.from_pretrained(path, device_map=dm, offload_folder=tmp_path / "bf16",
                                                 dtype=torch.bfloat16)
    assert model.model.embed_tokens.weight.dtype == torch.bfloat16
    assert greedy(model, inputs).shape[1] == inputs["input_ids"].shape[1] + NEW


def test_case7_load_in_4bit_keyword(path):
    with pytest.raises(TypeError, match="load_in_4bit"):
        AutoModelForCausalLM.from_pretrained(path, load_in_4bit=True)
    assert BitsAndBytesConfig(load_in_4bit=True).load_in_4bit  # where the keyword went


@pytest.mark.skipif(importlib.util.find_spec("bitsandbytes") is None, reason="bitsandbytes not installed")
def test_case7_and_9_quantized_recipe_on_cpu(path, inputs):
    model = AutoModelForCausalLM.from_pretrained(
        path, quantization_config=BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_compute_dtype=torch.float32),
        device_map={"": "cpu"}, max_memory={"cpu": "1GiB"})
    assert model.is_quantized and preflight(model, device_map_of(model), {"cpu": "1GiB"}).ok
    assert greedy(model, inputs).shape[1] == inputs["input_ids"].shape[1] + NEW


def test_case8_no_split_classes_missing_or_misspelt(config):
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    budget = {0: "300MB", 1: "300MB", "cpu": "2GB"}
    for given in ([], ["LLamaDecoderLayer"]):
        plan = infer_auto_device_map(model, max_memory=budget, no_split_module_classes=given)
        cut = {k.split(".")[2] for k in plan if k.startswith("model.layers.") and k.count(".") > 2}
        assert cut, "the planner no longer cuts a layer: update the case"
        kinds = preflight(model, plan, budget, no_split_module_classes=given).kinds()
        assert "no-split-cut" in kinds and (given == [] or "no-split-unknown" in kinds)
    plan = infer_auto_device_map(model, max_memory=budget, no_split_module_classes=model._no_split_modules)
    assert preflight(model, plan, budget).ok


def test_case9_quantized_with_too_little_room(config):
    from transformers.integrations.accelerate import infer_auto_device_map as hf_infer
    from transformers.quantizers import AutoHfQuantizer

    if importlib.util.find_spec("bitsandbytes") is None:
        pytest.skip("bitsandbytes not installed")
    for bnb in (BitsAndBytesConfig(load_in_4bit=True), BitsAndBytesConfig(load_in_8bit=True)):
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
