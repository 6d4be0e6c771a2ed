"""helpers.launch, helpers.reference and the workers under workers/ (CPU only: gloo processes, tiny random models)."""

import json

import pytest
import torch

from helpers.launch import ROOT, LaunchError, launch
from helpers.reference import reference_results


def _tiny_checkpoint(path):
    from transformers import LlamaConfig

    from helpers.shapes import random_model

    cfg = LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2, vocab_size=128)
    random_model(cfg, dtype=torch.float32, seed=0).save_pretrained(path)
    return path


@pytest.mark.subprocess
def test_a_launched_process_has_nvlink_multicast_off_and_finds_the_repo():
    """What a launched process really sees: the three multicast switches off, helpers importable, extra_env."""
    import sys

    code = ("import os, json, helpers; print(json.dumps({k: os.environ.get(k) for k in "
            "('NCCL_NVLS_ENABLE', 'TORCH_SYMM_MEM_DISABLE_MULTICAST', 'NVSHMEM_DISABLE_NVLS', 'EXTRA')}))")
    seen = json.loads(launch([sys.executable, "-c", code], timeout=60, extra_env={"EXTRA": "1"}).stdout)
    assert seen == {"NCCL_NVLS_ENABLE": "0", "TORCH_SYMM_MEM_DISABLE_MULTICAST": "1", "NVSHMEM_DISABLE_NVLS": "1",
                    "EXTRA": "1"}


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
    """The call notebook 07 teaches is the call the worker makes."""
    assert "distributed_config=DistributedConfig(tp_size=world)" in (ROOT / "workers/tensor_parallel.py").read_text()


def torchrun(script, nproc, args, timeout):
    return launch(["torchrun", "--standalone", f"--nproc_per_node={nproc}", script, *args], timeout=timeout)


@pytest.mark.subprocess
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


@pytest.mark.subprocess
def test_replicas_refuse_a_wrong_world_size(tmp_path):
    ckpt = _tiny_checkpoint(tmp_path / "tiny")
    with pytest.raises(LaunchError, match="expected 3 processes"):
        torchrun("workers/replicas.py", 2, ["--expect-world-size", 3, "--model", ckpt, "--random-weights",
                                            "--out", tmp_path / "r.json"], timeout=300)


def test_notebook_07_shows_the_call_the_tensor_parallel_worker_makes():
    """The from_pretrained call notebook 07 prints in its markdown is, whitespace aside, the worker's."""
    source = next((ROOT / "notebooks").glob("07_*.py")).read_text()
    block = source[source.index("# model = AutoModelForCausalLM.from_pretrained(args."):].split("# ```")[0]
    shown = " ".join(line.lstrip("#").strip() for line in block.splitlines()).removeprefix("model = ")
    worker = " ".join((ROOT / "workers/tensor_parallel.py").read_text().split())
    assert shown.startswith("AutoModelForCausalLM.from_pretrained(args.checkpoint,") and shown in worker, shown


def test_read_reference_gives_every_figure_its_limit_and_rate(capsys):
    from helpers.reference import read_reference

    files = read_reference(0)
    assert list(files) == ["one-gpu", "two-gpu"]
    assert "specified 4.8 TB/s" in capsys.readouterr().out  # the older two-GPU file measured no bandwidth
    for res in files.values():
        for r in res["records"]:
            assert 0 < r["tokens_per_s"] <= r["limit_tokens_per_s"], r
            key = r["layers_on_cpu"] if r["path"] == "cpu offload" else r["batch"]
            assert "% of the limit, " in r["rate"] and res["rows"][r["path"], r["format"]][key] is r
    assert "tp-system-transformers.json" in files["two-gpu"]["other_files"]


def _gpu_bench():
    import importlib.util

    spec = importlib.util.spec_from_file_location("gpu_bench", ROOT / "gpu-reference/tools/gpu_bench.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_gpu_bench_records_a_rate_with_its_spread_and_refuses_what_is_not_a_rate():
    bench, refused = _gpu_bench(), []
    timed = {"tokens_per_s": 10.0, "total_tokens_per_s": 40.0, "spread_total": [36.0, 44.0], "ttft_s": 0.1}
    row = bench.record("bf16", "one GPU", 4, 1, timed, 1000.0, refused)
    assert row["tokens_per_s"] == 40.0 and row["spread"] == [36.0, 44.0] and row["limit_tokens_per_s"] == 1000.0
    assert bench.record("bf16", "one GPU", 4, 1, timed, 30.0, refused) is None  # above its limit
    assert bench.record("bf16", "one GPU", 8, 1, {"error": "MeasurementError: too noisy"}, 30.0, refused) is None
    assert [r["reason"] for r in refused] == ["40 tokens/s is above the limit 30", "MeasurementError: too noisy"]


def test_gpu_bench_saves_a_measurement_before_it_formats_it(tmp_path, monkeypatch):
    """A measurement that lacks a field (here a worker's row without its spread) is written to the results
    file as it came and refused with the reason; an error later in the run leaves the file written, with
    everything measured before it and the error."""
    import helpers.hardware

    bench = _gpu_bench()
    out = tmp_path / "results.json"
    planted = {"tokens_per_s": 10.0, "total_tokens_per_s": 40.0, "ttft_s": 0.1}  # no "spread_total"
    good = {**planted, "spread_total": [36.0, 44.0]}

    def run(args, n_gpus, results):  # stands in for the GPU measurements: two of them, then a missing key
        assert results.keep("bf16", "one GPU", 4, 1, planted, 1000.0) is None
        assert results.keep("bf16", "one GPU", 8, 1, good, 1000.0)["tokens_per_s"] == 40.0
        return f"{planted['spread_total']}"

    monkeypatch.setattr(bench, "bench", run)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    monkeypatch.setattr(helpers.hardware, "report", lambda: {"python": "3.11"})
    with pytest.raises(KeyError, match="spread_total"):
        bench.main(["--out", str(out)])
    saved = json.loads(out.read_text())
    assert [r["measured"] for r in saved["raw"]] == [planted, good]
    assert saved["raw"][0] == {"section": "one GPU", "format": "bf16", "batch": 4, "gpus": 1,
                               "limit_tokens_per_s": 1000.0, "measured": planted}
    assert saved["refused"] == [{"format": "bf16", "path": "one GPU", "batch": 4,
                                 "reason": "the measurement has no spread_total (it is kept in raw)"}]
    assert [r["batch"] for r in saved["records"]] == [8]
    assert saved["error"] == "KeyError: 'spread_total'"


@pytest.mark.subprocess
def test_workers_bench_records_spreads_on_two_cpu_processes(tmp_path):
    ckpt = _tiny_checkpoint(tmp_path / "tiny")
    torchrun("workers/replicas.py", 2, ["--expect-world-size", 2, "--model", ckpt, "--random-weights", "--bench",
                                        "--batches", 2, "--bench-tokens", 8, "--out", tmp_path / "r.json"], timeout=300)
    launch(["torchrun", "--standalone", "--nproc_per_node=2", "workers/tensor_parallel.py", "--checkpoint", ckpt,
            "--expect-world-size", 2, "--cpu", "--bench", "--batches", 2, "--bench-tokens", 8,
            "--out", tmp_path / "tp.json"], timeout=300, extra_env={"CUDA_VISIBLE_DEVICES": ""})
    for row in (json.loads((tmp_path / "r.json").read_text())["bench"][0],
                json.loads((tmp_path / "tp.json").read_text())["bench"][0]):
        if "error" in row:  # a timing too noisy on a busy machine is recorded as such, never as a rate
            assert row["error"].startswith("MeasurementError"), row
            continue
        low, high = row["spread_total"]
        assert 0 < low <= row["total_tokens_per_s"] <= high, row


@pytest.mark.subprocess
def test_tensor_parallel_over_two_torchrun_machines_gives_the_one_machine_logits(tmp_path):
    """Notebook 07, section 6: two torchrun 'machines' (--nnodes 2, c10d rendezvous on 127.0.0.1), one process each."""
    from concurrent.futures import ThreadPoolExecutor

    from helpers.serving import free_port

    ckpt, hide = _tiny_checkpoint(tmp_path / "tiny"), {"CUDA_VISIBLE_DEVICES": ""}
    worker = ["workers/tensor_parallel.py", "--checkpoint", ckpt, "--expect-world-size", 2, "--cpu"]
    launch(["torchrun", "--standalone", "--nproc_per_node=2", *worker, "--out", tmp_path / "one.json"], timeout=300,
           extra_env=hide)
    rdzv = f"127.0.0.1:{free_port()}"
    nodes = [["torchrun", "--nnodes=2", "--nproc_per_node=1", f"--node_rank={r}", "--rdzv_backend=c10d",
              f"--rdzv_endpoint={rdzv}", *worker, "--out", tmp_path / "two.json"] for r in range(2)]
    with ThreadPoolExecutor(2) as pool:
        list(pool.map(lambda c: launch(c, timeout=300, extra_env=hide), nodes))
    two = json.loads((tmp_path / "two.json").read_text())
    assert sorted(r["node"] for r in two["per_rank"]) == ["0", "1"] and two["logits_check"]["ok"]
    assert torch.equal(torch.load(tmp_path / "one.logits.pt"), torch.load(tmp_path / "two.logits.pt"))
    kv = [r["kv_cache_bytes_per_token_fp32"] for r in two["per_rank"]]
    assert kv == [2 * 2 * (2 // 2) * 16 * 4] * 2  # K and V, 2 layers, 1 of the 2 key/value heads, head_dim 16, fp32
