"""Tests of helpers.planner: plans for GPUs this machine does not have, on the meta device."""

from __future__ import annotations

import logging

import matplotlib

matplotlib.use("Agg")

import pytest  # noqa: E402
import torch  # noqa: E402

from helpers.units import GiB  # noqa: E402
from helpers.memory import FORMATS  # noqa: E402
from helpers.planner import plan, prepared_model, show_plan  # noqa: E402
from helpers.quiet import quiet_planning  # noqa: E402


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
    (dict(shape="llama-3-8b"), "known shapes"),
    (dict(shape="llama-2-7b", fmt="q4"), "choose one of"),
    (dict(shape="llama-2-7b", strategy="even"), "choose one of"),
    (dict(shape="llama-2-7b", n_gpus=0), "from 1 to 64"),
    (dict(shape="llama-2-7b", gib_per_gpu=0), "positive"),
    (dict(shape="llama-2-7b", cpu_gib=-1), "positive"),
])
def test_bad_input(kwargs, words):
    with pytest.raises(ValueError, match=words):
        plan(**kwargs)


def test_formats_listed():
    assert set(FORMATS) >= {"bf16", "int8", "nf4"}


def test_show_plan_prints_and_draws(capsys):
    import matplotlib.pyplot as plt

    p = show_plan("bloom-1b7", "nf4", 2, 24)
    out = capsys.readouterr().out
    assert "FITS" in out and "GPU 0" in out
    assert plt.get_fignums()
    plt.close("all")
    assert p.fits


def test_widget_builds():
    pytest.importorskip("ipywidgets")
    from helpers.planner import planner_widget

    import matplotlib.pyplot as plt

    w = planner_widget()
    assert type(w).__name__ == "VBox"
    plt.close("all")


def test_no_gpu_touched():
    # planning never initialises CUDA (it would fail on a CPU-only torch)
    plan("llama-2-7b", "nf4", 4, 80)
    assert not torch.cuda.is_initialized()
