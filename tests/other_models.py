"""Small RANDOM-weight checkpoints of other architectures, to run the workbook on models it does not bundle.

The README invites users to point every notebook at their own checkpoint (``-p MODEL DIR``). These
checkpoints are what a user would make with ``save_pretrained``: a config, safetensors weights and the
bundled model's tokenizer (vocabulary 49,152), with weights drawn at random (seed 0), so their text is
meaningless. Each differs from the bundled model in a way the notebooks must handle:

- ``qwen2-untied``: a separate head (``tie_word_embeddings=False``), biases on q/k/v;
- ``gpt2``: ``Conv1D`` layers instead of ``nn.Linear``, learned positions, a tied head;
- ``llama-tied``: the bundled model's architecture, smaller (the cheapest);
- ``bloom``: ALiBi, fused query-key-value, word-embedding layer norm, a tied head.

Usage: ``python tests/other_models.py OUT_DIR [NAME ...]`` writes ``OUT_DIR/NAME`` for each and prints
the paths; ``tests/test_other_models.py`` runs the main job on them.
"""

from __future__ import annotations

import sys
from pathlib import Path

SMALL = {
    "llama-tied": dict(model_type="llama", hidden_size=128, intermediate_size=384, num_hidden_layers=4,
                       num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True,
                       max_position_embeddings=2048),
    "qwen2-untied": dict(model_type="qwen2", hidden_size=256, intermediate_size=768, num_hidden_layers=6,
                         num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=False,
                         max_position_embeddings=2048),
    "gpt2": dict(model_type="gpt2", n_embd=256, n_layer=6, n_head=4, n_positions=1024),
    "bloom": dict(model_type="bloom", hidden_size=256, n_layer=6, n_head=4),
}
"""Name -> config fields; every one takes the bundled tokenizer's vocabulary."""

CHEAPEST = "llama-tied"


def build(out: Path, name: str) -> Path:
    """Write (once) the RANDOM-weight checkpoint ``name`` of :data:`SMALL` to ``out/name``; return its path."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    from helpers.checkpoints import resolve_model

    target = Path(out) / name
    if (target / "config.json").is_file():
        return target
    bundled = resolve_model("bundled")
    tok = AutoTokenizer.from_pretrained(bundled)
    fields = dict(SMALL[name])
    config = AutoConfig.for_model(fields.pop("model_type"), vocab_size=len(tok), bos_token_id=tok.bos_token_id,
                                  eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id, **fields)
    with torch.random.fork_rng(devices=[]):  # seeded weights; the caller's random stream left as it was
        torch.manual_seed(0)
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.save_pretrained(target)
    tok.save_pretrained(target)
    (target / "RANDOM_WEIGHTS.txt").write_text(f"RANDOM weights (seed 0) of a small {name} shape: meaningless text.\n")
    return target


if __name__ == "__main__":
    if len(sys.argv) < 2:
        sys.exit(__doc__)
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
    for n in sys.argv[2:] or list(SMALL):
        print(build(Path(sys.argv[1]), n))
