#!/usr/bin/env bash
# The GPU check of issues 3 and 12, as one script (about 5 minutes on one recent GPU, plus the peers'):
# per-sample gradients, features and sketch error on CUDA, exact density, then the index on faiss-gpu. Tables go to
# benchmarks/results/*_cuda.md. Needs torch with CUDA and faiss-gpu installed as the README
# says (faiss-cpu uninstalled first). CI never runs it.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python}
"$PY" - <<'PYCHECK'
import faiss, torch
assert torch.cuda.is_available(), "no CUDA device visible to torch"
assert faiss.get_num_gpus() > 0, "this FAISS build sees no GPU: install faiss-gpu (README, Installation)"
PYCHECK
"$PY" benchmarks/bench_gradients.py --device cuda --out benchmarks/results/gradients_cuda.md
"$PY" benchmarks/bench_density.py --device cuda --out benchmarks/results/density_cuda.md
"$PY" benchmarks/bench_index.py --gpu --sizes 100000 1000000 --no-hnsw --out benchmarks/results/index_cuda.md
# The peer packages at the same work (makes benchmarks/.peers-venv with torch from PyPI first).
"$PY" benchmarks/bench_peers.py --device cuda --out benchmarks/results/peers_cuda.md
