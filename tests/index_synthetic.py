"""Synthetic feature rows and brute-force oracles (all pairs, float64) for the index tests."""

from __future__ import annotations

import numpy as np


def clustered_rows(n: int, d: int, *, clusters: int = 8, noise: float = 0.6, seed: int = 0) -> np.ndarray:
    """Unit float32 rows around a few random centres (neighbour structure like real features)."""
    rng = np.random.default_rng(seed)
    centres = rng.standard_normal((clusters, d))
    rows = centres[rng.integers(0, clusters, n)] + noise * rng.standard_normal((n, d)) * np.sqrt(1.0)
    rows /= np.linalg.norm(rows, axis=1, keepdims=True)
    return rows.astype(np.float32)


def with_duplicates_and_holes(rows: np.ndarray, *, seed: int = 1):
    """Copy a few rows exactly (duplicates) and blank a few (one NaN row, zero rows).
    Returns (rows, valid mask, pairs of duplicated ids)."""
    rows = rows.copy()
    rng = np.random.default_rng(seed)
    n = len(rows)
    src = rng.choice(n // 2, 4, replace=False)
    dst = n // 2 + rng.choice(n // 2 - 10, 4, replace=False)
    rows[dst] = rows[src]
    holes = np.array([3, n - 1, n // 2 - 1])
    rows[holes[0]] = np.nan
    rows[holes[1:]] = 0.0
    valid = np.ones(n, bool)
    valid[holes] = False
    return rows, valid, list(zip(src.tolist(), dst.tolist()))


def kernel(rows: np.ndarray, valid: np.ndarray) -> np.ndarray:
    """All-pairs cosine matrix in float64; rows/columns of invalid samples are NaN."""
    f = np.where(valid[:, None], rows, 0).astype(np.float64)
    k = f @ f.T
    k[~valid] = np.nan
    k[:, ~valid] = np.nan
    return k


def softmax(logits: np.ndarray) -> np.ndarray:
    z = np.exp(logits - logits.max(1, keepdims=True))
    return (z / z.sum(1, keepdims=True)).astype(np.float32)


def faiss_file(folder):
    """The FAISS file the manifest of an index folder commits (named by its contents), or None."""
    import json
    from pathlib import Path

    from nnsim_hooks.index.folder.index_file import index_file_path

    manifest = json.loads((Path(folder) / "manifest.json").read_text())
    return index_file_path(Path(folder), manifest) if manifest.get("index_file") else None


def faiss_files(folder):
    """The names of every FAISS file in ``folder`` (committed or not)."""
    from pathlib import Path

    return sorted(p.name for p in Path(folder).glob("index*.faiss"))
