"""NCCL under torchrun, one rank per GPU (issue 18, item 5): run by benchmarks/gpu_check.sh
when the machine has more than one GPU.

Each rank: the process group from the project's own ``init_from_env`` (NCCL with CUDA),
its device from ``Context.device`` (must be ``cuda:LOCAL_RANK``), then

- an NCCL all-reduce of 256 MiB float32 on the GPUs (bus bandwidth, as nccl-tests count it);
- the project's control messages over its gloo group (``all_gather``, ``all_reduce_sum``);
- the sharded exact search (``pairwise.topk`` of each rank's share on its own GPU,
  merged), checked against one process's answer.

    torchrun --nproc-per-node=N benchmarks/bench_gpu_nccl.py --out benchmarks/results/nccl_gpu.md
    torchrun --nproc-per-node=2 benchmarks/bench_gpu_nccl.py --mib 4   # without GPUs: gloo, a dry run
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from nnsim_hooks.index import pairwise  # noqa: E402
from nnsim_hooks.index.sharded import distributed  # noqa: E402


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--mib", type=int, default=256, help="size of the all-reduced tensor")
    parser.add_argument("--rows", type=int, default=200_000, help="rows of the sharded search")
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    if not distributed.init_from_env():
        print("bench_gpu_nccl: run under torchrun with more than one process", file=sys.stderr)
        return 1
    ctx = distributed.current()
    device = ctx.device
    local = int(os.environ["LOCAL_RANK"])
    problems = []
    if torch.cuda.is_available() and device != torch.device("cuda", local):
        problems.append(f"rank {ctx.rank} computes on {device}, not cuda:{local}")
    # 1. NCCL all-reduce bandwidth
    x = torch.ones(args.mib * 2**20 // 4, device=device)
    for _ in range(3):
        dist.all_reduce(x)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    repeats = 10
    t0 = time.perf_counter()
    for _ in range(repeats):
        dist.all_reduce(x)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    seconds = (time.perf_counter() - t0) / repeats
    bus_gbs = x.numel() * 4 * 2 * (ctx.world - 1) / ctx.world / seconds / 1e9
    # 2. the project's control messages
    names = distributed.all_gather(ctx, str(device), "checking devices")
    total = distributed.all_reduce_sum(ctx, np.array([float(ctx.rank)]))
    if total[0] != sum(range(ctx.world)):
        problems.append(f"all_reduce_sum gave {total[0]}, not {sum(range(ctx.world))}")
    if len(set(names)) != ctx.world and torch.cuda.is_available():
        problems.append(f"ranks share devices: {names}")
    # 3. sharded exact search: each rank its share of the rows on its own GPU, merged
    rng = np.random.default_rng(0)
    rows = rng.standard_normal((args.rows, 64)).astype(np.float32)
    rows /= np.linalg.norm(rows, axis=1, keepdims=True)
    valid = np.ones(len(rows), dtype=bool)
    queries = rows[:256]
    lo, hi = ctx.rank * len(rows) // ctx.world, (ctx.rank + 1) * len(rows) // ctx.world
    t0 = time.perf_counter()
    s, i = pairwise.topk(rows[lo:hi], valid[lo:hi], queries, 10, device=device)
    parts = distributed.all_gather(ctx, (s, i + lo), "merging the shards")
    sharded_s = np.concatenate([p[0] for p in parts], 1)
    sharded_i = np.concatenate([p[1] for p in parts], 1)
    order = np.argsort(-sharded_s, axis=1, kind="stable")[:, :10]
    merged = np.take_along_axis(sharded_i, order, 1)
    search_s = time.perf_counter() - t0
    _, single = pairwise.topk(rows, valid, queries, 10, device=device)
    if not np.array_equal(np.sort(merged, 1), np.sort(single, 1)):
        problems.append("the merged sharded search differs from one process's")
    if ctx.main:
        name = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU (gloo dry run, not a measurement)"
        text = "\n".join([
            "# NCCL under torchrun, one rank per GPU",
            "",
            f"Device: {ctx.world} x {name}, backend {ctx.backend}, torch {torch.__version__}. Command: "
            f"`torchrun --nproc-per-node={ctx.world} benchmarks/bench_gpu_nccl.py`.",
            "",
            "| check | result |",
            "|---|---|",
            f"| ranks' devices (Context.device) | {', '.join(names)} |",
            f"| all-reduce of {args.mib} MiB float32 | {seconds * 1e3:.2f} ms, bus bandwidth {bus_gbs:.1f} GB/s |",
            f"| sharded exact top-10 of 256 queries over {args.rows:,} rows, merged | {search_s:.2f} s, "
            f"{'equal to one process' if not problems else 'see problems'} |",
            f"| problems | {'; '.join(problems) or 'none'} |",
        ]) + "\n"
        print(text)
        if args.out:
            Path(args.out).parent.mkdir(parents=True, exist_ok=True)
            Path(args.out).write_text(text)
    dist.barrier()
    dist.destroy_process_group()
    if problems:
        print(f"bench_gpu_nccl rank {ctx.rank}: {problems}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
