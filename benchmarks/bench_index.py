"""Index times: build, query, density and effective neighbours, flat against IVF (and HNSW).

Synthetic unit vectors with cluster structure (like real gradient features: same-cluster
cosine about 0.3 by default, otherwise about 0) are written to an index folder, then each index
type is built over the same stored features. Baselines measured in the same run:

- queries: the flat (exact) index; approximate ones report recall@k against it;
- density and effective neighbours: the all-pairs computation (sum_j k_ij and
  sum_j k_ij^2 from the rows of K), timed on 1,000 rows and extrapolated to N.

Usage::

    python benchmarks/bench_index.py                 # N = 10^5, D = 1024, with HNSW
    python benchmarks/bench_index.py --large         # also N = 10^6 (4 GB of features; minutes)

The Markdown table is printed and written to benchmarks/results/index_cpu.md (``--out``)
with the command that produced it.
"""

from __future__ import annotations

import argparse
import os
import platform
import resource
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from nnsim_hooks.index import GradientIndex  # noqa: E402

CHUNK = 50_000


def clustered(n: int, dim: int, clusters: int, noise: float, seed: int, out=None) -> np.ndarray:
    """Unit rows centre + noise (same-cluster cosine about 1 / (1 + noise^2)), chunk by chunk."""
    rng = np.random.default_rng(seed)
    centres = np.random.default_rng(12345).standard_normal((clusters, dim)).astype(np.float32)
    out = np.empty((n, dim), np.float32) if out is None else out
    for start in range(0, n, CHUNK):
        m = min(CHUNK, n - start)
        x = centres[rng.integers(0, clusters, m)] + noise * rng.standard_normal((m, dim), dtype=np.float32)
        x /= np.linalg.norm(x, axis=1, keepdims=True)
        out[start : start + m] = x
    return out


class Timer:
    def __enter__(self):
        self.t = time.perf_counter()
        return self

    def __exit__(self, *exc):
        self.s = time.perf_counter() - self.t


def recall(ids: np.ndarray, truth: np.ndarray) -> float:
    return float(np.mean([len(set(a) & set(b)) / len(b) for a, b in zip(ids.tolist(), truth.tolist())]))


def all_pairs_seconds(features: np.ndarray, rows: int = 1000) -> float:
    """Seconds for sum_j k_ij and sum_j k_ij^2 of ``rows`` samples by brute force, scaled to all N."""
    f = torch.from_numpy(np.array(features[:rows]))
    with Timer() as t:
        total, squares = torch.zeros(rows, dtype=torch.float64), torch.zeros(rows, dtype=torch.float64)
        for start in range(0, len(features), CHUNK):
            k = f @ torch.from_numpy(np.array(features[start : start + CHUNK])).T
            total += k.sum(1, dtype=torch.float64)
            squares += k.double().square().sum(1)
    return t.s * len(features) / rows


def bench_size(n: int, args, workdir: Path) -> list:
    print(f"\n## N = {n:,}, D = {args.dim}", flush=True)
    raw_path = workdir / f"raw_{n}.f32"
    raw = np.memmap(raw_path, dtype=np.float32, mode="w+", shape=(n, args.dim))
    with Timer() as t:
        clustered(n, args.dim, args.clusters, args.noise, seed=0, out=raw)
        raw.flush()
    print(f"generated in {t.s:.1f} s", flush=True)
    queries = clustered(args.queries, args.dim, args.clusters, args.noise, seed=1)
    with Timer() as t_store:
        idx = GradientIndex.from_features(raw, path=workdir / f"index_{n}", overwrite=True, gpu=args.gpu)
    del raw
    raw_path.unlink()
    print(f"stored in {t_store.s:.1f} s", flush=True)

    rows = []
    with Timer() as t_build:
        idx.backend  # the flat FAISS index is built on first use
    with Timer() as t_query:
        _, truth = idx.search(queries, args.k)
    rows.append(dict(n=n, index="flat (exact)", build=t_build.s, query=t_query.s, recall=1.0))
    print(rows[-1], flush=True)

    with Timer() as t_density:
        idx.density()
    with Timer() as t_neff:
        idx.effective_neighbors()
    brute = all_pairs_seconds(idx.features)
    linear = dict(n=n, store=t_store.s, density=t_density.s, neff=t_neff.s, all_pairs=brute)
    print(linear, flush=True)

    kinds = [("ivf", {})]
    if args.hnsw and n <= args.hnsw_max:
        kinds.append(("hnsw", {}))
    for kind, options in kinds:
        with Timer() as t_build:
            idx.rebuild_index(kind, progress=False, **options)
        with Timer() as t_query:
            _, ids = idx.search(queries, args.k)
        opts = ", ".join(f"{k}={v}" for k, v in idx.spec.options.items() if k in ("nlist", "nprobe", "M", "ef_search"))
        rows.append(dict(n=n, index=f"{kind} ({opts})", build=t_build.s, query=t_query.s, recall=recall(ids, truth)))
        print(rows[-1], flush=True)
    del idx
    shutil.rmtree(workdir / f"index_{n}", ignore_errors=True)
    return rows, linear


def markdown(results, args, command: str) -> str:
    import faiss

    lines = [
        f"# Index benchmark ({'GPU, faiss-gpu' if args.gpu else 'CPU'})",
        "",
        f"Command: `{command}`",
        "",
        f"Machine: {platform.machine()}, {os.cpu_count()} CPU cores visible, torch {torch.__version__} "
        f"({torch.get_num_threads()} threads), faiss {faiss.__version__}, numpy {np.__version__}. "
        f"Date: {time.strftime('%Y-%m-%d')}. Peak RSS: {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20:.1f} GiB. "
        f"Load average (1 min) at start / end: {args.load_start:.1f} / {os.getloadavg()[0]:.1f} (other jobs shared "
        "the cores: compare ratios within the run, not seconds across runs).",
        "",
        f"Synthetic unit vectors, D = {args.dim}, {args.clusters} clusters, noise {args.noise} (same-cluster cosine "
        f"about {1 / (1 + args.noise ** 2):.2f}, otherwise about 0). "
        f"Queries: {args.queries:,} new vectors from the same distribution, k = {args.k}. Recall@{args.k} is "
        "against the flat (exact) index in the same run.",
        "",
        f"| N | index | build (s) | {args.queries:,} queries, k={args.k} (s) | queries/s | speed-up vs flat | recall@{args.k} |",
        "|---:|---|---:|---:|---:|---:|---:|",
    ]
    for rows, _ in results:
        flat = rows[0]["query"]
        for r in rows:
            lines.append(
                f"| {r['n']:,} | {r['index']} | {r['build']:.2f} | {r['query']:.2f} | {args.queries / r['query']:,.0f} | "
                f"{flat / r['query']:.1f}x | {r['recall']:.3f} |"
            )
    lines += [
        "",
        "Dataset-wide queries over the stored (memory-mapped) features; the baseline is the all-pairs "
        "computation of the same sums from the rows of K, timed on 1,000 rows and extrapolated to N:",
        "",
        "| N | store features (s) | density, O(N D) (s) | effective neighbours, O(N D^2) (s) | all pairs, O(N^2 D) (s, extrapolated) | all pairs / effective neighbours |",
        "|---:|---:|---:|---:|---:|---:|",
    ]
    for _, lin in results:
        lines.append(
            f"| {lin['n']:,} | {lin['store']:.1f} | {lin['density']:.2f} | {lin['neff']:.1f} | {lin['all_pairs']:,.0f} | "
            f"{lin['all_pairs'] / lin['neff']:,.0f}x |"
        )
    return "\n".join(lines) + "\n"


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sizes", type=int, nargs="+", default=[100_000], help="N values (default 10^5)")
    p.add_argument("--large", action="store_true", help="also N = 10^6 (4 GB of features, several minutes)")
    p.add_argument("--dim", type=int, default=1024)
    p.add_argument("--gpu", action="store_true", help="FAISS indexes on the GPU (needs faiss-gpu); default: CPU")
    p.add_argument("--clusters", type=int, default=1000)
    p.add_argument("--noise", type=float, default=1.5, help="noise around the centres (1.5: same-cluster cosine ~0.3)")
    p.add_argument("--queries", type=int, default=1000)
    p.add_argument("--k", type=int, default=10)
    p.add_argument("--no-hnsw", dest="hnsw", action="store_false", help="skip HNSW")
    p.add_argument("--hnsw-max", type=int, default=100_000, help="largest N for HNSW (slow to build)")
    p.add_argument("--workdir", type=Path, default=None, help="scratch folder (default: a temporary one)")
    p.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "index_cpu.md")
    args = p.parse_args(argv)
    sizes = list(args.sizes) + ([1_000_000] if args.large and 1_000_000 not in args.sizes else [])
    command = "python benchmarks/bench_index.py " + " ".join(argv if argv is not None else sys.argv[1:])
    args.load_start = os.getloadavg()[0]
    workdir = Path(tempfile.mkdtemp(prefix="bench_index_", dir=args.workdir))
    try:
        results = [bench_size(n, args, workdir) for n in sizes]
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    text = markdown(results, args, command.strip())
    print("\n" + text)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(text)
    print(f"written to {args.out}")


if __name__ == "__main__":
    main()
