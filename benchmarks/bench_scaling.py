"""Scaling of build_index and of the sharded queries with the number of processes (torchrun).

For each number of processes P (default 1 and 2) this script launches
``torchrun --standalone --nproc_per_node=P`` on itself; every rank builds the same index
of N samples (a small CNN, random weights, sketched features) into a shared folder: its
share of the extraction, then rank 0 merges. Timed on rank 0, from the first collective
to the merged index on every rank (process start and imports excluded), then
``ShardedQueries.neighbors(k)`` and ``effective_neighbors()``. The baseline is P = 1 (a
plain one-process build) in the same run; the table reports samples per second and the
speed-up over it.

Usage::

    python benchmarks/bench_scaling.py                       # CPU, gloo: P = 1, 2
    python benchmarks/bench_scaling.py --procs 1 2 4 8 --samples 20000 --gpu   # one GPU per rank, NCCL

``--threads`` sets torch's threads per process (default: the CPU cores divided by P, so
every P uses the whole machine). The Markdown table is printed and written to
benchmarks/results/scaling_cpu.md (``--out``) with the command that produced it.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


def model_and_data(n: int, seed: int = 0):
    import torch

    torch.manual_seed(seed)
    model = torch.nn.Sequential(
        torch.nn.Conv2d(3, 16, 3, padding=1), torch.nn.ReLU(), torch.nn.MaxPool2d(2),
        torch.nn.Conv2d(16, 32, 3, padding=1), torch.nn.ReLU(), torch.nn.AdaptiveAvgPool2d(4),
        torch.nn.Flatten(), torch.nn.Linear(32 * 16, 10),
    ).eval()
    g = torch.Generator().manual_seed(seed + 1)
    data = torch.utils.data.TensorDataset(torch.randn(n, 3, 32, 32, generator=g), torch.randint(0, 10, (n,), generator=g))
    return model, data


def worker(args) -> None:
    import torch
    import torch.distributed as dist

    import nnsim_hooks
    from nnsim_hooks.index.sharded.distributed import current, init_from_env
    from nnsim_hooks.index.sharded.queries import ShardedQueries

    torch.set_num_threads(args.threads)
    init_from_env()
    ctx = current()
    model, data = model_and_data(args.n)
    if args.gpu:
        model = model.to(ctx.device if ctx else torch.device("cuda"))

    def sync():
        if ctx is not None:
            dist.barrier()

    sync()
    start = time.perf_counter()
    with nnsim_hooks.attach(model, sketch_dim=args.dim, batch_size=args.batch) as h:
        idx = h.build_index(data, args.folder, batch_size=args.batch, progress=False, gpu=False)
    sync()
    built = time.perf_counter()
    q = ShardedQueries(idx)
    q.neighbors(args.k)
    sync()
    searched = time.perf_counter()
    q.effective_neighbors()
    sync()
    done = time.perf_counter()
    if ctx is None or ctx.main:
        Path(args.result).write_text(json.dumps({
            "build_s": built - start, "neighbors_s": searched - built, "n_eff_s": done - searched,
            "world": 1 if ctx is None else ctx.world, "threads": args.threads,
        }))
    if ctx is not None:
        dist.destroy_process_group()


def launch(procs: int, args, folder: Path, result: Path) -> dict:
    threads = args.threads or max(1, (os.cpu_count() or 1) // procs)
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]),
               OMP_NUM_THREADS=str(threads))
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={procs}",
           str(Path(__file__).resolve()), "--worker", "--folder", str(folder), "--result", str(result),
           "--samples", str(args.n), "--dim", str(args.dim), "--batch", str(args.batch), "--k", str(args.k),
           "--threads", str(threads)] + (["--gpu"] if args.gpu else [])
    subprocess.run(cmd, env=env, check=True, stdout=subprocess.DEVNULL)
    return json.loads(result.read_text())


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--procs", type=int, nargs="+", default=[1, 2])
    p.add_argument("--samples", dest="n", type=int, default=2048, help="samples N (default %(default)s)")
    p.add_argument("--dim", type=int, default=256, help="sketch dimension (default %(default)s)")
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--k", type=int, default=10)
    p.add_argument("--threads", type=int, default=0, help="torch threads per process (default: cores / P)")
    p.add_argument("--gpu", action="store_true", help="one GPU per rank (NCCL)")
    p.add_argument("--repeats", type=int, default=1, help="runs per P (the fastest is kept)")
    p.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "scaling_cpu.md"))
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--folder", help=argparse.SUPPRESS)
    p.add_argument("--result", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.worker:
        return worker(args)

    rows = []
    tmp = Path(tempfile.mkdtemp(prefix="bench_scaling."))
    load_before = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    try:
        for procs in args.procs:
            best = None
            for r in range(args.repeats):
                folder = tmp / f"p{procs}-{r}"
                res = launch(procs, args, folder, tmp / f"p{procs}-{r}.json")
                shutil.rmtree(folder, ignore_errors=True)
                best = res if best is None or res["build_s"] < best["build_s"] else best
            rows.append((procs, best))
            print(f"P={procs}: {best}", flush=True)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    load_after = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    base = rows[0][1]
    lines = [
        "| processes | threads each | build (samples/s) | build speed-up | neighbors(k) (s) | speed-up | effective_neighbors (s) |",
        "|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for procs, r in rows:
        lines.append(
            f"| {procs} | {r['threads']} | {args.n / r['build_s']:.0f} | {base['build_s'] / r['build_s']:.2f}x | "
            f"{r['neighbors_s']:.2f} | {base['neighbors_s'] / r['neighbors_s']:.2f}x | {r['n_eff_s']:.3f} |"
        )
    table = "\n".join(lines)
    print(table)
    device = "GPU (NCCL, one per rank)" if args.gpu else f"CPU (gloo), {os.cpu_count()} cores"
    text = f"""# Scaling with processes: build_index and sharded queries under torchrun

Command: `python benchmarks/bench_scaling.py {' '.join(sys.argv[1:])}`

Machine: {platform.processor() or platform.machine()}, {device}, torch threads per process as listed.
Load average (1 min) {load_before:.1f} before and {load_after:.1f} after the run.
N = {args.n} samples (3x32x32, a 2-conv CNN with random weights), sketch D = {args.dim}, batch {args.batch},
k = {args.k}. Baseline: 1 process (a plain build) in the same run. Times from the first collective to the
merged index on every rank (rank 0 merges: a sequential copy of N x D float32), process start and imports
excluded.

{table}
"""
    Path(args.out).write_text(text + NOTES)
    print(f"written to {args.out}")


NOTES = """
What it means:

- A load average above the number of cores means other work shared the machine while this ran (for the
  table committed from the 2-core development machine, seven teammates' tests): the ratios are then noisy.
  Rerun on a quiet machine, and with `--repeats 3`, before drawing conclusions.

- On this CPU every configuration shares the same cores: P processes of cores/P threads do the same arithmetic
  as one process of all the threads, so a speed-up near 1x is the expected result; it only shows that
  sharding costs little (the merge and the collectives) and that the per-rank work is balanced. With 1 thread
  per process the ratio measures the extraction's process scaling on free cores.
- On GPUs each rank has its own device, so the extraction (all of build_index but the merge) scales with the
  number of GPUs: P GPUs extract P shares at once. What does not scale: the merge on rank 0 (a sequential
  copy, disk bound; about N x D x 4 bytes), the FAISS build of the merged index (one process), and reading the
  dataset if the storage is the bottleneck. neighbors(k) and the hard/soft counts split the O(N^2 D) work over
  the ranks (each rank searches its share against everyone's queries, on its own GPU).
"""


if __name__ == "__main__":
    main()
