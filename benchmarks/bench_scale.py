"""The audit of a stored index at dataset scale: each step's time, peak RSS and recall@10.

For each N, synthetic clustered unit features (D = 1024, 1,000 clusters, same-cluster
cosine about 0.3: the data of issue 18's measurements), labels (5% flipped) and softmax
probabilities are written to an index folder, block by block. Then, in a fresh process
per N, ``nnsim_hooks.audit(index=folder, out_dir=...)`` runs the whole analysis (load,
density, N_eff, consistency, the neighbour step, tables and report), with each step timed
and the peak RSS recorded after it. recall@10 is checked independently: 200 random rows
are searched by brute force and compared with the audit table's similarity columns (a
neighbour counts when its similarity reaches the exact 10th one).

Usage::

    OMP_NUM_THREADS=2 python benchmarks/bench_scale.py --rows 1e4 1e5
    python benchmarks/bench_scale.py --rows 1e4 --out benchmarks/results/scale_cpu.md   # appends rows

The table (Markdown) is printed and merged into ``--out`` (rows of other N kept), with the
command that produced each row.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

DIM, CLUSTERS, NOISE, CLASSES = 1024, 1000, 1.5, 10
CHUNK = 20_000


def peak_gb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20


def write_index(folder: Path, n: int, seed: int = 0) -> None:
    """The synthetic index folder, written block by block (never [N, D] in memory)."""
    from nnsim_hooks.index.folder.manifest import new_manifest
    from nnsim_hooks.index.folder.store import ColumnSpec, Store

    rng = np.random.default_rng(seed)
    centres = np.random.default_rng(12345).standard_normal((CLUSTERS, DIM)).astype(np.float32)
    store = Store.create(folder, dict(new_manifest(None, {"data": "bench_scale"}), feature_dim=DIM,
                                      task="classification"))
    store.define_columns([ColumnSpec("features", "float32", (DIM,)), ColumnSpec("valid", "bool"),
                          ColumnSpec("ids", "int64"), ColumnSpec("norms", "float32"), ColumnSpec("labels", "int64"),
                          ColumnSpec("predictions", "int64"), ColumnSpec("probabilities", "float32", (CLASSES,))])
    for start in range(0, n, CHUNK):
        m = min(CHUNK, n - start)
        cluster = rng.integers(0, CLUSTERS, m)
        x = centres[cluster] + NOISE * rng.standard_normal((m, DIM), dtype=np.float32)
        x /= np.linalg.norm(x, axis=1, keepdims=True)
        truth = cluster % CLASSES
        labels = np.where(rng.random(m) < 0.05, rng.integers(0, CLASSES, m), truth)
        logits = 3.0 * np.eye(CLASSES, dtype=np.float32)[truth] + rng.standard_normal((m, CLASSES), dtype=np.float32)
        p = np.exp(logits - logits.max(1, keepdims=True))
        p /= p.sum(1, keepdims=True)
        store.append({"features": x, "valid": np.ones(m, bool), "ids": np.arange(start, start + m),
                      "norms": np.ones(m, np.float32), "labels": labels, "predictions": p.argmax(1),
                      "probabilities": p.astype(np.float32)})
        store.commit(extraction_complete=True)
    store.commit(complete=True, index={"kind": "flat", "options": {}, "factory": "Flat"})
    store.close()


def run_audit(folder: Path, out: Path, recall: float) -> dict:
    """The whole analysis in this process, each step timed (the child's side)."""
    import torch

    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "2")))
    import nnsim_hooks
    import nnsim_hooks.index as index_package
    from nnsim_hooks.audit import analysis
    from nnsim_hooks.index import queries

    steps: dict = {}

    def timed(owner, name, label):
        original = getattr(owner, name)

        def wrapper(*args, **kwargs):
            t = time.perf_counter()
            value = original(*args, **kwargs)
            steps[label] = {"s": round(time.perf_counter() - t + steps.get(label, {}).get("s", 0), 2),
                            "peak_gb": round(peak_gb(), 2)}
            return value

        setattr(owner, name, wrapper)

    timed(index_package, "load_index", "load")
    timed(queries.DatasetQueries, "density", "density")
    timed(queries.DatasetQueries, "effective_neighbors", "N_eff")
    timed(queries.DatasetQueries, "consistency", "consistency")
    timed(analysis, "all_neighbors", "neighbours")
    t = time.perf_counter()
    result = nnsim_hooks.audit(index=folder, out_dir=out, recall=recall, progress=False, overwrite=True)
    total = time.perf_counter() - t
    table = result.table
    sims = table[[f"similarity_{j}" for j in range(1, 11)]].to_numpy(dtype=np.float64)
    return {"steps": steps, "total_s": round(total, 2), "peak_gb": round(peak_gb(), 2),
            "plan": result.summary.get("neighbors"), "sims_file": _save(out, sims)}


def _save(out: Path, sims: np.ndarray) -> str:
    path = out / "bench_sims.npy"
    np.save(path, sims)
    return str(path)


def check_recall(folder: Path, sims: np.ndarray, rows: int = 200, seed: int = 7) -> float:
    """recall@10 of the audit's lists on random rows, against brute force over every row."""
    import torch

    f = np.memmap(folder / "features.bin", dtype=np.float32, mode="r").reshape(-1, DIM)
    n = len(f)
    pick = np.sort(np.random.default_rng(seed).choice(n, size=min(rows, n), replace=False))
    q = torch.from_numpy(np.array(f[pick]))
    best = torch.full((len(pick), 10), float("-inf"))
    for start in range(0, n, 65536):
        s = q @ torch.from_numpy(np.array(f[start : start + 65536])).T
        own = (pick >= start) & (pick < start + 65536)
        s[torch.from_numpy(np.flatnonzero(own)), torch.from_numpy(pick[own] - start)] = float("-inf")
        best = torch.topk(torch.cat([best, s], 1), 10, dim=1).values
    kth = best[:, -1:].numpy().astype(np.float64)
    return float((sims[pick] >= kth - 1e-5).mean())


def load_seconds(folder: Path) -> float:
    """``load_index`` alone in a fresh process (cold Python, warm page cache)."""
    code = ("import time,sys; sys.path.insert(0, %r); from nnsim_hooks.index import load_index; "
            "t=time.perf_counter(); idx=load_index(%r); print(time.perf_counter()-t)") % (str(ROOT), str(folder))
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    return float(out.stdout.strip().splitlines()[-1])


def fmt_row(n: int, r: dict) -> str:
    s = r["steps"]
    plan = r["plan"] or {}
    method = "exact" if plan.get("method") != "partition" else f"partition {plan.get('nprobe')}/{plan.get('nlist')}"
    other = r["total_s"] - sum(v["s"] for k, v in s.items() if k != "load")
    cell = lambda k: f"{s[k]['s']:,.1f} s" if k in s else "–"  # noqa: E731
    return (f"| {n:.0e} | {r['load_alone_s']:.2f} s | {cell('density')} | {cell('N_eff')} | {cell('consistency')} | "
            f"{cell('neighbours')} ({method}) | {other:,.1f} s | **{r['total_s']:,.1f} s** | {r['peak_gb']:.1f} GB | "
            f"{plan.get('recall_measured')} / {r['recall_check']:.3f} |")


HEADER = ("| N | load_index (own process) | density | N_eff | consistency | neighbours (method, nprobe/nlist) | "
          "tables, report | whole analysis | peak RSS | recall@10: audit's held-out / bench's 200 rows |\n"
          "|---:|---:|---:|---:|---:|---|---:|---:|---:|---|")


def merge_table(out: Path, rows: dict, note: str) -> str:
    """The results file: earlier rows of other N kept."""
    old = {}
    if out.is_file():
        for line in out.read_text().splitlines():
            if line.startswith("| ") and not line.startswith("| N ") and line.split("|")[1].strip()[:1].isdigit():
                old[float(line.split("|")[1])] = line
    old.update({float(n): line for n, line in rows.items()})
    lines = [HEADER] + [old[n] for n in sorted(old)]
    kept = ""
    if out.is_file():
        text = out.read_text()
        kept = text[text.index("## Runs") :] if "## Runs" in text else ""
    return ("# The audit of a stored index at scale (CPU)\n\n" + "\n".join(lines) + "\n\n"
            + (kept if kept else "## Runs\n") + note + "\n")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rows", nargs="+", type=float, default=[1e4, 1e5])
    p.add_argument("--recall", type=float, default=0.95)
    p.add_argument("--work", default=None, help="folder for the synthetic indexes (default: a temporary one)")
    p.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "scale_cpu.md"))
    p.add_argument("--child", nargs=2, metavar=("INDEX", "OUT"), help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child:
        print(json.dumps(run_audit(Path(args.child[0]), Path(args.child[1]), args.recall)))
        return
    work = Path(args.work or tempfile.mkdtemp(prefix="bench_scale_"))
    rows = {}
    for n in [int(r) for r in args.rows]:
        folder, out = work / f"index-{n}", work / f"audit-{n}"
        t = time.perf_counter()
        if not (folder / "manifest.json").is_file():
            write_index(folder, n)
        written = time.perf_counter() - t
        shutil.rmtree(out, ignore_errors=True)
        child = subprocess.run([sys.executable, __file__, "--recall", str(args.recall), "--child", str(folder), str(out)],
                               capture_output=True, text=True)
        if child.returncode != 0:
            print(child.stderr[-3000:], file=sys.stderr)
            raise SystemExit(f"the audit of {n} rows failed")
        r = json.loads(child.stdout.strip().splitlines()[-1])
        r["load_alone_s"] = load_seconds(folder)
        r["recall_check"] = check_recall(folder, np.load(r["sims_file"]))
        r["written_s"] = round(written, 1)
        rows[n] = fmt_row(n, r)
        print(rows[n], json.dumps({k: v for k, v in r.items() if k != "sims_file"}), flush=True)
        if args.work is None:
            shutil.rmtree(folder, ignore_errors=True)
        shutil.rmtree(out, ignore_errors=True)
    load = os.getloadavg()
    note = (f"- {time.strftime('%Y-%m-%d %H:%M')} UTC, rows {', '.join(f'{n:.0e}' for n in rows)}: "
            f"`OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS', '?')} python "
            f"benchmarks/bench_scale.py --rows {' '.join(f'{n:g}' for n in args.rows)}`; {platform.processor() or platform.machine()}, "
            f"{os.cpu_count()} cores, load average {load[0]:.1f} at the end"
            + (" (SHARED with other jobs: the times are upper bounds of an idle machine's)"
               if load[0] > (os.cpu_count() or 1) + 0.5 else ""))
    text = merge_table(Path(args.out), rows, note)
    Path(args.out).write_text(text)
    print(text)


if __name__ == "__main__":
    main()
