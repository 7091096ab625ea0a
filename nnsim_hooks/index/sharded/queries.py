"""The paper's dataset-scale queries on an index split into contiguous row shares.

    >>> q = ShardedQueries(index)          # under torchrun: one share per rank
    >>> density = q.density()              # every rank gets all N values
    >>> scores, ids = q.neighbors(10)      # each rank answers its own share's queries

Density, effective neighbours, denoising and consistency need only additive statistics
of the rows (the paper, §2-3, :mod:`nnsim_hooks.index.moments`): ``S = sum_j w_j f_j``,
``C = sum_j w_j^2 f_j f_j^T`` and ``M = sum_j w_j f_j p_j^T``. Each share's part is summed
(all-reduced under a process group; summed in turn over the shares without one), then
each share applies the totals to its own rows, and the per-row results are gathered in id
order. They equal :class:`~nnsim_hooks.index.GradientIndex`'s own queries up to the
order of float64 additions.

Neighbour search works like FAISS ``IndexShards``: every rank searches the queries of all
ranks against its own share (exact inner products in torch, on this rank's own GPU when
CUDA is there, else on the CPU: the same code), the partial top-k lists are gathered and
merged per query (ties go to the lower id). Hard and soft neighbour counts are sums over
shares of per-share counts. So ``neighbors(k)`` and the counts cost each of n ranks 1/n of
the O(N^2 D) work.

Shares are the rows ``shard_range(N, r, n)`` of the index (under a process group n is
the world size; without one, ``shards=`` or the layout recorded when the index was
merged, else one share). The index is read from its folder by every rank (memory-mapped),
each rank touching only its own share's rows for the statistics.
"""

from __future__ import annotations

from typing import List, Optional, Tuple

import numpy as np
import torch

from ...errors import InputError
from . import distributed as dist_
from .. import exact, moments
from ..arguments import as_float32_rows, check_k, check_threshold, defined_rows, exclusion_table, first_k_not_excluded
from ..queries import DatasetQueries
from .shards import shard_range


class _ShareRows(DatasetQueries):
    """Rows ``[a, b)`` of an index, answering the per-row queries with the totals over all shares."""

    def __init__(self, index, a: int, b: int, owner: "ShardedQueries"):
        self._index, self._a, self._b, self._owner = index, a, b, owner
        self._cache = {}
        self.cross = None  # the all-reduced M of the consistency call under way

    def __len__(self) -> int:
        return self._b - self._a

    def _slice(self, column):
        return None if column is None else column[self._a : self._b]

    features = property(lambda s: s._slice(s._index.features))
    valid = property(lambda s: s._slice(s._index.valid))
    norms = property(lambda s: s._slice(s._index.norms))
    probabilities = property(lambda s: s._slice(s._index.probabilities))
    outputs = property(lambda s: s._slice(s._index.outputs))
    predictions = property(lambda s: s._slice(s._index.predictions))

    @property
    def dim(self) -> int:
        return int(self._index.features.shape[1])

    def _moment(self, name: str, kernel: str) -> np.ndarray:
        return self._owner.moment(name, kernel)

    def _squared_sums(self, f, w, kernel: str, budget: int) -> np.ndarray:
        # These rows are one share: the sums over all j come from the summed second moment
        # (the N x N Gram path of a whole index would see only this share's columns).
        return moments.quadratic_forms(f, self._moment("second", kernel))

    def _cross_moment(self, p, w) -> np.ndarray:
        return self.cross


class ShardedQueries:
    """Queries on ``index`` (a :class:`~nnsim_hooks.index.GradientIndex`) shared over
    ranks (``distributed``: None uses an initialised group of several processes, False
    never, True requires one) or over ``shards`` row shares in this process.

    Every method is collective under a process group: call it on every rank."""

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
        self._moments = {}

    # -- additive statistics -------------------------------------------------------------

    def moment(self, name: str, kernel: str) -> np.ndarray:
        """``S`` ("sum") or ``C`` ("second") of a kernel over all shares (float64)."""
        key = (name, kernel)
        if key not in self._moments:
            w = self.index._weights(kernel)
            f = self.index.features
            compute = moments.weighted_sum if name == "sum" else moments.second_moment
            part = sum(compute(f[a:b], None if w is None else w[a:b]) for a, b in self.local)
            self._moments[key] = dist_.all_reduce_sum(self.ctx, np.asarray(part, dtype=np.float64))
        return self._moments[key]

    def _per_row(self, fn, step: str) -> np.ndarray:
        """``fn(share rows)`` for the local shares, gathered from every rank in id order."""
        blocks = [fn(_ShareRows(self.index, a, b, self)) for a, b in self.local]
        if self.ctx is not None:
            blocks = [blk for rank_blocks in dist_.all_gather(self.ctx, blocks, step) for blk in rank_blocks]
        return np.concatenate(blocks)

    def density(self, *, include_self: bool = True) -> np.ndarray:
        """:meth:`GradientIndex.density` from the shares' summed ``S``."""
        return self._per_row(lambda v: v.density(include_self=include_self), "gathering densities")

    def effective_neighbors(self, kernel: str = "cosine", *, include_self: bool = True) -> np.ndarray:
        """:meth:`GradientIndex.effective_neighbors` from the shares' summed ``S`` and ``C``."""
        return self._per_row(lambda v: v.effective_neighbors(kernel, include_self=include_self),
                             "gathering effective neighbours")

    def denoising_factor(self, kernel: str = "cosine", *, include_self: bool = True) -> np.ndarray:
        with np.errstate(divide="ignore"):
            return 1.0 / self.effective_neighbors(kernel, include_self=include_self)

    def consistency(self, kernel: str = "raw", *, include_self: bool = True, values=None,
                    return_average: bool = False):
        """:meth:`GradientIndex.consistency` from the shares' summed ``M = sum_j w_j f_j p_j^T``."""
        p = self.index._consistency_values(values)
        w = self.index._weights(kernel)
        f = self.index.features
        part = sum(moments.cross_moment(f[a:b], p[a:b], None if w is None else w[a:b]) for a, b in self.local)
        cross = dist_.all_reduce_sum(self.ctx, np.asarray(part, dtype=np.float64))

        def one(view):
            view.cross = cross
            out = view.consistency(kernel, include_self=include_self, values=np.asarray(p[view._a : view._b]),
                                   return_average=return_average)
            return np.concatenate([out[0][:, None], out[1]], 1) if return_average else out

        rows = self._per_row(one, "gathering consistencies")
        return (rows[:, 0], rows[:, 1:]) if return_average else rows

    # -- neighbours ------------------------------------------------------------------------

    def _local_topk(self, q: np.ndarray, k: int) -> Tuple[np.ndarray, np.ndarray]:
        f, valid = self.index.features, np.array(self.index.valid)  # a writable copy for torch
        parts = []
        for a, b in self.local:
            if b > a and len(q):
                s, i = exact.topk(f[a:b], valid[a:b], q, k, device=self.device)
                parts.append((s, np.where(i >= 0, i + a, -1)))
        if not parts:
            return np.full((len(q), k), np.nan, np.float32), np.full((len(q), k), -1, np.int64)
        return _merge(parts, k)

    def search(self, queries, k: int, *, exclude=None) -> Tuple[np.ndarray, np.ndarray]:
        """:meth:`GradientIndex.search` (exact), each rank asking its own ``queries`` (their
        number may differ between ranks, 0 included)."""
        q = as_float32_rows(queries, self.index.dim, "queries")
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

    def neighbors(self, k: int, *, exclude_self: bool = True, batch_size: int = 4096) -> Tuple[np.ndarray, np.ndarray]:
        """:meth:`GradientIndex.neighbors`: each share's rows are its rank's queries; every
        rank gets all ``[N, k]`` results."""
        k = check_k(k, len(self.index))
        f, all_ids = self.index.features, self.index.ids
        # the same number of (collective) search calls on every rank: the largest share's
        steps = max(1, max(-(-(b - a) // batch_size) for a, b in self.ranges))
        blocks = []
        for a, b in self.local:
            for step in range(steps):
                s, e = min(b, a + step * batch_size), min(b, a + (step + 1) * batch_size)
                exclude = np.asarray(all_ids[s:e]) if exclude_self else None
                blocks.append(self.search(np.asarray(f[s:e]), k, exclude=exclude))
        mine = (np.concatenate([x[0] for x in blocks]), np.concatenate([x[1] for x in blocks]))
        if self.ctx is None:
            return mine
        gathered = dist_.all_gather(self.ctx, mine, "gathering the neighbour lists")
        return np.concatenate([g[0] for g in gathered]), np.concatenate([g[1] for g in gathered])

    def neighbor_counts(self, threshold: float, *, include_self: bool = True) -> np.ndarray:
        """:meth:`GradientIndex.neighbor_counts` (``method="exact"``), summed over shares."""
        t = check_threshold(threshold)
        return self._pair_sums(exact.count_above(t), include_self)

    def soft_counts(self, power: float = 2, *, include_self: bool = True) -> np.ndarray:
        """:meth:`GradientIndex.soft_counts`, summed over shares."""
        if not isinstance(power, (int, float)) or isinstance(power, bool) or not power > 0:
            raise InputError(f"power must be a positive number (the paper uses 2, 3, 4), got {power!r}")
        return self._pair_sums(exact.positive_power(float(power)), include_self)

    def _pair_sums(self, reduce, include_self: bool) -> np.ndarray:
        f, valid = self.index.features, np.array(self.index.valid)  # a writable copy for torch
        n = len(self.index)
        out = np.zeros(n, dtype=np.float64)
        for qs, qe in exact.blocks(n, exact.QUERY_BLOCK):
            q = np.asarray(f[qs:qe])
            for a, b in self.local:
                if b > a:
                    # a query's own row, in this share's numbering (out of range: no exclusion)
                    own = None if include_self else np.arange(qs, qe) - a
                    out[qs:qe] += exact.pairwise_reduce(f[a:b], valid[a:b], q, reduce, device=self.device,
                                                        exclude_rows=own)
        out = dist_.all_reduce_sum(self.ctx, out)
        out[~np.asarray(valid)] = np.nan
        return out


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
    if ids.shape[1] < k:
        pad = k - ids.shape[1]
        scores = np.pad(scores, ((0, 0), (0, pad)), constant_values=np.nan)
        ids = np.pad(ids, ((0, 0), (0, pad)), constant_values=-1)
    return scores.astype(np.float32), ids.astype(np.int64)
