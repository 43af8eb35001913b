#!/usr/bin/env bash
# On a CUDA machine (no network): the test suite with compiled kernels (bf16 included),
# then the full benchmark and the profiler's kernel totals (TOTALS_OPS, default
# kron,serving). Logs and results go to $OUT (default: bench/results).
# TESTS narrows the test run (default: tests); extra arguments go to `python -m bench`.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-bench/results}
export PYTHONUNBUFFERED=1 TRITON_DEFAULT_FP_FUSION=1
nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.sm,clocks.mem --format=csv
python3 -c "import sys, torch, triton; print(sys.version.split()[0], torch.__version__, triton.__version__)"
python3 -m pip install -q --no-deps --no-build-isolation -e . || exit 1
python3 -m pytest -q -p no:cacheprovider ${TESTS:-tests} 2>&1 | tee "$OUT/gpu-tests.log" | tail -40
python3 -m bench --full --out "$OUT/${BENCH_NAME:-gpu-full}.json" "$@" 2>&1 | tee "$OUT/gpu-bench.log" | grep -v "^bench:.*case/s"
python3 -m bench.kernel_totals --full --ops "${TOTALS_OPS:-kron,serving}" --out "$OUT/kernel-totals.json" 2>&1 | tee "$OUT/kernel-totals.log" | tail -20
