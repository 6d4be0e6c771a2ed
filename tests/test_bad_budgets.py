"""Bad budgets and bad maps: what accelerate 1.15 (and transformers 5.24) do with each, and what the workbook does.

Every test first runs accelerate on the input (on a tiny Llama on the meta
device, or a tiny checkpoint saved to a temporary folder) and asserts what it
does: refuses, crashes, or silently accepts. Then it asserts what
``helpers.budgets`` (``parse_budget``) and ``helpers.preflight`` do with the same input: a ValueError naming the fix
where accelerate refuses or crashes or the value cannot be meant, a
``BudgetWarning`` where accelerate silently takes something that is probably a
mistake, acceptance where accelerate accepts. CPU only; no GPU is touched.

What accelerate 1.15 does (asserted below):

==============================================  ===============================================================
input                                           accelerate / transformers
==============================================  ===============================================================
max_memory="10GB" (a string)                    get_max_memory, infer_auto_device_map, get_balanced_memory,
                                                from_pretrained: TypeError "string indices must be integers"
{"cuda:0": "10GiB"}                             ValueError "Device cuda:0 is not recognized" (from_pretrained too)
{"xpu:0": ...} as a max_memory key              ValueError "Device xpu:0 is not recognized"
{0: X, 2: X}, balanced_low_0                    get_balanced_memory(low_zero=True) and from_pretrained(
                                                device_map="balanced_low_0"): KeyError: 1 ("balanced": fine)
{0: -1}                                         accepted: GPU 0 gets nothing, silently ("-1GB": ValueError)
{0: True}                                       accepted as 1 byte: GPU 0 gets nothing, silently
{0: inf}                                        accepted: everything on GPU 0
{0: nan}                                        accepted: GPU 0 gets nothing, silently
"10Gb", "10gb", "10mb", "10kb"                  bits: 10**9 / 8 bytes etc. ("10gB" is 10 GB; "24Gib" is GiB)
{0: X, 1: 0}, balanced_low_0                    accepted: low_zero is dropped, everything lands on GPU 0
{"mps": X}                                      accepted: the map then uses "mps"
map value "xpu:0", "xpu", "npu:0", "mps"        passed on to torch (dispatch_model / from_pretrained); fails only
                                                where torch lacks that backend ("npu" needs torch_npu)
"disk" in the map, no offload folder            load_checkpoint_and_dispatch: ValueError "please pass along an
                                                `offload_folder`"; dispatch_model: "We need an `offload_dir`";
                                                from_pretrained (safetensors): loads, no folder needed
from_pretrained inside init_empty_weights       every weight left on meta; tie_weights() ties two empty tensors;
                                                a forward fails ("Tensor on device meta ...")
any dict of size strings                        converted to ints IN PLACE by get_max_memory
==============================================  ===============================================================
"""

from __future__ import annotations

import copy
import math
import warnings

import pytest
import torch
from accelerate import dispatch_model, infer_auto_device_map, init_empty_weights, load_checkpoint_and_dispatch
from accelerate.utils import compute_module_sizes, convert_file_size_to_int, get_balanced_memory, get_max_memory
from transformers import AutoModelForCausalLM, LlamaConfig

from helpers.devicemap import canonical_device as map_device
from helpers.budgets import BudgetWarning, parse_budget
from helpers.preflight import preflight

pytestmark = [pytest.mark.usefixtures("quiet_accelerate"),
              # accelerate's note when a plan offloads for GPUs this machine lacks: expected here
              pytest.mark.filterwarnings("ignore:Current model requires .* bytes of buffer:UserWarning")]


def tiny_config(tie=False, layers=4):
    return LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=layers, num_attention_heads=4,
                       num_key_value_heads=2, vocab_size=1000, tie_word_embeddings=tie)


def meta_llama(tie=False, layers=4):
    with torch.device("meta"):
        return AutoModelForCausalLM.from_config(tiny_config(tie, layers))


def layer_map(n=4, dev=lambda i: 0 if i < 2 else 1, embed=0, head=1):
    dm = {"model.embed_tokens": embed}
    dm.update({f"model.layers.{i}": dev(i) for i in range(n)})
    dm.update({"model.norm": head, "model.rotary_emb": head, "lm_head": head})
    return dm


def counts(device_map):
    out = {}
    for d in device_map.values():
        out[d] = out.get(d, 0) + 1
    return out


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    """Two tiny random checkpoints (untied and tied), saved with save_pretrained (safetensors)."""
    root = tmp_path_factory.mktemp("tiny")
    out = {}
    for tie in (False, True):
        with torch.random.fork_rng(devices=[]):  # seeded weights, the caller's random stream left as it was
            torch.manual_seed(0)
            model = AutoModelForCausalLM.from_config(tiny_config(tie, layers=2))
        model.save_pretrained(root / f"tie{int(tie)}")
        out[tie] = str(root / f"tie{int(tie)}")
    return out


def no_budget_warning(fn, *a, **k):
    with warnings.catch_warnings():
        warnings.simplefilter("error", BudgetWarning)
        return fn(*a, **k)


# -- accelerate refuses or crashes: the workbook raises ValueError naming the fix ----------------------------

@pytest.mark.library_text
def test_string_max_memory(checkpoints):
    model = meta_llama()
    for accelerate_call in (lambda: get_max_memory("10GB"),
                            lambda: infer_auto_device_map(model, max_memory="10GB"),
                            lambda: get_balanced_memory(model, max_memory="10GB"),
                            lambda: AutoModelForCausalLM.from_pretrained(checkpoints[False], device_map="auto",
                                                                         max_memory="10GB")):
        with pytest.raises(TypeError, match="string indices must be integers"):  # accelerate: a bare crash
            accelerate_call()
    with pytest.raises(ValueError, match=r"must be a dict[\s\S]*max_memory=\{0: '10GB'\}"):  # workbook: the fix
        parse_budget("10GB")
    with pytest.raises(ValueError, match=r"max_memory=\{0: '10GB'\}"):
        preflight(model, {"": 0}, "10GB")


@pytest.mark.parametrize("key, fixed", [("cuda:0", 0), ("cuda:1", 1), ("cuda", 0), ("xpu:0", 0)])
@pytest.mark.library_text
def test_accelerator_strings_as_max_memory_keys(key, fixed, checkpoints):
    model = meta_llama()
    msg = f"Device {key} is not recognized"
    with pytest.raises(ValueError, match=msg):  # accelerate refuses, in every entry point
        get_max_memory({key: "10GiB", "cpu": "1GiB"})
    with pytest.raises(ValueError, match=msg):
        infer_auto_device_map(model, max_memory={key: "10GiB", "cpu": "1GiB"})
    if key == "cuda:0":
        with pytest.raises(ValueError, match=msg):  # from_pretrained refuses too
            AutoModelForCausalLM.from_pretrained(checkpoints[False], device_map="auto",
                                                 max_memory={key: "10GiB", "cpu": "1GiB"})
    with pytest.raises(ValueError, match=rf"max_memory=\{{{fixed}: \.\.\.\}}"):  # workbook: names the id to use
        parse_budget({key: "10GiB", "cpu": "1GiB"})
    with pytest.raises(ValueError, match=rf"max_memory=\{{{fixed}: \.\.\.\}}"):
        preflight(model, {"": 0}, {key: "10GiB"})
    # as a map value (not a budget key) "cuda:N" stays fine, for accelerate and the workbook
    assert preflight(model, {"": "cuda:1"}, {1: "1GiB"}).ok


@pytest.mark.parametrize("key, fix", [("CPU", "'cpu'"), ("0", "0"), (torch.device("cpu"), "'cpu'")])
@pytest.mark.library_text
def test_other_keys_accelerate_does_not_recognise(key, fix):
    with pytest.raises(ValueError, match="is not recognized"):
        get_max_memory({key: 1000})
    with pytest.raises(ValueError, match=f"write {fix}"):
        parse_budget({key: 1000})


@pytest.mark.library_text
def test_gpu_ids_with_a_gap_and_balanced_low_0(checkpoints):
    model = meta_llama()
    budget = {0: "300KB", 2: "300KB", "cpu": "1GB"}
    # accelerate: "balanced" copes with the gap; balanced_low_0 crashes inside get_balanced_memory
    get_balanced_memory(model, max_memory=dict(budget), no_split_module_classes=model._no_split_modules)
    with pytest.raises(KeyError) as e:
        get_balanced_memory(model, max_memory=dict(budget), no_split_module_classes=model._no_split_modules,
                            low_zero=True)
    assert e.value.args == (1,)
    with pytest.raises(KeyError) as e:  # the same crash from from_pretrained(device_map="balanced_low_0")
        AutoModelForCausalLM.from_pretrained(checkpoints[False], device_map="balanced_low_0", max_memory=dict(budget))
    assert e.value.args == (1,)
    # workbook: refused for balanced_low_0 only, naming the fix
    for call in (lambda: parse_budget(budget, strategy="balanced_low_0"),
                 lambda: preflight(model, {"": "cpu"}, budget, strategy="balanced_low_0")):
        with pytest.raises(ValueError, match=r"KeyError: 1[\s\S]*CUDA_VISIBLE_DEVICES=0,2"):
            call()
    for strategy in (None, "auto", "balanced", "sequential"):
        assert no_budget_warning(parse_budget, budget, strategy=strategy) == {0: 300_000, 2: 300_000, "cpu": 10**9}
    assert no_budget_warning(parse_budget, {0: "1GB", 1: "1GB", "cpu": "1GB"}, strategy="balanced_low_0")
    with pytest.raises(ValueError, match="strategy must be one of"):
        parse_budget(budget, strategy="balanced-low-0")


@pytest.mark.parametrize("gpus", [(0, 2), (2, 3), (1, 2), (0, 2, 3), (1, 3)])
def test_balanced_low_0_names_the_key_accelerate_misses(gpus):
    model = meta_llama()
    budget = {g: 10**6 for g in gpus}
    with pytest.raises(KeyError) as e:  # accelerate
        get_balanced_memory(model, max_memory=dict(budget), low_zero=True)
    with pytest.raises(ValueError, match=rf"fails with KeyError: {e.value.args[0]}\."):  # the workbook says which
        parse_budget(budget, strategy="balanced_low_0")


# -- values that cannot be meant: ValueError (accelerate takes them silently, or overflows) ------------------

@pytest.mark.parametrize("value, gpu0_gets, match", [
    (-1, "nothing", "negative"),                  # accelerate keeps -1: GPU 0 gets nothing, silently
    (True, "nothing", "boolean"),                 # accelerate reads True as 1 byte: GPU 0 gets nothing
    (float("nan"), "nothing", "NaN"),             # every comparison with NaN is False: GPU 0 gets nothing
    (float("inf"), "everything", "infinite"),     # unlimited: all on GPU 0 (the workbook used to raise OverflowError)
])
def test_values_that_cannot_be_meant(value, gpu0_gets, match):
    model = meta_llama()
    budget = {0: value, "cpu": "1GB"}
    got = get_max_memory(dict(budget))  # accelerate keeps the value as it is
    assert got[0] is value or (isinstance(value, float) and math.isnan(value) and math.isnan(got[0]))
    planned = infer_auto_device_map(model, max_memory=dict(budget), no_split_module_classes=model._no_split_modules)
    if gpu0_gets == "nothing":
        assert 0 not in planned.values() and set(planned.values()) == {"cpu"}
    else:
        assert set(planned.values()) == {0}
    with pytest.raises(ValueError, match=match):
        parse_budget(budget)
    with pytest.raises(ValueError, match=match):
        preflight(model, {"": 0}, budget)


@pytest.mark.parametrize("text", ["-1GB", "infGB", "10GB ", "2TB", "10G", "lots"])
def test_size_strings_accelerate_refuses(text):
    try:  # accelerate: ValueError, or OverflowError for "infGB" (float('inf') * 10**9 cannot become an int)
        convert_file_size_to_int(text)
        raise AssertionError(f"accelerate took {text!r}")
    except (ValueError, OverflowError):
        pass
    with pytest.raises(ValueError, match="is not a size"):
        parse_budget({0: text})


# -- accelerate silently takes a probable mistake: BudgetWarning ----------------------------------------------

@pytest.mark.parametrize("text, n_bytes, bits", [
    ("10Gb", 10**9 * 10 // 8, True), ("10gb", 10**9 * 10 // 8, True), ("10mb", 10**6 * 10 // 8, True),
    ("10Kb", 10**3 * 10 // 8, True), ("10kb", 10**3 * 10 // 8, True),
    ("10GB", 10 * 10**9, False), ("10gB", 10 * 10**9, False),
    ("24Gib", 24 * 2**30, False), ("24gib", 24 * 2**30, False), ("24GiB", 24 * 2**30, False),
    ("10KiB", 10 * 2**10, False),
])
def test_sizes_in_bits(text, n_bytes, bits):
    assert convert_file_size_to_int(text) == n_bytes  # accelerate: a lowercase final "b" (not "ib") means bits
    model = meta_llama()
    planned = infer_auto_device_map(model, max_memory={0: text, "cpu": "1GB"})
    assert planned  # and it plans with it, silently
    if bits:
        with pytest.warns(BudgetWarning, match=rf"{text!r} is read by accelerate as .-bits[\s\S]*'10.B'") as rec:
            assert parse_budget({0: text}) == {0: n_bytes}  # the same number as accelerate, with a warning
        assert rec[0].filename == __file__  # the warning points at the caller's line
        with pytest.warns(BudgetWarning):
            preflight(model, {"": 0}, {0: text})
    else:
        assert no_budget_warning(parse_budget, {0: text}) == {0: n_bytes}


def test_zero_budget_on_a_gpu():
    model = meta_llama()
    ns = model._no_split_modules
    size = compute_module_sizes(model)[""]
    # accelerate, balanced_low_0 with two GPUs: GPU 0 is kept light, GPU 1 takes the model
    two = get_balanced_memory(model, max_memory={0: size, 1: size, "cpu": 10**9}, no_split_module_classes=ns,
                              low_zero=True)
    assert counts(infer_auto_device_map(model, max_memory=two, no_split_module_classes=ns)).get(0, 0) <= 1
    # ... with a 0 on GPU 1 it counts one GPU, drops low_zero, and everything lands on GPU 0
    zero = get_balanced_memory(model, max_memory={0: size, 1: 0, "cpu": 10**9}, no_split_module_classes=ns,
                               low_zero=True)
    assert set(infer_auto_device_map(model, max_memory=zero, no_split_module_classes=ns).values()) == {0}
    # workbook: a warning, louder with the strategy named
    with pytest.warns(BudgetWarning, match=r"max_memory\[1\] = 0[\s\S]*balanced_low_0[\s\S]*GPU 0 first"):
        assert parse_budget({0: size, 1: 0}, strategy="balanced_low_0") == {0: size, 1: 0}
    with pytest.warns(BudgetWarning, match=r"GPU 1 gets no weights") as rec:
        preflight(model, {"": 0}, {0: size, 1: 0})
    assert "balanced_low_0" not in str(rec[0].message) and rec[0].filename == __file__
    assert no_budget_warning(parse_budget, {0: size, "cpu": 0, "disk": 0}) == {0: size, "cpu": 0, "disk": 0}
    with warnings.catch_warnings():  # callers can filter it: it is a UserWarning subclass of its own
        warnings.simplefilter("error", BudgetWarning)
        with pytest.raises(BudgetWarning):
            parse_budget({0: 0})


# -- what accelerate accepts, the workbook accepts --------------------------------------------------------------

def test_mps_as_a_budget_key_and_a_device(monkeypatch):
    model = meta_llama()
    assert get_max_memory({"mps": "1GB", "cpu": "1GB"}) == {"mps": 10**9, "cpu": 10**9}
    assert set(infer_auto_device_map(model, max_memory={"mps": "1GB", "cpu": "1GB"}).values()) == {"mps"}
    assert parse_budget({"mps": "1GB", "cpu": "1GB"}) == {"mps": 10**9, "cpu": 10**9}
    report = preflight(model, {"": "mps"}, {"mps": "1GB"})
    assert report.ok and report.bytes_per_device == {"mps": compute_module_sizes(model)[""]}
    assert preflight(model, {"": "mps"}, {"mps": "1KB"}).kinds() == ["over-budget"]
    monkeypatch.setattr(torch.backends.mps, "is_available", lambda: False)
    assert preflight(model, {"": "mps"}, mode="run").kinds() == ["absent-device"]


@pytest.mark.parametrize("value, canonical", [
    ("xpu:0", "xpu:0"), ("xpu", "xpu:0"), ("XPU:1", "xpu:1"), (torch.device("xpu", 2), "xpu:2"),
    ("npu:0", "npu:0"), ("mps", "mps"), ("cuda:3", 3), (2, 2), ("cpu", "cpu"), ("disk", "disk"),
    ("meta", None), ("tpu", None), ("gpu", None), (True, None), (-1, None),
])
def test_map_device(value, canonical):
    assert map_device(value) == canonical


@pytest.mark.library_text
def test_other_accelerators_as_map_values(monkeypatch):
    model = meta_llama()
    # accelerate passes "xpu:0" / "xpu" on to torch: torch knows the device type (it fails here only because this
    # torch has no XPU); "npu" is known to torch only once torch_npu registers it (accelerate then builds "npu:N")
    assert str(torch.device("xpu:0")) == "xpu:0" and str(torch.device("xpu")) == "xpu"
    if not torch.xpu.is_available():
        for value in ("xpu:0", "xpu"):
            with init_empty_weights():
                skeleton = AutoModelForCausalLM.from_config(tiny_config())
            with pytest.raises((AssertionError, RuntimeError), match="XPU"):
                dispatch_model(skeleton, {"": value})
    if not hasattr(torch, "npu"):
        with pytest.raises(RuntimeError, match="npu"):
            torch.device("npu:0")
    # workbook: plan mode accepts them, budgets them on the integer id, run mode checks they exist
    for value in ("xpu:0", "xpu", "npu:0"):
        report = preflight(model, {"": value}, {0: "1GB"})
        assert report.ok, str(report)
        assert list(report.bytes_per_device) == [map_device(value)]
    assert preflight(model, {"": "xpu:1"}, {1: "1KB"}).kinds() == ["over-budget"]
    assert preflight(model, {"": "npu:0"}, {1: "1GB"}).kinds() == ["no-budget"]
    mixed = layer_map(dev=lambda i: "xpu:0" if i < 2 else "xpu:1", embed="xpu:0", head="xpu:1")
    assert preflight(model, mixed, {0: "1GB", 1: "1GB"}).bytes_per_device.keys() == {"xpu:0", "xpu:1"}
    monkeypatch.setattr(torch.xpu, "is_available", lambda: False)
    run = preflight(model, {"": "xpu:0"}, mode="run")
    assert run.kinds() == ["absent-device"] and "xpu:0" in run.findings[0].message
    monkeypatch.setattr(torch.xpu, "is_available", lambda: True)
    monkeypatch.setattr(torch.xpu, "device_count", lambda: 2)
    assert preflight(model, {"": "xpu:1"}, mode="run").ok
    assert preflight(model, {"": "xpu:2"}, mode="run").kinds() == ["absent-device"]


# -- the caller's dict is never changed ------------------------------------------------------------------------

def test_the_callers_dict_is_unchanged():
    budget = {0: "10GiB", 1: "10GB", "cpu": "30GiB", "disk": 10**12}
    before = copy.deepcopy(budget)
    theirs = dict(budget)
    get_max_memory(theirs)
    assert theirs == {0: 10 * 2**30, 1: 10 * 10**9, "cpu": 30 * 2**30, "disk": 10**12}  # accelerate: in place
    assert parse_budget(budget) == theirs and budget == before  # workbook: same numbers, dict untouched
    model = meta_llama()
    dm = layer_map()
    dm_before = copy.deepcopy(dm)
    preflight(model, dm, budget, strategy="balanced_low_0")
    assert budget == before and dm == dm_before


# -- preflight: a model loaded inside init_empty_weights ----------------------------------------------------------

@pytest.mark.parametrize("tie", [False, True])
def test_from_pretrained_inside_init_empty_weights(tie, checkpoints):
    path = checkpoints[tie]
    with init_empty_weights():
        model = AutoModelForCausalLM.from_pretrained(path)
    # transformers: no error, but every weight stays on meta; a tied pair is two separate meta tensors
    assert all(p.is_meta for p in model.parameters())
    assert (model.lm_head.weight is model.model.embed_tokens.weight) is False
    with pytest.raises(RuntimeError, match="Tensor on device meta is not on the expected device"):
        model.generate(torch.tensor([[1, 2]]), max_new_tokens=1, do_sample=False)
    run = preflight(model, {"": "cpu"}, mode="run")
    assert run.kinds() == (["all-meta", "tie-lost"] if tie else ["all-meta"]), str(run)
    assert "never loaded" in run.findings[0].message
    assert "without init_empty_weights" in run.findings[0].fix and "load_checkpoint_and_dispatch" in run.findings[0].fix
    plan = preflight(model, {"": "cpu"})  # plan mode: a meta model is what planning takes
    assert plan.kinds() == (["tie-lost"] if tie else [])
    if tie:  # the tie-lost fix must not promise that tie_weights() is enough: it leaves the model empty
        fix = plan.findings[0].fix
        assert "tie_weights() alone leaves it empty" in fix and "load_checkpoint_and_dispatch" in fix
        model.tie_weights()
        assert all(p.is_meta for p in model.parameters())  # tied, and still empty
        assert preflight(model, {"": "cpu"}, mode="run").kinds() == ["all-meta"]
    # declaring the load that fills it: no all-meta; and that load does fill it (the fix is right)
    assert preflight(model, {"": "cpu"}, mode="run", loader="load_checkpoint_and_dispatch").ok
    model = load_checkpoint_and_dispatch(model, path, device_map={"": "cpu"})
    assert not any(p.is_meta for p in model.parameters())
    assert preflight(model, {"": "cpu"}, mode="run").ok


@pytest.mark.library_text
def test_a_skeleton_from_config_is_not_all_meta(checkpoints):
    with init_empty_weights():
        skeleton = AutoModelForCausalLM.from_config(tiny_config(tie=True, layers=2))
    skeleton.tie_weights()
    assert preflight(skeleton, {"": "cpu"}, mode="run", checkpoint=checkpoints[True]).ok  # meta by construction
    loaded = AutoModelForCausalLM.from_pretrained(checkpoints[False], device_map={"model": "cpu", "lm_head": "disk"})
    assert "all-meta" not in preflight(loaded, loaded.hf_device_map, mode="run").kinds()  # offloaded, not empty


# -- preflight: "disk" without an offload folder --------------------------------------------------------------------

@pytest.mark.library_text
def test_disk_without_offload_folder(checkpoints, tmp_path):
    path = checkpoints[False]
    dm = {"model": "cpu", "lm_head": "disk"}

    def skeleton():
        with init_empty_weights():
            return AutoModelForCausalLM.from_config(tiny_config(layers=2))

    with pytest.raises(ValueError, match="please pass along an `offload_folder`"):  # accelerate refuses
        load_checkpoint_and_dispatch(skeleton(), path, device_map=dm)
    with pytest.raises(ValueError, match="We need an `offload_dir`"):
        dispatch_model(skeleton(), dm)
    assert AutoModelForCausalLM.from_pretrained(path, device_map=dm).hf_device_map == dm  # transformers: fine
    model = skeleton()
    report = preflight(model, dm, mode="run", loader="load_checkpoint_and_dispatch")
    assert report.kinds() == ["no-offload-folder"]
    assert "offload_folder=" in report.findings[0].fix and "'lm_head'" in report.findings[0].message
    assert "offload_dir=" in preflight(model, dm, loader="dispatch_model").findings[0].fix
    assert preflight(model, dm, loader="load_checkpoint_and_dispatch", offload_folder=tmp_path).ok
    assert preflight(model, dm).ok  # opt-in: a plan without a loader is not flagged
    assert preflight(model, dm, loader="from_pretrained").ok
    assert preflight(model, {"": "cpu"}, loader="load_checkpoint_and_dispatch").ok  # no disk, no folder needed
    with pytest.raises(ValueError, match="loader must be one of"):
        preflight(model, dm, loader="accelerate")


# -- preflight: the fix for unplaced tensors names the map's own key and device ---------------------------------------

def test_unplaced_fix_names_the_layer_and_its_neighbours_device():
    model = meta_llama()
    dm = layer_map()  # layers 0-1 on GPU 0, layers 2-3 and the head on GPU 1
    del dm["model.layers.3"]
    report = preflight(model, dm)
    assert report.kinds() == ["unplaced"]
    f = report.findings[0]
    assert f.message.endswith("the map misses: model.layers.3.")  # the layer, not its leaf modules
    assert "device_map['model.layers.3'] = 1" in f.fix and "'model.layers.2'" in f.fix  # GPU 1, as layer 2
    assert "'cpu'" not in f.fix
    assert preflight(model, {**dm, "model.layers.3": 1}).ok  # the fix, applied, passes

    dm = layer_map()
    del dm["model.layers.1"], dm["model.embed_tokens"]  # nothing before: the next entry's device
    f = preflight(model, dm).findings[0]
    assert "device_map['model.embed_tokens'] = 0" in f.fix and "device_map['model.layers.1'] = 0" in f.fix


def test_unplaced_inside_a_no_split_block_names_the_block():
    model = meta_llama()
    dm = layer_map()
    del dm["model.layers.2"]
    dm["model.layers.2.self_attn"] = 1  # the rest of decoder layer 2 (mlp, norms) has no device
    f = preflight(model, dm).findings[0]
    assert f.kind == "unplaced"
    assert "device_map['model.layers.2'] = 1" in f.fix and f.message.endswith("misses: model.layers.2.")
    assert preflight(model, {**dm, "model.layers.2": 1}).ok
