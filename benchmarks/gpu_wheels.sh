#!/usr/bin/env bash
# Wheels for benchmarks/gpu_check.sh on a GPU machine without internet: nnsim_hooks' core
# dependencies that a CUDA image with torch, timm and numpy lacks (opacus, faiss-cpu), for
# Python ${PY_VERSION:-3.12} on x86-64 Linux, into .whl/ (in .gitignore: carry it, run(carry=[".whl"])).
# About 20 MB.
#
# faiss-gpu is not among them: its PyPI wheel (135 MB) needs CUDA 12's runtime and cuBLAS
# (several hundred MB more) and is larger than what a run can carry; the neighbour benchmark
# then runs its torch path only. Set FAISS=faiss-gpu to try it anyway where the machine has
# CUDA 12 libraries and the size does not matter.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
mkdir -p .whl
"$PY" -m pip download -q --no-deps --only-binary=:all: --python-version "${PY_VERSION:-3.12}" --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_17_x86_64 \
    --platform manylinux2014_x86_64 -d .whl "opacus>=1.5" "${FAISS:-faiss-cpu}>=1.8"
ls -la .whl
