"""The audit's neighbour step on one GPU at 10^6 and 10^7 rows (issue 18, item 5).

All-samples kNN (k = 10, each sample against every other) over synthetic clustered unit
rows of D = 1024, generated on the GPU and kept there in float16 (10^7 rows: 20 GB).
Methods:

- ``torch fp16 + re-rank``: query blocks against row tiles as float16 matrix products
  (float32 accumulation), a top-k' (k' = 4k) per tile, then the candidates re-scored
  exactly in float32 from the same rows: exact search, float16 tensor-core speed;
- ``nnsim pairwise.topk``: the project's exact GPU search (``nnsim_hooks.index.pairwise``,
  what the sharded queries run), float32, reading the rows from host memory as a stored
  index does;
- ``faiss-gpu GpuIndexFlatIP``: when the installed FAISS has GPUs (float16 storage).

Query blocks are timed in a random order for up to ``--budget`` seconds per N; when not
all of them were done, the whole step is extrapolated linearly in the number of queries
(each query costs the same), and the table says so. Recall@10 is measured on sampled queries against an exact float64
search over all rows.

    python benchmarks/bench_gpu_neighbors.py [--rows 1000000 10000000] [--out benchmarks/results/neighbors_gpu.md]
    python benchmarks/bench_gpu_neighbors.py --device cpu --rows 20000 --dim 64   # a dry run
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import Dict, List, Optional, Tuple

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

K = 10
GOAL_S = 20 * 60  # 10^7 rows audited in at most 20 minutes (issue 18)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def clustered_rows(n: int, d: int, device: torch.device, dtype: torch.dtype, seed: int = 0,
                   clusters: int = 1000, chunk: int = 1 << 20) -> torch.Tensor:
    """Unit rows around random centres (neighbour structure like real features), made in
    chunks on ``device`` so that only the result is held."""
    g = torch.Generator(device=device).manual_seed(seed)
    centres = torch.randn(clusters, d, device=device, generator=g)
    out = torch.empty(n, d, device=device, dtype=dtype)
    for start in range(0, n, chunk):
        m = min(chunk, n - start)
        which = torch.randint(0, clusters, (m,), device=device, generator=g)
        block = centres[which] + 0.6 * torch.randn(m, d, device=device, generator=g)
        out[start : start + m] = torch.nn.functional.normalize(block, dim=1).to(dtype)
    return out


def knn_rows(rows: torch.Tensor, ids: torch.Tensor, k: int, tile: int) -> Tuple[torch.Tensor, torch.Tensor]:
    """Exact top-``k`` neighbours (self excluded) of the rows ``ids``: float16 products per
    tile, k' = 4k candidates per tile, re-scored in float32."""
    q = rows[ids]
    wide = 4 * k
    cand_s, cand_i = [], []
    for t0 in range(0, len(rows), tile):
        scores = q @ rows[t0 : t0 + tile].T  # float16 out, float32 accumulation
        s, i = torch.topk(scores, min(wide, scores.shape[1]), dim=1)
        cand_s.append(s)
        cand_i.append(i + t0)
    cands = torch.cat(cand_i, 1)
    s = torch.cat(cand_s, 1).float()
    keep = torch.topk(s, min(wide, s.shape[1]), dim=1).indices
    cands = torch.gather(cands, 1, keep)
    exact = torch.einsum("qd,qcd->qc", q.float(), rows[cands].float())  # re-score the candidates in float32
    exact = exact.masked_fill(cands == ids[:, None], float("-inf"))
    best = torch.topk(exact, k, dim=1)
    return best.values, torch.gather(cands, 1, best.indices)


def exact_truth(rows: torch.Tensor, queries: torch.Tensor, k: int, tile: int) -> torch.Tensor:
    """Top-``k`` ids (self excluded) of the rows ``queries`` by float64 products."""
    q = rows[queries].double()
    best_s = torch.full((len(q), 0), float("-inf"), dtype=torch.float64, device=rows.device)
    best_i = torch.zeros((len(q), 0), dtype=torch.long, device=rows.device)
    for t0 in range(0, len(rows), tile):
        s = q @ rows[t0 : t0 + tile].double().T
        s[(queries[:, None] - t0) == torch.arange(s.shape[1], device=rows.device)[None, :]] = float("-inf")
        i = torch.arange(t0, t0 + s.shape[1], device=rows.device).expand(len(q), -1)
        both_s, both_i = torch.cat([best_s, s], 1), torch.cat([best_i, i], 1)
        best_s, pick = torch.topk(both_s, min(k, both_s.shape[1]), dim=1)
        best_i = torch.gather(both_i, 1, pick)
    return best_i


def recall(found: torch.Tensor, truth: torch.Tensor) -> float:
    hits = sum(len(set(a.tolist()) & set(b.tolist())) for a, b in zip(found, truth))
    return hits / truth.numel()


def run_torch(rows: torch.Tensor, block: int, tile: int, budget_s: float, sample: torch.Tensor) -> Dict:
    """Query blocks spread over the rows, timed until all are done or ``budget_s`` is spent."""
    n, device = len(rows), rows.device
    starts = list(range(0, n, block))
    order = [starts[i] for i in np.random.default_rng(0).permutation(len(starts))]
    knn_rows(rows, torch.arange(0, min(block, n), device=device), K, tile)  # warm-up
    sync(device)
    t0 = time.perf_counter()
    queries = 0
    for s in order:
        knn_rows(rows, torch.arange(s, min(s + block, n), device=device), K, tile)
        queries += min(s + block, n) - s
        if time.perf_counter() - t0 > budget_s:
            break
    sync(device)
    seconds = time.perf_counter() - t0
    found = knn_rows(rows, sample, K, tile)[1]
    return {"method": "torch fp16 + re-rank", "queries_timed": queries, "seconds": seconds,
            "total_s": seconds * n / queries, "extrapolated": queries < n, "found": found}


def run_pairwise(rows: torch.Tensor, n_queries: int, sample: torch.Tensor) -> Dict:
    """The project's exact search: float32 rows in host memory, blocks moved to the GPU."""
    from nnsim_hooks.index import pairwise

    host = rows.float().cpu().numpy()
    valid = np.ones(len(host), dtype=bool)
    device = rows.device
    q = host[:n_queries]
    pairwise.topk(host[:100_000], valid[:100_000], q[:64], K + 1, device=device)  # warm-up
    sync(device)
    t0 = time.perf_counter()
    pairwise.topk(host, valid, q, K + 1, device=device)
    sync(device)
    seconds = time.perf_counter() - t0
    _, ids = pairwise.topk(host, valid, host[sample.cpu().numpy()], K + 1, device=device)
    ids = torch.from_numpy(ids).to(device)
    found = torch.stack([row[row != int(s)][:K] for row, s in zip(ids, sample)])
    del host
    return {"method": "nnsim pairwise.topk (fp32, host rows)", "queries_timed": n_queries, "seconds": seconds,
            "total_s": seconds * len(rows) / n_queries, "extrapolated": n_queries < len(rows), "found": found}


def run_faiss(rows: torch.Tensor, n_queries: int, sample: torch.Tensor) -> Optional[Dict]:
    try:
        import faiss
    except ImportError:
        return None
    if not hasattr(faiss, "StandardGpuResources") or faiss.get_num_gpus() < 1:
        return None
    resources = faiss.StandardGpuResources()
    config = faiss.GpuIndexFlatConfig()
    config.useFloat16 = True
    config.device = rows.device.index or 0
    index = faiss.GpuIndexFlatIP(resources, rows.shape[1], config)
    for start in range(0, len(rows), 1 << 20):
        index.add(rows[start : start + (1 << 20)].float().cpu().numpy())
    q = rows[:n_queries].float().cpu().numpy()
    t0 = time.perf_counter()
    index.search(q, K + 1)
    seconds = time.perf_counter() - t0
    _, ids = index.search(rows[sample].float().cpu().numpy(), K + 1)
    ids = torch.from_numpy(ids).to(rows.device)
    found = torch.stack([row[row != int(s)][:K] for row, s in zip(ids, sample)])
    return {"method": "faiss-gpu GpuIndexFlatIP (fp16)", "queries_timed": n_queries, "seconds": seconds,
            "total_s": seconds * len(rows) / n_queries, "extrapolated": n_queries < len(rows), "found": found}


def bench(n: int, d: int, device: torch.device, args) -> List[Dict]:
    dtype = torch.float16 if device.type == "cuda" else torch.float32  # CPU half matmuls are emulated
    t0 = time.perf_counter()
    rows = clustered_rows(n, d, device, dtype)
    sync(device)
    made = time.perf_counter() - t0
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    sample = torch.randperm(n, device=device, generator=torch.Generator(device=device).manual_seed(1))[: args.recall_queries]
    truth = exact_truth(rows, sample, K, args.tile)
    out = []
    results = [run_torch(rows, args.block, args.tile, args.budget, sample)]
    if n <= args.pairwise_up_to:
        results.append(run_pairwise(rows, min(n, args.pairwise_queries), sample))
    faiss_result = run_faiss(rows, min(n, args.pairwise_queries), sample) if n <= args.faiss_up_to else None
    if faiss_result is not None:
        results.append(faiss_result)
    peak = torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else float("nan")
    for r in results:
        r.update(n=n, d=d, recall=recall(r.pop("found"), truth), made_s=made, peak_gib=peak)
        print({k: v for k, v in r.items()}, flush=True)
        out.append(r)
    del rows
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return out


def table(rows: List[Dict], device: torch.device, argv: List[str], faiss_note: str) -> str:
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU (dry run, not a measurement)"
    lines = [
        "# The audit's neighbour step on one GPU",
        "",
        f"Device: {name}, torch {torch.__version__}. Command: `python benchmarks/bench_gpu_neighbors.py "
        f"{' '.join(argv)}`. {faiss_note}",
        "",
        f"All-samples kNN, k = {K}, self excluded, synthetic clustered unit rows generated on the device. "
        "'time, all N queries' is measured when 'queries timed' = N, else extrapolated linearly from the timed "
        f"queries. Recall@{K} on sampled queries against exact float64 search. Goal: 10^7 rows in <= 20 minutes.",
        "",
        "| N | D | method | queries timed | seconds timed | time, all N queries | recall@10 | GPU peak (GiB) | goal |",
        "|---:|---:|---|---:|---:|---:|---:|---:|---|",
    ]
    for r in rows:
        total = f"{r['total_s']:.0f} s" + (" (extrapolated)" if r["extrapolated"] else "")
        goal = "" if r["n"] < 10_000_000 else ("met" if r["total_s"] <= GOAL_S else "**not met**")
        lines.append(f"| {r['n']:,} | {r['d']} | {r['method']} | {r['queries_timed']:,} | {r['seconds']:.1f} | {total} | "
                     f"{r['recall']:.3f} | {r['peak_gib']:.1f} | {goal} |")
    return "\n".join(lines) + "\n"


def main(argv: Optional[List[str]] = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--rows", type=int, nargs="+", default=[1_000_000, 10_000_000])
    parser.add_argument("--dim", type=int, default=1024)
    parser.add_argument("--block", type=int, default=4096, help="queries per block")
    parser.add_argument("--tile", type=int, default=1 << 20, help="rows per tile of the products")
    parser.add_argument("--budget", type=float, default=45.0,
                        help="seconds of timed query blocks per N (then the rest is extrapolated)")
    parser.add_argument("--recall-queries", type=int, default=200)
    parser.add_argument("--pairwise-up-to", type=int, default=1_000_000)
    parser.add_argument("--pairwise-queries", type=int, default=4096)
    parser.add_argument("--faiss-up-to", type=int, default=10_000_000)
    parser.add_argument("--out", default=None)
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        print("bench_gpu_neighbors: --device cuda but torch sees no GPU", file=sys.stderr)
        return 1
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_fp16_reduced_precision_reduction = False  # float32 accumulation
    try:
        import faiss

        faiss_note = ("faiss-gpu present." if hasattr(faiss, "StandardGpuResources") and faiss.get_num_gpus() > 0
                      else f"FAISS {faiss.__version__} has no GPU here (faiss-gpu not installed): no faiss-gpu row.")
    except ImportError:
        faiss_note = "FAISS not installed: no faiss-gpu row."
    results = []
    for n in args.rows:
        results += bench(n, args.dim, device, args)
    text = table(results, device, argv, faiss_note)
    print(text)
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(text)
    low = [r for r in results if r["recall"] < 0.99 and r["method"].startswith(("torch", "nnsim"))]
    if low:
        print(f"bench_gpu_neighbors: exact methods with recall below 0.99: {[(r['n'], r['method']) for r in low]}",
              file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
