"""helpers.multigpu and the launch scripts under scripts/ (CPU only: gloo processes, tiny random models)."""

import importlib.util
import json

import pytest
import torch

from helpers import multigpu
from helpers.multigpu import ROOT, LaunchError, launch_env, reference_results, torchrun


def _tiny_checkpoint(path):
    from transformers import LlamaConfig

    from helpers.shapes import random_model

    cfg = LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2, vocab_size=128)
    random_model(cfg, dtype=torch.float32, seed=0).save_pretrained(path)
    return path


def test_launch_env_turns_nvlink_multicast_off_and_finds_the_repo():
    env = launch_env({"EXTRA": "1"})
    assert env["NCCL_NVLS_ENABLE"] == "0"
    assert env["TORCH_SYMM_MEM_DISABLE_MULTICAST"] == "1"
    assert env["NVSHMEM_DISABLE_NVLS"] == "1"
    assert env["PYTHONPATH"].split(":")[0] == str(ROOT)
    assert env["EXTRA"] == "1"


def test_torchrun_rejects_zero_processes():
    with pytest.raises(ValueError, match="nproc"):
        torchrun("scripts/replicas.py", 0, [])


def test_reference_results_missing_says_how_to_make_one(tmp_path):
    with pytest.raises(FileNotFoundError, match="gpu_bench.py"):
        reference_results(tmp_path / "results.json")


def test_committed_reference_is_labelled_random_and_complete():
    ref = reference_results()
    assert ref["model"]["random_weights"] is True and "RANDOM" in ref["model"]["label"]
    for key in ("single", "split", "split_nf4", "replicas", "tensor_parallel", "offload", "h2d", "hardware"):
        assert key in ref, key
    assert len(ref["hardware"]["gpus"]) >= 2
    assert ref["split_nf4"]["bnb_backend"] == "cuda" and ref["split_nf4"]["weight_device"].startswith("cuda")
    assert ref["tensor_parallel"]["logits_check"]["ok"]
    assert ref["offload"]["effective_h2d_GBps"] > 0


def test_tp_load_kwargs_matches_the_installed_transformers():
    spec = importlib.util.spec_from_file_location("tensor_parallel", ROOT / "scripts" / "tensor_parallel.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    kw = mod.tp_load_kwargs(2)
    if "distributed_config" in kw:
        assert kw["distributed_config"].tp_size == 2
    else:
        assert kw == {"tp_plan": "auto"}


def test_replicas_two_cpu_processes_each_see_their_rank(tmp_path):
    ckpt = _tiny_checkpoint(tmp_path / "tiny")
    out = tmp_path / "r.json"
    torchrun("scripts/replicas.py", 2, ["--expect-world-size", 2, "--model", ckpt, "--random-weights",
                                        "--prompts", 5, "--new-tokens", 3, "--out", out], timeout=300)
    rep = json.loads(out.read_text())
    assert [p["rank"] for p in rep["processes"]] == [0, 1]
    assert {p["world_size"] for p in rep["processes"]} == {2}
    assert len({p["pid"] for p in rep["processes"]}) == 2
    assert [r["index"] for r in rep["results"]] == [0, 1, 2, 3, 4]  # gathered in prompt order
    assert rep["processes"][0]["prompt_indices"] == [0, 1, 2]  # contiguous slices, rank 0 first


def test_replicas_refuse_a_wrong_world_size(tmp_path):
    ckpt = _tiny_checkpoint(tmp_path / "tiny")
    with pytest.raises(LaunchError, match="expected 3 processes"):
        torchrun("scripts/replicas.py", 2, ["--expect-world-size", 3, "--model", ckpt, "--random-weights",
                                            "--out", tmp_path / "r.json"], timeout=300)


def test_random_checkpoint_rejects_unknown_shapes():
    with pytest.raises(ValueError, match="known shapes"):
        multigpu.random_checkpoint("no-such-shape")
