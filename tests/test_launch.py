"""helpers.launch, helpers.reference and the workers under workers/ (CPU only: gloo processes, tiny random models)."""

import json

import pytest
import torch

from helpers.launch import ROOT, LaunchError, launch, _launch_env as launch_env
from helpers.reference import reference_results


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


def test_launch_rejects_an_empty_command():
    with pytest.raises(ValueError, match="command line"):
        launch([])


def test_reference_results_missing_says_how_to_make_one(tmp_path):
    with pytest.raises(FileNotFoundError, match="gpu_bench.py"):
        reference_results(path=tmp_path / "results.json")


def test_reference_results_names_the_tiers():
    with pytest.raises(ValueError, match="one-gpu, two-gpu"):
        reference_results("three-gpu")


def test_committed_reference_is_labelled_random_and_complete():
    ref = reference_results("two-gpu")
    assert ref["model"]["random_weights"] is True and "RANDOM" in ref["model"]["label"]
    for key in ("single", "split", "split_nf4", "replicas", "tensor_parallel", "offload", "h2d", "hardware"):
        assert key in ref, key
    assert len(ref["hardware"]["gpus"]) >= 2
    assert ref["split_nf4"]["bnb_backend"] == "cuda" and ref["split_nf4"]["weight_device"].startswith("cuda")
    assert ref["tensor_parallel"]["logits_check"]["ok"]
    assert ref["offload"]["effective_h2d_GBps"] > 0


def test_tensor_parallel_worker_asks_for_distributed_config():
    """The call notebook 05 teaches is the call the worker makes."""
    from transformers.distributed import DistributedConfig

    assert DistributedConfig(tp_size=2).tp_size == 2
    assert "distributed_config=DistributedConfig(tp_size=world)" in (ROOT / "workers/tensor_parallel.py").read_text()


def torchrun(script, nproc, args, timeout):
    return launch(["torchrun", "--standalone", f"--nproc_per_node={nproc}", script, *args], timeout=timeout)


def test_replicas_two_cpu_processes_each_see_their_rank(tmp_path):
    ckpt = _tiny_checkpoint(tmp_path / "tiny")
    out = tmp_path / "r.json"
    torchrun("workers/replicas.py", 2, ["--expect-world-size", 2, "--model", ckpt, "--random-weights",
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
        torchrun("workers/replicas.py", 2, ["--expect-world-size", 3, "--model", ckpt, "--random-weights",
                                            "--out", tmp_path / "r.json"], timeout=300)
