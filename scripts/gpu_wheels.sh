#!/usr/bin/env bash
# Downloads the wheels a GPU machine without network needs to run salientft's check
# (scripts/gpu_check.sh), on a machine WITH the package index. See docs/gpu.md.
#
#   bash scripts/gpu_wheels.sh                 # -> wheels/gpu/ (ignored by git)
#   bash scripts/gpu_wheels.sh DIR             # -> DIR
#
# What travels is listed in scripts/gpu_wheels.txt (a name without a version takes its pin from
# requirements/ci.txt), each downloaded with --no-deps as a binary wheel for the GPU machine's
# Python and platform: GPU_PYTHON (default 3.12, CPython) on manylinux x86_64. Never torch, nvidia-*
# or triton: the check tests the CUDA build already there. The folder is written whole or not at
# all (a temporary folder, renamed at the end), and the script fails if it exceeds GPU_WHEELS_MAX_MIB
# (default 60: the device machine takes 64 MiB of files per call, the repository included).
set -euo pipefail
cd "$(dirname "$0")/.."
DEST=${1:-wheels/gpu}
PY=${PYTHON:-}
if [ -z "$PY" ]; then
    if [ -x .venv/bin/python ]; then PY=.venv/bin/python; else PY=python3; fi
fi
GPU_PYTHON=${GPU_PYTHON:-3.12}
MAX_MIB=${GPU_WHEELS_MAX_MIB:-60}
LIST=${GPU_WHEELS_LIST:-scripts/gpu_wheels.txt}

# name -> name==version: the list's own pin, else requirements/ci.txt's, else an error.
specs=()
while read -r line; do
    line=${line%%#*}
    line=$(echo "$line" | tr -d '[:space:]')
    [ -n "$line" ] || continue
    name=${line%%==*}
    case "$(echo "$name" | tr 'A-Z_' 'a-z-')" in
        torch|triton|nvidia-*) echo "gpu_wheels.sh: $LIST lists $name: the GPU machine's own CUDA build must be tested, never a downloaded one" >&2; exit 2 ;;
    esac
    if [[ "$line" != *==* ]]; then
        pin=$(grep -i -E "^${name}==" requirements/ci.txt | head -1 || true)
        if [ -z "$pin" ]; then
            echo "gpu_wheels.sh: $name has no version in $LIST and no pin in requirements/ci.txt; add name==version to $LIST" >&2
            exit 2
        fi
        line=$pin
    fi
    specs+=("$line")
done < "$LIST"

tmp="${DEST%/}.tmp.$$"
rm -rf "$tmp"
mkdir -p "$tmp" "$(dirname "$DEST")"
trap 'rm -rf "$tmp"' EXIT
platforms=()
for p in manylinux_2_28_x86_64 manylinux_2_27_x86_64 manylinux_2_24_x86_64 manylinux_2_17_x86_64 \
         manylinux2014_x86_64 manylinux1_x86_64; do
    platforms+=(--platform "$p")
done
echo "downloading ${#specs[@]} wheels for CPython $GPU_PYTHON, manylinux x86_64, into $DEST"
PIP_DISABLE_PIP_VERSION_CHECK=1 "$PY" -m pip download -q --no-deps --only-binary=:all: \
    --python-version "$GPU_PYTHON" --implementation cp "${platforms[@]}" -d "$tmp" "${specs[@]}"

# Sizes, total, and the limit.
total=0
for f in "$tmp"/*; do
    size=$(stat -c %s "$f")
    total=$((total + size))
    printf '  %8.2f MiB  %s\n' "$(echo "$size / 1048576" | bc -l)" "$(basename "$f")"
done
printf 'total %.2f MiB (limit %s MiB)\n' "$(echo "$total / 1048576" | bc -l)" "$MAX_MIB"
if [ "$total" -gt $((MAX_MIB * 1048576)) ]; then
    echo "gpu_wheels.sh: the wheels take more than $MAX_MIB MiB; trim $LIST" >&2
    exit 1
fi
rm -rf "$DEST"
mv "$tmp" "$DEST"
trap - EXIT
echo "wrote $DEST; on the GPU machine: bash scripts/gpu_check.sh OUTDIR (see docs/gpu.md)"
