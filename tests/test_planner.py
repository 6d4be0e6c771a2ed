"""Tests of helpers.planner: plans for GPUs this machine does not have, on the meta device."""

from __future__ import annotations

import logging

import matplotlib

matplotlib.use("Agg")

import pytest  # noqa: E402
import torch  # noqa: E402

from helpers.units import GiB  # noqa: E402
from helpers.memory import FORMATS  # noqa: E402
from helpers.memory import kv_cache_bytes, kv_cache_layers  # noqa: E402
from helpers.planner import plan as plan_with_room  # noqa: E402
from helpers.planner import _prepared_model as prepared_model, show_plan  # noqa: E402
from helpers.quiet import quiet_planning  # noqa: E402


def plan(*args, **kwargs):
    """The weights-only question (no KV cache, no reserve), as the older tests ask it."""
    kwargs.setdefault("context", 0)
    kwargs.setdefault("reserve_gib", 0)
    return plan_with_room(*args, **kwargs)


def _from_pretrained_map(p):
    """The map transformers' own from_pretrained step computes for the same question."""
    from transformers.integrations.accelerate import _get_device_map

    with quiet_planning():
        return _get_device_map(p.model, p.strategy, dict(p.max_memory), p.hf_quantizer)


@pytest.mark.parametrize("shape, fmt, n, gib, strategy", [
    ("llama-2-70b", "nf4", 2, 24, "balanced"),
    ("llama-2-7b", "bf16", 4, 24, "balanced_low_0"),
    ("llama-2-7b", "int8", 2, 8, "sequential"),
    ("bloom-1b7", "nf4-dq", 2, 24, "auto"),
])
def test_plan_matches_from_pretrained_steps(shape, fmt, n, gib, strategy):
    p = plan(shape, fmt, n, gib, strategy)
    assert p.fits
    assert p.device_map == _from_pretrained_map(p)


def test_verdicts():
    assert not plan("llama-2-70b", "bf16", 2, 24).fits  # 128 GiB of bf16 weights
    big = plan("llama-2-70b", "bf16", 2, 24)
    assert "disk" in big.bytes_per_device and "DOES NOT FIT" in big.summary()
    assert plan("llama-2-70b", "bf16", 4, 80).fits
    assert plan("llama-2-70b", "nf4", 2, 24).fits


def test_quantized_sizes_embeddings_stay_full():
    p = plan("llama-2-7b", "nf4", 1, 80)
    model = p.model
    cfg = model.config
    linear = sum(m.weight.numel() for name, m in model.named_modules()
                 if type(m).__name__ == "Linear4bit")
    emb = cfg.vocab_size * cfg.hidden_size
    assert type(model.lm_head).__name__ == "Linear"  # the head is not quantized
    planned = p.total_bytes
    true = p.total_true_bytes
    # embedding and head in bf16 (2 bytes), 4-bit Linear layers at 0.5 byte, norms in bf16
    norms = sum(prm.numel() for n, prm in model.named_parameters() if "norm" in n)
    assert planned == 2 * emb * 2 + linear // 2 + norms * 2 + sum(b.numel() * b.element_size()
                                                                   for b in model.buffers())
    # the scales: one float32 absmax per 64 weights
    assert true - planned == pytest.approx(linear * 4 / 64, abs=64)


def test_ninety_percent_cut():
    p = plan("llama-2-7b", "nf4", 2, 10, "sequential")
    assert p.effective_memory == {0: int(0.9 * 10 * GiB), 1: int(0.9 * 10 * GiB)}
    q = plan("llama-2-7b", "bf16", 2, 10, "sequential")
    assert q.effective_memory == {0: 10 * GiB, 1: 10 * GiB}


def test_ninety_percent_cut_changes_the_verdict():
    # NF4 llama-2-7b is about 3.5 GiB in transformers' accounting: it fits 3.8 GiB of bytes,
    # but not 90% of it.
    total = plan("llama-2-7b", "nf4", 1, 80).total_bytes
    gib = round(total / GiB / 0.95, 2)
    assert total < gib * GiB
    assert not plan("llama-2-7b", "nf4", 1, gib, "sequential").fits


def test_cpu_budget_allows_cpu_offload():
    p = plan("llama-2-7b", "bf16", 1, 8, "sequential", cpu_gib=64)
    assert not p.fits and "cpu" in p.bytes_per_device and "disk" not in p.bytes_per_device


def test_tied_model_counts_the_tie_once():
    p = plan("smollm2-135m", "bf16", 1, 1)
    model = p.model
    assert model.lm_head.weight is model.model.embed_tokens.weight
    n = sum(x.numel() for x in model.parameters())  # unique parameters
    buffers = sum(b.numel() * b.element_size() for b in model.buffers())
    assert p.total_bytes == n * 2 + buffers


def test_no_absent_device_warnings(caplog):
    with caplog.at_level(logging.WARNING):
        plan("llama-2-7b", "bf16", 8, 80)
    assert not [r for r in caplog.records if "not available" in r.getMessage()]


def test_quiet_planning_restores_levels():
    lg = logging.getLogger("accelerate.utils.modeling")
    before = lg.level
    with quiet_planning():
        assert lg.level == logging.ERROR
    assert lg.level == before


def test_prepared_model_is_on_meta_and_cached():
    m1, q1 = prepared_model("llama-2-70b", "nf4")
    m2, _ = prepared_model("llama-2-70b", "nf4")
    assert m1 is m2 and m1.hf_quantizer is q1
    assert {p.device.type for p in m1.parameters()} == {"meta"}
    assert prepared_model("llama-2-7b", "bf16")[1] is None


@pytest.mark.parametrize("kwargs, words", [
    (dict(model="llama-3-8b"), "not a shape name or a local folder.*HF_HUB_OFFLINE"),
    (dict(model="llama-2-7b", fmt="q4"), "choose one of"),
    (dict(model="llama-2-7b", strategy="even"), "choose one of"),
    (dict(model="llama-2-7b", n_gpus=0), "from 1 to 64"),
    (dict(model="llama-2-7b", n_gpus=True), "from 1 to 64"),
    (dict(model="llama-2-7b", gib_per_gpu=0), "finite number above 0"),
    (dict(model="llama-2-7b", gib_per_gpu="24GiB"), "not a string"),
    (dict(model="llama-2-7b", gib_per_gpu=float("inf")), "finite number"),
    (dict(model="llama-2-7b", gib_per_gpu=True), "finite number"),
    (dict(model="llama-2-7b", cpu_gib=-1), "finite number above 0"),
    (dict(model="llama-2-7b", context=-1), "context"),
    (dict(model="llama-2-7b", batch=0), "batch"),
    (dict(model={"model_type": "llama"}), "cannot plan dict"),
])
def test_bad_input(kwargs, words, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(ValueError, match=words):
        plan(**kwargs)


def test_every_format_plans_and_fewer_bits_plan_fewer_bytes():
    weights = {fmt: sum(plan_with_room("llama-2-7b", fmt, 1, 80).true_bytes_per_device.values()) for fmt in FORMATS}
    assert weights["bf16"] > weights["int8"] > weights["nf4"] > 0, weights


def test_show_plan_prints_and_draws(capsys):
    import matplotlib.pyplot as plt

    p = show_plan("bloom-1b7", "nf4", 2, 24, reserve_gib=0.5)
    out = capsys.readouterr().out
    assert "FITS" in out and "GPU 0" in out
    assert plt.get_fignums()
    plt.close("all")
    assert p.fits


def test_widget_builds_draws_once_per_change_and_never_uses_pyplot():
    import matplotlib.pyplot as plt

    from helpers.planner_widget import RUN_ME, plan_image, planner_widget

    plt.close("all")
    w = planner_widget()
    assert repr(w) == RUN_ME and w._repr_mimebundle_()["text/plain"] == RUN_ME  # what a saved copy shows
    descriptions = {c.description for c in w.controls.values()}
    assert {"model", "or", "format", "GPUs", "GiB / GPU", "device_map", "context", "batch"} == descriptions
    assert w.plans_drawn == 1 and w._image.value == plan_image(plan_with_room(**w.arguments()))
    w.controls["n_gpus"].value = 4
    w.controls["n_gpus"].value = 4  # no new value: no redraw
    assert w.plans_drawn == 2 and "4 x 24 GiB" in w._verdict.value
    assert not w.controls["n_gpus"].continuous_update and not w.controls["typed"].continuous_update
    w.controls["typed"].value = "/no/such/folder"
    assert w.plans_drawn == 3 and "ValueError" in w._verdict.value and w._image.value == b""
    assert not plt.get_fignums(), "the widget draws without pyplot (thread safety in JupyterLab)"


def test_no_gpu_touched():
    # planning never initialises CUDA (it would fail on a CPU-only torch)
    plan("llama-2-7b", "nf4", 4, 80)
    assert not torch.cuda.is_initialized()


# -- any model, with room for the KV cache --------------------------------------------------------------------

def _small(config_name, tie):
    import transformers

    cfg = getattr(transformers, config_name)()
    cfg.num_hidden_layers = 4  # GPT-2 and Bloom map it to n_layer
    cfg.tie_word_embeddings = tie
    return cfg


@pytest.mark.parametrize("config_name", ["LlamaConfig", "MistralConfig", "Qwen2Config", "GemmaConfig",
                                         "GPT2Config", "BloomConfig"])
@pytest.mark.parametrize("tie", [True, False])
def test_plans_any_decoder_config_with_its_own_no_split_class(config_name, tie):
    p = plan(_small(config_name, tie), "bf16", 2, 80, strategy="sequential")
    assert p.on_gpus and p.shape.startswith(config_name)
    layer_class = type(next(m for n, m in p.model.named_modules() if n.endswith(".0"))).__name__
    assert set(p.model._no_split_modules) == {layer_class}  # e.g. GPT2Block, BloomBlock, MistralDecoderLayer
    head, emb = p.model.get_output_embeddings().weight, p.model.get_input_embeddings().weight
    assert (head is emb) == tie


def test_a_checkpoint_directory_is_planned_from_its_config_only(tmp_path):
    _small("MistralConfig", False).save_pretrained(tmp_path)  # config.json, no weights
    assert plan(str(tmp_path), "bf16", 1, 80).on_gpus


def test_kv_cache_formula_and_sliding_window():
    from transformers import Gemma2Config, MistralConfig

    c = plan("llama-2-70b", "bf16", 8, 80).model.config
    assert kv_cache_bytes(c, 4096) == 2 * 80 * 8 * 128 * 2 * 4096  # layers x kv heads x head dim x 2 bytes
    mistral = MistralConfig()  # sliding_window 4096: the cache stops growing there
    assert kv_cache_bytes(mistral, 32768) == kv_cache_bytes(mistral, 4096)
    gemma = Gemma2Config()  # alternating sliding and full layers: only the full ones keep growing
    layers = kv_cache_layers(gemma, 32768)
    assert layers[0] < layers[1] and kv_cache_bytes(gemma, 32768) < 8 * kv_cache_bytes(gemma, 4096)


def test_verdict_counts_kv_cache_and_reserve():
    weights_only = plan("llama-2-7b", "bf16", 1, 14, "sequential")
    assert weights_only.fits
    long = plan_with_room("llama-2-7b", "bf16", 1, 14, "sequential", context=4096, batch=4, reserve_gib=0.5)
    assert long.on_gpus and not long.fits and "KV cache" in long.summary()
    kv = kv_cache_bytes(long.model.config, 4096, 4)
    assert long.needed_bytes_per_device[0] == long.true_bytes_per_device[0] + kv + int(0.5 * GiB)
    # the longest context that fits is just that: one more token does not
    t = long.max_context
    free = 14 * GiB - long.true_bytes_per_device[0] - int(0.5 * GiB)
    assert kv_cache_bytes(long.model.config, t, 4) <= free < kv_cache_bytes(long.model.config, t + 1, 4)
    assert plan_with_room("llama-2-7b", "bf16", 1, 14, "sequential", context=t, batch=4, reserve_gib=0.5).fits


def test_longest_context_is_capped_by_the_model():
    p = plan_with_room("smollm2-135m", "bf16", 1, 80, context=1024, reserve_gib=0.5)
    assert p.max_context == p.model.config.max_position_embeddings and p.max_context_capped


def test_measured_reserve_is_the_default():
    from helpers.planner import RESERVE_FILE, _measured_reserve as measured_reserve

    if not RESERVE_FILE.is_file():
        pytest.skip("no measured reserve committed yet")
    reserve, source = measured_reserve()
    p = plan_with_room("llama-2-7b", "bf16", 1, 80, context=1024)
    assert p.reserve_bytes == reserve > 0 and "measured on" in source


def test_stored_widget_cell_reads_as_an_instruction_to_run_it():
    """A saved notebook holds no live widget: what JupyterLab shows before the cell runs is RUN_ME, not a repr."""
    import json
    from pathlib import Path

    from helpers.planner_widget import RUN_ME

    nb = json.loads(next(Path(__file__).parent.parent.glob("notebooks/03_*.ipynb")).read_text())
    cells = [c for c in nb["cells"] if c["cell_type"] == "code" and "planner_widget(" in "".join(c["source"])]
    assert len(cells) == 1
    texts = ["".join(o["data"]["text/plain"]) for o in cells[0]["outputs"] if "text/plain" in o.get("data", {})]
    assert texts == [RUN_ME], texts
