"""Dataset-wide queries in linear time, from moments of the features (the paper, §2, §3).

With unit feature rows f_i, k_ij = f_i . f_j, and weights w_j (1 for the cosine kernel,
the gradient norm for the raw kernel K_ij = w_i w_j k_ij):

- soft neighbour count   sum_j k_ij = f_i . S,                   S = sum_j f_j
- sum of squares         sum_j k_ij^2 = f_i^T C f_i,             C = sum_j f_j f_j^T  (D x D)
- kernel-weighted mean   sum_j K_ij p_j / sum_j K_ij = f_i^T M / f_i . S_w,
                         M = sum_j w_j f_j p_j^T, S_w = sum_j w_j f_j

so each costs one pass to build the moment and one to apply it: O(N D) for S, O(N D^2)
for C and O(N D C) for M, never O(N^2). Rows of samples without a gradient direction are
stored as zeros and so add nothing. Moments are accumulated in float64 from blocks of
rows (memory-mapped files are read block by block).
"""

from __future__ import annotations

from typing import Iterator, Optional, Tuple

import numpy as np

ROW_BLOCK = 16384


def row_blocks(features: np.ndarray, block: int = ROW_BLOCK) -> Iterator[Tuple[int, int, np.ndarray]]:
    """``(start, end, float64 rows)`` over ``features``."""
    for start in range(0, len(features), block):
        end = min(len(features), start + block)
        yield start, end, np.asarray(features[start:end], dtype=np.float64)


def weighted_sum(features: np.ndarray, weights: Optional[np.ndarray] = None) -> np.ndarray:
    """``S_w = sum_j w_j f_j`` (float64 [D])."""
    total = np.zeros(features.shape[1], dtype=np.float64)
    for start, end, f in row_blocks(features):
        total += f.sum(0) if weights is None else np.asarray(weights[start:end], np.float64) @ f
    return total


def second_moment(features: np.ndarray, weights: Optional[np.ndarray] = None) -> np.ndarray:
    """``C_w = sum_j w_j^2 f_j f_j^T`` (float64 [D, D])."""
    d = features.shape[1]
    total = np.zeros((d, d), dtype=np.float64)
    for start, end, f in row_blocks(features):
        if weights is not None:
            f = f * np.asarray(weights[start:end], np.float64)[:, None]
        total += f.T @ f
    return total


def cross_moment(features: np.ndarray, values: np.ndarray, weights: Optional[np.ndarray] = None) -> np.ndarray:
    """``M_w = sum_j w_j f_j p_j^T`` (float64 [D, C]); rows whose values are not finite add nothing."""
    total = np.zeros((features.shape[1], values.shape[1]), dtype=np.float64)
    for start, end, f in row_blocks(features):
        p = np.nan_to_num(np.asarray(values[start:end], np.float64), nan=0.0, posinf=0.0, neginf=0.0)
        if weights is not None:
            p = p * np.asarray(weights[start:end], np.float64)[:, None]
        total += f.T @ p
    return total


def apply_rows(features: np.ndarray, matrix: np.ndarray) -> np.ndarray:
    """``features @ matrix`` in float64, block by block (matrix [D] or [D, C])."""
    out = np.empty((len(features),) + matrix.shape[1:], dtype=np.float64)
    for start, end, f in row_blocks(features):
        out[start:end] = f @ matrix
    return out


def quadratic_forms(features: np.ndarray, matrix: np.ndarray) -> np.ndarray:
    """``f_i^T C f_i`` for every row (float64 [N])."""
    out = np.empty(len(features), dtype=np.float64)
    for start, end, f in row_blocks(features):
        out[start:end] = np.einsum("ij,ij->i", f @ matrix, f)
    return out


def squared_norms(features: np.ndarray) -> np.ndarray:
    """``|f_i|^2`` (1 for valid rows up to rounding, 0 for undefined ones)."""
    out = np.empty(len(features), dtype=np.float64)
    for start, end, f in row_blocks(features):
        out[start:end] = np.einsum("ij,ij->i", f, f)
    return out


# -- sums of squared similarities within a memory budget ---------------------------------
# sum_j w_j^2 k_ij^2 either from the N x N Gram matrix (cheaper when D > N: O(N^2 D)) or
# from the D x D second moment (O(N D^2)), built in column chunks when it does not fit.

#: Part of the memory the kernel reports as available that a query may use by default.
DEFAULT_MEMORY_SHARE = 0.5


def available_memory() -> int:
    """Bytes the system reports as available (Linux ``MemAvailable``; 4 GiB when unknown)."""
    try:
        with open("/proc/meminfo") as fh:
            for line in fh:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:  # pragma: no cover - not Linux
        pass
    return 4 << 30  # pragma: no cover


def memory_budget(max_memory: Optional[int]) -> int:
    from ..errors import InputError

    if max_memory is None:
        return int(available_memory() * DEFAULT_MEMORY_SHARE)
    if isinstance(max_memory, bool) or not isinstance(max_memory, (int, np.integer)) or max_memory <= 0:
        raise InputError(f"max_memory must be a positive number of bytes or None, got {max_memory!r}")
    return int(max_memory)


def _require(need: int, budget: int, what: str) -> None:
    from ..errors import InputError

    if need > budget:
        raise InputError(
            f"{what} needs at least {need:,} bytes ({need / 2**30:.2f} GiB) of memory and {budget:,} are allowed; give "
            "max_memory= more (it defaults to half the available memory), or free memory"
        )


def _scaled(features: np.ndarray, weights: Optional[np.ndarray], rows: slice, cols: slice) -> np.ndarray:
    f = np.asarray(features[rows, cols], dtype=np.float64)
    if weights is not None:
        f = f * np.asarray(weights[rows], np.float64)[:, None]
    return f


def gram_squares(features: np.ndarray, weights: Optional[np.ndarray], budget: int) -> np.ndarray:
    """``sum_j w_j^2 (f_i . f_j)^2`` (float64 [N]) from the N x N Gram matrix, built in
    blocks of rows and of feature columns so that at most ``budget`` bytes are held."""
    n, dim = features.shape
    _require(8 * 2 * n, budget, f"the Gram path for N = {n} (one row of the N x N matrix and one feature column)")
    rows = int(min(n, max(1, budget // 2 // (8 * n))))
    cols = int(min(dim, max(1, (budget - 8 * rows * n) // (8 * (n + rows)))))
    out = np.empty(n, dtype=np.float64)
    for r0 in range(0, n, rows):
        r1 = min(n, r0 + rows)
        k = np.zeros((r1 - r0, n), dtype=np.float64)
        for c0 in range(0, dim, cols):
            c = slice(c0, min(dim, c0 + cols))
            k += np.asarray(features[r0:r1, c], dtype=np.float64) @ _scaled(features, weights, slice(None), c).T
        out[r0:r1] = np.einsum("ij,ij->i", k, k)
    return out


def second_moment_fits(dim: int, budget: int) -> bool:
    """Whether the D x D moment, its temporary and a block of rows fit in ``budget``."""
    return 8 * (2 * dim * dim + ROW_BLOCK * dim) <= budget


def chunked_quadratic_forms(features: np.ndarray, weights: Optional[np.ndarray], budget: int) -> np.ndarray:
    """``f_i^T C_w f_i`` with ``C_w = sum_j w_j^2 f_j f_j^T``, building ``C_w`` a chunk of
    columns at a time (``D x c`` floats): ``sum_{a in chunk} f_ia (F C_w[:, chunk])_ia``.
    Two reads of the features per chunk; O(N D^2) work like the full moment."""
    n, dim = features.shape
    rows = int(min(n, ROW_BLOCK, max(1, budget // 4 // (8 * dim))))
    _require(8 * (2 * dim + 2 * rows * dim + rows), budget,
             f"the chunked D x D second moment for D = {dim} (one column of it and a block of rows)")
    cols = int(min(dim, max(1, (budget - 8 * 2 * rows * dim) // (8 * (dim + 2 * rows)))))
    out = np.zeros(n, dtype=np.float64)
    everything = slice(None)
    for c0 in range(0, dim, cols):
        chunk = slice(c0, min(dim, c0 + cols))
        moment = np.zeros((dim, chunk.stop - c0), dtype=np.float64)
        for r0 in range(0, n, rows):
            r = slice(r0, min(n, r0 + rows))
            fw = _scaled(features, weights, r, everything)
            moment += fw.T @ fw[:, chunk]
        for r0 in range(0, n, rows):
            r = slice(r0, min(n, r0 + rows))
            f = np.asarray(features[r], dtype=np.float64)
            out[r] += np.einsum("ij,ij->i", f @ moment, f[:, chunk])
    return out
