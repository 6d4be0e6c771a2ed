"""Memory arithmetic, the footprint predictor and model shapes."""

import pytest
import torch

from helpers import memory, shapes, units


def test_unknown_shape_lists_known_ones():
    with pytest.raises(ValueError, match="unknown model shape 'llama-3-405b'.*llama-2-70b"):
        shapes.shape_config("llama-3-405b")


def test_unknown_format():
    with pytest.raises(ValueError, match="unknown format 'int3'"):
        memory.linear_bytes_per_weight("int3")


@pytest.mark.parametrize("name,billions", [("bloom-1b7", 1.72), ("llama-2-7b", 6.74), ("llama-2-13b", 13.02),
                                           ("llama-2-70b", 68.98), ("smollm2-135m", 0.13), ("llama-1b", 1.10),
                                           ("llama-3.1-70b", 70.55), ("qwen2.5-32b", 32.76)])
def test_shapes_have_published_sizes(name, billions):
    m = shapes.meta_model(name)
    assert round(shapes.n_params(m) / 1e9, 2) == billions
    assert next(m.parameters()).is_meta


def test_bytes_per_weight():
    assert memory.linear_bytes_per_weight("nf4") == 0.5625
    assert memory.linear_bytes_per_weight("int8", 4096) == pytest.approx(1 + 4 / 4096)
    assert round(memory.linear_bytes_per_weight("nf4-dq"), 4) == 0.5159


def test_tied_head_counted_once_and_not_quantized():
    from helpers.planner import predict_footprint

    m = shapes.meta_model("smollm2-135m")
    emb = 49152 * 576
    blocks = shapes.n_params(m) - emb - sum(p.numel() for n, p in m.named_parameters() if "norm" in n)
    fp32 = predict_footprint("smollm2-135m", "fp32")
    nf4 = predict_footprint("smollm2-135m", "nf4", dtype=torch.float32)
    assert fp32 == shapes.n_params(m) * 4  # the tied head is the embedding's tensor, counted once
    # only the block Linears shrink: the embedding (and the head tied to it) keeps the load dtype's 4 bytes
    assert fp32 - nf4 == round(blocks * (4 - 0.5625))


def test_llama_70b_bf16_needs_two_80gib_gpus():
    from helpers.planner import predict_footprint

    assert 80 * units.GiB < predict_footprint("llama-2-70b", "bf16") < 160 * units.GiB


# -- one footprint predictor: what transformers' quantizer quantizes, asked the same way everywhere --------------

def _small(name):
    """A small config of each architecture (built in code): GPT-2's Conv1D, Bloom's fused qkv, tied and untied heads."""
    import transformers

    return {
        "gpt2": transformers.GPT2Config(n_embd=128, n_layer=2, n_head=2, vocab_size=1024, n_positions=256),
        "bloom": transformers.BloomConfig(hidden_size=128, n_layer=2, n_head=2, vocab_size=1024),
        "llama": transformers.LlamaConfig(hidden_size=128, intermediate_size=256, num_hidden_layers=2,
                                          num_attention_heads=2, num_key_value_heads=1, vocab_size=1024,
                                          tie_word_embeddings=True),
        "qwen2": transformers.Qwen2Config(hidden_size=128, intermediate_size=256, num_hidden_layers=2,
                                          num_attention_heads=2, num_key_value_heads=1, vocab_size=1024,
                                          tie_word_embeddings=False),
    }[name]


ARCHS = ["gpt2", "bloom", "llama", "qwen2"]


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("fmt", ["int8", "nf4", "nf4-dq"])
def test_predictor_and_planner_agree(arch, fmt):
    from helpers.planner import plan, predict_footprint

    config = _small(arch)
    p = plan(config, fmt, 1, 80, context=0, reserve_gib=0)
    buffers = sum(b.numel() * b.element_size() for b in p.model.buffers())
    assert predict_footprint(config, fmt) == p.total_true_bytes - buffers
    # and the quantizer really quantized the blocks' matrices, Conv1D included
    assert predict_footprint(config, fmt) < 0.75 * predict_footprint(config, "bf16")


def test_gpt2_xl_int8_is_about_half_of_bf16():
    """GPT-2's Conv1D layers are not nn.Linear, but transformers' quantizer replaces them: int8 is not bf16."""
    from transformers import GPT2Config

    from helpers.planner import predict_footprint

    xl = GPT2Config(n_embd=1600, n_layer=48, n_head=25)  # gpt2-xl's published shape
    ratio = predict_footprint(xl, "int8") / predict_footprint(xl, "bf16")
    assert 0.5 < ratio < 0.6
    assert predict_footprint(xl, "nf4") / predict_footprint(xl, "bf16") < 0.35


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("fmt", ["int8", "nf4"])
def test_prediction_matches_what_bitsandbytes_allocates(arch, fmt, tmp_path):
    """Load a small random checkpoint on the CPU: footprint + scales - buffers is the prediction, to the byte."""
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    from helpers.planner import predict_footprint
    from helpers.quiet import known_warnings_silenced

    config = _small(arch)
    with torch.random.fork_rng(devices=[]):  # seeded weights; the caller's random stream left as it was
        torch.manual_seed(0)
        small = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    small.save_pretrained(tmp_path)
    q = (BitsAndBytesConfig(load_in_8bit=True) if fmt == "int8" else
         BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=torch.float32))
    with known_warnings_silenced():
        model = AutoModelForCausalLM.from_pretrained(tmp_path, quantization_config=q, dtype=torch.float32,
                                                     device_map={"": "cpu"})
    scales = 0
    for module in model.modules():
        w = getattr(module, "weight", None)
        qs, scb = getattr(w, "quant_state", None), getattr(w, "SCB", None)
        scales += qs.absmax.numel() * qs.absmax.element_size() if qs is not None else 0
        scales += scb.numel() * scb.element_size() if scb is not None else 0
    buffers = sum(b.numel() * b.element_size() for b in model.buffers())
    assert model.get_memory_footprint() + scales - buffers == predict_footprint(model, fmt, dtype=torch.float32)


def test_predictor_refuses_a_dtype_that_contradicts_the_format():
    from helpers.planner import predict_footprint

    with pytest.raises(ValueError, match="contradicts"):
        predict_footprint("llama-2-7b", "bf16", dtype=torch.float32)


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
        config = shapes.shape_config(name)
        assert config.model_type == fields["model_type"]
        for key, value in fields.items():  # every published value reaches the config (none lost to a renamed field)
            if key != "model_type":
                assert getattr(config, key) == value, (name, key)
