#!/usr/bin/env bash
# The GPU check (docs/gpu.md): on a machine with one NVIDIA GPU, a CUDA build of PyTorch already
# installed and no network, install salientft from the carried wheels, run the test suite on the
# GPU, then the bf16 step-time and memory benchmark; results into OUTDIR, ready to commit under
# docs/results/gpu/. Budgeted to finish in under 5 minutes on an H100.
#
#   bash scripts/gpu_wheels.sh                 # first, on a machine with the package index
#   bash scripts/gpu_check.sh OUTDIR           # then, on the GPU machine (wheels/gpu/ travels along)
#   bash scripts/gpu_check.sh --dry-run OUTDIR # on CPU: the benchmark with tiny models (CI runs this)
#
# Writes OUTDIR/gpu_check.{md,json} (phases, versions, verdicts), tests.xml (junit) and tests.log
# (the suite), gpu_step.{md,json} (the benchmark and the project's GPU targets). Exit code 0 when every
# phase ran and passed, 1 when a test or the benchmark failed (the reports are written anyway),
# 2 when the machine is not fit for the check (refused before any work).
#
# Settings (environment): PYTHON (default python3: the one with the CUDA torch), GPU_CHECK_WHEELS
# (default wheels/gpu), GPU_CHECK_SITE (where the wheels are installed, default a temporary folder),
# GPU_CHECK_SUITE_S (default 110) and GPU_CHECK_BENCH_S (default 150): each phase's time limit
# (with the install, about 4.5 minutes);
# GPU_CHECK_PYTEST_ARGS (default: -m "not integration", plus -n 4 with pytest-xdist: the embedded
# SmolLM2 files the integration tests read do not travel); GPU_CHECK_BENCH_ARGS: more arguments
# for bench/gpu_step.py (e.g. "--models smollm2-shape --methods lora,gift-none").
set -uo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
usage="usage: bash scripts/gpu_check.sh [--dry-run] OUTDIR"
dry=0
out=""
for a in "$@"; do
    case "$a" in
        --dry-run) dry=1 ;;
        -h|--help) echo "$usage"; exit 0 ;;
        -*) echo "gpu_check.sh: unknown option $a; $usage" >&2; exit 2 ;;
        *) if [ -n "$out" ]; then echo "gpu_check.sh: one OUTDIR only; $usage" >&2; exit 2; fi; out=$a ;;
    esac
done
if [ -z "$out" ]; then echo "gpu_check.sh: OUTDIR missing; $usage" >&2; exit 2; fi
PY=${PYTHON:-python3}
SUITE_S=${GPU_CHECK_SUITE_S:-110}
BENCH_S=${GPU_CHECK_BENCH_S:-150}
WHEELS=${GPU_CHECK_WHEELS:-wheels/gpu}

# Preconditions, before any work.
if ! torch_line=$("$PY" -c "import torch; print(torch.__version__, torch.version.cuda, torch.cuda.is_available())" 2>/dev/null); then
    echo "gpu_check.sh: $PY cannot import torch; set PYTHON to the interpreter that has the CUDA build of PyTorch" >&2
    exit 2
fi
read -r torch_version cuda_version cuda_ok <<< "$torch_line"
if [ "$dry" = 0 ] && [ "$cuda_ok" != "True" ]; then
    echo "gpu_check.sh: torch $torch_version (CUDA $cuda_version) sees no CUDA device: this check is for a machine with an NVIDIA GPU; --dry-run runs its CPU smoke version" >&2
    exit 2
fi
if [ "$dry" = 0 ] && ! ls "$WHEELS"/*.whl >/dev/null 2>&1; then
    echo "gpu_check.sh: no wheels in $WHEELS: run 'bash scripts/gpu_wheels.sh' on a machine with the package index and bring $WHEELS along (docs/gpu.md)" >&2
    exit 2
fi
mkdir -p "$out" || { echo "gpu_check.sh: cannot create $out" >&2; exit 2; }
out=$(cd "$out" && pwd)
phases=$(mktemp)
trap 'rm -f "$phases"' EXIT
start_all=$SECONDS
record() { printf '%s\t%s\t%s\t%s\n' "$1" "$2" "$3" "$4" >> "$phases"; }  # name status seconds note

# 1. Install: the carried wheels into a folder of their own, first on PYTHONPATH (ahead of the
# machine's own transformers), never downloading anything; salientft itself from src/.
t=$SECONDS
if [ "$dry" = 1 ]; then
    export PYTHONPATH="$ROOT/src${PYTHONPATH:+:$PYTHONPATH}"
    record install skipped 0 "dry run: the current environment"
else
    site=${GPU_CHECK_SITE:-$(mktemp -d /tmp/salientft-gpu-site.XXXXXX)}
    if "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$site" \
            "$WHEELS"/*.whl > "$out/install.log" 2>&1 \
       && PYTHONPATH="$ROOT/src:$site${PYTHONPATH:+:$PYTHONPATH}" "$PY" bench/gpu_step.py --check-env >> "$out/install.log" 2>&1; then
        export PYTHONPATH="$ROOT/src:$site${PYTHONPATH:+:$PYTHONPATH}"
        record install ok $((SECONDS - t)) "$(ls "$WHEELS"/*.whl | wc -l) wheels into $site"
        rm -f "$out/install.log"
    else
        record install FAILED $((SECONDS - t)) "see install.log"
        PYTHONPATH="$ROOT/src${PYTHONPATH:+:$PYTHONPATH}" "$PY" bench/gpu_step.py --check-report "$phases" --out "$out"
        cat "$out/install.log" >&2
        exit 1
    fi
fi

# 2. The test suite on the GPU (SIGINT at the limit: pytest stops and still writes its reports).
t=$SECONDS
if [ "$dry" = 1 ]; then
    record suite skipped 0 "dry run: CI runs the suite itself"
else
    if [ -n "${GPU_CHECK_PYTEST_ARGS+x}" ]; then
        read -r -a pargs <<< "$GPU_CHECK_PYTEST_ARGS"
    else
        pargs=(-m "not integration")
        if "$PY" -c "import xdist" 2>/dev/null; then pargs+=(-n 4); fi
    fi
    SALIENTFT_TEST_DEVICE=cuda timeout -s INT -k 20 "$SUITE_S" "$PY" -m pytest -q -p no:cacheprovider \
        --junitxml="$out/tests.xml" "${pargs[@]}" > "$out/tests.log" 2>&1
    rc=$?
    case $rc in
        0) record suite ok $((SECONDS - t)) "" ;;
        124|130|137) record suite TIMEOUT $((SECONDS - t)) "stopped at ${SUITE_S} s (GPU_CHECK_SUITE_S)" ;;
        *) record suite FAILED $((SECONDS - t)) "pytest exit code $rc" ;;
    esac
fi

# 3. The benchmark (it budgets itself; the limit here only guards against a hang).
t=$SECONDS
bargs=(--out "$out" --budget-s "$BENCH_S")
[ "$dry" = 1 ] && bargs+=(--dry-run)
if [ -n "${GPU_CHECK_BENCH_ARGS:-}" ]; then read -r -a extra <<< "$GPU_CHECK_BENCH_ARGS"; bargs+=("${extra[@]}"); fi
timeout -s INT -k 15 $((BENCH_S + 60)) "$PY" bench/gpu_step.py "${bargs[@]}" > "$out/bench.log" 2>&1
rc=$?
case $rc in
    0) record bench ok $((SECONDS - t)) ""; rm -f "$out/bench.log" ;;
    124|130|137) record bench TIMEOUT $((SECONDS - t)) "see bench.log" ;;
    *) record bench FAILED $((SECONDS - t)) "exit code $rc, see bench.log" ;;
esac
record total ok $((SECONDS - start_all)) ""

"$PY" bench/gpu_step.py --check-report "$phases" --out "$out" $([ "$dry" = 1 ] && echo --dry-run)
if awk -F'\t' '$2 == "FAILED" || $2 == "TIMEOUT" {bad = 1} END {exit !bad}' "$phases"; then exit 1; fi
exit 0
