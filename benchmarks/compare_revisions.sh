#!/usr/bin/env bash
# The speed benchmarks of two revisions on the same machine, back to back, ROUNDS times:
#   benchmarks/compare_revisions.sh OLD_REV [ROUNDS]     (logs in $OUT, default /tmp/nnsim-compare)
# Each revision runs from its own git worktree with this checkout's virtualenv, so that the
# ratios of both come from one machine in one sitting (absolute times move between machines).
set -euo pipefail
old=${1:?usage: compare_revisions.sh OLD_REV [ROUNDS]}
rounds=${2:-2}
repo=$(cd "$(dirname "$0")/.." && pwd)
py=${PYTHON:-$repo/.venv/bin/python}
out=${OUT:-/tmp/nnsim-compare}
mkdir -p "$out"
tree=$out/old-tree
[ -d "$tree" ] || git -C "$repo" worktree add -q --detach "$tree" "$old"
for round in $(seq "$rounds"); do
  for side in old new; do
    dir=$repo; [ "$side" = old ] && dir=$tree
    echo "== $side (round $round) $(date -u)"
    (cd "$dir" && export PYTHONPATH=$dir &&
      "$py" benchmarks/bench_gradients.py --skip-error \
        --methods plain per_sample_gradients "similarity(exact=True)" "features (D=1024)" > "$out/gradients_${side}_$round.md" &&
      "$py" benchmarks/bench_density.py --no-pairs > "$out/density_${side}_$round.md" &&
      OMP_NUM_THREADS=1 "$py" benchmarks/bench_pair.py > "$out/pair_${side}_$round.md")
  done
done
