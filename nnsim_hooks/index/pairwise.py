"""Exact, blocked torch products of query rows with all stored rows (top-k, pair sums).

They answer what FAISS-GPU cannot (range search, k > 2048) and the all-pairs queries
(hard counts, ``sum_j max(k, 0)^n``). Memory stays bounded by the block sizes whatever N
is; compute is one ``[q_block, D] @ [D, db_block]`` product per pair of blocks, on
``device`` (CPU, or CUDA when the index is on GPU).

Conventions shared with :class:`~nnsim_hooks.index.GradientIndex`: stored rows that are
not ``valid`` are never neighbours; ``exclude_rows`` (one stored row per query, or -1)
drops a query's own row.
"""

from __future__ import annotations

from typing import Callable, Optional, Tuple

import numpy as np
import torch

from ..data.batching import chunks

DB_BLOCK = 16384
QUERY_BLOCK = 4096


def _tensor(array: np.ndarray, device: torch.device) -> torch.Tensor:
    # a copy: blocks of read-only memmaps cannot back a tensor
    return torch.from_numpy(np.array(array, dtype=np.float32, order="C", copy=True)).to(device)


def _scores(queries: torch.Tensor, features: np.ndarray, valid: np.ndarray, start: int, end: int,
            exclude_rows: Optional[torch.Tensor], device: torch.device) -> torch.Tensor:
    """``queries @ features[start:end].T`` with invalid and excluded rows set to NaN."""
    s = queries @ _tensor(features[start:end], device).T
    bad = ~torch.from_numpy(np.array(valid[start:end], dtype=bool)).to(device)  # a copy: memmaps are read-only
    if bool(bad.any()):
        s[:, bad] = float("nan")
    if exclude_rows is not None:
        local = exclude_rows - start
        hit = (local >= 0) & (local < end - start)
        if bool(hit.any()):
            rows = hit.nonzero().flatten()
            s[rows, local[rows]] = float("nan")
    return s


def topk(features: np.ndarray, valid: np.ndarray, queries: np.ndarray, k: int, *, device: torch.device,
         exclude_rows: Optional[np.ndarray] = None) -> Tuple[np.ndarray, np.ndarray]:
    """Exact top-``k`` inner products of ``queries`` against the valid stored rows; missing
    results are ``(NaN, -1)``. Ties go to the lower row."""
    q = _tensor(queries, device)
    ex = torch.from_numpy(np.asarray(exclude_rows, dtype=np.int64)).to(device) if exclude_rows is not None else None
    best_s = torch.full((len(q), 0), float("-inf"), device=device)
    best_i = torch.full((len(q), 0), -1, dtype=torch.int64, device=device)
    for start, end in chunks(len(features), DB_BLOCK):
        s = _scores(q, features, valid, start, end, ex, device).nan_to_num_(nan=float("-inf"))
        ids = torch.arange(start, end, device=device).expand(len(q), -1)
        cat_s, cat_i = torch.cat([best_s, s], 1), torch.cat([best_i, ids], 1)
        keep = min(k, cat_s.shape[1])
        # stable: among equal scores the earlier column (lower row) wins
        order = torch.sort(cat_s, dim=1, descending=True, stable=True).indices[:, :keep]
        best_s, best_i = cat_s.gather(1, order), cat_i.gather(1, order)
    scores = best_s.cpu().numpy().astype(np.float32)
    ids = best_i.cpu().numpy()
    missing = ~np.isfinite(scores)
    ids[missing], scores[missing] = -1, np.nan
    if scores.shape[1] < k:
        pad = k - scores.shape[1]
        scores = np.pad(scores, ((0, 0), (0, pad)), constant_values=np.nan)
        ids = np.pad(ids, ((0, 0), (0, pad)), constant_values=-1)
    return scores, ids


def pairwise_reduce(features: np.ndarray, valid: np.ndarray, queries: np.ndarray, reduce: Callable[[torch.Tensor], torch.Tensor], *,
                    device: torch.device, exclude_rows: Optional[np.ndarray] = None) -> np.ndarray:
    """``sum_j reduce(q . f_j)`` over valid stored rows j (NaN-safe: excluded pairs add 0),
    accumulated in float64; ``reduce`` maps a score block to per-pair float64 terms."""
    q = _tensor(queries, device)
    ex = torch.from_numpy(np.asarray(exclude_rows, dtype=np.int64)).to(device) if exclude_rows is not None else None
    total = torch.zeros(len(q), dtype=torch.float64, device=device)
    for start, end in chunks(len(features), DB_BLOCK):
        s = _scores(q, features, valid, start, end, ex, device)
        total += reduce(s).nan_to_num_(nan=0.0).sum(1)
    return total.cpu().numpy()


def count_above(threshold: float) -> Callable[[torch.Tensor], torch.Tensor]:
    return lambda s: (s > threshold).to(torch.float64)  # NaN > t is False


def positive_power(power: float) -> Callable[[torch.Tensor], torch.Tensor]:
    return lambda s: s.double().clamp_min(0).pow(power)
