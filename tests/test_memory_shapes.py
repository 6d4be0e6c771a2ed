"""Memory arithmetic and model shapes."""

import pytest

from helpers import memory, shapes, units


def test_unknown_shape_lists_known_ones():
    with pytest.raises(ValueError, match="unknown model shape 'llama-3-405b'.*llama-2-70b"):
        shapes.shape_config("llama-3-405b")


def test_unknown_format():
    with pytest.raises(ValueError, match="unknown format 'int3'"):
        memory.linear_bytes_per_weight("int3")


@pytest.mark.parametrize("name,billions", [("bloom-1b7", 1.72), ("llama-2-7b", 6.74), ("llama-2-13b", 13.02),
                                           ("llama-2-70b", 68.98), ("smollm2-135m", 0.13), ("llama-1b", 1.10)])
def test_shapes_have_published_sizes(name, billions):
    m = shapes.meta_model(name)
    assert round(shapes.n_params(m) / 1e9, 2) == billions
    assert next(m.parameters()).is_meta


def test_bytes_per_weight():
    assert memory.linear_bytes_per_weight("nf4") == 0.5625
    assert memory.linear_bytes_per_weight("int8", 4096) == pytest.approx(1 + 4 / 4096)
    assert round(memory.linear_bytes_per_weight("nf4-dq"), 4) == 0.5159


def test_tied_head_counted_once_and_not_quantized():
    m = shapes.meta_model("smollm2-135m")
    groups = memory.param_groups(m)
    assert groups["lm_head"] == 0 and groups["embedding"] == 49152 * 576
    fp32 = memory.predict_footprint(m, "fp32")
    nf4 = memory.predict_footprint(m, "nf4", dtype_bytes=4)
    # only the block Linears shrink: the embedding keeps its 4 bytes per weight
    assert fp32 - nf4 == round(groups["linear (in blocks)"] * (4 - 0.5625))


def test_llama_70b_bf16_needs_two_80gib_gpus():
    m = shapes.meta_model("llama-2-70b")
    assert 80 < units.gib(memory.predict_footprint(m, "bf16")) < 160


@pytest.mark.parametrize("config_name", ["MistralConfig", "Qwen2Config", "GemmaConfig", "GPT2Config", "BloomConfig"])
def test_any_causal_lm_config_builds_its_own_architecture(config_name):
    import transformers

    config = getattr(transformers, config_name)()
    config.num_hidden_layers = config.n_layer = 2
    m = shapes.meta_model(config)
    assert type(m).__name__.startswith(config_name.removesuffix("Config"))
    assert next(m.parameters()).is_meta


def test_shapes_refuse_what_they_cannot_build():
    from transformers import CLIPVisionConfig

    with pytest.raises(TypeError, match="shape name .* or a transformers config"):
        shapes.meta_model({"model_type": "llama"})
    with pytest.raises(ValueError, match="cannot build a CLIPVisionConfig.*MistralConfig"):
        shapes.meta_model(CLIPVisionConfig())


def test_every_named_shape_builds_its_declared_model_type():
    for name, fields in shapes.SHAPES.items():
        assert shapes.shape_config(name).model_type == fields["model_type"]
