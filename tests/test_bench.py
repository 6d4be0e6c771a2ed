"""The speed benchmark (tools/bench.py) on a tiny random Llama: every record complete and within its limit.

One run of ``tools/bench.py --quick --profile`` in its own process on ``tests/other_models.py``'s ``llama-tied``
(4 layers, hidden 128, random weights): batches 1 and 2, bf16, NF4 and torchao int4, a few new tokens, no compile,
a profile of a few decode steps. About half a minute on 2 busy cores; the committed results themselves are checked
by ``tests/test_stored_rates.py``. The time budget, the per-shape defaults of the GPU plan and the child processes'
command lines are checked without running a model.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tools"))

from bench import CUDA_PATHS, Run, child_argv, expected_compile_s, main, parse_args, shape_defaults  # noqa: E402

RECORD_FIELDS = ("shape", "format", "path", "batch", "tokens_per_s", "tokens_per_s_per_sequence",
                 "limit_tokens_per_s", "share_of_limit", "spread", "ttft_s", "warmup_s", "repeats", "random_weights")
"""What every record holds (tools/bench.py's docstring)."""


@pytest.fixture(scope="module")
def bench(tmp_path_factory) -> tuple[dict, Path]:
    from tests.other_models import build

    tmp = tmp_path_factory.mktemp("bench")
    model = build(tmp, "llama-tied")
    out = tmp / "out"
    done = subprocess.run([sys.executable, str(ROOT / "tools/bench.py"), "--out", str(out), "--shapes", str(model),
                           "--quick", "--profile"], cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    return json.loads((out / "speed.json").read_text()), out


@pytest.mark.subprocess
def test_every_record_is_complete_within_its_limit_and_inside_its_spread(bench):
    res, _ = bench
    assert {r["path"] for r in res["records"]} == {"eager", "static"}
    assert {(r["format"], r["batch"]) for r in res["records"] if "formats" in r["sections"]} >= {("bf16", 1),
                                                                                              ("nf4", 2)}
    for r in res["records"]:
        missing = [f for f in RECORD_FIELDS if r.get(f) is None]
        assert not missing, f"{r['format']} {r['path']} batch {r['batch']} lacks {missing}"
        assert 0 < r["tokens_per_s"] <= r["limit_tokens_per_s"], r
        assert r["spread"][0] <= r["tokens_per_s"] <= r["spread"][1], r
        assert r["repeats"] >= 3 and r["random_weights"] is True and r["shape"] == "llama-tied"
        assert r["tokens_per_s"] == pytest.approx(r["batch"] * r["tokens_per_s_per_sequence"])
        assert r["share_of_limit"] == pytest.approx(r["tokens_per_s"] / r["limit_tokens_per_s"])


@pytest.mark.subprocess
def test_the_file_holds_the_machine_the_limit_and_every_section(bench):
    res, out = bench
    assert res["hardware"]["cpu_cores"] >= 1 and res["hardware"]["torch"] == torch.__version__
    assert {"torch", "transformers", "accelerate", "bitsandbytes", "torchao"} <= set(res["versions"])
    bw = res["bandwidth"]
    assert bw["spread"][0] <= bw["bytes_per_s"] <= bw["spread"][1] and bw["gib"] >= 1
    assert res["matmul"]["flops_per_s"] > 0 and res["random_weights"] == {"llama-tied": True}
    assert res["saturation"]["llama-tied"]["path"] in ("eager", "static") and res["saturation"]["llama-tied"]["reason"]
    assert [p["prompt_tokens"] for p in res["prefill"]] == [8, 32]
    assert all(p["floor_s"] <= p["ttft_s"] and p["spread"][0] <= p["ttft_s"] <= p["spread"][1] for p in res["prefill"])
    assert [x["what"] for x in res["load"]] == ["bf16", "nf4, quantized while loading", "nf4, saved and loaded again"]
    assert not list((ROOT / "build").glob("bench-nf4-*")), "the saved NF4 checkpoint was left behind"
    assert any(s["path"] == "compile" and "--quick" in s["reason"] for s in res["skipped"])
    assert res["plan"]["took_s"]["total"] > 0
    assert (out / "roofline.png").stat().st_size > 10_000 and (out / "batch.png").stat().st_size > 10_000
    assert res["running"] is None, "a run that ended names nothing as running"
    assert res["invocations"][-1]["seconds"] > 0 and res["settings"]["torch._dynamo.config.recompile_limit"] >= 64


@pytest.mark.subprocess
def test_the_profile_says_where_a_decode_step_goes(bench):
    res, _ = bench
    p = res["profile"]["llama-tied"]
    assert p["path"] in ("eager", "static") and p["steps"] >= 1 and p["graphs_compiled_while_profiling"] == 0
    assert len(p["step_series_s"]) == 7 and p["median_decode_step_s"] > 0  # 8 new tokens: 7 decode steps
    assert 0 < p["cpu_in_ops_s"] <= p["step_s"] and p["cpu_outside_ops_s"] >= 0
    assert p["top_by"] == "self CPU time of each op" and 0 < len(p["top"]) <= 10
    assert any(t["name"] == "aten::mm" for t in p["top"]), p["top"]  # a decode step is matrix products
    assert p["decode_step_s"] == pytest.approx(1 / next(r["tokens_per_s"] for r in res["records"]
                                                        if r["path"] == p["path"] and r["batch"] == 1
                                                        and r["format"] == "bf16"))


@pytest.mark.subprocess
def test_plot_only_draws_the_plots_again_from_the_file(bench, tmp_path):
    res, out = bench
    (tmp_path / "speed.json").write_text((out / "speed.json").read_text())
    assert main(["--out", str(tmp_path), "--plot-only"]) == 0
    assert (tmp_path / "roofline.png").stat().st_size > 10_000 and (tmp_path / "batch.png").stat().st_size > 10_000


@pytest.mark.subprocess
@pytest.mark.skipif(torch.cuda.is_available(), reason="torchao int4 weight-only loads on CUDA")
def test_torchao_int4_on_a_cpu_is_refused_with_its_cause(bench):
    res, _ = bench
    refused = [r for r in res["refused"] if r["format"] == "torchao-int4wo"]
    assert len(refused) == 1 and "CUDA" in refused[0]["reason"], res["refused"]
    assert not [r for r in res["records"] if r["format"] == "torchao-int4wo"]


def test_several_shapes_run_one_process_each_with_the_same_settings():
    args = parse_args(["--out", "o", "--shapes", "llama-1b", "llama-3.1-8b", "--formats", "bf16", "nf4",
                       "--format-batches", "1", "--minutes", "6"])
    argv = child_argv(args, "llama-3.1-8b", append=True)
    assert argv[2:] == ["--out", "o", "--shapes", "llama-3.1-8b", "--formats", "bf16", "nf4", "--format-batches", "1",
                        "--minutes", "6.0", "--append"]
    argv = child_argv(parse_args(["--out", "o", "--skip", "--profile"]), "llama-1b", append=False)
    assert argv[-3:] == ["llama-1b", "--skip", "--profile"], "an empty --skip (no default skips) reaches the child"
    args = parse_args(["--out", "o", "--append-from", "first/speed.json"])  # the first child starts from that file
    assert child_argv(args, "llama-1b", append=False)[-2:] == ["--append-from", "first/speed.json"]
    assert child_argv(args, "llama-3.1-8b", append=True)[-1] == "--append"  # the next from what the first wrote


def test_the_8b_shape_measures_every_gpu_path_in_one_process_and_skips_its_loads():
    d = shape_defaults("llama-3.1-8b", "cuda")
    assert tuple(d["paths"]) == CUDA_PATHS and "static+tuned" in d["paths"] and d["skip"] == ("load",)
    assert d["formats"] == ("bf16",) and tuple(d["batches"]) == (1,) and d["minutes"] < 10
    assert shape_defaults("llama-3.1-8b", "cpu") == {} and shape_defaults("llama-1b", "cuda") == {"minutes": 4}


def test_an_item_that_would_not_end_within_the_budget_is_skipped_and_written(tmp_path):
    run = Run(parse_args(["--out", str(tmp_path)]), "cpu", budget_s=60)
    m = {"label": "s"}
    assert expected_compile_s(run, m, "compile") == 90  # nothing compiled yet on this CPU
    assert not run.over_budget({"shape": "s", "path": "eager"})
    assert run.over_budget({"shape": "s", "path": "compile"}, expected_compile_s(run, m, "compile"))
    written = json.loads((tmp_path / "speed.json").read_text())  # written at once: a killed run keeps it
    assert "expected to take 90 s" in written["skipped"][0]["reason"] and written["skipped"][0]["path"] == "compile"
    run.compile_s["static+compile"] = 100.0  # a compile measured in this process sets the next one's expectation
    assert expected_compile_s(run, m, "static+tuned") == 150 and expected_compile_s(run, m, "static+compile") == 100
    gpu = Run(parse_args(["--out", str(tmp_path / "g")]), "cuda", budget_s=540)
    gpu.res["models"]["s"] = {"params": 8e9}
    assert expected_compile_s(gpu, m, "static+compile") == 150 and expected_compile_s(gpu, m, "static+tuned") == 225
