"""Model shapes written in code: configs of well-known models, no download.

The values come from the models' published ``config.json`` files (bloom-1b7:
bigscience/bloom-1b7; Llama-2: meta-llama/Llama-2-{7,13,70}b-hf; SmolLM2:
HuggingFaceTB/SmolLM2-135M-Instruct; Llama-3.1-8B: meta-llama/Llama-3.1-8B, without
its rope settings, which change no size; Llama-3.1-70B: meta-llama/Llama-3.1-70B; Qwen2.5-32B:
Qwen/Qwen2.5-32B, a Qwen2Config). Notebook 05 plans the last two. ``llama-1b`` is a TinyLlama-like shape
(hidden 2048, 22 layers, 32 heads, 4 key/value heads) whose head counts divide
by 2, 4 and 8, used for random-weight speed runs and tensor parallelism.

Use :func:`meta_model` to build one on the meta device (no memory), or
:func:`random_model` where a run needs real bytes: its weights are random and
every figure measured on it must say so. Both also take any transformers
config that ``AutoModelForCausalLM.from_config`` builds (a ``MistralConfig``,
a checkpoint's ``AutoConfig.from_pretrained(path)``, ...). Notebook 00 sizes
the named shapes (through :func:`helpers.planner.predict_footprint`); notebook 03 plans them.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    from transformers import PretrainedConfig, PreTrainedModel

SHAPES = {
    "smollm2-135m": dict(
        model_type="llama", hidden_size=576, intermediate_size=1536, num_hidden_layers=30,
        num_attention_heads=9, num_key_value_heads=3, vocab_size=49152, tie_word_embeddings=True,
        max_position_embeddings=8192, rms_norm_eps=1e-5,
    ),
    "llama-1b": dict(
        model_type="llama", hidden_size=2048, intermediate_size=5632, num_hidden_layers=22,
        num_attention_heads=32, num_key_value_heads=4, vocab_size=32000, tie_word_embeddings=False,
    ),
    "llama-3.1-8b": dict(
        model_type="llama", hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
        num_attention_heads=32, num_key_value_heads=8, vocab_size=128256, tie_word_embeddings=False,
        max_position_embeddings=131072, rms_norm_eps=1e-5,
    ),
    "bloom-1b7": dict(model_type="bloom", hidden_size=2048, n_layer=24, n_head=16, vocab_size=250880),
    "llama-2-7b": dict(
        model_type="llama", hidden_size=4096, intermediate_size=11008, num_hidden_layers=32,
        num_attention_heads=32, num_key_value_heads=32, vocab_size=32000, tie_word_embeddings=False,
        max_position_embeddings=4096,
    ),
    "llama-2-13b": dict(
        model_type="llama", hidden_size=5120, intermediate_size=13824, num_hidden_layers=40,
        num_attention_heads=40, num_key_value_heads=40, vocab_size=32000, tie_word_embeddings=False,
        max_position_embeddings=4096,
    ),
    "llama-2-70b": dict(
        model_type="llama", hidden_size=8192, intermediate_size=28672, num_hidden_layers=80,
        num_attention_heads=64, num_key_value_heads=8, vocab_size=32000, tie_word_embeddings=False,
        max_position_embeddings=4096,
    ),
    # meta-llama/Llama-3.1-70B config.json (rope_theta 500000, in transformers 5's rope_parameters; its llama3
    # rope scaling left out: it changes no size)
    "llama-3.1-70b": dict(
        model_type="llama", hidden_size=8192, intermediate_size=28672, num_hidden_layers=80,
        num_attention_heads=64, num_key_value_heads=8, vocab_size=128256, tie_word_embeddings=False,
        max_position_embeddings=131072, rope_parameters={"rope_type": "default", "rope_theta": 500000.0},
        rms_norm_eps=1e-5,
    ),
    # Qwen/Qwen2.5-32B config.json (Qwen2Config, rope_theta 1000000; its sliding window is off:
    # use_sliding_window false)
    "qwen2.5-32b": dict(
        model_type="qwen2", hidden_size=5120, intermediate_size=27648, num_hidden_layers=64,
        num_attention_heads=40, num_key_value_heads=8, vocab_size=152064, tie_word_embeddings=False,
        max_position_embeddings=32768, rope_parameters={"rope_type": "default", "rope_theta": 1000000.0},
        rms_norm_eps=1e-6, use_sliding_window=False,
    ),
}
"""Shape name -> ``model_type`` (the key transformers' ``AutoConfig.for_model`` takes) and config fields."""


def shape_config(name: str) -> PretrainedConfig:
    """The transformers config of a named shape in :data:`SHAPES` (notebook 03; notebook 00 through the planner).

    Raises:
        ValueError: unknown name (the message lists the known ones), or a
            ``model_type`` this transformers does not know.
    """
    from transformers import AutoConfig

    if not isinstance(name, str) or name not in SHAPES:
        raise ValueError(f"unknown model shape {name!r}; known shapes: {', '.join(SHAPES)}")
    fields = dict(SHAPES[name])
    model_type = fields.pop("model_type")
    return AutoConfig.for_model(model_type, **fields)


def as_config(name_or_config: str | PretrainedConfig) -> PretrainedConfig:
    """A config from a shape name or a config object; anything else is refused.

    Raises:
        TypeError: neither a name of :data:`SHAPES` nor a ``PretrainedConfig``.
        ValueError: an unknown name.

    :mod:`helpers.planner` reads shape names with it.
    """
    from transformers import PretrainedConfig

    if isinstance(name_or_config, str):
        return shape_config(name_or_config)
    if isinstance(name_or_config, PretrainedConfig):
        return name_or_config
    raise TypeError(
        f"expected a shape name ({', '.join(SHAPES)}) or a transformers config (e.g. "
        f"AutoConfig.from_pretrained(path)), not {type(name_or_config).__name__}"
    )


def _build(name_or_config: str | PretrainedConfig, dtype: torch.dtype, device: str) -> PreTrainedModel:
    """``AutoModelForCausalLM.from_config`` under ``torch.device(device)``; a clear error when it cannot."""
    from transformers import AutoModelForCausalLM

    config = as_config(name_or_config)
    try:
        with torch.device(device):
            return AutoModelForCausalLM.from_config(config, dtype=dtype)
    except ValueError as e:  # "Unrecognized configuration class ... for this kind of AutoModel"
        raise ValueError(
            f"AutoModelForCausalLM cannot build a {type(config).__name__} (model_type "
            f"{getattr(config, 'model_type', None)!r}): pass the config of a causal language model, such as "
            f"LlamaConfig, MistralConfig, Qwen2Config, GemmaConfig, GPT2Config or BloomConfig. ({e})"
        ) from None


def meta_model(name_or_config: str | PretrainedConfig, dtype: torch.dtype = torch.bfloat16) -> PreTrainedModel:
    """Build a causal LM from a shape name or config on the meta device (no bytes allocated).

    Ties are declared by the config and applied (``tie_weights`` runs in
    ``post_init``), so a tied head is the embedding's parameter, as after
    ``from_pretrained``. Notebook 00 builds on the meta device the same way, in its own cell.

    Raises:
        TypeError: not a shape name or a config. ValueError: an unknown name,
        or a config ``AutoModelForCausalLM`` does not build.
    """
    return _build(name_or_config, dtype, "meta")


def random_model(name_or_config: str | PretrainedConfig, dtype: torch.dtype = torch.bfloat16, seed: int = 0,
                 device: str = "cpu") -> PreTrainedModel:
    """Build a causal LM with RANDOM weights, drawn from ``seed``, on ``device``.

    The same seed gives the same weights (on the CPU, those of ``torch.manual_seed(seed)``). The
    caller's random-number generators are left as they were: the weights are drawn inside
    ``torch.random.fork_rng``, from the generator of ``device`` alone (the CPU's, or that GPU's),
    so a notebook's own seeded stream goes on unchanged and no other GPU's generator is reseeded.
    Its outputs are meaningless text; use it only for memory and speed (notebook 07's tensor-parallel toy).
    Raises as :func:`meta_model`.
    """
    dev = torch.device(device)
    gpus = [dev.index if dev.index is not None else torch.cuda.current_device()] if dev.type == "cuda" else []
    with torch.random.fork_rng(devices=gpus):
        torch.default_generator.manual_seed(seed)
        for g in gpus:
            torch.cuda.default_generators[g].manual_seed(seed)
        return _build(name_or_config, dtype, device).eval()


def n_params(model: torch.nn.Module) -> int:
    """Parameters, shared (tied) ones counted once (``gpu-reference/tools/gpu_bench.py``)."""
    return sum(p.numel() for p in model.parameters())
