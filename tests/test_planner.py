"""Tests of helpers.planner: plans for GPUs this machine does not have, on the meta device."""

from __future__ import annotations

import logging

import matplotlib

matplotlib.use("Agg")

import pytest  # noqa: E402
import torch  # noqa: E402

from helpers.units import GiB  # noqa: E402
from helpers.memory import FORMATS  # noqa: E402
from helpers.memory import kv_cache_bytes, kv_cache_layers, prefill_peak_bytes  # noqa: E402
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
    assert {"model", "or", "format", "GPUs", "GiB / GPU", "device_map", "context", "batch", "prompt", "RAM GiB",
            "allow offload"} == descriptions
    assert w.plans_drawn == 1 and w._image.value == plan_image(plan_with_room(**w.arguments()))
    w.controls["n_gpus"].value = 4
    w.controls["n_gpus"].value = 4  # no new value: no redraw
    assert w.plans_drawn == 2 and "4 x 24 GiB" in w._verdict.value
    assert not w.controls["n_gpus"].continuous_update and not w.controls["typed"].continuous_update
    w.controls["typed"].value = "/no/such/folder"
    assert w.plans_drawn == 3 and "ValueError" in w._verdict.value and w._image.value == b""
    w.controls["typed"].value = ""
    w.controls["prompt"].value = "1024"  # the prompt box: a number of tokens; empty is min(context, 4096)
    assert w.arguments()["prompt"] == 1024 and "prompt 1,024" in w._verdict.value
    w.controls["prompt"].value = "99999"  # above the context: the planner's reason, not a traceback
    assert "prompt must be" in w._verdict.value and w._image.value == b""
    w.controls["prompt"].value = ""
    assert "binding:" in w._headline.value and "s per token" in w._headline.value
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
    cfg = long.model.config
    kv = kv_cache_bytes(cfg, 4096, 4)
    act = prefill_peak_bytes(cfg, 4096, 4)  # prompt=None: min(context, 4096)
    assert long.prompt == 4096 and long.prefill_bytes_per_device[0] == act
    assert long.needed_bytes_per_device[0] == long.true_bytes_per_device[0] + kv + int(0.5 * GiB) + act
    # the longest context that fits is just that: one more token does not (its prompt grows with it, to 4,096)
    t = long.max_context
    free = 14 * GiB - long.true_bytes_per_device[0] - int(0.5 * GiB)

    def need(tokens):
        return kv_cache_bytes(cfg, tokens, 4) + prefill_peak_bytes(cfg, min(tokens, 4096), 4)

    assert need(t) <= free < need(t + 1)
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

    nb = json.loads(next(Path(__file__).parent.parent.glob("notebooks/05_*.ipynb")).read_text())
    cells = [c for c in nb["cells"] if c["cell_type"] == "code" and "planner_widget(" in "".join(c["source"])]
    assert len(cells) == 1
    texts = ["".join(o["data"]["text/plain"]) for o in cells[0]["outputs"] if "text/plain" in o.get("data", {})]
    assert texts == [RUN_ME], texts


# -- notebook 05: every term that must fit ---------------------------------------------------------------------

def _tiny_llama(**kw):
    from transformers import LlamaConfig

    fields = dict(hidden_size=128, intermediate_size=512, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, vocab_size=256, max_position_embeddings=4096)
    fields.update(kw)
    return LlamaConfig(**fields)


@pytest.mark.parametrize("attention", ["sdpa", "eager"])
def test_prefill_formula_holds_a_measured_forward(attention):
    """The prefill peak formula against torch's own allocation events on a tiny random model: within 10%."""
    from helpers.measure import allocation_peak
    from helpers.shapes import random_model

    cfg = _tiny_llama()
    cfg._attn_implementation = attention
    model = random_model(cfg)
    prompt = 1024 if attention == "sdpa" else 512
    ids = torch.randint(0, 256, (1, prompt))
    with torch.inference_mode():
        _, peak = allocation_peak(lambda: model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=1,
                                                         do_sample=False, pad_token_id=0))
    measured = peak - kv_cache_bytes(cfg, prompt)
    predicted = prefill_peak_bytes(cfg, prompt, attention=attention)
    assert measured == pytest.approx(predicted, rel=0.10), (measured, predicted)


def test_prefill_terms_grow_as_derived():
    from helpers.memory import prefill_terms
    from helpers.shapes import as_config

    c = as_config("llama-2-70b")  # hidden 8192, intermediate 28672
    t = prefill_terms(c, 4096)
    assert t["binding"] == "mlp" and t["mlp"] == 4096 * (4 * 8192 * 2 + 2 * 128 * 2 + 3 * 28672 * 2)
    assert prefill_peak_bytes(c, 8192) == 2 * prefill_peak_bytes(c, 4096)  # linear in the prompt with sdpa
    assert prefill_peak_bytes(c, 4096, batch=4) == 4 * prefill_peak_bytes(c, 4096)
    eager = prefill_terms(c, 4096, attention="eager")
    assert eager["binding"] == "scores" and eager["scores"] > 64 * 4096**2 * 10  # n x prompt^2 x (2 + 8)
    assert prefill_terms(c, 4096, logits="all")["logits"] == 4096 * 32000 * 2
    with pytest.raises(ValueError, match="prompt must be"):
        prefill_peak_bytes(c, -1)
    with pytest.raises(ValueError, match="attention must be"):
        prefill_peak_bytes(c, 1, attention="flash")


def test_load_peak_premise_one_tensor_at_a_time():
    """The load-peak formula rests on transformers 5.24 loading sequentially when it quantizes on the fly."""
    import inspect

    from transformers import core_model_loading

    src = inspect.getsource(core_model_loading.convert_and_load_state_dict_in_model)
    assert "has_on_the_fly_quantization" in src and "thread_pool = None" in src


def test_load_peak_arithmetic():
    from helpers.memory import QUANTIZE_BYTES_PER_WEIGHT, load_host_bytes, load_peak_bytes

    assert load_peak_bytes(10**9, 0, "bf16") == 10**9
    assert load_peak_bytes(10**9, 10**6, "nf4", "cuda") == 10**9 + 10**6 * QUANTIZE_BYTES_PER_WEIGHT["cuda"]["nf4"]
    assert load_peak_bytes(10**9, 10**6, "nf4", "cpu") > load_peak_bytes(10**9, 10**6, "nf4", "cuda")
    assert load_host_bytes(10**6, "nf4", 4, 2) == 6 * 10**6  # one tensor: its float32 read and its bf16 copy
    assert load_host_bytes(10**6, "bf16", 2, 2) == 4 * 2 * 10**6  # four loader threads in flight
    with pytest.raises(ValueError, match="device must be"):
        load_peak_bytes(1, 1, "nf4", "mps")


def test_context_above_the_models_limit_never_fits():
    p = plan_with_room("llama-2-70b", "nf4", 4, 80, context=8192, reserve_gib=0.5)
    assert not p.fits and not p.runs and p.binding == "max_position_embeddings"
    first = p.summary().splitlines()[0]
    assert first.startswith("DOES NOT FIT: context 8,192 is above the model's max_position_embeddings (4,096)")
    assert plan_with_room("llama-2-70b", "nf4", 4, 80, context=4096, reserve_gib=0.5).fits


def test_weights_are_labelled_with_or_without_scales():
    from helpers.planner import weights_label

    text = " ".join(plan_with_room("qwen2.5-32b", "nf4", 1, 24, reserve_gib=0.5).summary().split())
    assert "weights with NF4 scales 19.25 GiB" in text  # the pair: 19.25 with scales, 17.43 counted
    assert "weights, transformers' count (0.5 byte per 4-bit weight): 17.43 GiB" in text
    assert weights_label("int8", "transformers") == "weights, transformers' count (1 byte per 8-bit weight)"
    assert "scales" not in plan_with_room("llama-2-7b", "bf16", 1, 24, reserve_gib=0.5).summary()


def test_each_term_can_bind():
    cfg = "llama-2-7b"
    assert plan_with_room(cfg, "bf16", 1, 14, "sequential", context=4096, batch=4, reserve_gib=0.5).binding \
        == "KV cache"
    # 12.55 GiB of weights + 2 GiB of KV cache fit 14.8 GiB; the prefill of 4,096 tokens (0.4 GiB) does not
    big_prompt = plan_with_room(cfg, "bf16", 1, 14.8, "sequential", context=4096, prompt=4096, reserve_gib=0)
    small_prompt = plan_with_room(cfg, "bf16", 1, 14.8, "sequential", context=4096, prompt=256, reserve_gib=0)
    assert big_prompt.binding == "prefill activations" and not big_prompt.fits and small_prompt.fits
    # a budget between the weights and their load peak (the largest NF4 weight's bf16 copy)
    roomy = plan_with_room(cfg, "nf4", 1, 80, context=0, reserve_gib=0)
    gib = (roomy.needed_bytes_per_device[0] + roomy.load_peak_bytes[0]) / 2 / GiB
    tight = plan_with_room(cfg, "nf4", 1, gib, context=0, reserve_gib=0)
    assert tight.on_gpus and not tight.fits and tight.binding == "load peak" and tight.max_context == 0


def test_offload_plan_counts_ram_disk_and_seconds_per_token():
    rates = {"gpu_bandwidth": 1e12, "h2d_rate": 1e10, "disk_rate": 1e9}
    no = plan_with_room("llama-2-70b", "nf4", 1, 24, context=2048, reserve_gib=0.5, cpu_gib=64, rates=rates)
    assert not no.fits and not no.runs and no.binding == "weights"
    p = plan_with_room("llama-2-70b", "nf4", 1, 24, context=2048, reserve_gib=0.5, cpu_gib=64, offload=True,
                       rates=rates)
    assert p.runs and not p.fits and "RUNS WITH OFFLOAD" in p.summary() and p.cpu_bytes > 0 and p.disk_bytes == 0
    assert all(p.needed_bytes_per_device[d] <= p.max_memory[d] for d in range(p.n_gpus))
    # the offloaded layers stay unquantized (llm_int8_enable_fp32_cpu_offload): bf16 bytes on the CPU
    bf16 = plan_with_room("llama-2-70b", "bf16", 1, 24, context=0, reserve_gib=0)
    plain = dict(bf16.model.named_parameters())
    on_cpu = sum(t.numel() * 2 for n, t in plain.items() if p.device_map.get(n.rsplit(".", 1)[0]) == "cpu"
                 or any(n.startswith(k + ".") for k, v in p.device_map.items() if v == "cpu"))
    assert p.cpu_bytes == pytest.approx(on_cpu, abs=4096) and p.ram_needed_bytes >= p.cpu_bytes  # + buffers
    s = p.seconds_per_token
    assert s["h2d_s"] == pytest.approx(p.cpu_bytes / 1e10) and s["disk_s"] == 0
    assert s["seconds_per_token"] == pytest.approx(s["gpu_s"] + s["h2d_s"])
    short = plan_with_room("llama-2-70b", "nf4", 1, 24, context=2048, reserve_gib=0.5, cpu_gib=16, offload=True,
                           rates=rates)
    assert short.runs and short.disk_bytes > 0 and short.ram_needed_bytes <= 16 * GiB
    assert short.seconds_per_token["disk_s"] == pytest.approx(short.disk_bytes / 1e9)


def test_prompt_is_checked():
    with pytest.raises(ValueError, match="prompt must be"):
        plan_with_room("llama-2-7b", "bf16", 1, 24, context=1024, prompt=2048, reserve_gib=0.5)
    assert plan_with_room("llama-2-7b", "bf16", 1, 24, context=1024, reserve_gib=0.5).prompt == 1024
    assert plan_with_room("llama-3.1-8b", "bf16", 1, 80, context=32768, reserve_gib=0.5).prompt == 4096


def test_preflight_warns_about_the_load_and_prefill_peaks():
    from helpers.preflight import preflight

    p = plan_with_room("llama-2-70b", "nf4", 2, 24, context=0, reserve_gib=0)
    roomy = {0: 24 * GiB, 1: 24 * GiB}
    assert preflight(p.model, p.device_map, roomy, hf_quantizer=p.hf_quantizer).ok
    prefill = preflight(p.model, p.device_map, roomy, hf_quantizer=p.hf_quantizer, prompt=4096, batch=4)
    assert prefill.kinds() == ["prefill-peak"] and "shorter prompt" in prefill.findings[0].fix
    load_gib = (p.true_bytes_per_device[1] + 0.5 * (p.load_peak_bytes[1] - p.true_bytes_per_device[1])) / GiB
    budget = {0: 24 * GiB, 1: int(load_gib * GiB)}
    assert preflight(p.model, p.device_map, budget, hf_quantizer=p.hf_quantizer).ok  # the peaks are opt-in
    tight = preflight(p.model, p.device_map, budget, hf_quantizer=p.hf_quantizer, loader="from_pretrained")
    assert tight.kinds() == ["load-peak"] and "GPU 1" in tight.findings[0].message
