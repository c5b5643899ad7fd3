#!/usr/bin/env bash
# Fetch, on this (CPU) machine, the wheels benchmarks/gpu.py needs on the lent GPU machine,
# whose image (Python 3.12, torch, transformers, safetensors) lacks them and cannot reach
# any package index. They land in .whl/ (git-ignored), which the device run carries:
#   bash benchmarks/gpu_wheels.sh
#   device run: carry [".whl"], command "bash benchmarks/gpu_device.sh"
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON="${PYTHON:-.venv/bin/python}"
rm -rf .whl && mkdir -p .whl
# open_clip_torch is installed without its dependencies: only its CLIP BPE vocabulary file
# is read (kiln_server.models.clip_vocabulary), as in the Makefile.
"$PYTHON" -m pip download --quiet --no-deps --only-binary=:all: \
    --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 \
    --platform manylinux2014_x86_64 -d .whl \
    "diffusers==0.42.1" "importlib_metadata==10.2.0" "zipp==4.1.2" "open_clip_torch==3.3.0"
du -sh .whl
