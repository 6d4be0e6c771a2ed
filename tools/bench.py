"""The speed benchmark: how fast generation runs on this machine, every figure beside this machine's limit.

Usage (``./workbook.sh bench`` runs it with ``--out build/bench``)::

    python tools/bench.py --out DIR [--shapes NAME_OR_PATH ...] [--quick] [--append] [--minutes M]

It writes ``DIR/speed.json`` (again after every section, so a crash keeps what was measured) and two plots
beside it, ``roofline.png`` (each measured step under the two ceilings, :func:`helpers.speed.roofline`) and
``batch.png`` (tokens/s in total and per sequence against batch, with the limit).

What it measures, per model ("shape"), in this order:

1. **limit**: the memory bandwidth (:func:`helpers.measure.memory_bandwidth`, a copy of 1 GiB on a CPU, 4 GiB
   on a GPU, three medians of 3, their spread) and the matrix-multiply rate (:func:`helpers.speed.matmul_rate`).
2. **paths** at batch 1, bf16: ``eager`` (``generate`` as it comes), ``static`` (``cache_implementation=
   "static"``; on CUDA with ``disable_compile=True``, so nothing compiles), on CUDA ``static+compile``
   (``generate`` compiles the forward itself, ``CompileConfig``'s default "reduce-overhead") and
   ``static+tuned`` (the same plus inductor's ``coordinate_descent_tuning``, passed as
   ``CompileConfig(mode=None, options=...)``: "reduce-overhead" is ``{"triton.cudagraphs": True}``), on a
   CPU ``compile`` (an explicit ``torch.compile(model.forward)`` with a static cache: ``generate`` compiles
   only on CUDA, XPU, Neuron and TPU). A compiled path counts only where :func:`helpers.speed.compiled_graphs`
   rose during the warm-up of its first run (``compile`` lists each run's counts) and never during timed
   repeats; each path's greedy tokens are compared with eager's (``same_tokens_as_eager``, and
   ``first_token_differing_from_eager``).
3. **batch** sweep 1, 2, 4, ... 64 on the fastest bf16 path (on a CPU the fastest that does not compile: a
   compile costs a minute or more there, and the first new batch size compiles again), and the batch at which
   decode stops being bandwidth-bound (``saturation``: total tokens/s grows by less than 10% when the batch
   doubles, or the compute limit from the matmul rate falls below the bandwidth limit).
4. **formats** at batch 1 and 16: bf16, LLM.int8 (threshold 6.0 and 0.0), NF4, NF4 with double
   quantization, torchao int8 and int4 weight-only through transformers' ``TorchAoConfig`` (int4 with
   ``int4_packing_format="tile_packed_to_4d"``; it fails on a CPU and is refused there with its reason).
   bitsandbytes formats run ``eager``: transformers does not compile bitsandbytes models (their quantizers'
   ``is_compileable`` is False). bf16 and torchao take the sweep's path.
5. **prefill**: time to first token at 3 or 4 prompt lengths against the FLOP floor
   (:func:`helpers.speed.prefill_flops` over the matmul rate).
6. **load**: bf16, NF4 quantized while loading, and an NF4 checkpoint saved (into a temporary folder under
   ``build/``, removed afterwards) and loaded again.

Every decode figure is a record in ``records``: ``shape``, ``format``, ``path``, ``batch``, ``tokens_per_s``
(TOTAL over the batch), ``tokens_per_s_per_sequence``, ``limit_tokens_per_s`` (TOTAL,
:func:`helpers.measure.decode_limit` with the bandwidth of this run and the mean context of the timed steps,
prompt plus half the new tokens), ``share_of_limit``, ``spread`` ([lowest, highest] total tokens/s of the repeats), ``ttft_s``,
``warmup_s`` (the first run, compile included), ``repeats``, ``random_weights``, and what the plots need
(``bytes_per_step``, ``flops_per_step``, ``compute_limit_tokens_per_s``, ``bandwidth_bytes_per_s``). Decode
rate: ``(new_tokens - 1) / (t(new_tokens) - t(1))``, medians of 3 after a warm-up
(:func:`helpers.measure.time_generate`). A timing too
noisy to mean anything (``MeasurementError``) or a path that fails goes to ``refused`` with the reason;
whatever the time budget (``--minutes``) or ``--quick`` leaves out goes to ``skipped``: nothing is dropped
silently, no number is made up.

Models: on a CPU, the bundled model (SmolLM2-135M-Instruct, run in bf16). On a GPU, RANDOM-weight shapes
built on the device (:func:`helpers.checkpoints.random_checkpoint`; ``random_weights`` true, their text is
meaningless): ``llama-1b`` and ``llama-3.1-8b``. A path to a checkpoint folder works too (``--shapes PATH``).
Several shapes run one process each (compile caches and dynamo's recompile limit are per process);
``--append`` keeps what ``DIR/speed.json`` already holds, except what this invocation measures again (a record
of the same shape, format, path and batch; a section run again for the same shape).

The plan (``plan`` in the file records what each section took):

- 2-core CPU, bundled model, one invocation: at most 5 minutes (``--minutes 5``); the explicit compile is
  about a minute of it on a fresh machine (about 10 s once inductor's on-disk cache holds it). Measured with
  other work on the same two cores (load average 3 to 4): 7 min 43 s, of which the formats 5 minutes.
- One H200, two invocations of at most 6 minutes each, from the figures measured there (compile of the 8B
  static path about 150 s, of the 1.1B shape 20 to 60 s, more with tuning):

  1. ``--shapes llama-1b``: set-up 0.5 min (build and save 2.2 GB of random weights), limit 0.2, paths 2.5
     (two compiles), sweep 1 (one recompile: the batch size changes), formats 1.5 (two torchao compiles,
     four bitsandbytes loads), prefill 0.2, load 0.3: about 6 minutes.
  2. ``--shapes llama-3.1-8b --append``: set-up 1 min (build and save 16 GB), limit 0.2, paths 3.2
     (eager, static, static+compile: 150 s of compile), formats 0.8 (NF4 at batch 1), prefill 0.2,
     load 0.8: about 6 minutes. The tuned path, the sweep and the other formats of the 8B shape would need
     another compile each (2.5 to 4 minutes): ``--shapes llama-3.1-8b --append --paths static+tuned`` in a
     third invocation adds the tuned path (``--skip`` the sections already measured).
"""

from __future__ import annotations

import argparse
import functools
import gc
import importlib.metadata
import json
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))  # this file lives in tools/

FORMATS = ("bf16", "int8-t6", "int8-t0", "nf4", "nf4-dq", "torchao-int8wo", "torchao-int4wo")
CPU_PATHS = ("eager", "static", "compile")
CUDA_PATHS = ("eager", "static", "static+compile", "static+tuned")
COMPILED = ("compile", "static+compile", "static+tuned")
TUNED_OPTIONS = {"triton.cudagraphs": True, "coordinate_descent_tuning": True}
"""CompileConfig's default mode "reduce-overhead" is inductor's ``{"triton.cudagraphs": True}``; plus gpt-fast's
tuning. torch.compile takes a mode or options, not both, so the tuned path passes ``mode=None`` and these."""

PLAN = {
    "cpu": {"device": "2-core CPU", "invocations": [{"shapes": ["smollm2-135m"], "minutes": 5}]},
    "cuda": {"device": "one H200 (estimated from the figures measured there; remeasured in took_s)",
             "invocations": [
                 {"shapes": ["llama-1b"], "minutes": 6,
                  "sections_min": {"set-up": 0.5, "limit": 0.2, "paths": 2.5, "batch": 1.0, "formats": 1.5,
                                   "prefill": 0.2, "load": 0.3}},
                 {"shapes": ["llama-3.1-8b"], "minutes": 6,
                  "sections_min": {"set-up": 1.0, "limit": 0.2, "paths": 3.2, "formats": 0.8, "prefill": 0.2,
                                   "load": 0.8}}]},
}
"""The time plan written into ``speed.json`` (module docstring: the same in words)."""

SHAPE_DEFAULTS = {
    "llama-3.1-8b": {"paths": ("eager", "static", "static+compile"), "batches": (1,), "formats": ("bf16", "nf4"),
                     "format_batches": (1,)},
}
"""Per-shape defaults that keep the GPU plan: the 8B shape's every compile costs about 150 s."""


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", required=True, help="folder for speed.json and the plots (created)")
    ap.add_argument("--shapes", nargs="*", help="'bundled', a shape of helpers.shapes.SHAPES (random weights) "
                    "or a checkpoint folder; default: bundled on a CPU, llama-1b and llama-3.1-8b on CUDA")
    ap.add_argument("--quick", action="store_true", help="a tiny run for the unit test: few tokens, batches 1 "
                    "and 2, no compile, bf16, NF4 and torchao int4")
    ap.add_argument("--append", action="store_true", help="keep what DIR/speed.json holds, but for what this "
                    "invocation measures again")
    ap.add_argument("--minutes", type=float, help="time budget: what would start later is skipped, and listed "
                    "(default 5 on a CPU, 6 a shape on CUDA)")
    ap.add_argument("--paths", nargs="*", choices=sorted(set(CPU_PATHS + CUDA_PATHS)),
                    help="paths at batch 1 (default: all of this device)")
    ap.add_argument("--formats", nargs="*", choices=FORMATS, help="formats (default: all)")
    ap.add_argument("--batches", type=int, nargs="*", help="batch sweep (default 1 2 4 ... 64)")
    ap.add_argument("--format-batches", type=int, nargs="*", help="batches of the formats (default 1 16)")
    ap.add_argument("--prefill", type=int, nargs="*", help="prompt lengths of the prefill section")
    ap.add_argument("--tokens", type=int, help="new tokens a timed run (default 16 on a CPU, 64 on CUDA)")
    ap.add_argument("--prompt", type=int, help="prompt tokens of the decode runs (default 16)")
    ap.add_argument("--load-repeats", type=int, help="loads timed of each kind (default 3 on a CPU, 1 on CUDA: "
                    "an 8B load takes 10 to 30 s)")
    ap.add_argument("--skip", nargs="*", default=[], choices=["paths", "batch", "formats", "prefill", "load"],
                    help="sections to leave out")
    return ap.parse_args(argv)


# --- the run's state ---------------------------------------------------------------------------------------------

class Run:
    """What this invocation measured so far; ``write`` puts it in ``DIR/speed.json``."""

    def __init__(self, args, device: str):
        self.args, self.device, self.t0 = args, device, time.perf_counter()
        self.out = Path(args.out)
        self.out.mkdir(parents=True, exist_ok=True)
        self.budget = 60 * (args.minutes or (5 if device == "cpu" else 6))
        self.res = {"hardware": None, "versions": None, "random_weights": {}, "models": {}, "bandwidth": None,
                    "matmul": None, "records": [], "prefill": [], "load": [], "compile": [], "refused": [],
                    "skipped": [], "saturation": {}, "format_paths": {}, "plan": dict(PLAN[device], took_s={}),
                    "invocations": []}
        self.done: dict[tuple, dict] = {}
        self.failed: set[tuple] = set()
        self.compiled: set[tuple] = set()  # (shape, format, path) whose graph compiled in this process
        self.tokens: dict[tuple, list] = {}
        self.prev: dict = {}  # --append: the file as an earlier invocation left it
        self.ran: set[tuple] = set()  # (shape, section) run in this invocation

    def ran_for(self, m: dict) -> set[str]:
        """The sections run for a shape in this invocation."""
        return {name for label, name in self.ran if label == m["label"]}

    def elapsed(self) -> float:
        return time.perf_counter() - self.t0

    def log(self, msg: str) -> None:
        print(f"[{self.elapsed():6.1f} s] {msg}", flush=True)

    def over_budget(self, what: dict) -> bool:
        """True (and ``what`` listed in ``skipped``) once the time budget is spent."""
        if self.elapsed() < self.budget:
            return False
        self.res["skipped"].append({**what, "reason": f"not run: the run had used its {self.budget / 60:g} "
                                    "minutes (--minutes)"})
        return True

    def refuse(self, what: dict, error: BaseException, cause: str | None = None) -> None:
        reason = f"{type(error).__name__}: {error}".strip() + (f" The cause: {cause}" if cause else "")
        self.res["refused"].append({**what, "reason": reason})
        self.log(f"refused {what}: {reason[:300]}")

    def merged(self) -> dict:
        """This invocation's results over an earlier invocation's (``--append``): a record measured again, or a
        section run again for the same shape, replaces the earlier one; the rest is kept."""
        res, prev = dict(self.res), self.prev
        res["plan"] = {**res["plan"], "took_s": {**prev.get("plan", {}).get("took_s", {}), **res["plan"]["took_s"],
                                                 "total": round(self.elapsed(), 1)}}
        if not prev:
            return res
        for k in ("records", "compile"):
            again = {record_key(r) for r in res[k]}
            res[k] = [r for r in prev.get(k, []) if record_key(r) not in again] + res[k]
        for k in ("prefill", "load", "refused", "skipped"):
            res[k] = [r for r in prev.get(k, []) if (r.get("shape"), r.get("section")) not in self.ran] + res[k]
        for k in ("random_weights", "models", "saturation"):
            res[k] = {**prev.get(k, {}), **res[k]}
        res["format_paths"] = {s: {**prev.get("format_paths", {}).get(s, {}), **v}
                               for s, v in {**prev.get("format_paths", {}), **res["format_paths"]}.items()}
        res["invocations"] = prev.get("invocations", []) + res["invocations"]
        return res

    def write(self) -> dict:
        """Write ``DIR/speed.json`` (atomically: a crash leaves the previous whole file); returns what it wrote."""
        res = self.merged()
        path = self.out / "speed.json"
        tmp = path.with_suffix(".json.tmp")
        tmp.write_text(json.dumps(res, indent=1, default=str) + "\n")
        tmp.replace(path)
        return res


def record_key(r: dict) -> tuple:
    """What a decode record (or compile entry) measured: shape, format, path, batch."""
    return r["shape"], r["format"], r["path"], r["batch"]


# --- models ------------------------------------------------------------------------------------------------------

def label_of(shape: str) -> str:
    """The ``shape`` field of a ``--shapes`` entry: smollm2-135m (bundled), a shape's name, a folder's name."""
    from helpers.shapes import SHAPES

    return "smollm2-135m" if shape == "bundled" else shape if shape in SHAPES else Path(shape).expanduser().name


def source_of(shape: str, device: str) -> tuple[Path, bool]:
    """(checkpoint folder, random weights?) of a ``--shapes`` entry; a random shape is built once, on ``device``."""
    from helpers.checkpoints import RANDOM_MARK, random_checkpoint, resolve_model
    from helpers.shapes import SHAPES

    if shape in SHAPES:
        return random_checkpoint(shape, device=device), True
    path = Path(resolve_model(shape))
    return path, shape != "bundled" and (path / RANDOM_MARK).is_file()


def quant_config(fmt: str):
    """The ``quantization_config`` of a format (None for bf16)."""
    import torch
    from transformers import BitsAndBytesConfig, TorchAoConfig

    if fmt.startswith("int8"):
        return BitsAndBytesConfig(load_in_8bit=True, llm_int8_threshold=6.0 if fmt == "int8-t6" else 0.0)
    if fmt.startswith("nf4"):
        return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=torch.bfloat16,
                                  bnb_4bit_use_double_quant=fmt == "nf4-dq")
    if fmt.startswith("torchao"):
        from torchao.quantization import Int4WeightOnlyConfig, Int8WeightOnlyConfig

        return TorchAoConfig(Int8WeightOnlyConfig() if fmt == "torchao-int8wo"
                             else Int4WeightOnlyConfig(int4_packing_format="tile_packed_to_4d"))
    return None


def load(path: Path, fmt: str, device: str):
    """``from_pretrained`` in bf16 (quantized as ``fmt`` says) onto ``device``: (model, seconds)."""
    import torch
    from transformers import AutoModelForCausalLM

    from helpers.measure import sync
    from helpers.quiet import known_warnings_silenced

    kw = {"dtype": torch.bfloat16}
    if device == "cuda":
        kw["device_map"] = "cuda"
    with known_warnings_silenced():
        if fmt != "bf16":
            kw["quantization_config"] = quant_config(fmt)
        sync()
        t0 = time.perf_counter()
        model = AutoModelForCausalLM.from_pretrained(path, **kw)
        sync()
    return model.eval(), time.perf_counter() - t0


def conversion_cause(fmt: str, device: str) -> str | None:
    """Why transformers could not convert the weights to a torchao format: the error torchao's own ``quantize_``
    raises on one bf16 Linear on ``device`` (transformers puts it in a load report that a quiet run does not print)."""
    import torch

    if not fmt.startswith("torchao"):
        return None
    from torchao.quantization import quantize_

    try:
        quantize_(torch.nn.Linear(256, 256, dtype=torch.bfloat16, device=device), quant_config(fmt).quant_type)
    except Exception as e:  # noqa: BLE001
        return f"torchao's quantize_ on one bf16 Linear on {device} raises {type(e).__name__}: {e}"
    return None


def free(compiled: bool = False) -> None:
    """Release what a deleted model held; ``compiled=True`` also drops every compiled graph and CUDA graph."""
    import torch

    if compiled:
        torch.compiler.reset()
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()


@functools.cache
def text_ids(path: Path):
    """The bundled text (helpers/data/alice.txt) as token ids of the checkpoint's tokenizer, or None without one."""
    if not (path / "tokenizer.json").is_file():
        return None
    from transformers import AutoTokenizer

    text = (ROOT / "helpers/data/alice.txt").read_text()
    return AutoTokenizer.from_pretrained(path)(text, return_tensors="pt")["input_ids"][0]


def prompts(path: Path, config, length: int, batch: int, device: str):
    """``batch`` different prompts of ``length`` tokens: consecutive pieces of the bundled text where the folder
    has a tokenizer, else seeded random ids."""
    import torch

    vocab = config.get_text_config().vocab_size
    ids = text_ids(path)
    if ids is not None:
        ids = ids[ids < vocab]
        ids = ids.repeat(-(-length * batch // len(ids)))[: length * batch].view(batch, length)
    else:
        ids = torch.randint(0, vocab, (batch, length), generator=torch.Generator().manual_seed(0))
    return {"input_ids": ids.to(device), "attention_mask": torch.ones_like(ids).to(device)}


# --- decode ------------------------------------------------------------------------------------------------------

def path_kwargs(path: str) -> dict:
    """``generate`` keywords of a path."""
    from transformers import CompileConfig

    if path == "eager":
        return {}
    kw = {"cache_implementation": "static"}
    if path == "static" and _cuda():
        kw["disable_compile"] = True  # on CUDA generate would compile a static cache's forward itself
    if path == "static+tuned":
        kw["compile_config"] = CompileConfig(mode=None, options=dict(TUNED_OPTIONS))
    return kw


def _cuda() -> bool:
    import torch

    return torch.cuda.is_available()


def decode(run: Run, m: dict, model, fmt: str, path: str, batch: int, section: str) -> dict | None:
    """One record (reused when the same shape, format, path and batch was measured before), or None."""
    import torch

    from helpers.measure import MeasurementError, decode_bytes, decode_limit, sync, time_generate
    from helpers.speed import compiled_graphs, decode_flops

    key = (m["label"], fmt, path, batch)
    what = {"shape": m["label"], "format": fmt, "path": path, "batch": batch, "section": section}
    if key in run.done:
        run.done[key]["sections"].append(section)
        return run.done[key]
    if key in run.failed:
        return None
    if run.over_budget(what):
        return None
    a = run.args
    inputs = prompts(m["path"], model.config, a.prompt, batch, run.device)
    context = a.prompt + a.tokens // 2  # the mean cache over the timed steps (notebook 04 counts it so too)
    kw = {**path_kwargs(path), "pad_token_id": model.generation_config.pad_token_id
          or model.config.get_text_config().eos_token_id or 0}
    compiled = path in COMPILED
    if path == "compile":
        model.forward = torch.compile(model.forward)  # an instance attribute: `del model.forward` undoes it
    try:
        if torch.cuda.is_available():
            torch.cuda.reset_peak_memory_stats()
        limit = decode_limit(model, run.res["bandwidth"]["bytes_per_s"], batch, context)
        g0 = compiled_graphs()
        with torch.inference_mode():
            sync()
            t0 = time.perf_counter()
            out = model.generate(**inputs, max_new_tokens=a.tokens, min_new_tokens=a.tokens, do_sample=False, **kw)
            sync()
            warmup = time.perf_counter() - t0
            # every shape a timed repeat uses, once: 1 new token, then the full run again (a compiled path
            # recompiles when the static cache's length changes, before the timing, not during it)
            for n in (1, a.tokens) if compiled else ():
                model.generate(**inputs, max_new_tokens=n, min_new_tokens=n, do_sample=False, **kw)
        g1 = compiled_graphs()
        # warmup=0: the runs above were the warm-up
        r = time_generate(model, inputs, new_tokens=a.tokens, repeats=3, warmup=0, limit_tokens_per_s=limit / batch,
                          **kw)
        g2 = compiled_graphs()
        if compiled:
            # the first run of a compiled path must compile (later batches may reuse its graph, or recompile
            # during their warm-up); no run may compile during the timed repeats
            first = key[:3] not in run.compiled
            run.res["compile"].append({**what, "warmup_s": round(warmup, 2), "graphs_during_warmup": g1 - g0,
                                       "graphs_during_timed_repeats": g2 - g1,
                                       "compiled": (g1 > g0 or not first) and g2 == g1})
            if first and g1 == g0:
                raise MeasurementError(
                    "no graph was compiled during the warm-up: this path did not compile (generate compiles only on "
                    "CUDA, XPU, Neuron or TPU; transformers does not compile a model whose quantizer cannot be "
                    "compiled; dynamo stops compiling a function once it reaches its recompile limit)")
            if g2 > g1:
                raise MeasurementError(f"{g2 - g1} graph(s) compiled during the timed repeats: a recompile was timed")
            run.compiled.add(key[:3])
    except Exception as e:  # noqa: BLE001  (a refusal, with its reason, is the result)
        run.failed.add(key)
        run.refuse(what, e)
        return None
    finally:
        if path == "compile":
            del model.forward
    config = model.config.get_text_config()
    bytes_step = decode_bytes(model, batch, context)
    flops_step = decode_flops(config, batch, context)
    rate = run.res["matmul"]["flops_per_s"]
    rec = {"shape": m["label"], "format": fmt, "path": path, "batch": batch,
           "tokens_per_s": r["total_tokens_per_s"], "tokens_per_s_per_sequence": r["tokens_per_s"],
           "limit_tokens_per_s": limit, "share_of_limit": r["total_tokens_per_s"] / limit,
           "bandwidth_bytes_per_s": run.res["bandwidth"]["bytes_per_s"],
           "spread": [r["spread"][0] * batch, r["spread"][1] * batch], "ttft_s": r["ttft_s"],
           "warmup_s": warmup, "repeats": r["runs"], "random_weights": m["random"], "new_tokens": a.tokens,
           "prompt_tokens": a.prompt, "context": context, "bytes_per_step": bytes_step, "flops_per_step": flops_step,
           "compute_limit_tokens_per_s": batch * rate / flops_step, "sections": [section]}
    run.tokens[key] = out[0, -a.tokens:].tolist()
    if torch.cuda.is_available():
        rec["peak_gib"] = round(torch.cuda.max_memory_allocated() / 2**30, 2)
    run.done[key] = rec
    run.res["records"].append(rec)
    run.log(f"{m['label']} {fmt} {path} batch {batch}: {rec['tokens_per_s']:.4g} tokens/s total "
            f"({rec['share_of_limit']:.1%} of {limit:.4g}), warm-up {warmup:.1f} s")
    return rec


# --- sections ----------------------------------------------------------------------------------------------------

def section(run: Run, name: str, label: str):
    """Time a section into ``plan.took_s`` and write the file after it."""
    class _Timed:
        def __enter__(self):
            self.t = time.perf_counter()
            run.ran.add((label, name))
            run.log(f"== {label}: {name}")

        def __exit__(self, *exc):
            run.res["plan"]["took_s"][f"{label}: {name}"] = round(time.perf_counter() - self.t, 1)
            run.write()
            return False
    return _Timed()


def measure_limit(run: Run) -> None:
    from helpers.measure import memory_bandwidth
    from helpers.speed import matmul_rate

    gib = 4 if run.device == "cuda" else 1
    rates = [memory_bandwidth(run.device, gib=gib, repeats=3) for _ in range(3)]
    run.res["bandwidth"] = {"bytes_per_s": statistics.median(rates), "spread": [min(rates), max(rates)], "gib": gib,
                            "how": "a copy of gib GiB, bytes read plus written over the time; median of three "
                                   "medians of 3 (helpers.measure.memory_bandwidth)"}
    run.res["matmul"] = matmul_rate(run.device)
    run.log(f"bandwidth {run.res['bandwidth']['bytes_per_s'] / 1e9:.1f} GB/s, matmul "
            f"{run.res['matmul']['flops_per_s'] / 1e12:.3g} TFLOP/s")


def measure_paths(run: Run, m: dict, model, paths) -> str:
    """Every path at batch 1; returns the fastest bf16 path the sweep takes."""
    eager = decode(run, m, model, "bf16", "eager", 1, "paths")
    for p in paths:
        rec = decode(run, m, model, "bf16", p, 1, "paths") if p != "eager" else None
        if rec and eager:  # greedy tokens of the first sequence, this path against eager
            mine, theirs = run.tokens[(m["label"], "bf16", p, 1)], run.tokens[(m["label"], "bf16", "eager", 1)]
            rec["same_tokens_as_eager"] = mine == theirs
            rec["first_token_differing_from_eager"] = next((i for i, (x, y) in enumerate(zip(mine, theirs)) if x != y),
                                                           None)
    sweepable = [p for p in paths if run.device == "cuda" or p not in COMPILED]
    measured = [run.done[k] for k in run.done if k[0] == m["label"] and k[1] == "bf16" and k[3] == 1
                and k[2] in sweepable]
    best = max(measured, key=lambda r: r["tokens_per_s"])["path"] if measured else "eager"
    return best


def measure_batches(run: Run, m: dict, model, path: str, batches) -> None:
    recs = [r for r in (decode(run, m, model, "bf16", path, b, "batch") for b in batches) if r]
    why = ("the fastest bf16 path at batch 1" + ("" if run.device == "cuda" else
           " among those that do not compile (on a CPU a compile costs a minute or more, and the first new batch "
           "size compiles again)"))
    sat = run.res["saturation"][m["label"]] = {"path": path, "why": why if "paths" in run.ran_for(m) else
                                               "--skip paths: eager"}
    sat["stops_at_batch"] = None
    sat["reason"] = (f"total tokens/s grew by 10% or more at every doubling up to batch {recs[-1]['batch']}"
                     if len(recs) > 1 else "fewer than two batches measured: no doubling to judge")
    for i, a in enumerate(recs):  # the first batch where decode stops being bandwidth-bound, and why
        if a["compute_limit_tokens_per_s"] < a["limit_tokens_per_s"]:
            sat["stops_at_batch"] = a["batch"]
            sat["reason"] = (f"at batch {a['batch']} the compute limit ({a['compute_limit_tokens_per_s']:.4g} "
                             f"tokens/s from the matmul rate) is below the bandwidth limit "
                             f"({a['limit_tokens_per_s']:.4g}): compute binds")
            break
        b = recs[i + 1] if i + 1 < len(recs) else None
        if b and b["batch"] == 2 * a["batch"] and b["tokens_per_s"] < 1.10 * a["tokens_per_s"]:
            sat["stops_at_batch"] = a["batch"]
            sat["reason"] = (f"doubling batch {a['batch']} to {b['batch']} changed total tokens/s by "
                             f"{b['tokens_per_s'] / a['tokens_per_s'] - 1:+.0%}, less than +10%")
            break


def measure_formats(run: Run, m: dict, model, best: str, formats, batches) -> None:
    for fmt in formats:
        if fmt == "bf16":
            path, why = best, "the sweep's path"
        elif fmt.startswith(("int8", "nf4")):
            path, why = "eager", "transformers does not compile bitsandbytes models (is_compileable is False)"
        else:
            path = best
            why = "the sweep's path" + (" (torchao's quantizer can be compiled)" if best in COMPILED else "")
        run.res["format_paths"].setdefault(m["label"], {})[fmt] = {"path": path, "why": why}
        if fmt == "bf16":
            for b in batches:
                decode(run, m, model, fmt, path, b, "formats")
            continue
        what = {"shape": m["label"], "format": fmt, "path": path, "section": "formats"}
        if run.over_budget(what):
            continue
        try:
            q, secs = load(m["path"], fmt, run.device)
        except Exception as e:  # noqa: BLE001  (e.g. torchao int4 on a CPU: refused with its reason)
            run.refuse(what, e, conversion_cause(fmt, run.device) if "CONVERSION" in str(e) else None)
            continue
        run.log(f"{fmt} loaded in {secs:.1f} s")
        for b in batches:
            decode(run, m, q, fmt, path, b, "formats")
        del q
        free()


def measure_prefill(run: Run, m: dict, model, lengths) -> None:
    import torch

    from helpers.measure import decode_bytes, sync
    from helpers.speed import prefill_flops

    rate = run.res["matmul"]["flops_per_s"]
    longest = getattr(model.config.get_text_config(), "max_position_embeddings", None)
    for n in lengths:
        what = {"shape": m["label"], "format": "bf16", "path": "eager", "prompt_tokens": n, "section": "prefill"}
        if longest and n + 1 > longest:
            run.res["skipped"].append({**what, "reason": f"not run: the model's max_position_embeddings is {longest}"})
            continue
        if run.over_budget(what):
            continue
        inputs = prompts(m["path"], model.config, n, 1, run.device)
        times = []
        with torch.inference_mode():
            for i in range(4):  # a warm-up, then 3 repeats
                sync()
                t0 = time.perf_counter()
                model.generate(**inputs, max_new_tokens=1, do_sample=False, pad_token_id=0)
                sync()
                if i:
                    times.append(time.perf_counter() - t0)
        ttft = statistics.median(times)
        flops = prefill_flops(model.config.get_text_config(), n)
        rec = {**what, "batch": 1, "ttft_s": ttft, "spread": [min(times), max(times)], "repeats": 3,
               "flops": flops, "floor_s": flops / rate, "share_of_floor": flops / rate / ttft,
               "bytes": decode_bytes(model, 1, n), "random_weights": m["random"]}
        if rec["share_of_floor"] > 1:
            run.refuse(what, RuntimeError(f"time to first token {ttft:.3g} s is below the FLOP floor "
                                          f"{rec['floor_s']:.3g} s: the matmul rate was understated"))
            continue
        run.res["prefill"].append(rec)
        run.log(f"prefill {n} tokens: {ttft * 1e3:.0f} ms (floor {rec['floor_s'] * 1e3:.0f} ms)")


def measure_load(run: Run, m: dict) -> None:
    build = ROOT / "build"
    build.mkdir(exist_ok=True)
    saved = Path(tempfile.mkdtemp(prefix="bench-nf4-", dir=build))  # ours: removed below
    try:
        for what, src, fmt in (("bf16", m["path"], "bf16"), ("nf4, quantized while loading", m["path"], "nf4"),
                               ("nf4, saved and loaded again", saved, "bf16")):
            item = {"shape": m["label"], "what": what, "section": "load"}
            if run.over_budget(item):
                continue
            times = []
            try:
                for _ in range(run.args.load_repeats):
                    model, secs = load(src, fmt, run.device)
                    times.append(secs)
                    if what.startswith("nf4, quantized") and not (saved / "config.json").is_file():
                        model.save_pretrained(saved)
                    del model
                    free()
            except Exception as e:  # noqa: BLE001
                run.refuse(item, e)
                continue
            run.res["load"].append({**item, "format": "nf4" if what.startswith("nf4") else "bf16",
                                    "seconds": statistics.median(times), "repeats": len(times),
                                    "spread": [min(times), max(times)] if len(times) > 1 else None,
                                    "runs": times, "random_weights": m["random"]})
            run.log(f"load {what}: {statistics.median(times):.2f} s")
    finally:
        shutil.rmtree(saved, ignore_errors=True)


# --- plots -------------------------------------------------------------------------------------------------------

def plot(res: dict, out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from helpers.speed import roofline

    shapes = list(res["models"])
    if not shapes:
        return
    fig, axes = plt.subplots(1, len(shapes), figsize=(7 * len(shapes), 5), squeeze=False)
    for ax, s in zip(axes[0], shapes):
        bw, rate = res["models"][s]["bandwidth"], res["models"][s]["matmul"]
        pts = [{"label": f"{r['path']} {r['format']} b{r['batch']}", "flops": r["flops_per_step"],
                "bytes": r["bytes_per_step"], "seconds": r["batch"] / r["tokens_per_s"]}
               for r in res["records"] if r["shape"] == s and ("paths" in r["sections"] or "batch" in r["sections"])]
        pts += [{"label": f"prefill {p['prompt_tokens']}", "flops": p["flops"], "bytes": p["bytes"],
                 "seconds": p["ttft_s"]} for p in res["prefill"] if p["shape"] == s]
        if pts:
            ax.set_prop_cycle(color=plt.get_cmap("tab20").colors)  # up to 20 points, each its own colour
            roofline(ax, bw, rate, pts)
            ax.set_title(f"{s}: {bw / 1e9:.0f} GB/s, {rate / 1e12:.2f} TFLOP/s (bf16 matmul)")
    fig.tight_layout()
    fig.savefig(out / "roofline.png", dpi=100)
    plt.close(fig)

    fig, axes = plt.subplots(1, len(shapes), figsize=(7 * len(shapes), 5), squeeze=False)
    for ax, s in zip(axes[0], shapes):
        path = res["saturation"].get(s, {}).get("path")
        recs = sorted((r for r in res["records"] if r["shape"] == s and r["path"] == path and r["format"] == "bf16"),
                      key=lambda r: r["batch"])
        if not recs:
            continue
        b = [r["batch"] for r in recs]
        ax.plot(b, [r["tokens_per_s"] for r in recs], "o-", label="total")
        ax.plot(b, [r["tokens_per_s_per_sequence"] for r in recs], "s-", label="per sequence")
        ax.plot(b, [r["limit_tokens_per_s"] for r in recs], "k--", label="bandwidth limit (total)")
        ax.plot(b, [r["compute_limit_tokens_per_s"] for r in recs], "k:", label="compute limit (total)")
        sat = res["saturation"].get(s, {}).get("stops_at_batch")
        if sat:
            ax.axvline(sat, color="grey", lw=1, label=f"stops being bandwidth-bound: batch {sat}")
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xlabel("batch (sequences)")
        ax.set_ylabel("tokens/s")
        ax.set_title(f"{s}, bf16, {path}: decode against batch")
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out / "batch.png", dpi=100)
    plt.close(fig)


# --- main --------------------------------------------------------------------------------------------------------

def run_shape(run: Run, shape: str) -> None:
    from helpers.shapes import SHAPES, n_params

    a, defaults = run.args, SHAPE_DEFAULTS.get(shape, {}) if run.device == "cuda" else {}
    label = label_of(shape)
    with section(run, "set-up", label):
        path, random = source_of(shape, run.device)
        free()  # a random checkpoint was just built on the device
        model, secs = load(path, "bf16", run.device)
        m = {"label": label, "path": path, "random": random}
        run.res["random_weights"][label] = random
        source = ("the bundled model (SmolLM2-135M-Instruct)" if shape == "bundled" else
                  "random weights (helpers.checkpoints.random_checkpoint)" if shape in SHAPES else
                  f"the checkpoint {path.name}" + (" (random weights)" if random else ""))
        run.res["models"][label] = {"source": source, "params": n_params(model), "random_weights": random,
                                    "bandwidth": run.res["bandwidth"]["bytes_per_s"],
                                    "matmul": run.res["matmul"]["flops_per_s"], "first_load_s": secs}
    paths = a.paths or defaults.get("paths") or (CUDA_PATHS if run.device == "cuda" else CPU_PATHS)
    if a.quick and not a.paths:
        paths = ("eager", "static")
        run.res["skipped"].append({"shape": label, "section": "paths", "path": "compile",
                                   "reason": "not run: --quick (a compile takes a minute or more)"})
    best = "eager"
    if "paths" not in a.skip:
        with section(run, "paths", label):
            best = measure_paths(run, m, model, paths)
    if "batch" not in a.skip:
        with section(run, "batch", label):
            measure_batches(run, m, model, best, a.batches or defaults.get("batches") or (1, 2, 4, 8, 16, 32, 64))
    if "formats" not in a.skip:
        with section(run, "formats", label):
            measure_formats(run, m, model, best, a.formats or defaults.get("formats") or FORMATS,
                            a.format_batches or defaults.get("format_batches") or (1, 16))
    if "prefill" not in a.skip:
        with section(run, "prefill", label):
            measure_prefill(run, m, model, a.prefill or ((128, 512, 2048, 8192) if run.device == "cuda"
                                                         else (64, 256, 1024)))
    del model
    free(compiled=True)
    if "load" not in a.skip:
        with section(run, "load", label):
            measure_load(run, m)


def child_argv(args, shape: str, append: bool) -> list[str]:
    """The command line of one shape's own process."""
    argv = [sys.executable, __file__, "--out", args.out, "--shapes", shape]
    for name in ("paths", "formats", "batches", "format_batches", "prefill", "skip"):
        v = getattr(args, name)
        if v:
            argv += [f"--{name.replace('_', '-')}", *map(str, v)]
    for name in ("minutes", "tokens", "prompt", "load_repeats"):
        if getattr(args, name) is not None:
            argv += [f"--{name.replace('_', '-')}", str(getattr(args, name))]
    return argv + ["--quick"] * args.quick + ["--append"] * append


def versions() -> dict:
    import torch

    names = ("torch", "transformers", "accelerate", "bitsandbytes", "torchao", "safetensors")
    out = {"python": sys.version.split()[0], "cuda": torch.version.cuda}
    for n in names:
        try:
            out[n] = importlib.metadata.version(n)
        except importlib.metadata.PackageNotFoundError:
            out[n] = "not installed"
    return out


def main(argv=None) -> int:
    args = parse_args(argv)
    import torch

    device = "cuda" if torch.cuda.is_available() else "cpu"
    shapes = args.shapes or (["llama-1b", "llama-3.1-8b"] if device == "cuda" else ["bundled"])
    if len(shapes) > 1:  # one process a shape: compile caches and dynamo's recompile limit are per process
        for i, s in enumerate(shapes):
            done = subprocess.run(child_argv(args, s, append=args.append or i > 0))
            if done.returncode:
                return done.returncode
        return 0
    a = args
    a.tokens = a.tokens or (8 if a.quick else 64 if device == "cuda" else 16)
    a.prompt = a.prompt or (8 if a.quick else 16)
    a.load_repeats = a.load_repeats or (3 if device == "cpu" else 1)
    if a.quick:
        a.batches = a.batches or [1, 2]
        a.format_batches = a.format_batches or [1, 2]
        a.formats = a.formats or ["bf16", "nf4", "torchao-int4wo"]
        a.prefill = a.prefill or [8, 32]
    run = Run(args, device)
    old = Path(args.out) / "speed.json"
    if args.append and old.is_file():
        run.prev = json.loads(old.read_text())
    from helpers.hardware import report
    from helpers.quiet import known_warnings_silenced

    # the known, harmless messages (helpers.quiet) quieted for the whole run: bitsandbytes logs on import on
    # some CPUs, and LLM.int8 on a CPU at every matrix product
    with known_warnings_silenced():
        run.res["hardware"], run.res["versions"] = report(), versions()
        with section(run, "limit", label_of(shapes[0])):
            measure_limit(run)
        run_shape(run, shapes[0])
    run.res["invocations"].append({"shapes": shapes, "argv": sys.argv[1:], "seconds": round(run.elapsed(), 1),
                                   "bandwidth": run.res["bandwidth"], "matmul": run.res["matmul"]})
    res = run.write()
    plot(res, run.out)
    run.log(f"wrote {run.out / 'speed.json'}, roofline.png and batch.png ({len(res['records'])} records, "
            f"{len(res['refused'])} refused, {len(res['skipped'])} skipped)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
