"""Unit tests of helpers.preflight (the pre-flight check), helpers.budgets and helpers.devicemap (the table, the plot).

They use small Llama configs on the meta device (no weights, no checkpoint),
plus the bundled checkpoint's index for the checkpoint checks.
"""

from __future__ import annotations

import ast
import warnings
from collections import OrderedDict
from pathlib import Path

import pytest
import torch
from accelerate import init_empty_weights
from accelerate.utils import compute_module_sizes
from transformers import AutoModelForCausalLM, LlamaConfig

import helpers.budgets
import helpers.preflight
from helpers.budgets import BudgetWarning, parse_budget
from helpers.devicemap import device_map_of, map_table, placement, plot_device_map
from helpers.preflight import Report, _checkpoint_keys as checkpoint_keys, _declared_ties as declared_ties, preflight



pytestmark = pytest.mark.usefixtures("quiet_accelerate")


def tiny_config(tie=True, layers=4):
    return LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=layers, num_attention_heads=4,
                       num_key_value_heads=2, vocab_size=1000, tie_word_embeddings=tie)


def meta_llama(tie=True, layers=4, dtype=torch.float32):
    with torch.device("meta"):
        return AutoModelForCausalLM.from_config(tiny_config(tie, layers), dtype=dtype)


def full_map(n_layers=4, layer_dev=lambda i: 0, embed=0, head=0):
    dm = {"model.embed_tokens": embed}
    dm.update({f"model.layers.{i}": layer_dev(i) for i in range(n_layers)})
    dm.update({"model.norm": head, "model.rotary_emb": head, "lm_head": head})
    return dm


# -- budget parsing ---------------------------------------------------------

def test_parse_budget_units_and_keys():
    b = parse_budget({0: "35GiB", 1: "500MB", "cpu": 1000, "disk": 2.5e9})
    assert b == {0: 35 * 2**30, 1: 500 * 10**6, "cpu": 1000, "disk": 2_500_000_000}
    # "cuda:1" as a max_memory key: accelerate's get_max_memory refuses it ("Device cuda:1 is not recognized"),
    # and so does from_pretrained; the workbook refuses it too, naming the id to use (tests/test_bad_budgets.py).
    with pytest.raises(ValueError, match=r"max_memory=\{1: \.\.\.\}"):
        parse_budget({0: "35GiB", "cuda:1": "500MB"})


@pytest.mark.parametrize("bad", [{0: "lots"}, {"meta": "1GB"}, {"gpu0": 10}])
def test_parse_budget_rejects_bad_input(bad):
    with pytest.raises(ValueError, match="max_memory"):
        parse_budget(bad)


HELPERS = Path(__file__).resolve().parent.parent / "helpers"


def helper_imports() -> dict[str, set[str]]:
    """{module: the helpers modules it imports}, top-level and inside functions alike."""
    graph = {}
    for path in sorted(HELPERS.glob("*.py")):
        deps = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.level == 1 and node.module:
                deps.add(node.module.split(".")[0])
        graph[path.stem] = deps
    return graph


def test_helper_imports_run_one_way():
    """No two helpers import each other, directly or around a loop: budgets has one owner (helpers.budgets)."""
    graph = helper_imports()
    assert "devicemap" in graph["budgets"] and "budgets" in graph["preflight"]
    assert not graph["devicemap"] & {"budgets", "preflight", "planner"}, "devicemap is the vocabulary: it imports none"

    def reaches(start, goal, seen=()):
        return any(d == goal or (d not in seen and reaches(d, goal, seen + (d,))) for d in graph.get(start, ()))

    loops = sorted(m for m in graph if reaches(m, m))
    assert not loops, f"helpers that import themselves around a loop: {loops}"


def test_preflight_still_offers_the_budget_names_notebooks_import_from_it():
    # notebooks 06 and 08 write `from helpers.preflight import parse_budget, preflight`
    assert helpers.preflight.parse_budget is helpers.budgets.parse_budget
    assert helpers.preflight.BudgetWarning is helpers.budgets.BudgetWarning


def test_budget_warnings_point_at_the_callers_line():
    """A BudgetWarning names the learner's line, whether it comes from parse_budget or from preflight."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        parse_budget({0: "24Gb"})
        preflight(meta_llama(), {"": "cpu"}, {"cpu": "24Gb"})
    assert [w.category for w in caught] == [BudgetWarning, BudgetWarning]
    assert {Path(w.filename).name for w in caught} == {Path(__file__).name}


# -- devices -----------------------------------------------------------------

def test_plan_mode_accepts_hypothetical_gpus_without_cuda(monkeypatch):
    def boom(name):
        def refuse(*a, **k):
            raise AssertionError(f"planning mode must not touch a GPU (torch.cuda.{name})")
        return refuse  # one function per name: torch's dynamo refuses the same function patched twice

    monkeypatch.setattr(torch.cuda, "device_count", lambda: 0)  # accelerate's get_max_memory counts the GPUs
    for name in ("mem_get_info", "get_device_properties", "set_device", "init", "synchronize"):
        monkeypatch.setattr(torch.cuda, name, boom(name))
    model = meta_llama()
    dm = full_map(layer_dev=lambda i: i % 8, embed=0, head=0)
    dm["model.layers.3"] = "cuda:7"
    report = preflight(model, dm, {i: "80GiB" for i in range(8)})
    assert report.ok, str(report)
    assert 7 in report.bytes_per_device


def test_run_mode_names_the_absent_device(monkeypatch):
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    model = meta_llama()
    report = preflight(model, full_map(layer_dev=lambda i: i // 2), mode="run")
    assert report.kinds() == ["absent-device"]
    assert "GPU 1" in report.findings[0].message and "1 CUDA GPU" in report.findings[0].message
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    assert preflight(model, full_map(layer_dev=lambda i: i // 2), mode="run").ok


def test_meta_and_nonsense_devices_are_findings():
    model = meta_llama()
    dm = full_map()
    dm["model.layers.1"] = "meta"
    dm["model.layers.2"] = -1
    report = preflight(model, dm)
    assert report.kinds() == ["unknown-device", "unknown-device"]
    assert "meta device holds no data" in report.findings[0].message


def test_torch_device_values_are_understood():
    model = meta_llama()
    dm = full_map(layer_dev=lambda i: torch.device("cpu"), embed="cpu", head="cpu")
    assert preflight(model, dm, mode="run").ok


def test_unplaced_and_unknown_keys():
    model = meta_llama()
    dm = full_map()
    del dm["model.norm"]
    dm["modle.norm"] = 0
    report = preflight(model, dm)
    assert set(report.kinds()) == {"unplaced", "unknown-module"}
    assert "model.norm" in str(report) and "'modle.norm'" in str(report)


def test_catch_all_key_and_longest_prefix():
    model = meta_llama()
    report = preflight(model, {"": "cpu", "model.layers.0": 0}, {"cpu": "1GB", 0: "1GB"})
    assert report.ok
    sizes = compute_module_sizes(model)
    assert report.bytes_per_device[0] == sizes["model.layers.0"]
    assert report.bytes_per_device[0] + report.bytes_per_device["cpu"] == sizes[""]


def test_mode_and_map_type_are_validated():
    model = meta_llama()
    with pytest.raises(ValueError, match="mode"):
        preflight(model, {"": 0}, mode="dry")
    with pytest.raises(ValueError, match="infer_auto_device_map"):
        preflight(model, "auto")


# -- ties ----------------------------------------------------------------------

def test_ties_read_from_the_declaration_on_meta():
    with init_empty_weights():
        lost = AutoModelForCausalLM.from_config(tiny_config())
    assert lost.lm_head.weight is not lost.model.embed_tokens.weight
    assert declared_ties(lost) == [("lm_head.weight", "model.embed_tokens.weight")]
    report = preflight(lost, full_map())
    assert report.kinds() == ["tie-lost"]
    assert "tie_weights()" in report.findings[0].fix
    lost.tie_weights()
    assert preflight(lost, full_map()).ok
    assert declared_ties(meta_llama(tie=False)) == []


def test_tied_split_either_way():
    model = meta_llama()
    for embed, head in [(0, "cpu"), ("cpu", "disk"), ("disk", "cpu"), (1, 0)]:
        report = preflight(model, full_map(embed=embed, head=head))
        assert "tied-split" in report.kinds(), (embed, head, str(report))


class TwoTies(torch.nn.Module):
    """Two tied pairs, neither of them an lm_head: the check must cover both."""

    def __init__(self):
        super().__init__()
        self.enc = torch.nn.Linear(4, 4)
        self.dec = torch.nn.Linear(4, 4)
        self.aux_in = torch.nn.Embedding(10, 4)
        self.aux_out = torch.nn.Linear(4, 10, bias=False)
        self.dec.weight = self.enc.weight
        self.aux_out.weight = self.aux_in.weight


def test_every_tied_pair_is_checked():
    model = TwoTies()
    ok = {"enc": "cpu", "dec": "cpu", "aux_in": 0, "aux_out": 0}
    assert preflight(model, ok).ok
    report = preflight(model, {**ok, "aux_out": "cpu"})
    assert report.kinds() == ["tied-split"] and "aux_out.weight" in str(report)
    report = preflight(model, {**ok, "dec": 1})
    assert report.kinds() == ["tied-split"] and "dec.weight" in str(report)


def test_checkpoint_keys_and_missing_tied_key(tmp_path):
    from helpers.checkpoints import resolve_model

    path = resolve_model("bundled")
    keys = checkpoint_keys(path)
    assert "model.embed_tokens.weight" in keys and "lm_head.weight" not in keys
    with pytest.raises(FileNotFoundError, match="save_pretrained"):
        checkpoint_keys(tmp_path)


# -- no-split ------------------------------------------------------------------

def test_no_split_cut_uses_the_models_own_list_even_when_given_empty():
    model = meta_llama()
    dm = full_map()
    del dm["model.layers.2"]
    dm.update({"model.layers.2.self_attn": 0, "model.layers.2.mlp": 1, "model.layers.2.input_layernorm": 0,
               "model.layers.2.post_attention_layernorm": 1})
    for given in (None, []):
        report = preflight(model, dm, no_split_module_classes=given)
        assert report.kinds() == ["no-split-cut"], str(report)
        assert "model.layers.2 (LlamaDecoderLayer)" in report.findings[0].message


def test_no_split_unknown_class_suggests_the_right_one():
    model = meta_llama()
    report = preflight(model, full_map(), no_split_module_classes=["LLamaDecoderLayer"])
    assert report.kinds() == ["no-split-unknown"]
    assert "Did you mean 'LlamaDecoderLayer'" in report.findings[0].message


# -- budget --------------------------------------------------------------------

def test_over_budget_counts_in_the_given_dtype():
    model = meta_llama()
    total = compute_module_sizes(model)[""]  # float32 bytes
    dm = {"": 0}
    assert preflight(model, dm, {0: total}).ok
    over = preflight(model, dm, {0: total // 2 + 1000})
    assert over.kinds() == ["over-budget"] and "GPU 0" in over.findings[0].message
    assert preflight(model, dm, {0: total // 2 + 1000}, dtype=torch.bfloat16).ok
    assert preflight(model, dm, {0: total // 2 + 1000}, dtype="bfloat16").bytes_per_device[0] <= total // 2 + 1000


def test_device_without_budget():
    model = meta_llama()
    report = preflight(model, full_map(layer_dev=lambda i: "cpu" if i else 0), {0: "1GB"})
    assert report.kinds() == ["no-budget"]


# -- quantized -----------------------------------------------------------------

def test_quantized_offload_rules():
    model = meta_llama()
    model.is_quantized = True
    model.config.quantization_config = {"quant_method": "bitsandbytes", "load_in_4bit": True}
    assert preflight(model, {"": "cpu"}).ok
    assert preflight(model, {"": 0}).ok
    mixed = full_map(layer_dev=lambda i: "disk" if i > 1 else 0)
    assert preflight(model, mixed).kinds() == ["quantized-offload"]
    model.config.quantization_config["llm_int8_enable_fp32_cpu_offload"] = True
    assert preflight(model, mixed).ok
    assert preflight(model, {"": "disk"}).kinds() == ["quantized-offload"]


def test_fp32_cpu_offload_flag_as_transformers_applies_it():
    """With the flag, from_pretrained leaves the modules a dict maps to cpu/disk unquantized (quantizer_bnb_4bit.py,
    _process_model_before_weight_loading); with "auto" it quantizes first and the flag does nothing."""
    pytest.importorskip("bitsandbytes")
    from transformers import BitsAndBytesConfig
    from transformers.quantizers import AutoHfQuantizer

    dict_map = full_map(layer_dev=lambda i: "cpu" if i >= 2 else 0)
    qc = BitsAndBytesConfig(load_in_4bit=True, llm_int8_enable_fp32_cpu_offload=True)

    def prepared(device_map):
        model = meta_llama(dtype=torch.bfloat16)
        quantizer = AutoHfQuantizer.from_config(qc, pre_quantized=False)
        quantizer.preprocess_model(model=model, dtype=torch.bfloat16, device_map=device_map, checkpoint_files=None,
                                   use_kernels=False)
        return model, quantizer

    model, quantizer = prepared(dict_map)  # the recipe: layers 2-3 stay plain bf16 Linear on the CPU
    assert type(model.model.layers[3].mlp.up_proj).__name__ == "Linear"
    assert type(model.model.layers[0].mlp.up_proj).__name__ == "Linear4bit"
    assert preflight(model, dict_map, hf_quantizer=quantizer).ok
    model, quantizer = prepared("auto")  # planned after quantizing: the CPU layers are 4-bit, offloaded
    report = preflight(model, dict_map, hf_quantizer=quantizer)
    assert report.kinds() == ["quantized-offload"] and "acts only on a device_map dict" in str(report)
    cpu_only = {k: "cpu" if v == 0 else v for k, v in dict_map.items()}
    model, quantizer = prepared(cpu_only)  # no GPU in the map: nothing is quantized at all
    assert not any(type(m).__name__ == "Linear4bit" for m in model.modules())
    report = preflight(model, cpu_only, hf_quantizer=quantizer)
    assert report.kinds() == ["quantized-offload"] and "nothing is quantized" in str(report)


# -- report, table, plot -----------------------------------------------------------

def test_report_text_and_raise():
    model = meta_llama()
    good = preflight(model, full_map())
    assert str(good).startswith("pre-flight check: OK (GPU 0 ")
    good.raise_if_problems()
    bad = preflight(model, full_map(head="cpu"))
    with pytest.raises(ValueError, match=r"1 problem\(s\)[\s\S]*fix:"):
        bad.raise_if_problems()
    assert isinstance(bad, Report) and not bad.ok


def test_map_table_rows_and_totals():
    model = meta_llama(layers=6)
    dm = full_map(6, layer_dev=lambda i: 0 if i < 3 else 1, embed=0, head=1)
    dm["lm_head"] = 0
    table = map_table(model, dm)
    assert list(table.columns) == ["device", "modules", "parameters", "bytes", "GiB"]
    assert list(table["device"]) == [0, 1]
    assert table.loc[0, "modules"] == "embed_tokens, layers 0-2, lm_head"
    assert table.loc[1, "modules"] == "layers 3-5, norm, rotary_emb"
    assert table["parameters"].sum() == sum(p.numel() for p in model.parameters())
    assert table["bytes"].sum() == compute_module_sizes(model)[""]
    half = map_table(model, dm, dtype=torch.bfloat16)
    assert half["bytes"].sum() == table["bytes"].sum() // 2


def test_map_table_marks_cut_layers_and_unplaced():
    model = meta_llama()
    dm = full_map()
    del dm["model.layers.1"], dm["model.norm"]
    dm.update({"model.layers.1.self_attn": 0, "model.layers.1.mlp": "cpu", "model.layers.1.input_layernorm": 0,
               "model.layers.1.post_attention_layernorm": "cpu"})
    table = map_table(model, dm)
    assert list(table["device"]) == [0, "cpu", "(none)"]
    assert "layers 1 (part)" in table.loc[0, "modules"] and "layers 1 (part)" in table.loc[1, "modules"]
    assert table.loc[2, "modules"] == "norm"


def test_plot_device_map_two_panels_and_single_axes():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    model = meta_llama()
    fig = plot_device_map(model, full_map(layer_dev=lambda i: i // 2), {0: "1MB", 1: "1GB"}, title="t")
    strip, bars = fig.axes
    assert strip.get_title() == "t" and bars.get_ylabel() in ("weights (GiB)", "weights (MiB)")
    assert bars.get_xlabel() == "device"
    plt.close(fig)
    fig, ax = plt.subplots()
    assert plot_device_map(model, full_map(), ax=ax) is fig
    plt.close(fig)


def test_plot_device_map_fits_jupyterlab_and_keeps_labels_and_legends_clear():
    """The faults seen in JupyterLab 4.6 (848 px output area): a strip squashed by rotated labels, a legend
    over a budget outline, module names crammed together, a figure wider than the output area."""
    import io

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.text import Text
    from PIL import Image

    from helpers.planner import plan

    heights = {}
    for shape in ("bloom-1b7", "llama-2-70b"):  # long module names; many layers
        p = plan(shape, "bf16", 8, 80)
        fig = plot_device_map(p.model, p.device_map, max_memory=p.max_memory, hf_quantizer=p.hf_quantizer)
        strip, bars = fig.axes
        fig.canvas.draw()
        renderer = fig.canvas.get_renderer()
        assert all(t.get_rotation() == 0 for t in strip.get_xticklabels()), "tick labels lie flat"
        names = [Text.get_window_extent(t, renderer) for t in strip.texts]  # the words, not the joining line
        assert {t.get_text() for t in strip.texts} >= {"lm_head"}, "non-layer modules are named in full"
        assert not any(a.overlaps(b) for i, a in enumerate(names) for b in names[i + 1:]), "names never touch"
        numbers = [t.get_window_extent(renderer) for t in strip.get_xticklabels() if t.get_text()]
        assert not any(a.overlaps(b) for a, b in zip(numbers, numbers[1:])), "layer numbers never touch"
        plotted = bars.get_window_extent(renderer)
        for legend in [a.get_legend() for a in fig.axes if a.get_legend()]:
            assert not legend.get_window_extent(renderer).overlaps(plotted), "a legend sits beside the bars"
        heights[shape] = strip.get_window_extent(renderer).height
        buf = io.BytesIO()
        fig.savefig(buf, format="png", dpi=100, bbox_inches="tight")  # as JupyterLab's inline backend does
        assert Image.open(buf).size[0] <= 848, "wider than JupyterLab's output area: it would be shrunk"
        plt.close(fig)
    assert abs(heights["bloom-1b7"] - heights["llama-2-70b"]) < 2, "the strip's height does not depend on labels"


def test_device_map_of_plain_and_dispatched():
    with torch.device("cpu"):
        model = AutoModelForCausalLM.from_config(tiny_config(layers=1))
    assert device_map_of(model) == {"": "cpu"}
    from accelerate import dispatch_model  # a real dispatched model, with the map dispatch_model records

    wanted = OrderedDict([("model", "cpu"), ("lm_head", "cpu")])
    dispatch_model(model, device_map=wanted)
    assert device_map_of(model) == {"model": "cpu", "lm_head": "cpu"}


def test_placement_names_what_each_device_holds():
    m = meta_llama(tie=False, layers=4)
    assert placement(m, full_map(4, layer_dev=lambda i: 0 if i < 2 else 1, head=1)) == {
        0: "embed_tokens, layers 0-1", 1: "layers 2-3, norm, lm_head, rotary_emb"}
    whole = placement(m, {"": 1})  # one entry for the whole model: everything on GPU 1
    assert list(whole) == [1] and "layers 0-3" in whole[1]
