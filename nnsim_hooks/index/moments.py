"""Dataset-wide queries in linear time, from moments of the features (../shared/PAPER.md §2, §3).

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
