"""``nnsim audit --index PATH --dry-run``: what each step of the audit of a stored index
will cost for its N and D, from the operation counts and this machine's measured matrix
product speed (a fraction of a second to measure). Estimates, not promises: another
process on the machine slows every step alike."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import List, Optional, Tuple

from ..index.all_neighbors import EXACT_UP_TO, KMEANS_ITERATIONS, KMEANS_POINTS_PER_LIST, SAMPLE_ROWS, partition_lists

#: nprobe assumed for the estimate (the run measures its own).
ASSUMED_NPROBE = 8
#: Seconds per row of the tables and the report (measured: 45 s at 10^6 rows, scale_cpu.md).
TABLE_SECONDS_PER_ROW = 4.5e-5


def matmul_rate(seconds: float = 0.3) -> Tuple[float, float]:
    """Measured float32 and float64 matrix-product speeds of this process (FLOP/s)."""
    import torch

    rates = []
    for dtype in (torch.float32, torch.float64):
        a, b = torch.randn(1024, 1024, dtype=dtype), torch.randn(1024, 1024, dtype=dtype)
        a @ b  # warm-up
        runs, t = 0, time.perf_counter()
        while time.perf_counter() - t < seconds / 2:
            a @ b
            runs += 1
        rates.append(runs * 2 * 1024**3 / (time.perf_counter() - t))
    return rates[0], rates[1]


def audit_steps(n: int, d: int, k: int, recall: float, d_paper: int, f32: float, f64: float) -> List[Tuple[str, float, str]]:
    """``(step, seconds, note)`` of the audit of ``n`` rows of dimension ``d`` (the density
    and denoising index: ``d_paper``)."""
    steps = [
        ("load the index", 0.5, "manifest and block checksums only"),
        ("density", 2 * n * d_paper / f64 + n * d_paper * 4 / 2e9, "one pass over the features"),
        ("effective neighbours (N_eff)", 2 * (2 * n * d_paper**2) / f64, "second moment and quadratic forms, O(N D^2)"),
        ("consistency", 2 * n * d_paper * 16 / f64 + n * d_paper * 4 / 2e9, "one pass"),
    ]
    exact = 2.0 * n * n * d  # FLOP
    if recall >= 1 or n <= EXACT_UP_TO:
        steps.append(("neighbours (exact)", exact / f32, f"N^2 D; {n * k * 12 / 1e6:.0f} MB of lists"))
    else:
        nlist = partition_lists(n)
        plan = 2.0 * (KMEANS_ITERATIONS * KMEANS_POINTS_PER_LIST * nlist * nlist * d + (SAMPLE_ROWS + nlist) * n * d)
        search = 2.0 * n * (ASSUMED_NPROBE + 1) * (n / nlist) * d
        steps.append(("neighbours: k-means, recall sample", plan / f32, f"{nlist} lists, {SAMPLE_ROWS} exact queries"))
        steps.append(("neighbours: partition search", min(search, exact) / f32 * 1.3,
                      f"at nprobe {ASSUMED_NPROBE} (measured at run time for recall {recall}); exact would take "
                      f"{_time(exact / f32)}"))
    steps.append(("tables and report", n * TABLE_SECONDS_PER_ROW, ""))
    return steps


def _time(seconds: float) -> str:
    if seconds < 120:
        return f"{seconds:.0f} s"
    if seconds < 7200:
        return f"{seconds / 60:.0f} min"
    return f"{seconds / 3600:.1f} h"


def estimate_audit(main: Path, denoise: Optional[Path], *, k: int, recall: float) -> str:
    """The dry run's text for the index folders ``main`` (and ``denoise``)."""
    manifest = json.loads((Path(main) / "manifest.json").read_text())
    n, d = int(manifest["count"]), int(manifest.get("feature_dim") or manifest["columns"]["features"]["shape"][0])
    d_paper = d
    if denoise is not None:
        dm = json.loads((Path(denoise) / "manifest.json").read_text())
        d_paper = int(dm.get("feature_dim") or dm["columns"]["features"]["shape"][0])
    f32, f64 = matmul_rate()
    steps = audit_steps(n, d, k, recall, d_paper, f32, f64)
    total = sum(s for _, s, _ in steps)
    width = max(len(name) for name, _, _ in steps)
    lines = [f"nnsim audit --index {main} --dry-run: N = {n:,}, D = {d}, k = {k}, recall target {recall} "
             f"(this machine: {f32 / 1e9:.0f} GFLOP/s float32, {f64 / 1e9:.0f} float64)"]
    lines += [f"  {name:<{width}}  {_time(sec):>8}  {note}" for name, sec, note in steps]
    lines.append(f"  {'total':<{width}}  {_time(total):>8}  memory: features memory-mapped ({n * d * 4 / 1e9:.1f} GB "
                 f"of page cache), about {(n * (k * 12 + 64) + 4 * d * d * 8) / 1e9 + 0.6:.1f} GB besides")
    return "\n".join(lines)
