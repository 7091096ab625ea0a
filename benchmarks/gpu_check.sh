#!/usr/bin/env bash
# The GPU check (issues 3, 12 and 18), in under 8 minutes on one H100 or H200:
#   1. features throughput against the plain training step (timm ResNet-50 and ViT-B/16 at
#      224 px, float32 and bf16 autocast; goal >= 40%) and CPU/GPU parity of the features,
#      similarity and density           -> benchmarks/results/features_gpu.md
#   2. the audit's neighbour step at 10^6 and 10^7 synthetic rows, D = 1024, on the GPU
#      (torch; faiss-gpu too when installed; goal: 10^7 in <= 20 min)
#                                        -> benchmarks/results/neighbors_gpu.md
#   3. NCCL under torchrun, one rank per GPU, when there is more than one GPU
#                                        -> benchmarks/results/nccl_gpu.md
# GPU_CHECK_FULL=1 also reruns the older CUDA benchmarks (gradients, density, index, peers:
# *_cuda.md, 10+ minutes more).
#
# What it needs beyond torch with CUDA, timm and numpy: opacus, faiss and tqdm (nnsim_hooks'
# core dependencies). Where they are missing (a machine without internet), it installs them
# from wheels in .whl/, made beforehand on a machine with internet by
# `bash benchmarks/gpu_wheels.sh` (Python 3.12, x86-64 Linux by default). On the device tool:
#   run(command="bash benchmarks/gpu_check.sh", carry=[".whl"], timeout_s=540)
# The result tables are also copied into $OUT when that is set, so that they come back.
# Exits non-zero, naming the step, as soon as a step fails. CI never runs it.
# GPU_CHECK_DRY=1: a dry run of every step on the CPU at tiny sizes (NCCL as gloo on two
# processes), tables into ${TMPDIR:-/tmp}/nnsim-gpu-dry/: checks the script, not the GPU.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-$(command -v python3 || command -v python)}
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
DRY=${GPU_CHECK_DRY:-0}
RESULTS=benchmarks/results
DEVICE=cuda
FEATURES_ARGS=()
NEIGHBORS_ARGS=(--rows 1000000 10000000)
NCCL_ARGS=()
SLOW=1  # the timeouts below are for a GPU; a dry run on a shared CPU gets 20 times more
if [ "$DRY" = 1 ]; then
    SLOW=20
    RESULTS=${TMPDIR:-/tmp}/nnsim-gpu-dry
    DEVICE=cpu
    FEATURES_ARGS=(--tiny --budget 0.2)
    NEIGHBORS_ARGS=(--rows 3000 12000 --dim 32 --block 512 --tile 4096 --budget 1
                    --recall-queries 50 --pairwise-up-to 5000 --pairwise-queries 500)
    NCCL_ARGS=(--mib 4 --rows 20000)
fi
STEP="setup"
START=$SECONDS

finish() {
    local code=$?
    if [ -n "${OUT:-}" ] && [ -d "${OUT:-}" ]; then
        cp -f "$RESULTS"/*_gpu.md "$OUT"/ 2>/dev/null || true
    fi
    if [ "$code" -ne 0 ]; then
        echo "gpu_check: FAILED at step '$STEP' (exit $code) after $((SECONDS - START)) s" >&2
    else
        echo "gpu_check: done in $((SECONDS - START)) s"
    fi
}
trap finish EXIT

step() { STEP=$1; echo; echo "== $1 ($((SECONDS - START)) s)"; }

step "dependencies"
missing=$("$PY" - <<'PYCHECK'
import importlib.util
print(" ".join(m for m in ("opacus", "faiss", "tqdm", "timm") if importlib.util.find_spec(m) is None))
PYCHECK
)
if [ -n "$missing" ]; then
    if ! ls .whl/*.whl >/dev/null 2>&1; then
        echo "gpu_check: missing Python packages: $missing, and no wheels in .whl/ to install them from." >&2
        echo "  Make them where pip reaches PyPI: bash benchmarks/gpu_wheels.sh (then carry .whl)" >&2
        exit 1
    fi
    SITE=${TMPDIR:-/tmp}/nnsim-gpu-site
    "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$SITE" .whl/*.whl
    export PYTHONPATH="$PYTHONPATH:$SITE"  # --no-deps: only opacus and faiss land there, never a torch or numpy
    echo "installed from .whl/ into $SITE: $(ls .whl | tr '\n' ' ')"
fi

step "CUDA"
GPU_CHECK_DRY=$DRY "$PY" - <<'PYCHECK'
import os, faiss, torch, nnsim_hooks
assert torch.cuda.is_available() or os.environ["GPU_CHECK_DRY"] == "1", "torch sees no CUDA device"
if not torch.cuda.is_available():
    print("dry run on the CPU: no CUDA device")
    raise SystemExit(0)
print(f"torch {torch.__version__} CUDA {torch.version.cuda}; {torch.cuda.device_count()} x {torch.cuda.get_device_name(0)}")
gpus = faiss.get_num_gpus() if hasattr(faiss, "get_num_gpus") else 0
print(f"faiss {faiss.__version__}: {gpus} GPU(s) ({'faiss-gpu' if gpus else 'CPU build: the neighbour table has no faiss-gpu row'})")
print(f"nnsim_hooks from {nnsim_hooks.__file__}")
PYCHECK
NGPU=$("$PY" -c "import torch; print(torch.cuda.device_count())")
[ "$DRY" = 1 ] && NGPU=2  # gloo on two CPU processes
mkdir -p "$RESULTS"

step "features throughput and CPU/GPU parity"
timeout $((240 * SLOW)) "$PY" benchmarks/bench_gpu_features.py --device "$DEVICE" "${FEATURES_ARGS[@]}" \
    --out "$RESULTS/features_gpu.md"

step "neighbour step at 10^6 and 10^7 rows"
timeout $((270 * SLOW)) "$PY" benchmarks/bench_gpu_neighbors.py --device "$DEVICE" "${NEIGHBORS_ARGS[@]}" \
    --out "$RESULTS/neighbors_gpu.md"

if [ "$NGPU" -gt 1 ]; then
    step "NCCL with torchrun on $NGPU GPUs"
    timeout $((120 * SLOW)) "$PY" -m torch.distributed.run --standalone --nproc-per-node="$NGPU" \
        benchmarks/bench_gpu_nccl.py "${NCCL_ARGS[@]}" --out "$RESULTS/nccl_gpu.md"
else
    echo "one GPU: NCCL with torchrun not run (it needs two or more)"
fi

if [ "${GPU_CHECK_FULL:-0}" = 1 ]; then
    step "older CUDA benchmarks (GPU_CHECK_FULL=1)"
    "$PY" benchmarks/bench_gradients.py --device cuda --out "$RESULTS/gradients_cuda.md"
    "$PY" benchmarks/bench_density.py --device cuda --out "$RESULTS/density_cuda.md"
    "$PY" benchmarks/bench_index.py --gpu --sizes 100000 1000000 --no-hnsw --out "$RESULTS/index_cuda.md"
    "$PY" benchmarks/bench_peers.py --device cuda --out "$RESULTS/peers_cuda.md"
fi
STEP="done"
