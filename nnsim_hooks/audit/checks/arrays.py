"""Helpers on the arrays every check reads, pure (no model, no index, no I/O).

The neighbour lists of the gradient index: ``ids [N, k]`` (int, -1 where there is no
neighbour) and ``sims [N, k]`` (the network's similarity, cosine between label-free
gradients, descending along each row). Labels are ints with -1 for "missing".
"""

from __future__ import annotations

from typing import Optional

import numpy as np


def usable_neighbors(ids: np.ndarray, sims: np.ndarray) -> np.ndarray:
    """Mask ``[N, k]`` of neighbour slots that hold a real neighbour."""
    return (ids >= 0) & np.isfinite(sims)


def agreement(a: np.ndarray, b: np.ndarray, mask: Optional[np.ndarray] = None) -> float:
    """Share of samples (within ``mask``, among those where both are >= 0) with a == b."""
    a, b = np.asarray(a), np.asarray(b)
    ok = (a >= 0) & (b >= 0)
    if mask is not None:
        ok &= mask
    return float((a[ok] == b[ok]).mean()) if ok.any() else float("nan")


def nanstat(fn, values) -> float:
    """``fn`` of the finite values (NaN when there are none)."""
    v = np.asarray(values, dtype=np.float64)
    v = v[np.isfinite(v)]
    return float(fn(v)) if v.size else float("nan")


def class_column(table, column: str) -> np.ndarray:
    """A nullable class column of the table as ints, -1 where missing."""
    return table[column].fillna(-1).to_numpy(dtype=np.int64)
