"""The paper's dataset-scale queries on an index split into contiguous row shares.

    >>> q = ShardedQueries(index)          # under torchrun: one share per rank
    >>> density = q.density()              # every rank gets all N values
    >>> scores, ids = q.neighbors(10)      # each rank answers its own share's queries

The queries are :mod:`nnsim_hooks.index.queries`' own (written once); this class is
their host for shares: its :class:`~nnsim_hooks.index.statistics.Statistics` sums the
additive statistics of the paper, §2-3 (``S = sum_j w_j f_j``, ``C = sum_j w_j^2 f_j f_j^T``,
``M = sum_j w_j f_j p_j^T``) over this process's shares and all-reduces them under a
process group; each share then answers for its own rows, and the per-row results are
gathered in id order. They equal :class:`~nnsim_hooks.index.GradientIndex`'s results up
to the order of float64 additions. Hard and soft neighbour counts of a share's rows are
computed against every stored row, so n ranks each do 1/n of the O(N^2 D) work.

Neighbour search works like FAISS ``IndexShards``: every rank searches the queries of all
ranks against its own share (exact inner products in torch, on this rank's own GPU when
CUDA is there, else on the CPU: the same code), the partial top-k lists are gathered and
merged per query (ties go to the lower id).

Shares are the rows ``shard_range(N, r, n)`` of the index (under a process group n is
the world size; without one, ``shards=`` or the layout recorded when the index was
merged, else one share). The index is read from its folder by every rank (memory-mapped),
each rank touching only its own share's rows for the statistics.
"""

from __future__ import annotations

from typing import Callable, List, Optional, Tuple

import numpy as np
import torch

from ...errors import InputError
from . import distributed as dist_
from .. import pairwise
from ..arguments import as_float32_rows, check_finite_queries, check_k, defined_rows, exclusion_table, first_k_not_excluded, pad_to_k
from ..queries import DatasetQueries
from ..statistics import Rows, Statistics
from .shards import shard_range


class ShardedQueries(DatasetQueries):
    """Queries on ``index`` (a :class:`~nnsim_hooks.index.GradientIndex`) shared over
    ranks (``distributed``: None uses an initialised group of several processes, False
    never, True requires one) or over ``shards`` row shares in this process.

    Every method is collective under a process group: call it on every rank. The
    dataset queries (density, counts, effective neighbours, denoising, consistency) are
    :class:`~nnsim_hooks.index.queries.DatasetQueries`'; this class adds the search."""

    def __init__(self, index, *, distributed: Optional[bool] = None, shards: Optional[int] = None,
                 device: Optional[torch.device] = None):
        self.index = index
        self.ctx = dist_.current(distributed)
        n = len(index)
        if self.ctx is not None:
            parts = self.ctx.world
        else:
            parts = shards or (index.manifest.get("shards") or {}).get("count") or 1
            if not isinstance(parts, int) or parts < 1:
                raise InputError(f"shards must be a positive number of row shares, got {shards!r}")
        self.ranges: List[Tuple[int, int]] = [shard_range(n, i, parts) for i in range(parts)]
        self.local = [self.ranges[self.ctx.rank]] if self.ctx is not None else list(self.ranges)
        self.device = device if device is not None else (self.ctx.device if self.ctx else torch.device("cpu"))
        self._statistics: Optional[Statistics] = None

    # -- the queries' host (see nnsim_hooks.index.queries) --------------------------------

    @property
    def statistics(self) -> Statistics:
        """Sums over every row of the index: this process's shares, all-reduced over ranks."""
        if self._statistics is None:
            reduce = (lambda x: dist_.all_reduce_sum(self.ctx, x)) if self.ctx is not None else None
            self._statistics = Statistics(self.index, self.local, reduce, device=lambda: self.device,
                                          show_progress=self.ctx is None or self.ctx.main)
        return self._statistics

    def map_rows(self, fn: Callable[[Rows], np.ndarray], step: str) -> np.ndarray:
        """``fn(share rows)`` for the local shares, gathered from every rank in id order."""
        blocks = [fn(Rows(self.index, a, b)) for a, b in self.local]
        if self.ctx is not None:
            blocks = [blk for rank_blocks in dist_.all_gather(self.ctx, blocks, step) for blk in rank_blocks]
        return np.concatenate(blocks)

    # -- neighbours ------------------------------------------------------------------------

    def _local_topk(self, q: np.ndarray, k: int) -> Tuple[np.ndarray, np.ndarray]:
        f, valid = self.index.features, np.array(self.index.valid)  # a writable copy for torch
        parts = []
        for a, b in self.local:
            if b > a and len(q):
                s, i = pairwise.topk(f[a:b], valid[a:b], q, k, device=self.device)
                parts.append((s, np.where(i >= 0, i + a, -1)))
        if not parts:
            return np.full((len(q), k), np.nan, np.float32), np.full((len(q), k), -1, np.int64)
        return _merge(parts, k)

    def search(self, queries, k: int, *, exclude=None) -> Tuple[np.ndarray, np.ndarray]:
        """:meth:`GradientIndex.search` (exact), each rank asking its own ``queries`` (their
        number may differ between ranks, 0 included)."""
        q = check_finite_queries(as_float32_rows(queries, self.index.dim, "queries"))
        k = check_k(k, len(self.index))
        table = exclusion_table(exclude, len(q))
        wanted = k + (table.shape[1] if table is not None else 0)
        if self.ctx is None:
            scores, ids = self._local_topk(q, wanted)
        else:
            asked = dist_.all_gather(self.ctx, (q, wanted), "sharing the queries")
            answers = [self._local_topk(qq, kk) for qq, kk in asked]
            gathered = dist_.all_gather(self.ctx, answers, "sharing the partial neighbour lists")
            scores, ids = _merge([per_rank[self.ctx.rank] for per_rank in gathered], wanted)
        scores, ids = first_k_not_excluded(scores, ids, table, k)
        bad = ~defined_rows(q)
        scores[bad], ids[bad] = np.nan, -1
        return scores, ids

    def nearest(self, queries: np.ndarray, k: int, exclude) -> Tuple[np.ndarray, np.ndarray]:
        """The ``k`` stored rows most similar to each query, exact, by this process alone
        against every stored row (each rank answers its own share's rows in :meth:`neighbors`)."""
        q = as_float32_rows(queries, self.index.dim, "queries")
        table = exclusion_table(exclude, len(q))
        wanted = k + (table.shape[1] if table is not None else 0)
        scores, ids = pairwise.topk(self.index.features, self.index.valid, q, wanted, device=self.device)
        scores, ids = first_k_not_excluded(scores, ids, table, k)
        bad = ~defined_rows(q)
        scores[bad], ids[bad] = np.nan, -1
        return scores, ids


def _merge(parts: List[Tuple[np.ndarray, np.ndarray]], k: int) -> Tuple[np.ndarray, np.ndarray]:
    """The best ``k`` of several partial top-k lists per query (NaN last, ties to the lower id)."""
    scores = np.concatenate([p[0] for p in parts], 1)
    ids = np.concatenate([p[1] for p in parts], 1)
    missing = ~np.isfinite(scores) | (ids < 0)
    key_score = np.where(missing, np.inf, -scores.astype(np.float64))
    key_id = np.where(missing, np.iinfo(np.int64).max, ids)
    order = np.lexsort((key_id, key_score), axis=1)[:, :k]
    scores = np.take_along_axis(scores, order, 1)
    ids = np.take_along_axis(ids, order, 1)
    gone = np.take_along_axis(missing, order, 1)
    scores[gone], ids[gone] = np.nan, -1
    scores, ids = pad_to_k(scores, ids, k)
    return scores.astype(np.float32), ids.astype(np.int64)
