#!/usr/bin/env bash
# Re-runs the float-sensitive tests (pytest -m numerics) with other CPU kernels and thread counts,
# the local stand-in for "another x86 machine" (docs/testing.md). Every configuration must pass.
#
#   scripts/check_determinism.sh                                   # all numerics tests, 5 configurations
#   scripts/check_determinism.sh -m "numerics and not integration and not slow"   # the quick ones
#   scripts/check_determinism.sh tests/test_quant.py               # one file (still -m numerics)
#
# Extra arguments go to pytest (a later -m replaces the default one). PYTHON overrides the
# interpreter (default .venv/bin/python). Logs: $LOGDIR (default a fresh directory under /tmp).
#
# Configurations:
#   ATEN_CPU_CAPABILITY=default|avx2  PyTorch's own kernels (reductions, softmax, elementwise, even
#                                     the last bits of torch.randn) compiled for another ISA
#   1 or 2 threads                    OpenMP/MKL split reductions and GEMMs differently
#   MKL_CBWR=AVX2 ONEDNN_MAX_CPU_ISA=AVX2
#                                     other BLAS (MKL sgemm) and oneDNN (bf16 matmul) code paths, as an
#                                     Intel CPU without AVX-512 or an AMD one would take
#
# Within each configuration, tests/test_quant_threads.py also quantizes (GPTQ and RTN, 2-4 bits)
# under 1, 2 and 4 torch threads and requires the same integers (docs/quantization.md).
set -uo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-.venv/bin/python}
[ -x "$PY" ] || PY=python3
LOGDIR=${LOGDIR:-$(mktemp -d /tmp/check_determinism.XXXXXX)}
mkdir -p "$LOGDIR"

CONFIGS=(
  "ATEN_CPU_CAPABILITY=default SALIENTFT_TEST_THREADS=1 OMP_NUM_THREADS=1"
  "ATEN_CPU_CAPABILITY=default SALIENTFT_TEST_THREADS=2 OMP_NUM_THREADS=2"
  "ATEN_CPU_CAPABILITY=avx2 SALIENTFT_TEST_THREADS=1 OMP_NUM_THREADS=1"
  "ATEN_CPU_CAPABILITY=avx2 SALIENTFT_TEST_THREADS=2 OMP_NUM_THREADS=2"
  "MKL_CBWR=AVX2 ONEDNN_MAX_CPU_ISA=AVX2 SALIENTFT_TEST_THREADS=2 OMP_NUM_THREADS=2"
)

native=$("$PY" -c "import torch; print(torch.backends.cpu.get_cpu_capability())" 2>/dev/null) || {
  echo "cannot import torch with $PY" >&2; exit 2; }
echo "native CPU capability: $native; logs in $LOGDIR"
failed=0
summary=()
for i in "${!CONFIGS[@]}"; do
  cfg=${CONFIGS[$i]}
  log="$LOGDIR/config$i.log"
  used=$(env $cfg "$PY" -c "import torch; print(torch.backends.cpu.get_cpu_capability())" 2>/dev/null)
  echo "=== [$((i + 1))/${#CONFIGS[@]}] $cfg (kernels: $used)"
  start=$SECONDS
  env $cfg "$PY" -m pytest -p no:cacheprovider -q -m numerics "$@" >"$log" 2>&1
  rc=$?
  tail_line=$(grep -E "passed|failed|error|no tests ran" "$log" | tail -1)
  if [ $rc -eq 0 ]; then verdict=PASS; else verdict=FAIL; failed=1; fi
  echo "    $verdict ($((SECONDS - start)) s): $tail_line"
  [ $rc -eq 0 ] || grep -E "^(FAILED|ERROR) " "$log" | sed 's/^/    /'
  summary+=("$verdict  $cfg")
done
echo
echo "summary:"
printf '  %s\n' "${summary[@]}"
exit $failed
