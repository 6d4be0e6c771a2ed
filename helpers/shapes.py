"""Model shapes written in code: configs of well-known models, no download.

The values come from the models' published ``config.json`` files (bloom-1b7:
bigscience/bloom-1b7; Llama-2: meta-llama/Llama-2-{7,13,70}b-hf; SmolLM2:
HuggingFaceTB/SmolLM2-135M-Instruct). ``llama-1b`` is a TinyLlama-like shape
(hidden 2048, 22 layers, 32 heads, 4 key/value heads) whose head counts divide
by 2, 4 and 8, used for random-weight speed runs and tensor parallelism.

Use :func:`meta_model` to build one on the meta device (no memory), or
:func:`random_model` where a run needs real bytes: its weights are random and
every figure measured on it must say so.
"""

from __future__ import annotations

import torch

SHAPES = {
    "smollm2-135m": dict(
        kind="llama", hidden_size=576, intermediate_size=1536, num_hidden_layers=30,
        num_attention_heads=9, num_key_value_heads=3, vocab_size=49152, tie_word_embeddings=True,
        max_position_embeddings=8192, rms_norm_eps=1e-5,
    ),
    "llama-1b": dict(
        kind="llama", hidden_size=2048, intermediate_size=5632, num_hidden_layers=22,
        num_attention_heads=32, num_key_value_heads=4, vocab_size=32000, tie_word_embeddings=False,
    ),
    "bloom-1b7": dict(kind="bloom", hidden_size=2048, n_layer=24, n_head=16, vocab_size=250880),
    "llama-2-7b": dict(
        kind="llama", hidden_size=4096, intermediate_size=11008, num_hidden_layers=32,
        num_attention_heads=32, num_key_value_heads=32, vocab_size=32000, tie_word_embeddings=False,
    ),
    "llama-2-13b": dict(
        kind="llama", hidden_size=5120, intermediate_size=13824, num_hidden_layers=40,
        num_attention_heads=40, num_key_value_heads=40, vocab_size=32000, tie_word_embeddings=False,
    ),
    "llama-2-70b": dict(
        kind="llama", hidden_size=8192, intermediate_size=28672, num_hidden_layers=80,
        num_attention_heads=64, num_key_value_heads=8, vocab_size=32000, tie_word_embeddings=False,
    ),
}
"""Shape name -> config fields. The ``kind`` picks the config class."""


def shape_config(name: str):
    """The transformers config of a named shape.

    Raises:
        ValueError: unknown name; the message lists the known ones.
    """
    from transformers import BloomConfig, LlamaConfig

    if name not in SHAPES:
        raise ValueError(f"unknown model shape {name!r}; known shapes: {', '.join(SHAPES)}")
    fields = dict(SHAPES[name])
    kind = fields.pop("kind")
    return (LlamaConfig if kind == "llama" else BloomConfig)(**fields)


def meta_model(name_or_config, dtype: torch.dtype = torch.bfloat16):
    """Build a causal LM from a shape name or config on the meta device (no bytes allocated).

    Ties are declared by the config and applied (``tie_weights``), so a tied
    head is the embedding's parameter, as after ``from_pretrained``.
    """
    from transformers import AutoModelForCausalLM

    config = shape_config(name_or_config) if isinstance(name_or_config, str) else name_or_config
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    return model


def random_model(name_or_config, dtype: torch.dtype = torch.bfloat16, seed: int = 0, device: str = "cpu"):
    """Build a causal LM with RANDOM weights (``torch.manual_seed(seed)``) on ``device``.

    Its outputs are meaningless text; use it only for memory and speed.
    """
    from transformers import AutoModelForCausalLM

    config = shape_config(name_or_config) if isinstance(name_or_config, str) else name_or_config
    torch.manual_seed(seed)
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    return model.eval()


def n_params(model: torch.nn.Module) -> int:
    """Parameters, shared (tied) ones counted once."""
    return sum(p.numel() for p in model.parameters())
