#!/usr/bin/env bash
# The one command a session with a lent GPU runs (after `bash benchmarks/gpu_wheels.sh`
# here, carrying .whl): install the carried wheels, run benchmarks/gpu.py with
# --write-results, and leave RESULTS.md and the full log in $OUT to copy back.
# Extra arguments go to gpu.py (e.g. --variants plain,compile).
set -uo pipefail
cd "$(dirname "$0")/.."
OUT="${OUT:-/tmp/kiln-gpu-out}"
mkdir -p "$OUT"
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target /tmp/site .whl/*.whl || { echo "wheels missing: run benchmarks/gpu_wheels.sh"; exit 2; }
export PYTHONPATH="/tmp/site:$PWD/server:$PWD/build_engines:$PWD/clients/python:$PWD/training"
export PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader || true
python3 benchmarks/gpu.py --write-results "$@" 2>&1 | tee "$OUT/gpu-benchmark.log"
status=${PIPESTATUS[0]}
cp benchmarks/RESULTS.md "$OUT/RESULTS.md"
exit "$status"
