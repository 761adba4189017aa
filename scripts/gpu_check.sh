#!/usr/bin/env bash
# The GPU check of a machine with CUDA, in about 5 minutes: the suite's CUDA-only tests (marker
# `cuda`), then benchmarks/bench_gpu.py at its defaults. Each part runs under `timeout`; the
# script fails when either part fails or times out. Without CUDA the tests skip, the benchmark is
# not run, and the script succeeds.
#
# Environment (all optional):
#   SFLAM_GPU_CHECK_PYTEST_ARGS  extra pytest arguments, e.g. "tests/test_quantize_torch.py -k cuda"
#                                to collect one file instead of the whole suite
#   SFLAM_GPU_CHECK_BENCH_ARGS   extra benchmark arguments, e.g. "--quick" or "--batch 64"
#   SFLAM_GPU_CHECK_TESTS_S      time limit of the tests in seconds (default 150)
#   SFLAM_GPU_CHECK_BENCH_S      time limit of the benchmark in seconds (default 150)
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

PY=.venv/bin/python
TESTS_S=${SFLAM_GPU_CHECK_TESTS_S:-150}
BENCH_S=${SFLAM_GPU_CHECK_BENCH_S:-150}
read -r -a pytest_args <<<"${SFLAM_GPU_CHECK_PYTEST_ARGS:-}"
read -r -a bench_args <<<"${SFLAM_GPU_CHECK_BENCH_ARGS:-}"
export PYTHONUNBUFFERED=1  # a part stopped by its timeout still shows what it printed

# say how a part ended; 124 is timeout's "time limit reached"
report() {
  local part=$1 status=$2 limit=$3
  if [ "$status" -eq 0 ]; then
    echo "==> $part: passed"
  elif [ "$status" -eq 124 ]; then
    echo "==> $part: FAILED (stopped after its limit of ${limit} s)"
  else
    echo "==> $part: FAILED (exit status $status)"
  fi
}

echo "==> GPUs"
if command -v nvidia-smi >/dev/null 2>&1; then
  nvidia-smi -L || echo "nvidia-smi found but it failed"
else
  echo "nvidia-smi: not found"
fi

if [ ! -x "$PY" ]; then
  echo "==> no virtualenv: make setup"
  make setup
fi

echo "==> CUDA tests (pytest -m cuda, limit ${TESTS_S} s)"
tests_status=0
timeout --kill-after=10 "$TESTS_S" "$PY" -m pytest -m cuda -q -p no:cacheprovider \
  ${pytest_args[@]+"${pytest_args[@]}"} || tests_status=$?
report "CUDA tests" "$tests_status" "$TESTS_S"

if ! "$PY" -c 'import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)'; then
  echo "no CUDA device: the CUDA tests skip and the GPU benchmark is not run"
  exit "$tests_status"
fi

echo "==> GPU benchmark (benchmarks/bench_gpu.py, limit ${BENCH_S} s)"
bench_status=0
timeout --kill-after=10 "$BENCH_S" "$PY" benchmarks/bench_gpu.py \
  ${bench_args[@]+"${bench_args[@]}"} || bench_status=$?
report "GPU benchmark" "$bench_status" "$BENCH_S"

if [ "$tests_status" -ne 0 ] || [ "$bench_status" -ne 0 ]; then
  exit 1
fi
echo "==> GPU check passed"
