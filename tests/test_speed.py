"""helpers.speed (the compute side of the roofline) and the byte counts of helpers.measure it is set against."""

from __future__ import annotations

import matplotlib
import pytest
import torch
from transformers import AutoModelForCausalLM, LlamaConfig

from helpers.measure import decode_bytes, stored_bytes
from helpers.shapes import shape_config
from helpers.speed import decode_flops, matmul_params, matmul_rate, prefill_flops, roofline

matplotlib.use("Agg")


def tiny() -> LlamaConfig:
    return LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                       num_key_value_heads=2, vocab_size=1000, tie_word_embeddings=False)


def test_matmul_params_counts_every_matrix_product_weight_of_a_real_model():
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(tiny())
    linear = sum(m.weight.numel() for m in model.modules() if isinstance(m, torch.nn.Linear))
    assert matmul_params(model.config) == linear  # the layers' projections and the untied head


def test_llama_3_1_8b_shape_is_8_billion_parameters_and_its_flops_follow():
    c = shape_config("llama-3.1-8b")
    assert matmul_params(c) == 7_504_658_432  # 8.03 B less the 0.53 B input embedding (a lookup)
    assert decode_flops(c) == 2 * matmul_params(c)
    # attention grows with the square of the prompt; the weights' part linearly
    weights = 2 * matmul_params(c) * 1000
    attention = prefill_flops(c, 1000, all_logits=True) - weights
    assert attention == pytest.approx(4 * (prefill_flops(c, 500, all_logits=True) - weights / 2))
    head = c.vocab_size * c.hidden_size  # generate asks for the last position's logits only: the head once
    assert prefill_flops(c, 1000) == pytest.approx(prefill_flops(c, 1000, all_logits=True) - 2 * head * 999)


def test_matmul_rate_refuses_too_few_repeats_and_reports_a_spread():
    with pytest.raises(ValueError, match="3 repeats"):
        matmul_rate(repeats=2)
    r = matmul_rate(n=256, dtype=torch.float32, repeats=3)
    assert r["spread"][0] <= r["flops_per_s"] <= r["spread"][1] and r["n"] == 256


def test_stored_bytes_counts_what_a_torchao_weight_holds_not_its_dtype():
    from torchao.quantization import Int8WeightOnlyConfig, quantize_

    lin = torch.nn.Sequential(torch.nn.Linear(256, 256, bias=False)).to(torch.bfloat16)
    assert stored_bytes(lin[0].weight) == 256 * 256 * 2
    quantize_(lin, Int8WeightOnlyConfig())
    w = lin[0].weight
    assert w.dtype == torch.bfloat16 and w.numel() * w.element_size() == 256 * 256 * 2  # what its dtype says
    assert 256 * 256 <= stored_bytes(w) < 256 * 256 * 1.1  # int8 data plus one scale (and zero point) a row


def test_decode_bytes_of_a_torchao_model_is_about_half_of_bf16():
    from torchao.quantization import Int8WeightOnlyConfig, quantize_

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(tiny(), dtype=torch.bfloat16)
    bf16 = decode_bytes(model)
    quantize_(model.model.layers, Int8WeightOnlyConfig())
    assert decode_bytes(model) < 0.8 * bf16


def test_roofline_draws_both_ceilings_and_refuses_an_empty_point():
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots()
    roofline(ax, 30e9, 400e9, [{"label": "decode", "flops": 2.7e8, "bytes": 2.7e8, "seconds": 0.04}])
    assert len(ax.lines) >= 2
    with pytest.raises(ValueError, match="positive"):
        roofline(ax, 30e9, 400e9, [{"label": "bad", "flops": 1, "bytes": 0, "seconds": 1}])
    plt.close(fig)
