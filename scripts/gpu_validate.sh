#!/usr/bin/env bash
# On a CUDA machine (no network): the GPU validation in one timed run of at most 8 minutes
# (scripts/gpu_validate.py: its stages, budgets and what it writes). Results go to $OUT
# (default bench/results/gpu-validate); arguments go to the driver (--rehearse: the CPU
# rehearsal; --stages; --total SECONDS).
set -uo pipefail
cd "$(dirname "$0")/.."
exec python3 scripts/gpu_validate.py ${OUT:+--out "$OUT"} "$@"
