"""The private library names the workbook relies on (helpers/private_apis.py), checked on the installed versions.

Each entry of ``helpers.private_apis.PRIVATE_NAMES`` has a check here: the name is still there, its
signature is the one the workbook reads, and the behaviour relied on still holds. A failure names the
entry, what changed, where the workbook uses it and the versions it was checked against. A scan of
``helpers/``, ``notebooks/*.py``, ``workers/``, ``tools/`` and ``gpu-reference/tools/`` fails on a
private name or monkey-patch that is not listed. The last sections check the public calls that replaced
private ones (bitsandbytes' library, budgets through ``get_max_memory``), that the workbook's map
checks agree with accelerate's own, and that helpers leave global state (logging, the RNG) as found.
CPU only, a few seconds.
"""

from __future__ import annotations

import functools
import importlib
import importlib.metadata
import importlib.util
import inspect
import logging
import re
from pathlib import Path

import pytest
import torch
from accelerate import dispatch_model
from transformers import AutoModelForCausalLM, LlamaConfig

from helpers.private_apis import CHECKED_AGAINST, PRIVATE_NAMES

ROOT = Path(__file__).resolve().parent.parent
ENTRIES = {e.name: e for e in PRIVATE_NAMES}
CHECKED: set[str] = set()
LIBRARIES = ("transformers", "accelerate", "bitsandbytes", "torch")


def checks(*names: str):
    """Mark a test as the check of these registry entries (every entry needs one)."""
    def mark(fn):
        CHECKED.update(names)
        return fn
    return mark


def changed(name: str, what: str) -> str:
    """The failure message for an entry: what changed, where the workbook uses it and why, the versions."""
    e = ENTRIES[name]
    return (f"{e.library} {importlib.metadata.version(e.library)} (the workbook was checked against "
            f"{CHECKED_AGAINST[e.library]}) changed {e.name} ({e.kind}): {what}. The workbook uses it in "
            f"{', '.join(e.used_in)}: {e.why} Re-read it in the installed source, update those files and "
            f"helpers/private_apis.py.")


def tiny_config(**kw) -> LlamaConfig:
    return LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                       num_key_value_heads=2, vocab_size=1000, **kw)


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("tiny-llama")
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(tiny_config(), dtype=torch.float32).save_pretrained(path)
    return path


def meta_llama(**kw):
    with torch.device("meta"):
        return AutoModelForCausalLM.from_config(tiny_config(**kw))


# -- the registry itself ---------------------------------------------------------------------------------------

def test_registry_is_complete_and_checked():
    assert set(CHECKED_AGAINST) == set(LIBRARIES)
    for e in PRIVATE_NAMES:
        assert e.library in LIBRARIES and e.used_in and e.why, e
        assert e.kind in ("attribute", "function", "monkey-patch", "logger", "message text", "cited", "workaround"), e
    unchecked = sorted(set(ENTRIES) - CHECKED)
    assert not unchecked, f"helpers/private_apis.py lists names no test here checks: {unchecked}"
    assert not CHECKED - set(ENTRIES), f"checks of names the registry does not list: {sorted(CHECKED - set(ENTRIES))}"


def test_installed_versions_are_the_checked_ones():
    """Not a failure of the code: a reminder that the registry was read against other versions."""
    differ = {lib: (importlib.metadata.version(lib), v) for lib, v in CHECKED_AGAINST.items()
              if importlib.metadata.version(lib) != v}
    if differ:
        pytest.skip(f"installed versions differ from helpers.private_apis.CHECKED_AGAINST {differ}: the checks below "
                    f"still run; when they pass, update CHECKED_AGAINST")


SCANNED = ["helpers/*.py", "notebooks/*.py", "workers/*.py", "tools/*.py", "gpu-reference/tools/*.py"]
USE = re.compile(r"""\.(_[a-z]\w*)|(?:getattr|hasattr|setattr)\(\s*[^,()]+,\s*["'](_[a-z]\w*)["']"""
                 r"""|\bfrom\s+[\w.]+\s+import\s+(_[a-z]\w*)""")
MODULE_ALIAS = re.compile(r"^\s*(?:import\s+([\w.]+)\s+as\s+(\w+)|from\s+([\w.]+)\s+import\s+(\w+)\s+as\s+(\w+))", re.M)


def scanned_files() -> list[Path]:
    return sorted(p for pattern in SCANNED for p in ROOT.glob(pattern))


def test_every_private_name_used_is_registered():
    files = {p: p.read_text() for p in scanned_files()}
    own = set()  # private names the workbook defines itself (its own functions, attributes, constants)
    for text in files.values():
        own |= set(re.findall(r"\bdef\s+(_\w+)", text)) | set(re.findall(r"\bclass\s+(_\w+)", text))
        own |= set(re.findall(r"\bself\.(_[a-z]\w*)\s*[:=]", text))
        own |= set(re.findall(r"^\s*(_[a-z]\w*)\s*[:=]", text, re.M))
    # an entry registers every private part of its dotted name (torch._dynamo.utils.counters: _dynamo too)
    registered = {e.short for e in PRIVATE_NAMES} | {p for e in PRIVATE_NAMES for p in e.name.split(".") if p[0] == "_"}
    unlisted = {}
    for path, text in files.items():
        for i, line in enumerate(text.splitlines(), 1):
            for m in USE.finditer(line):
                name = next(g for g in m.groups() if g)
                if name not in own and name not in registered:
                    unlisted.setdefault(name, []).append(f"{path.relative_to(ROOT)}:{i}")
    assert not unlisted, (f"private names used but not listed in helpers/private_apis.py: {unlisted}. Use a public "
                          f"call instead, or list the name there with the reason and add its check here.")


def is_module(dotted: str) -> bool:
    try:
        return importlib.util.find_spec(dotted) is not None
    except (ModuleNotFoundError, ValueError):  # a function or class of a module, not a module
        return False


def test_every_monkey_patch_is_registered():
    """An assignment to an attribute of a library's module (``module.name = ...``) is a monkey-patch."""
    patches = {e.name for e in PRIVATE_NAMES if e.kind == "monkey-patch"}
    unlisted = {}
    for path in scanned_files():
        text = path.read_text()
        modules = {}
        for m in MODULE_ALIAS.finditer(text):
            full, alias = (m.group(1), m.group(2)) if m.group(1) else (f"{m.group(3)}.{m.group(4)}", m.group(5))
            if full.split(".")[0] in LIBRARIES and is_module(full):
                modules[alias] = full
        for alias, full in modules.items():
            for m in re.finditer(rf"(?:^|[^\w.]){alias}\.(\w+)\s*=(?!=)|setattr\(\s*{alias}\s*,\s*[\"'](\w+)", text):
                name = f"{full}.{m.group(1) or m.group(2)}"
                if name not in patches:
                    unlisted.setdefault(name, []).append(str(path.relative_to(ROOT)))
    assert not unlisted, f"monkey-patches of library modules not listed in helpers/private_apis.py: {unlisted}"


# -- transformers ----------------------------------------------------------------------------------------------

@checks("transformers.PreTrainedModel._no_split_modules")
@pytest.mark.parametrize("config", ["llama", "gpt2", "qwen2", "bloom"])
def test_no_split_modules(config):
    import transformers

    cfg = {"llama": tiny_config(), "gpt2": transformers.GPT2Config(n_embd=64, n_layer=2, n_head=2, vocab_size=100),
           "qwen2": transformers.Qwen2Config(hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                             num_attention_heads=4, num_key_value_heads=2, vocab_size=100),
           "bloom": transformers.BloomConfig(hidden_size=64, n_layer=2, n_head=2, vocab_size=100)}[config]
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(cfg)
    name = "transformers.PreTrainedModel._no_split_modules"
    declared = getattr(model, "_no_split_modules", None)
    assert declared, changed(name, f"a {type(model).__name__} has no _no_split_modules ({declared!r})")
    classes = {type(m).__name__ for m in model.modules()}
    assert set(declared) <= classes, changed(
        name, f"it names {sorted(set(declared) - classes)}, which are no module's class")
    from transformers.integrations.accelerate import _get_device_map

    assert "model._no_split_modules" in inspect.getsource(_get_device_map), changed(
        name, "from_pretrained's planner (_get_device_map) no longer reads it")


@checks("transformers.PreTrainedModel._no_placement_params")
def test_no_placement_params():
    from transformers.integrations.accelerate import _get_device_map, infer_auto_device_map

    name = "transformers.PreTrainedModel._no_placement_params"
    assert '"_no_placement_params"' in inspect.getsource(_get_device_map), changed(
        name, "_get_device_map no longer reads it: the planner's copy of that step must follow")
    assert "no_placement_params" in inspect.signature(infer_auto_device_map).parameters, changed(
        name, "transformers' infer_auto_device_map takes no no_placement_params any more")


@checks("transformers.integrations.accelerate._get_device_map")
def test_get_device_map():
    import transformers.integrations.accelerate as hf_accelerate

    name = "transformers.integrations.accelerate._get_device_map"
    fn = getattr(hf_accelerate, "_get_device_map", None)
    assert fn is not None, changed(name, "the function is gone")
    params = list(inspect.signature(fn).parameters)
    assert params == ["model", "device_map", "max_memory", "hf_quantizer"], changed(
        name, f"its parameters are {params}")
    from helpers.quiet import quiet_planning

    with quiet_planning():  # "Device 1 is not available": expected, planning for GPUs this machine lacks
        got = fn(meta_llama(), "auto", {0: 10**5, 1: 10**6, "cpu": 10**9}, None)
    assert isinstance(got, dict) and set(got.values()) <= {0, 1, "cpu", "disk"}, changed(name, f"it returned {got!r}")


@checks("transformers.integrations.accelerate.infer_auto_device_map")
def test_from_pretrained_plans_through_the_module_attribute(checkpoint, monkeypatch):
    import transformers.integrations.accelerate as hf_accelerate

    name = "transformers.integrations.accelerate.infer_auto_device_map"
    seen = {}
    original = hf_accelerate.infer_auto_device_map

    def recording(*args, **kwargs):
        seen["map"] = original(*args, **kwargs)
        return seen["map"]

    monkeypatch.setattr(hf_accelerate, "infer_auto_device_map", recording)
    model = AutoModelForCausalLM.from_pretrained(checkpoint, device_map="auto", max_memory={"cpu": 10**9})
    assert "map" in seen, changed(name, "from_pretrained(device_map='auto') no longer calls it through its module, "
                                        "so notebook 03 cannot read the map it computed")
    assert set(seen["map"].values()) == {"cpu"} and next(model.parameters()).device.type == "cpu"


@checks("transformers.distributed.mixin.DistributedMixin._resolve_parallel_plans")
def test_resolve_parallel_plans():
    from transformers.distributed import DistributedConfig

    name = "transformers.distributed.mixin.DistributedMixin._resolve_parallel_plans"
    model = meta_llama()
    fn = getattr(model, "_resolve_parallel_plans", None)
    assert fn is not None, changed(name, "the method is gone")
    assert list(inspect.signature(fn).parameters) == ["distributed_config"], changed(
        name, f"its parameters are {list(inspect.signature(fn).parameters)}")
    plans = fn(DistributedConfig(tp_size=2))
    assert isinstance(plans, tuple) and len(plans) == 3, changed(name, f"it returned {type(plans).__name__}")
    tp = plans[0]
    assert tp.get("model.layers.0.self_attn.q_proj") == "colwise" and "model.layers.1.mlp.down_proj" in tp, changed(
        name, f"the tensor-parallel plan it resolves names no concrete layer: {sorted(tp)[:4]}")
    with pytest.raises(ValueError):  # an empty override with tp_size > 1: refused
        meta_llama()._resolve_parallel_plans(DistributedConfig(tp_size=2, tp_plan={}))


@checks("transformers.PreTrainedModel._weight_conversions", "torch.nn.Parameter._is_hf_initialized")
def test_marks_of_a_model_from_pretrained(checkpoint):
    from accelerate import init_empty_weights

    from helpers.preflight import preflight

    with init_empty_weights():
        loaded = AutoModelForCausalLM.from_pretrained(checkpoint)
        skeleton = AutoModelForCausalLM.from_config(tiny_config())
    assert all(p.is_meta for p in loaded.parameters())
    assert getattr(loaded, "_weight_conversions", None) is not None, changed(
        "transformers.PreTrainedModel._weight_conversions", "from_pretrained no longer sets it")
    assert any(getattr(p, "_is_hf_initialized", False) for p in loaded.parameters()), changed(
        "torch.nn.Parameter._is_hf_initialized", "from_pretrained no longer marks the parameters it loaded")
    assert getattr(skeleton, "_weight_conversions", None) is None, changed(
        "transformers.PreTrainedModel._weight_conversions", "from_config sets it too: it no longer tells them apart")
    assert not any(getattr(p, "_is_hf_initialized", False) for p in skeleton.parameters()), changed(
        "torch.nn.Parameter._is_hf_initialized", "from_config marks its parameters too")
    assert "all-meta" in preflight(loaded, {"": "cpu"}, mode="run").kinds()
    assert "all-meta" not in preflight(skeleton, {"": "cpu"}, mode="run").kinds()


@checks("transformers.quantizers.quantizer_bnb_4bit.Bnb4BitHfQuantizer._process_model_before_weight_loading")
def test_fp32_cpu_offload_leaves_the_modules_a_dict_maps_off_the_gpu_unquantized():
    from transformers import BitsAndBytesConfig
    from transformers.quantizers import AutoHfQuantizer
    from transformers.quantizers.quantizer_bnb_4bit import Bnb4BitHfQuantizer

    name = "transformers.quantizers.quantizer_bnb_4bit.Bnb4BitHfQuantizer._process_model_before_weight_loading"
    assert hasattr(Bnb4BitHfQuantizer, "_process_model_before_weight_loading"), changed(name, "the method is gone")
    model = meta_llama()
    qc = BitsAndBytesConfig(load_in_4bit=True, llm_int8_enable_fp32_cpu_offload=True)
    quantizer = AutoHfQuantizer.from_config(qc, pre_quantized=False)
    device_map = {"model.embed_tokens": 0, "model.layers.0": 0, "model.layers.1": "cpu", "model.norm": "cpu",
                  "model.rotary_emb": "cpu", "lm_head": "cpu"}
    quantizer.preprocess_model(model=model, dtype=torch.bfloat16, device_map=device_map, checkpoint_files=None,
                               use_kernels=False)
    kinds = {n: type(m).__name__ for n, m in model.named_modules() if n.endswith("mlp.up_proj")}
    assert kinds == {"model.layers.0.mlp.up_proj": "Linear4bit", "model.layers.1.mlp.up_proj": "Linear"}, changed(
        name, f"with the flag and a device_map dict the layers became {kinds} (layer 0 on GPU 0, layer 1 on 'cpu')")


@checks("transformers.quantizers.quantizer_gguf.GgufHfQuantizer.is_serializable")
def test_a_gguf_quantizer_blocks_save_pretrained_until_detached(tmp_path):
    from transformers.quantizers.quantizer_gguf import GgufHfQuantizer
    from transformers.utils.quantization_config import GgufConfig

    name = "transformers.quantizers.quantizer_gguf.GgufHfQuantizer.is_serializable"
    model = AutoModelForCausalLM.from_config(tiny_config())
    model.hf_quantizer = GgufHfQuantizer(GgufConfig())
    with pytest.raises(ValueError):
        model.save_pretrained(tmp_path / "refused")
    model.hf_quantizer = None  # what helpers.checkpoints does before saving
    model.save_pretrained(tmp_path / "saved")
    assert (tmp_path / "saved" / "model.safetensors").is_file(), changed(name, "save_pretrained wrote no weights")


def test_gguf_quantizer_still_refuses_to_save():
    """When this fails, transformers saves GGUF-loaded models itself: the workaround can go."""
    from transformers.quantizers.quantizer_gguf import GgufHfQuantizer
    from transformers.utils.quantization_config import GgufConfig

    assert GgufHfQuantizer(GgufConfig()).is_serializable() is False, changed(
        "transformers.quantizers.quantizer_gguf.GgufHfQuantizer.is_serializable",
        "a GGUF quantizer is now serializable: helpers.checkpoints no longer needs to detach it")


# -- accelerate ------------------------------------------------------------------------------------------------

@pytest.fixture
def offloaded(tmp_path, monkeypatch):
    """A tiny random model to dispatch with layer 1 on disk (main device: the CPU), and the records logged.

    The logger starts without filters, whatever an earlier test of this session left on it.
    """
    monkeypatch.setattr(logging.getLogger("accelerate.big_modeling"), "filters", [])
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(tiny_config(), dtype=torch.float32).eval()
    device_map = {"model.embed_tokens": "cpu", "model.layers.0": "cpu", "model.layers.1": "disk", "model.norm": "cpu",
                  "model.rotary_emb": "cpu", "lm_head": "cpu"}
    records: list[logging.LogRecord] = []

    class Keep(logging.Handler):
        def emit(self, record):
            records.append(record)

    logger, handler = logging.getLogger("accelerate.big_modeling"), Keep(logging.WARNING)
    logger.addHandler(handler)
    try:
        yield model, device_map, tmp_path, records
    finally:
        logger.removeHandler(handler)


@checks("torch.nn.Module._hf_hook", "torch.nn.Module._old_forward")
def test_dispatch_hooks(offloaded):
    model, device_map, folder, _ = offloaded
    dispatch_model(model, device_map, offload_dir=str(folder))
    layer = model.model.layers[1]
    hook = getattr(layer, "_hf_hook", None)
    assert hook is not None, changed("torch.nn.Module._hf_hook", "dispatch_model attached no hook there")
    for field in ("execution_device", "offload", "weights_map"):
        assert hasattr(hook, field), changed("torch.nn.Module._hf_hook", f"its hook has no {field}")
    leaf = layer.mlp.up_proj._hf_hook  # offloaded weights are loaded by the hooks of the leaves, not the block's
    assert leaf.offload and "weight" in leaf.weights_map, changed(
        "torch.nn.Module._hf_hook", "the hook of a disk layer's Linear does not hold its weight")
    assert callable(getattr(layer, "_old_forward", None)), changed("torch.nn.Module._old_forward",
                                                                   "the module's own forward is not kept there")
    out = model(torch.tensor([[1, 2, 3]])).logits
    assert out.shape == (1, 3, 1000) and torch.isfinite(out).all()


@checks("accelerate.big_modeling")
@pytest.mark.library_text
def test_offload_notice_starts_with_the_text_quiet_drops(offloaded):
    from helpers.quiet import KNOWN_MESSAGES, known_warnings_silenced

    model, device_map, folder, records = offloaded
    logger = logging.getLogger("accelerate.big_modeling")
    before = list(logger.filters)
    with known_warnings_silenced():
        dispatch_model(model, device_map, offload_dir=str(folder))
    assert logger.filters == before, "known_warnings_silenced left a filter behind"
    assert not records, f"the notice was not dropped: {[r.getMessage() for r in records]}"
    dispatch_model(AutoModelForCausalLM.from_config(tiny_config(), dtype=torch.float32), device_map,
                   offload_dir=str(folder / "again"))
    messages = [r.getMessage() for r in records]
    assert any(m.startswith(KNOWN_MESSAGES["accelerate.big_modeling"]) for m in messages), changed(
        "accelerate.big_modeling", f"dispatch_model with offload now logs {messages}")


@checks("accelerate.utils.modeling.tqdm")
def test_accelerate_loading_bar(monkeypatch):
    import accelerate.utils.modeling as modeling
    from accelerate.utils.tqdm import tqdm as accelerate_tqdm

    from helpers.quiet import known_warnings_silenced

    name = "accelerate.utils.modeling.tqdm"
    if isinstance(modeling.tqdm, functools.partial):  # an earlier silence_known_warnings() of this session
        monkeypatch.setattr(modeling, "tqdm", modeling.tqdm.func)
    assert modeling.tqdm is accelerate_tqdm, changed(
        name, "load_state_dict's module no longer uses accelerate's wrapper")
    assert "tqdm(" in inspect.getsource(modeling.load_state_dict), changed(
        name, "load_state_dict makes no bar any more")
    monkeypatch.setenv("TQDM_DISABLE", "1")
    bar = modeling.tqdm(total=1, main_process_only=False)
    shown = not bar.disable
    bar.close()
    assert shown, changed(name, "its bar now obeys TQDM_DISABLE: helpers.quiet need not replace it any more")
    with known_warnings_silenced():
        bar = modeling.tqdm(total=1, main_process_only=False)
        assert bar.disable
        bar.close()
    assert modeling.tqdm is accelerate_tqdm, "known_warnings_silenced did not put accelerate's bar back"


@checks("accelerate.utils.modeling", "transformers.integrations.accelerate", "bitsandbytes.backends.cpu.ops",
        "bitsandbytes.autograd._functions")
@pytest.mark.parametrize("name", ["accelerate.utils.modeling", "transformers.integrations.accelerate",
                                  "bitsandbytes.backends.cpu.ops", "bitsandbytes.autograd._functions"])
def test_loggers_are_named_after_their_modules(name):
    module = importlib.import_module(name)
    logger = getattr(module, "logger", None)
    assert logger is not None and logger.name == name, changed(
        name, f"the module logs through {getattr(logger, 'name', None)!r}, so helpers.quiet quiets nothing")


def test_absent_gpu_notice_comes_from_the_planning_logger(caplog):
    from accelerate.utils import get_max_memory

    from helpers.quiet import PLANNING, quiet_planning

    if torch.cuda.device_count() > 7:
        pytest.skip("this machine has a GPU 7")
    with caplog.at_level(logging.WARNING):
        get_max_memory({7: 10**6})
    assert {r.name for r in caplog.records} <= set(PLANNING) and caplog.records, changed(
        "accelerate.utils.modeling", f"the absent-GPU notice came from {[r.name for r in caplog.records]}")
    caplog.clear()
    with caplog.at_level(logging.WARNING), quiet_planning():
        get_max_memory({7: 10**6})
    assert not caplog.records


# -- public calls that replaced private ones ------------------------------------------------------------------

def test_bnb_library_names_the_library_really_loaded():
    """helpers.hardware asks bitsandbytes' public selection; the process's own map says what was loaded."""
    from helpers.hardware import bnb_library

    lib = bnb_library()
    mapped = {Path(line.split()[-1]).name for line in Path("/proc/self/maps").read_text().splitlines()
              if "libbitsandbytes" in line}
    assert lib["backend"] in ("cpu", "cuda", "xpu") and lib["library"] in mapped, (lib, mapped)
    assert (lib["cuda"] is None) == (lib["backend"] != "cuda")


def test_bnb_library_changes_no_logging():
    from helpers.hardware import bnb_library

    loggers = {name: logging.getLogger(name) for name in ("bitsandbytes.backends.cpu.ops", "accelerate.big_modeling")}
    before = {n: (lg.level, list(lg.filters)) for n, lg in loggers.items()}
    bnb_library()
    assert {n: (lg.level, list(lg.filters)) for n, lg in loggers.items()} == before


@pytest.mark.parametrize("budget", [{"cuda:0": "1GiB"}, {0: "lots"}, {0: "infGB"}, {torch.device("cpu"): 10}])
def test_budget_refusals_quote_accelerates_own_error(budget):
    from accelerate.utils import get_max_memory

    from helpers.budgets import parse_budget

    with pytest.raises((ValueError, OverflowError)) as theirs:
        get_max_memory(dict(budget))
    with pytest.raises(ValueError) as ours:
        parse_budget(budget)
    assert str(theirs.value) in str(ours.value) and ours.value.__cause__ is not None


def test_budgets_are_accelerates_numbers():
    from accelerate.utils import get_max_memory

    from helpers.budgets import parse_budget

    budget = {"cpu": "3GB", 1: "2.5GiB", 0: 10**9, "disk": 2.5e9}
    assert parse_budget(budget) == get_max_memory(dict(budget)) and list(parse_budget(budget)) == list(budget)


# -- the workbook's map checks agree with accelerate's public ones -------------------------------------------

def full_map(skip: str = "") -> dict:
    dm = {"model.embed_tokens": 0, "model.layers.0": 0, "model.layers.1": 1, "model.norm": 1, "model.rotary_emb": 1,
          "lm_head": 1}
    dm.pop(skip, None)
    return dm


@pytest.mark.parametrize("skip", ["", "model.layers.1", "lm_head", "model.norm"])
def test_unplaced_agrees_with_check_device_map(skip):
    from accelerate.utils import check_device_map

    from helpers.preflight import preflight

    model = meta_llama()
    try:
        check_device_map(model, full_map(skip))
        accelerate_refuses = False
    except ValueError:
        accelerate_refuses = True
    assert ("unplaced" in preflight(model, full_map(skip)).kinds()) == accelerate_refuses


@pytest.mark.parametrize("head", [0, 1])
def test_tied_split_agrees_with_check_tied_parameters_on_same_device(head, caplog):
    from accelerate.utils import check_tied_parameters_on_same_device, find_tied_parameters

    from helpers.preflight import preflight

    model = AutoModelForCausalLM.from_config(tiny_config(tie_word_embeddings=True))
    dm = {**full_map(), "lm_head": head}
    with caplog.at_level(logging.WARNING, logger="accelerate.utils.modeling"):
        check_tied_parameters_on_same_device(find_tied_parameters(model), dm)
    accelerate_warns = any(r.name == "accelerate.utils.modeling" for r in caplog.records)
    assert ("tied-split" in preflight(model, dm).kinds()) == accelerate_warns == (head != 0)


# -- helpers leave global state as they found it ------------------------------------------------------------

def test_known_warnings_silenced_restores_everything(monkeypatch):
    import accelerate.utils.modeling as modeling

    from helpers.quiet import KNOWN, KNOWN_MESSAGES, known_warnings_silenced

    monkeypatch.setenv("TQDM_DISABLE", "1")
    if isinstance(modeling.tqdm, functools.partial):  # an earlier silence_known_warnings() of this session
        monkeypatch.setattr(modeling, "tqdm", modeling.tqdm.func)
    names = list(KNOWN) + list(KNOWN_MESSAGES)
    for n in names:  # start from loggers as a fresh session has them
        monkeypatch.setattr(logging.getLogger(n), "filters", [])
        monkeypatch.setattr(logging.getLogger(n), "level", logging.NOTSET)
    before = {n: (logging.getLogger(n).level, list(logging.getLogger(n).filters)) for n in names}
    bar = modeling.tqdm
    with known_warnings_silenced():
        assert all(logging.getLogger(n).level == level for n, level in KNOWN.items())
        assert all(logging.getLogger(n).filters for n in KNOWN_MESSAGES)
        assert modeling.tqdm is not bar
    assert {n: (logging.getLogger(n).level, list(logging.getLogger(n).filters)) for n in names} == before
    assert modeling.tqdm is bar


def test_random_model_leaves_the_callers_rng_alone():
    from helpers.shapes import random_model

    torch.manual_seed(123)
    expected = torch.rand(4)
    torch.manual_seed(123)
    a = random_model(tiny_config(), dtype=torch.float32, seed=0)
    assert torch.equal(torch.rand(4), expected), "random_model moved the caller's random stream"
    b = random_model(tiny_config(), dtype=torch.float32, seed=0)
    c = random_model(tiny_config(), dtype=torch.float32, seed=1)
    assert all(torch.equal(x, y) for x, y in zip(a.parameters(), b.parameters())), "same seed, other weights"
    assert not torch.equal(a.lm_head.weight, c.lm_head.weight), "another seed, the same weights"
    torch.manual_seed(0)
    reference = AutoModelForCausalLM.from_config(tiny_config(), dtype=torch.float32)
    assert torch.equal(reference.lm_head.weight, a.lm_head.weight), "seed s should give torch.manual_seed(s)'s weights"


def test_no_hidden_quieting_in_helpers():
    """Only the notebooks (their first cell) and tests call the quieting; no helper does it on the side."""
    callers = [str(p.relative_to(ROOT)) for p in ROOT.glob("helpers/*.py")
               if p.name != "quiet.py" and re.search(r"\bsilence_known_warnings\s*\(", p.read_text())]
    assert not callers, f"helpers that change global logging as a side effect: {callers}"


@checks("torch._dynamo.utils.counters")
def test_dynamo_counts_the_graphs_it_compiles():
    from helpers.speed import compiled_graphs

    before = compiled_graphs()
    f = torch.compile(lambda x: x * 2 + 1, backend="eager")  # dynamo only: no inductor compile, a second
    f(torch.ones(3))
    assert compiled_graphs() == before + 1, changed("torch._dynamo.utils.counters",
                                                    "counters['stats']['unique_graphs'] did not rise by 1")
    f(torch.ones(3))
    assert compiled_graphs() == before + 1, changed("torch._dynamo.utils.counters", "a cached graph was counted again")


@checks("torch._inductor.config.coordinate_descent_tuning")
def test_inductor_has_the_tuning_switch():
    import torch._inductor.config as inductor_config

    assert isinstance(getattr(inductor_config, "coordinate_descent_tuning", None), bool), changed(
        "torch._inductor.config.coordinate_descent_tuning", "no such boolean setting")


@checks("torch.utils._pytree")
def test_pytree_logs_the_enum_message_quiet_drops():
    import torch.utils._pytree as pytree

    source = Path(pytree.__file__).read_text()
    assert "is an Enum subclass and is now natively supported" in source, changed(
        "torch.utils._pytree", "the message quiet.KNOWN drops is no longer in the module")
    assert "getLogger(__name__)" in source, changed("torch.utils._pytree", "it no longer logs under its module's name")


def test_each_private_name_lists_the_notebooks_that_use_it():
    """``used_in`` names exactly the notebooks whose source spells the name (kept true through renumbering)."""
    sources = {f"notebooks/{p.name[:2]}": p.read_text() for p in sorted((ROOT / "notebooks").glob("[0-9][0-9]_*.py"))}
    wrong = {}
    for e in PRIVATE_NAMES:
        if not e.short.startswith("_") and e.kind != "monkey-patch":
            continue  # loggers and module names are spelt in many places without being used
        listed = {u for u in e.used_in if u.startswith("notebooks/")}
        found = {nb for nb, text in sources.items() if e.short in text}
        # a monkey-patched public function is called in many notebooks and patched in the listed ones only
        if listed != found and not (e.kind == "monkey-patch" and not e.short.startswith("_") and listed <= found):
            wrong[e.name] = {"listed": sorted(listed), "spelt in": sorted(found)}
    assert not wrong, f"helpers/private_apis.py: used_in does not match the notebooks: {wrong}"
