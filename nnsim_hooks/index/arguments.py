"""Checks on what is passed to an index, so that FAISS's bare ``assert`` never reaches the user."""

from __future__ import annotations

import numbers
import warnings
from typing import List, Optional, Tuple

import numpy as np

from ..errors import InputError

# A valid feature row has norm 1 up to this tolerance (float32 rounding of normalized rows).
UNIT_TOLERANCE = 1e-3


def as_float32_rows(x, dim: Optional[int], what: str) -> np.ndarray:
    """``x`` (numpy array or torch tensor, ``[n, dim]`` or ``[dim]``) as a C-contiguous float32
    numpy array ``[n, dim]``. Other dtypes are refused rather than silently cast."""
    try:
        import torch

        if isinstance(x, torch.Tensor):
            if x.dtype != torch.float32:
                raise InputError(
                    f"{what} must be float32, got a {x.dtype} tensor of shape {list(x.shape)}; convert with "
                    "x.float() (features are float32; a silent cast could hide a mix-up)"
                )
            x = x.detach().cpu().numpy()
    except ImportError:  # pragma: no cover - torch is a core dependency
        pass
    if not isinstance(x, np.ndarray):
        raise InputError(f"{what} must be a numpy array or torch tensor of float32 rows, got {type(x).__name__}")
    if x.dtype != np.float32:
        raise InputError(
            f"{what} must be float32, got {x.dtype} with shape {list(x.shape)}; convert with x.astype(np.float32) "
            "(features are float32; a silent cast could hide a mix-up)"
        )
    if x.ndim == 1:
        x = x[None, :]
    if x.ndim != 2:
        raise InputError(f"{what} must be a 2-D array [n, feature_dim], got shape {list(x.shape)}")
    if dim is not None and x.shape[1] != dim:
        raise InputError(
            f"{what} have {x.shape[1]} columns but the index holds {dim}-dimensional features; compute them "
            "with the same handle (sketch_dim, output) the index was built with"
        )
    return np.ascontiguousarray(x)


def check_finite_queries(q: np.ndarray, what: str = "queries") -> np.ndarray:
    """``q`` unchanged, unless a row holds an infinity or a NaN among finite values: a
    similarity with it is undefined, and FAISS would answer NaN scores with ids -1 as if
    nothing were stored. A row that is entirely NaN is the package's own mark of a sample
    without a gradient direction (:meth:`nnsim_hooks.Handle.features`) and, like a zero
    row, gets no results."""
    finite = np.isfinite(q)
    corrupt = ~finite.all(1) & ~np.isnan(q).all(1)
    if corrupt.any():
        rows = np.flatnonzero(corrupt)
        r = int(rows[0])
        c = int(np.flatnonzero(~finite[r])[0])
        raise InputError(
            f"{what} rows {rows[:10].tolist()}{'...' if len(rows) > 10 else ''} hold NaN or Inf values (row {r}, "
            f"column {c} is {q[r, c]}): their similarities are undefined. Fix or drop those rows; a row that is "
            "entirely NaN (a sample without a gradient direction, from handle.features) or zero gets no results"
        )
    return q


def defined_rows(x: np.ndarray) -> np.ndarray:
    """Rows that are finite and not all zero (a sample without a gradient direction is NaN or zero)."""
    finite = np.isfinite(x).all(1)
    nonzero = np.abs(np.where(np.isfinite(x), x, 0)).max(1, initial=0) > 0
    return finite & nonzero


def check_k(k, n: int, what: str = "samples in the index") -> int:
    """``k`` as an int, clamped to ``n`` (the most neighbours there can be) with a warning:
    asking for more than exist is almost always a mistake (a k meant for another dataset)
    that would otherwise pass unnoticed."""
    if not isinstance(k, numbers.Integral) or isinstance(k, bool) or k < 1:
        raise InputError(f"k must be a positive integer, got {k!r}")
    n = max(int(n), 1)
    if k > n:
        warnings.warn(f"nnsim_hooks: k={int(k)} is more than the {n} {what}; using k={n}", RuntimeWarning, stacklevel=3)
        return n
    return int(k)


def check_threshold(threshold) -> float:
    if not isinstance(threshold, numbers.Real) or not np.isfinite(threshold):
        raise InputError(f"threshold must be a finite number (a cosine, in [-1, 1]), got {threshold!r}")
    return float(threshold)


def exclusion_table(exclude, n_queries: int) -> Optional[np.ndarray]:
    """``exclude`` (one id per query, or a list of ids per query) as an int64 table
    ``[n_queries, m]`` padded with -2 (never an id)."""
    if exclude is None:
        return None
    try:
        import torch

        if isinstance(exclude, torch.Tensor):
            exclude = exclude.cpu().numpy()
    except ImportError:  # pragma: no cover
        pass
    if isinstance(exclude, np.ndarray) and exclude.dtype != object:
        table = exclude
        if table.ndim == 1:
            table = table[:, None]
        if table.ndim != 2 or not np.issubdtype(table.dtype, np.integer):
            raise InputError(
                f"exclude must hold integer ids, one per query ([{n_queries}]) or several ([{n_queries}, m]); got "
                f"{table.dtype} of shape {list(exclude.shape)}"
            )
    else:
        rows: List[np.ndarray] = []
        for item in exclude:
            ids = np.atleast_1d(np.asarray(list(item) if isinstance(item, (set, frozenset)) else item))
            if ids.size and not np.issubdtype(ids.dtype, np.integer):
                raise InputError(f"exclude must hold integer ids; got {ids.dtype} values {ids[:5].tolist()}")
            rows.append(ids.astype(np.int64).ravel())
        width = max((len(r) for r in rows), default=0)
        table = np.full((len(rows), width), -2, dtype=np.int64)
        for i, r in enumerate(rows):
            table[i, : len(r)] = r
    if len(table) != n_queries:
        raise InputError(f"exclude has {len(table)} entries but there are {n_queries} queries; give one per query")
    return np.asarray(table, dtype=np.int64)


def first_k_not_excluded(scores: np.ndarray, ids: np.ndarray, table: Optional[np.ndarray], k: int) -> Tuple[np.ndarray, np.ndarray]:
    """Drop excluded ids (and FAISS's -1 "no result") from each row, keep the first ``k``,
    pad with ``(NaN, -1)``."""
    drop = ids < 0
    if table is not None and table.shape[1]:
        drop |= (ids[:, :, None] == table[:, None, :]).any(-1)
    order = np.argsort(drop, axis=1, kind="stable")[:, :k]
    scores = np.take_along_axis(scores, order, 1).astype(np.float32)
    ids = np.take_along_axis(ids, order, 1).astype(np.int64)
    gone = np.take_along_axis(drop, order, 1)
    scores[gone], ids[gone] = np.nan, -1
    return pad_to_k(scores, ids, k)


def pad_to_k(scores: np.ndarray, ids: np.ndarray, k: int) -> Tuple[np.ndarray, np.ndarray]:
    """Rows of fewer than ``k`` neighbours padded with ``(NaN, -1)``."""
    if ids.shape[1] < k:
        pad = k - ids.shape[1]
        scores = np.pad(scores, ((0, 0), (0, pad)), constant_values=np.nan)
        ids = np.pad(ids, ((0, 0), (0, pad)), constant_values=-1)
    return scores, ids
