"""The speed benchmark: how fast generation runs on this machine, every figure beside this machine's limit.

Usage (``./workbook.sh bench`` runs it with ``--out build/bench``)::

    python tools/bench.py --out DIR [--shapes NAME_OR_PATH ...] [--quick] [--append | --append-from FILE]
                          [--minutes M] [--profile]
    python tools/bench.py --out DIR --plot-only     # the plots again from DIR/speed.json (e.g. after a killed run)

It writes ``DIR/speed.json`` again after every record, refusal and skip (atomically, so a run killed at any moment
leaves a whole file of what it measured; ``running`` then names what it was doing, ``null`` once a run ends) and,
at the end, two plots beside it, ``roofline.png`` (each measured step under the two ceilings,
:func:`helpers.speed.roofline`) and ``batch.png`` (tokens/s in total and per sequence against batch, with the limit).

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
   ``first_token_differing_from_eager``). dynamo's recompile limit is raised to 64 for the run (``settings``):
   at its default of 8 the formats' compiles could reach it, and dynamo then runs the forward uncompiled.
3. **batch** sweep 1, 2, 4, ... 64 on the fastest bf16 path (on a CPU the fastest that does not compile: a
   compile costs a minute or more there, and the first new batch size compiles again), and the batch at which
   decode stops being bandwidth-bound (``saturation``: total tokens/s grows by less than 10% when the batch
   doubles, or the compute limit from the matmul rate falls below the bandwidth limit).
4. **formats** at batch 1 and 16: bf16, LLM.int8 (threshold 6.0 and 0.0), NF4, NF4 with double
   quantization, torchao int8 and int4 weight-only through transformers' ``TorchAoConfig`` (int4 with
   ``int4_packing_format="tile_packed_to_4d"``; it fails on a CPU and is refused there with its reason; both
   with ``set_inductor_config=False``: torchao's default turns on coordinate-descent tuning for every later
   compile of the process, so a path named ``static+compile`` would run tuned).
   bitsandbytes formats run ``eager``: transformers does not compile bitsandbytes models (their quantizers'
   ``is_compileable`` is False). bf16 and torchao take the sweep's path.
5. **prefill**: time to first token at 3 or 4 prompt lengths against the FLOP floor
   (:func:`helpers.speed.prefill_flops` over the matmul rate); a default length beyond the model's
   ``max_position_embeddings`` is replaced by the longest it takes (llama-1b: 2047), a length given with
   ``--prefill`` is skipped there.
6. **profile** (``--profile`` only): ``torch.profiler`` over a few decode steps of one ``generate`` at batch 1 on
   the fastest bf16 path measured in this process (a ``LogitsProcessor`` marks each step), summarised per step
   in ``profile``: ``step_s`` (CPU wall time of a step), ``cpu_in_ops_s`` (inside torch ops and compiled
   graphs) and ``cpu_outside_ops_s`` (the rest: Python, ``generate``'s loop), ``launches_per_step`` (kernel and
   CUDA-graph launches), ``kernels_per_step`` and ``kernel_s_per_step`` (on the GPU), ``decode_step_s`` (the
   timed rate's step) and ``top`` (the 10 kernels with the most GPU time, on a CPU the 10 ops with the most
   self CPU time). It answers where a step's time goes: kernels, launches or Python.
7. **load**: bf16, NF4 quantized while loading, and an NF4 checkpoint saved (into a temporary folder under
   ``build/``, removed afterwards) and loaded again.

Every decode figure is a record in ``records``: ``shape``, ``format``, ``path``, ``batch``, ``tokens_per_s``
(TOTAL over the batch), ``tokens_per_s_per_sequence``, ``limit_tokens_per_s`` (TOTAL,
:func:`helpers.measure.decode_limit` with the bandwidth of this run and the mean context of the timed steps,
prompt plus half the new tokens), ``share_of_limit``, ``spread`` ([lowest, highest] total tokens/s of the
repeats), ``ttft_s``, ``warmup_s`` (the first run, compile included), ``repeats``, ``random_weights``, and what the
plots need (``bytes_per_step``, ``flops_per_step``, ``compute_limit_tokens_per_s``, ``bandwidth_bytes_per_s``).
Decode rate: ``(new_tokens - 1) / (t(new_tokens) - t(1))``, medians of 3 after a warm-up
(:func:`helpers.measure.time_generate`). A timing too noisy to mean anything (``MeasurementError``) or a path
that fails goes to ``refused`` with the reason; whatever the time budget (``--minutes``) or ``--quick`` leaves
out goes to ``skipped``: nothing is dropped silently, no number is made up.

The time budget: an item (a decode record, a format's load, a load, a prefill length, the profile) starts only
if the time used so far plus what it is expected to take fits in ``--minutes``; the expectation is a compile's
warm-up where the item compiles (:func:`expected_compile_s`: the longest compile measured so far in this
process, times 1.5 for the tuned path, else 30 s plus 15 s per billion parameters on CUDA, 90 s on a CPU) and
nothing otherwise. A skipped item's reason gives both figures.

Models: on a CPU, the bundled model (SmolLM2-135M-Instruct, run in bf16). On a GPU, RANDOM-weight shapes
(``random_weights`` true, their text is meaningless): ``llama-1b`` and ``llama-3.1-8b``, drawn on the device
with seed 0 (:func:`helpers.shapes.random_model`). Only the formats and load sections need them as a checkpoint
folder: the first of them to run saves it once (:func:`helpers.checkpoints.random_checkpoint`, 2.2 GB for
llama-1b, 16 GB for llama-3.1-8b, into the workbook's cache), timed as ``checkpoint`` in ``plan.took_s``; a run
that skips both writes nothing to disk. A path to a checkpoint folder works too (``--shapes PATH``).
Several shapes run one process each (compile caches and dynamo's recompile limit are per process);
``--append`` keeps what ``DIR/speed.json`` already holds, except what this invocation measures again (a record
of the same shape, format, path and batch; a section run again for the same shape); ``--append-from FILE`` does
the same from another file (a device call's ``$OUT`` starts empty: the second call names the first call's
``speed.json``, carried in the working tree).

The plan (``plan`` in the file records what each section took):

- 2-core CPU, bundled model, one invocation: at most 5 minutes (``--minutes 5``); the explicit compile is
  about a minute of it on a fresh machine (about 10 s once inductor's on-disk cache holds it). Measured on the
  idle machine with inductor's cache empty: 189 s (a cold compile of 71 s among them); with other work on the
  same two cores (load average 3 to 4) 7 min 43 s, of which the formats 5 minutes.
- One GPU (H200 or H100), two invocations, from the figures measured on an H200 (compile of the 8B static path
  about 150 s, of the 1.1B shape 20 to 60 s, more with tuning). A device call lasts at most 10 minutes: each
  invocation's budget leaves a minute for starting Python and what its wrapper installs first.

  1. ``--shapes llama-1b --profile`` (budget 4 min): set-up 0.1 (drawn on the GPU), limit 0.1, paths 1.5
     (two compiles), sweep 0.6 (one recompile: the batch size changes), checkpoint 0.2 (2.2 GB saved), formats
     1.0 (two torchao compiles, four bitsandbytes loads), prefill 0.2, profile 0.1, load 0.2: about 4 minutes;
     what would not fit is skipped and listed.
  2. ``--shapes llama-3.1-8b --append --profile`` (in a second device call ``--append-from`` the first call's
     ``speed.json``; budget 8 min, the 8B shape's defaults): set-up 0.2, limit 0.2, paths eager, static,
     static+compile and static+tuned 7 (eager and static 0.3, two compiles of about 2.5 and 3.5 minutes),
     prefill 0.2, profile 0.1; the sweep and the formats take bf16 at batch 1 only (the paths' record) and the
     load section is skipped, so nothing is written to disk: about 8 minutes.
     The shape's other formats, the sweep and the loads would need a third invocation, e.g. ``--shapes
     llama-3.1-8b --append --paths eager --formats bf16 nf4 --skip batch prefill`` (NF4 at batch 1 and the
     loads, with the 16 GB checkpoint saved first: about 3 minutes).

  Both: at most 12 minutes of device time, in two calls (the budgets hold each to its plan).
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import gc
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
    "cuda": {"device": "one GPU, H200 or H100 (estimated from the figures measured on an H200; remeasured in "
                       "took_s)",
             "invocations": [
                 {"shapes": ["llama-1b"], "minutes": 4,
                  "sections_min": {"set-up": 0.1, "limit": 0.1, "paths": 1.5, "batch": 0.6, "checkpoint": 0.2,
                                   "formats": 1.0, "prefill": 0.2, "profile": 0.1, "load": 0.2}},
                 {"shapes": ["llama-3.1-8b"], "minutes": 8,
                  "sections_min": {"set-up": 0.2, "limit": 0.2, "paths": 7.0, "prefill": 0.2, "profile": 0.1}}]},
}
"""The time plan written into ``speed.json`` (module docstring: the same in words)."""

SHAPE_DEFAULTS = {
    "llama-3.1-8b": {"paths": CUDA_PATHS, "batches": (1,), "formats": ("bf16",), "format_batches": (1,),
                     "skip": ("load",), "minutes": 8},
    "llama-1b": {"minutes": 4},
}
"""Per-shape defaults on CUDA that keep the GPU plan: the 8B shape's every compile costs 2.5 minutes or more, so its
invocation measures the four paths (the fastest one against the plain static cache, in one process) and leaves the
sweep, the other formats and the loads to the 1.1B shape. An option given on the command line replaces its default
(``--skip`` too: ``--skip`` alone skips nothing)."""


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", required=True, help="folder for speed.json and the plots (created)")
    ap.add_argument("--shapes", nargs="*", help="'bundled', a shape of helpers.shapes.SHAPES (random weights) "
                    "or a checkpoint folder; default: bundled on a CPU, llama-1b and llama-3.1-8b on CUDA")
    ap.add_argument("--quick", action="store_true", help="a tiny run for the unit test: few tokens, batches 1 "
                    "and 2, no compile, bf16, NF4 and torchao int4")
    ap.add_argument("--append", action="store_true", help="keep what DIR/speed.json holds, but for what this "
                    "invocation measures again")
    ap.add_argument("--append-from", type=Path, metavar="FILE", help="as --append, from FILE instead of "
                    "DIR/speed.json (a device call's OUT folder starts empty: carry the first call's speed.json "
                    "in the working tree and name it here)")
    ap.add_argument("--minutes", type=float, help="time budget of each shape's process: an item that would not "
                    "end within it is skipped, and listed (default 5 on a CPU; on CUDA 6, 4 for llama-1b, 8 for "
                    "llama-3.1-8b)")
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
    ap.add_argument("--skip", nargs="*", choices=["paths", "batch", "formats", "prefill", "load"],
                    help="sections to leave out (replaces a shape's default skips: llama-3.1-8b skips load on CUDA)")
    ap.add_argument("--profile", action="store_true", help="profile a few decode steps of the fastest bf16 path "
                    "(torch.profiler: kernels, launches, time outside torch ops) into speed.json's 'profile'")
    ap.add_argument("--plot-only", action="store_true", help="draw the plots from DIR/speed.json and stop")
    return ap.parse_args(argv)


# --- the run's state ---------------------------------------------------------------------------------------------

class Run:
    """What this invocation measured so far; ``write`` puts it in ``DIR/speed.json``."""

    def __init__(self, args, device: str, budget_s: float):
        self.args, self.device, self.t0 = args, device, time.perf_counter()
        self.out = Path(args.out)
        self.out.mkdir(parents=True, exist_ok=True)
        self.budget = budget_s
        self.res = {"hardware": None, "versions": None, "settings": {}, "random_weights": {}, "models": {},
                    "bandwidth": None, "matmul": None, "records": [], "prefill": [], "load": [], "compile": [],
                    "profile": {}, "refused": [], "skipped": [], "saturation": {}, "format_paths": {},
                    "plan": dict(PLAN[device], took_s={}), "running": None,
                    "invocations": [{"shapes": args.shapes, "argv": sys.argv[1:], "budget_s": budget_s}]}
        self.done: dict[tuple, dict] = {}
        self.failed: set[tuple] = set()
        self.compiled: set[tuple] = set()  # (shape, format, path) whose graph compiled in this process
        self.compile_s: dict[str, float] = {}  # path -> the longest compile warm-up measured in this process
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

    def over_budget(self, what: dict, need_s: float = 0.0) -> bool:
        """True (and ``what`` listed in ``skipped``) where the time used plus ``need_s`` (what the item is expected
        to take: a compile) does not fit in the time budget."""
        if self.elapsed() + need_s < self.budget:
            return False
        need = f", and it was expected to take {need_s:.0f} s (a compile)" if need_s else ""
        self.res["skipped"].append({**what, "reason": f"not run: {self.elapsed():.0f} s of the run's "
                                    f"{self.budget / 60:g} minutes (--minutes) were used{need}"})
        self.log(f"skipped {what}: over the time budget{need}")
        self.write()
        return True

    @contextlib.contextmanager
    def item(self, what: dict):
        """Name ``what`` as ``running`` in the file while it runs: a run killed meanwhile says what it was doing."""
        before = self.res["running"]
        self.res["running"] = {**what, "since_s": round(self.elapsed(), 1)}
        self.write()
        try:
            yield
        finally:
            self.res["running"] = before
            self.write()

    def refuse(self, what: dict, error: BaseException, cause: str | None = None) -> None:
        reason = f"{type(error).__name__}: {error}".strip() + (f" The cause: {cause}" if cause else "")
        self.res["refused"].append({**what, "reason": reason})
        self.log(f"refused {what}: {reason[:300]}")
        self.write()

    def merged(self) -> dict:
        """This invocation's results over an earlier invocation's (``--append``): a record measured again, or a
        section run again for the same shape, replaces the earlier one; the rest is kept."""
        res, prev = dict(self.res), self.prev
        res["invocations"][-1].update(seconds=round(self.elapsed(), 1), bandwidth=res["bandwidth"],
                                      matmul=res["matmul"])
        res["plan"] = {**res["plan"], "took_s": {**prev.get("plan", {}).get("took_s", {}), **res["plan"]["took_s"],
                                                 "total": round(self.elapsed(), 1)}}
        if not prev:
            return res
        for k in ("records", "compile"):
            again = {record_key(r) for r in res[k]}
            res[k] = [r for r in prev.get(k, []) if record_key(r) not in again] + res[k]
        for k in ("prefill", "load", "refused", "skipped"):
            res[k] = [r for r in prev.get(k, []) if (r.get("shape"), r.get("section")) not in self.ran
                      and r not in res[k]] + res[k]  # (an entry given again, e.g. a section skipped again, once)
        for k in ("random_weights", "models", "saturation", "profile"):
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


def first_model(run: Run, shape: str) -> tuple:
    """(bf16 model on the device, ``m``, seconds) of a ``--shapes`` entry. ``m`` is ``{"label", "shape", "path",
    "random"}``; a named shape's weights are drawn on the device (seed 0, the weights :func:`checkpoint` saves),
    and its ``path`` stays None until a section needs the folder (:func:`checkpoint`)."""
    import torch

    from helpers.checkpoints import RANDOM_MARK, resolve_model
    from helpers.measure import sync
    from helpers.shapes import SHAPES, random_model

    m = {"label": label_of(shape), "shape": shape, "path": None, "random": shape in SHAPES}
    if shape in SHAPES:
        sync()
        t0 = time.perf_counter()
        model = random_model(shape, dtype=torch.bfloat16, seed=0, device=run.device)
        sync()
        return model, m, time.perf_counter() - t0
    m["path"] = Path(resolve_model(shape))
    m["random"] = shape != "bundled" and (m["path"] / RANDOM_MARK).is_file()
    model, secs = load(m["path"], "bf16", run.device)
    return model, m, secs


def checkpoint(run: Run, m: dict) -> Path:
    """The checkpoint folder of ``m``: a named shape's random weights saved once into the workbook's cache
    (:func:`helpers.checkpoints.random_checkpoint`, drawn on the device), timed as ``checkpoint``."""
    if m["path"] is None:
        from helpers.checkpoints import random_checkpoint

        t0 = time.perf_counter()
        m["path"] = random_checkpoint(m["shape"], device=run.device)
        free()  # the weights were drawn on the device to be saved
        run.res["plan"]["took_s"][f"{m['label']}: checkpoint"] = round(time.perf_counter() - t0, 1)
        run.log(f"checkpoint {m['path']} ready in {time.perf_counter() - t0:.1f} s")
    return m["path"]


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

        # set_inductor_config=False: torchao's default (recommended_inductor_config_setter) turns on
        # coordinate-descent tuning for every later compile of the process; here the path alone decides it
        return TorchAoConfig(Int8WeightOnlyConfig(set_inductor_config=False) if fmt == "torchao-int8wo"
                             else Int4WeightOnlyConfig(int4_packing_format="tile_packed_to_4d",
                                                       set_inductor_config=False))
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
def text_ids(path: Path | None):
    """The bundled text (helpers/data/alice.txt) as token ids of the checkpoint's tokenizer, or None without one."""
    if path is None or not (path / "tokenizer.json").is_file():
        return None
    from transformers import AutoTokenizer

    text = (ROOT / "helpers/data/alice.txt").read_text()
    return AutoTokenizer.from_pretrained(path)(text, return_tensors="pt")["input_ids"][0]


def prompts(path: Path | None, config, length: int, batch: int, device: str):
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


def expected_compile_s(run: Run, m: dict, path: str) -> float:
    """Seconds the first run of a compiled ``path`` is expected to take (its compile): the longest compile warm-up
    measured so far in this process (times 1.5 for the tuned path after an untuned one), else on CUDA 30 s plus 15 s
    per billion parameters (one H200: about 150 s for the 8B shape's static path, 20 to 60 s for the 1.1B one), on a
    CPU 90 s (57 to 76 s measured on 2 cores). The time budget (:meth:`Run.over_budget`) uses it."""
    if run.compile_s:
        longest = max(run.compile_s.values())
        tuned_after_untuned = path == "static+tuned" and "static+tuned" not in run.compile_s
        return longest * (1.5 if tuned_after_untuned else 1.0)
    if run.device != "cuda":
        return 90.0
    params = run.res["models"].get(m["label"], {}).get("params") or 0
    return (30 + 15 * params / 1e9) * (1.5 if path == "static+tuned" else 1.0)


def decode(run: Run, m: dict, model, fmt: str, path: str, batch: int, section: str) -> dict | None:
    """One record (reused when the same shape, format, path and batch was measured before), or None."""
    key = (m["label"], fmt, path, batch)
    what = {"shape": m["label"], "format": fmt, "path": path, "batch": batch, "section": section}
    if key in run.done:
        run.done[key]["sections"].append(section)
        return run.done[key]
    if key in run.failed:
        return None
    # a compiled path compiles at its first run, and again at its first batch above 1 (dynamo then makes the batch
    # dimension dynamic); later batch sizes reuse that graph
    batches = {k[3] for k in run.done if k[:3] == key[:3]}
    compiles = path in COMPILED and (key[:3] not in run.compiled or batch > 1 and max(batches, default=1) == 1)
    if run.over_budget(what, expected_compile_s(run, m, path) if compiles else 0.0):
        return None
    with run.item(what):
        return _decode(run, m, model, fmt, path, batch, section, what)


def _decode(run: Run, m: dict, model, fmt: str, path: str, batch: int, section: str, what: dict) -> dict | None:
    import torch

    from helpers.measure import MeasurementError, decode_bytes, decode_limit, sync, time_generate
    from helpers.speed import compiled_graphs, decode_flops

    key = (m["label"], fmt, path, batch)
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
            if first:  # what the next compile of this process is expected to take (the time budget)
                run.compile_s[path] = max(run.compile_s.get(path, 0.0), warmup)
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
        compiles = path in COMPILED and (m["label"], fmt, path) not in run.compiled
        if run.over_budget(what, expected_compile_s(run, m, path) if compiles else 0.0):
            continue  # (not loaded only to find its first decode over the budget)
        with run.item({**what, "doing": "load"}):
            try:
                q, secs = load(checkpoint(run, m), fmt, run.device)
            except Exception as e:  # noqa: BLE001  (e.g. torchao int4 on a CPU: refused with its reason)
                run.refuse(what, e, conversion_cause(fmt, run.device) if "CONVERSION" in str(e) else None)
                continue
        run.log(f"{fmt} loaded in {secs:.1f} s")
        for b in batches:
            decode(run, m, q, fmt, path, b, "formats")
        del q
        free()
        if run.device == "cuda":  # what the format left behind (compiled graphs' memory pools, a leak)
            import torch

            run.res["format_paths"][m["label"]][fmt]["gib_allocated_after"] = round(
                torch.cuda.memory_allocated() / 2**30, 2)


def measure_prefill(run: Run, m: dict, model, lengths, given: bool) -> None:
    """Time to first token at each prompt length (``given``: lengths from ``--prefill``, else the defaults, whose
    lengths beyond the model's ``max_position_embeddings`` become the longest it takes)."""
    import torch

    from helpers.measure import decode_bytes, sync
    from helpers.speed import prefill_flops

    rate = run.res["matmul"]["flops_per_s"]
    longest = getattr(model.config.get_text_config(), "max_position_embeddings", None)
    if longest and not given:
        lengths = sorted({min(n, longest - 1) for n in lengths})
    for n in lengths:
        what = {"shape": m["label"], "format": "bf16", "path": "eager", "prompt_tokens": n, "section": "prefill"}
        if longest and n + 1 > longest:
            run.res["skipped"].append({**what, "reason": f"not run: the model's max_position_embeddings is {longest}"})
            continue
        if run.over_budget(what):
            continue
        inputs = prompts(m["path"], model.config, n, 1, run.device)
        times = []
        with run.item(what), torch.inference_mode():
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


LAUNCHES = ("LaunchKernel", "LaunchCooperativeKernel", "GraphLaunch")
"""Parts of the names of the CUDA runtime and driver calls that launch work on the GPU, a kernel or a whole CUDA graph
(the profiler names them ``cudaLaunchKernel``, ``cuLaunchKernel``, ``cudaLaunchKernelExC_v11060``,
``cudaGraphLaunch``, ...)."""


def profile_path(run: Run, m: dict) -> str | None:
    """The fastest bf16 path at batch 1 measured in this process (on a CPU the explicit ``compile`` path is undone
    after its runs, so it is left out), or None."""
    recs = [r for k, r in run.done.items() if k[0] == m["label"] and k[1] == "bf16" and k[3] == 1
            and k[2] != "compile"]
    return max(recs, key=lambda r: r["tokens_per_s"])["path"] if recs else None


def measure_profile(run: Run, m: dict, model) -> None:
    """``torch.profiler`` over a few decode steps of one ``generate`` (batch 1, the fastest bf16 path), summarised per
    step into ``profile[shape]``: where a step's time goes (module docstring, section 6)."""
    path = profile_path(run, m)
    what = {"shape": m["label"], "format": "bf16", "path": path, "batch": 1, "section": "profile"}
    a = run.args
    if path is None or a.tokens < 4:
        run.res["skipped"].append({**what, "reason": "not run: no bf16 path was measured at batch 1" if path is None
                                   else "not run: --tokens below 4 leaves no decode step to profile"})
        return
    if run.over_budget(what):
        return
    with run.item(what):
        try:
            summary = _profile(run, m, model, path)
        except Exception as e:  # noqa: BLE001  (the profile is optional: its failure is recorded, the run goes on)
            run.refuse(what, e)
            return
    rec = run.done[(m["label"], "bf16", path, 1)]
    summary["decode_step_s"] = 1 / rec["tokens_per_s"]
    if summary["kernel_s_per_step"]:
        summary["gpu_busy_share_of_decode_step"] = summary["kernel_s_per_step"] / summary["decode_step_s"]
    run.res["profile"][m["label"]] = summary
    ms = {k: v * 1e3 for k, v in summary.items() if isinstance(v, float) and k.endswith(("_s", "_s_per_step"))}
    run.log(f"decode steps of {path} (device synchronised): the first {ms['first_decode_step_s']:.2f} ms, the median "
            f"{ms['median_decode_step_s']:.2f} ms")
    run.log(f"profile of {path}: a step {ms['step_s']:.2f} ms on the CPU ({ms['cpu_outside_ops_s']:.2f} outside torch "
            f"ops), {summary['launches_per_step']:.0f} launches, {summary['kernels_per_step']:.0f} kernels "
            f"({ms['kernel_s_per_step']:.2f} ms); the timed step {ms['decode_step_s']:.2f} ms")


def _profile(run: Run, m: dict, model, path: str) -> dict:
    import collections

    import torch
    from torch.autograd import DeviceType
    from torch.profiler import ProfilerActivity, profile, schedule
    from transformers import LogitsProcessor, LogitsProcessorList

    from helpers.measure import sync
    from helpers.speed import compiled_graphs

    a = run.args
    # the processors run once a new token (the first one right after the prefill): step 0 holds the prefill, step
    # 1 warms the profiler up, then `active` decode steps are recorded; all within the timed runs' a.tokens, so a
    # compiled path's static cache keeps its length (no recompile)
    active = max(1, min(4, a.tokens - 3))
    got: dict = {}

    class Step(LogitsProcessor):
        def __call__(self, input_ids, scores):
            prof.step()
            return scores

    class Mark(LogitsProcessor):  # the wall time of every step, the device waited for at each
        def __call__(self, input_ids, scores):
            sync()
            marks.append(time.perf_counter())
            return scores

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if run.device == "cuda" else [])
    inputs = prompts(m["path"], model.config, a.prompt, 1, run.device)
    kw = {**path_kwargs(path), "pad_token_id": model.generation_config.pad_token_id
          or model.config.get_text_config().eos_token_id or 0,
          "max_new_tokens": a.tokens, "min_new_tokens": a.tokens, "do_sample": False}
    marks: list[float] = []
    with torch.inference_mode():
        model.generate(**inputs, **kw)  # warm
        g0 = compiled_graphs()
        model.generate(**inputs, logits_processor=LogitsProcessorList([Mark()]), **kw)
        with profile(activities=activities, schedule=schedule(wait=1, warmup=1, active=active, repeat=1),
                     on_trace_ready=lambda p: got.setdefault("events", list(p.events()))) as prof:
            model.generate(**inputs, logits_processor=LogitsProcessorList([Step()]), **kw)
        g1 = compiled_graphs()
    series = [b - a_ for a_, b in zip(marks, marks[1:])]  # decode steps 1, 2, ... (the prefill's mark first)
    events = got.get("events")
    if not events:
        raise RuntimeError(f"the profiler recorded no step (active {active} of {a.tokens} new tokens)")
    steps = [e for e in events if e.name.startswith("ProfilerStep")]
    n = len(steps) or active
    cpu = [e for e in events if e.device_type == DeviceType.CPU and not e.name.startswith("ProfilerStep")]
    top_level = [e for e in cpu if e.cpu_parent is None or e.cpu_parent.name.startswith("ProfilerStep")]
    kernels = [e for e in events if e.device_type == DeviceType.CUDA and not e.name.startswith(("Memcpy", "Memset"))]
    launches = [e for e in cpu if any(part in e.name for part in LAUNCHES)]
    step_s = sum(e.time_range.elapsed_us() for e in steps) / 1e6 / n
    in_ops = sum(e.time_range.elapsed_us() for e in top_level) / 1e6 / n
    by_name: dict = collections.defaultdict(lambda: [0, 0.0])
    for e in kernels or cpu:  # on a GPU its kernels by GPU time, on a CPU the ops by self CPU time
        by_name[e.name][0] += 1
        by_name[e.name][1] += (e.time_range.elapsed_us() if kernels else e.self_cpu_time_total) / 1e6
    total = sum(t for _, t in by_name.values()) or 1.0
    top = sorted(by_name.items(), key=lambda kv: -kv[1][1])[:10]
    summary = {
        "path": path, "batch": 1, "steps": n, "new_tokens": a.tokens, "graphs_compiled_while_profiling": g1 - g0,
        "step_series_s": [round(t, 6) for t in series], "first_decode_step_s": series[0] if series else None,
        "median_decode_step_s": statistics.median(series) if series else None,
        "step_s": step_s, "cpu_in_ops_s": in_ops, "cpu_outside_ops_s": max(step_s - in_ops, 0.0),
        "launches_per_step": len(launches) / n,
        "launch_calls_per_step": {k: v / n for k, v in collections.Counter(e.name for e in launches).items()},
        "graph_launches_per_step": sum("GraphLaunch" in e.name for e in launches) / n,
        "kernels_per_step": len(kernels) / n,
        "kernel_s_per_step": sum(e.time_range.elapsed_us() for e in kernels) / 1e6 / n,
        "top_by": "GPU time of each kernel" if kernels else "self CPU time of each op",
        "top": [{"name": name[:200], "calls_per_step": c / n, "s_per_step": t / n, "share": t / total}
                for name, (c, t) in top],
        "how": f"after a warm-up generate, step_series_s: the wall time of each decode step of one generate of "
               f"{a.tokens} new tokens, the device synchronised at every step (a LogitsProcessor marks them; a "
               "first step far above the median is a cost paid once a generate call, such as a CUDA graph "
               f"recorded again for a new static cache); then torch.profiler over {n} decode steps of another "
               "generate: step_s is the CPU wall time between two marks (it runs ahead of the GPU where nothing "
               "waits), cpu_in_ops_s the top-level torch ops and compiled graphs within it, cpu_outside_ops_s the "
               "rest (Python, generate's loop)",
    }
    if g1 > g0:
        summary["note_compile"] = f"{g1 - g0} graph(s) compiled during these runs: the profile includes a compile"
    if run.device == "cuda" and not kernels:
        summary["note"] = "the profiler reported no kernel (CUPTI gave none, e.g. inside CUDA graphs)"
    return summary


def measure_load(run: Run, m: dict) -> None:
    try:
        folder = checkpoint(run, m)
    except Exception as e:  # noqa: BLE001
        run.refuse({"shape": m["label"], "what": "the checkpoint", "section": "load"}, e)
        return
    build = ROOT / "build"
    build.mkdir(exist_ok=True)
    saved = Path(tempfile.mkdtemp(prefix="bench-nf4-", dir=build))  # ours: removed below
    try:
        for what, src, fmt in (("bf16", folder, "bf16"), ("nf4, quantized while loading", folder, "nf4"),
                               ("nf4, saved and loaded again", saved, "bf16")):
            item = {"shape": m["label"], "what": what, "section": "load"}
            if src == saved and not (saved / "config.json").is_file():
                run.res["skipped"].append({**item, "reason": "not run: no NF4 checkpoint was saved (the NF4 load "
                                           "before it did not run)"})
                continue
            if run.over_budget(item):
                continue
            times = []
            try:
                with run.item(item):
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

    a, defaults = run.args, shape_defaults(shape, run.device)
    skip = set(a.skip if a.skip is not None else defaults.get("skip", ()))
    label = label_of(shape)
    with section(run, "set-up", label):
        model, m, secs = first_model(run, shape)
        run.res["random_weights"][label] = m["random"]
        source = ("the bundled model (SmolLM2-135M-Instruct)" if shape == "bundled" else
                  "random weights drawn on the device (helpers.shapes.random_model, seed 0)" if shape in SHAPES else
                  f"the checkpoint {m['path'].name}" + (" (random weights)" if m["random"] else ""))
        run.res["models"][label] = {"source": source, "params": n_params(model), "random_weights": m["random"],
                                    "bandwidth": run.res["bandwidth"]["bytes_per_s"],
                                    "matmul": run.res["matmul"]["flops_per_s"], "first_load_s": secs}
        run.log(f"{label}: {n_params(model) / 1e9:.3g} billion parameters ready in {secs:.1f} s")
    paths = a.paths or defaults.get("paths") or (CUDA_PATHS if run.device == "cuda" else CPU_PATHS)
    if a.quick and not a.paths:
        paths = ("eager", "static")
        run.res["skipped"].append({"shape": label, "section": "paths", "path": "compile",
                                   "reason": "not run: --quick (a compile takes a minute or more)"})
    for s in sorted(skip):
        run.res["skipped"].append({"shape": label, "section": s, "reason": "not run in this invocation: --skip"
                                   if a.skip is not None else f"not run in this invocation: the default of {shape} "
                                   f"on {run.device} (--skip replaces it)"})
    best = "eager"
    if "paths" not in skip:
        with section(run, "paths", label):
            best = measure_paths(run, m, model, paths)
    if "batch" not in skip:
        with section(run, "batch", label):
            measure_batches(run, m, model, best, a.batches or defaults.get("batches") or (1, 2, 4, 8, 16, 32, 64))
    if "formats" not in skip:
        with section(run, "formats", label):
            measure_formats(run, m, model, best, a.formats or defaults.get("formats") or FORMATS,
                            a.format_batches or defaults.get("format_batches") or (1, 16))
    if "prefill" not in skip:
        with section(run, "prefill", label):
            measure_prefill(run, m, model, a.prefill or ((128, 512, 2048, 8192) if run.device == "cuda"
                                                         else (64, 256, 1024)), given=bool(a.prefill))
    if a.profile:
        with section(run, "profile", label):
            measure_profile(run, m, model)
    del model
    free(compiled=True)
    if "load" not in skip:
        with section(run, "load", label):
            measure_load(run, m)


def shape_defaults(shape: str, device: str) -> dict:
    """:data:`SHAPE_DEFAULTS` of a shape on CUDA; none on a CPU."""
    return SHAPE_DEFAULTS.get(shape, {}) if device == "cuda" else {}


def child_argv(args, shape: str, append: bool) -> list[str]:
    """The command line of one shape's own process."""
    argv = [sys.executable, __file__, "--out", args.out, "--shapes", shape]
    for name in ("paths", "formats", "batches", "format_batches", "prefill", "skip"):
        v = getattr(args, name)
        if v or (name == "skip" and v is not None):  # an empty --skip replaces a shape's default skips
            argv += [f"--{name.replace('_', '-')}", *map(str, v)]
    for name in ("minutes", "tokens", "prompt", "load_repeats"):
        if getattr(args, name) is not None:
            argv += [f"--{name.replace('_', '-')}", str(getattr(args, name))]
    flags = [f"--{name}" for name in ("quick", "profile") if getattr(args, name)]
    if append:
        return argv + flags + ["--append"]
    return argv + flags + (["--append-from", str(args.append_from)] if args.append_from else [])


def raise_recompile_limit(limit: int = 64) -> dict:
    """dynamo's recompile limit (per function) raised to ``limit`` for this process; returns the settings to record.
    At its default of 8, the paths, the sweep's batch sizes and the torchao formats can reach it, and dynamo then
    runs the function uncompiled (a compiled path's first run would be refused: no graph compiled)."""
    import torch._dynamo.config as dynamo

    name = "recompile_limit" if hasattr(dynamo, "recompile_limit") else "cache_size_limit"
    before = getattr(dynamo, name)
    setattr(dynamo, name, max(before, limit))
    return {f"torch._dynamo.config.{name}": getattr(dynamo, name), "default": before}


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.append_from and not args.append_from.is_file():
        sys.exit(f"--append-from {args.append_from}: no such file; give the speed.json an earlier invocation wrote")
    if args.plot_only:
        out = Path(args.out)
        plot(json.loads((out / "speed.json").read_text()), out)
        print(f"drew {out / 'roofline.png'} and {out / 'batch.png'} from {out / 'speed.json'}")
        return 0
    import torch

    device = "cuda" if torch.cuda.is_available() else "cpu"
    shapes = args.shapes or (["llama-1b", "llama-3.1-8b"] if device == "cuda" else ["bundled"])
    if len(shapes) > 1:  # one process a shape: compile caches and dynamo's recompile limit are per process
        for i, s in enumerate(shapes):
            done = subprocess.run(child_argv(args, s, append=args.append or i > 0))  # the first: --append-from
            if done.returncode:
                return done.returncode
        return 0
    a = args
    a.shapes = shapes
    a.tokens = a.tokens or (8 if a.quick else 64 if device == "cuda" else 16)
    a.prompt = a.prompt or (8 if a.quick else 16)
    a.load_repeats = a.load_repeats or (3 if device == "cpu" else 1)
    if a.quick:
        a.batches = a.batches or [1, 2]
        a.format_batches = a.format_batches or [1, 2]
        a.formats = a.formats or ["bf16", "nf4", "torchao-int4wo"]
        a.prefill = a.prefill or [8, 32]
    minutes = a.minutes or shape_defaults(shapes[0], device).get("minutes") or (5 if device == "cpu" else 6)
    run = Run(args, device, 60 * minutes)
    old = args.append_from or Path(args.out) / "speed.json"
    if args.append_from or args.append and old.is_file():
        run.prev = json.loads(old.read_text())
        run.log(f"appending to what {old} holds ({len(run.prev.get('records', []))} records)")
    run.res["settings"] = {**raise_recompile_limit(), "new_tokens": a.tokens, "prompt_tokens": a.prompt}
    from helpers.hardware import PACKAGES, report
    from helpers.quiet import known_warnings_silenced

    # the known, harmless messages (helpers.quiet) quieted for the whole run: bitsandbytes logs on import on
    # some CPUs, and LLM.int8 on a CPU at every matrix product
    with known_warnings_silenced():
        run.res["hardware"] = report()
        run.res["versions"] = {k: run.res["hardware"][k] for k in ("python", "cuda", *PACKAGES)}
        with section(run, "limit", label_of(shapes[0])):
            measure_limit(run)
        run_shape(run, shapes[0])
    res = run.write()
    plot(res, run.out)
    run.log(f"wrote {run.out / 'speed.json'}, roofline.png and batch.png ({len(res['records'])} records, "
            f"{len(res['refused'])} refused, {len(res['skipped'])} skipped)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
