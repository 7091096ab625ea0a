"""The paper's dataset-scale queries, written once: density and neighbour counts (the
paper §2), effective neighbours, denoising and consistency (the paper, §3), from additive
statistics of the feature rows (:mod:`.statistics`), never the N x N matrix.

:class:`DatasetQueries` runs on whatever provides three things (its host):

- ``index``: the :class:`~nnsim_hooks.index.GradientIndex` whose columns are read;
- ``statistics``: a :class:`~nnsim_hooks.index.statistics.Statistics`, sums over every row;
- ``map_rows(fn, step)``: ``fn(rows)`` for each :class:`~nnsim_hooks.index.statistics.Rows`
  this process answers for, the per-row results of all rows returned in id order;
- ``nearest(queries, k, exclude)``: the ``k`` stored rows most similar to each query, by
  this process alone (FAISS for one index, exact torch products for shares).

:class:`~nnsim_hooks.index.GradientIndex` is one host (all rows, one process);
:class:`~nnsim_hooks.index.ShardedQueries` another (row shares, summed and gathered over
processes). A new query is one method here, and both have it.

Conventions for every per-sample result (arrays ``[N]`` in id order):

- the kernel is the cosine ``k_ij = f_i . f_j`` of the unit feature rows (the sketched
  estimate of the paper's similarity; ``Tr(K_C)/d`` for d outputs);
- sums over j include j = i (``k_ii = 1``) unless ``include_self=False``;
- samples without a gradient direction (``valid`` False) are never anyone's neighbour,
  and their own results are NaN.
"""

from __future__ import annotations

from typing import Any, Callable, Optional, Tuple

import numpy as np
import torch

from ..data.batching import chunks
from ..errors import DataError, InputError
from . import moments, pairwise
from .arguments import check_k, check_threshold
from .statistics import KERNELS, Rows, Statistics, check_kernel  # noqa: F401 (KERNELS re-exported)


class DatasetQueries:
    """Density, counts, denoising and consistency on the host's rows (see the module's
    docstring for what a host provides)."""

    index: Any
    statistics: Statistics

    def map_rows(self, fn: Callable[[Rows], np.ndarray], step: str) -> np.ndarray:  # pragma: no cover - abstract
        raise NotImplementedError

    def nearest(self, queries: np.ndarray, k: int, exclude) -> Tuple[np.ndarray, np.ndarray]:  # pragma: no cover
        raise NotImplementedError

    @property
    def range_search_available(self) -> bool:
        """Whether ``neighbor_counts(method="auto")`` uses FAISS range search."""
        return False

    #: how the last :meth:`density` was computed: ``"exact"`` or ``"sketched, D=..."``
    density_method: Optional[str] = None

    def density(self, *, include_self: bool = True, handle=None, data=None, batch_size: Optional[int] = None,
                progress: bool = True) -> np.ndarray:
        """The paper's soft neighbour count ``sum_j k(x_i, x_j)`` (float64 [N]). Includes
        ``k_ii = 1`` unless ``include_self=False``. Negative similarities cancel positive ones.

        Without ``handle``: sketched, in O(N D) through the sum vector ``S = sum_j f_j``.
        With ``handle=`` (attached to the model the index was built with) and ``data=`` (the
        same samples in the same order): exact, no sketch, two passes over ``data`` (see
        :meth:`nnsim_hooks.Handle.density`). :attr:`density_method` then says which was
        used: ``"exact"`` or ``"sketched, D=..."``."""
        if handle is None and data is None:
            s = self.statistics.weighted_sum("cosine")

            def rows_density(rows: Rows) -> np.ndarray:
                out = moments.apply_rows(rows.features, s)
                if not include_self:
                    out -= moments.squared_norms(rows.features)
                return rows.nan_where_invalid(out)

            out = self.map_rows(rows_density, "gathering densities")
            self.density_method = f"sketched, D={self.index.dim}"
            return out
        if handle is None or data is None:
            raise InputError(
                "the exact density needs both handle= (attached to the index's model) and data= (the indexed samples, "
                "in the same order); give neither for the sketched density"
            )
        from .folder.manifest import check_fingerprint

        index = self.index
        stored = index.fingerprint
        if stored is not None:
            current = handle.fingerprint()
            unresolved = current.get("output") == "auto"
            check_fingerprint({k: v for k, v in stored.items() if k != "sketch"},
                              {k: v for k, v in current.items() if k != "sketch"},
                              index.path or "(in memory)", unresolved_output=unresolved)
        out = np.asarray(handle.density(data, include_self=include_self, batch_size=batch_size, progress=progress),
                         dtype=np.float64)
        if len(out) != len(index):
            raise InputError(
                f"data= holds {len(out)} samples but the index {len(index)}: give the samples the index was built from, "
                "in the same order"
            )
        self.density_method = "exact"
        return out

    def neighbor_counts(self, threshold: float, *, include_self: bool = True, method: str = "auto",
                        progress: bool = True) -> np.ndarray:
        """Hard neighbour counts ``#{j : k(x_i, x_j) > threshold}`` (float64 [N], NaN where
        not valid).

        ``method``: ``"range_search"`` (FAISS range search, query batches sized to bound
        memory; approximate for approximate index types), ``"exact"`` (blocked torch
        products, O(N^2 D) compute, O(block^2) memory), or ``"auto"``: range search unless
        the index is on GPU (which has none) or shared by several processes.
        """
        t = check_threshold(threshold)
        if method not in ("auto", "range_search", "exact"):
            raise InputError(f"method must be 'auto', 'range_search' or 'exact', got {method!r}")
        if method == "auto":
            method = "range_search" if self.range_search_available else "exact"
        if method == "exact":
            stats = self.statistics

            def count(rows: Rows) -> np.ndarray:
                counts = stats.pair_sums(rows, pairwise.count_above(t), include_self=include_self, progress=progress,
                                         desc="hard counts")
                return rows.nan_where_invalid(counts)
        else:
            def count(rows: Rows) -> np.ndarray:
                counts = self.index.range_counts(t, rows, include_self=include_self, progress=progress)
                return rows.nan_where_invalid(counts)

        return self.map_rows(count, "gathering neighbour counts")

    def soft_counts(self, power: float = 2, *, include_self: bool = True, progress: bool = True) -> np.ndarray:
        """The "less soft" counts ``sum_j max(k(x_i, x_j), 0) ** power`` (float64 [N]).

        Exact and O(N^2 D): every pair is computed, in blocks (memory O(block^2)), with a
        progress bar. For N in the millions prefer :meth:`density` or :meth:`neighbor_counts`.
        """
        if not isinstance(power, (int, float)) or isinstance(power, bool) or not power > 0:
            raise InputError(f"power must be a positive number (the paper uses 2, 3, 4), got {power!r}")
        stats, reduce = self.statistics, pairwise.positive_power(float(power))

        def soft(rows: Rows) -> np.ndarray:
            counts = stats.pair_sums(rows, reduce, include_self=include_self, progress=progress,
                                     desc=f"soft counts ^{power}")
            return rows.nan_where_invalid(counts)

        return self.map_rows(soft, "gathering soft counts")

    def neighbors(self, k: int, *, exclude_self: bool = True, batch_size: int = 4096,
                  progress: bool = True) -> Tuple[np.ndarray, np.ndarray]:
        """The ``k`` nearest stored samples of every stored sample: ``(scores [N, k], ids [N, k])``
        (rows of non-valid samples are ``(NaN, -1)``), searched ``batch_size`` at a time
        (one index: its FAISS search, approximate for approximate index types; shares:
        exact). ``k`` above the number of other samples is clamped to it, with a warning."""
        n = len(self.index)
        k = check_k(k, n - 1 if exclude_self else n,
                    "other samples in the index" if exclude_self else "samples in the index")
        from tqdm.auto import tqdm

        def rows_neighbors(rows: Rows) -> np.ndarray:
            scores = np.full((len(rows), k), np.nan, dtype=np.float32)
            ids = np.full((len(rows), k), -1, dtype=np.int64)
            for start, end in tqdm(list(chunks(len(rows), batch_size)), desc="neighbours", unit="batch",
                                   disable=not (progress and self.statistics.show_progress), leave=False):
                exclude = np.asarray(rows.ids[start:end]) if exclude_self else None
                scores[start:end], ids[start:end] = self.nearest(np.asarray(rows.features[start:end]), k, exclude)
            return np.concatenate([scores, ids.astype(np.float64)], 1)  # both exact in float64

        out = self.map_rows(rows_neighbors, "gathering the neighbour lists")
        return np.ascontiguousarray(out[:, :k], dtype=np.float32), np.ascontiguousarray(out[:, k:], dtype=np.int64)

    # -- denoising (the paper, §3) ---------------------------------------------------------

    def effective_neighbors(self, kernel: str = "cosine", *, include_self: bool = True,
                            max_memory: Optional[int] = None) -> np.ndarray:
        """``N_eff(x_i) = (sum_j k_ij)^2 / sum_j k_ij^2`` (float64 [N]), the number of equal
        neighbours that would average label noise as much (the paper, §3).

        Never the N x N matrix at once. ``sum_j k_ij^2`` comes from whichever is cheaper:
        with more feature columns than samples (D > N, exact features), the N x N Gram
        matrix in blocks, O(N^2 D); else the D x D second moment ``C = sum_j f_j f_j^T``,
        ``f_i^T C f_i``, O(N D^2), built a chunk of columns at a time when it does not fit.
        ``max_memory`` (bytes; None: half the available memory) bounds what is held; below
        the minimum either path needs, an :class:`~nnsim_hooks.errors.InputError` names it.
        (Shared by several processes, always the summed second moment.)
        ``kernel="raw"`` uses ``K_ij = |g_i| |g_j| k_ij`` with the stored gradient norms (the
        paper's raw kernel; for d > 1 outputs its scalar trace version). NaN where the
        denominator is 0.
        """
        check_kernel(kernel)
        stats = self.statistics
        budget = moments.memory_budget(max_memory)
        s = stats.weighted_sum(kernel)

        def rows_n_eff(rows: Rows) -> np.ndarray:
            f, w = rows.features, rows.weights(kernel)
            num = moments.apply_rows(f, s)
            den = stats.squared_sums(rows, kernel, budget)
            if not include_self:
                sq = moments.squared_norms(f)
                wi = w if w is not None else 1.0
                num -= wi * sq
                den -= (wi * sq) ** 2
            with np.errstate(divide="ignore", invalid="ignore"):
                out = np.where(den > 0, num**2 / np.where(den > 0, den, 1.0), np.nan)
            return rows.nan_where_invalid(out)

        return self.map_rows(rows_n_eff, "gathering effective neighbours")

    def denoising_factor(self, kernel: str = "cosine", *, include_self: bool = True,
                         max_memory: Optional[int] = None) -> np.ndarray:
        """``1 / N_eff``: the factor by which the network divides the variance of i.i.d.
        label noise at each sample (the paper, §3); see :meth:`effective_neighbors`."""
        with np.errstate(divide="ignore"):
            return 1.0 / self.effective_neighbors(kernel, include_self=include_self, max_memory=max_memory)

    def consistency(self, kernel: str = "raw", *, include_self: bool = True, values=None,
                    return_average: bool = False):
        """The label-free check of the averaging hypothesis (the paper, §3):
        ``|| p_i - (sum_j K_ij)^{-1} sum_j K_ij p_j ||`` (float64 [N]).

        ``p`` is ``values`` ([N, C]) if given, else the stored probabilities, else the raw
        outputs, else one-hot predictions. O(N D C) through ``M = sum_j w_j f_j p_j^T``.
        ``kernel="raw"`` (default: the paper's formula uses the raw kernel K) or
        ``"cosine"``. NaN where ``sum_j K_ij`` is 0. With ``return_average=True`` also
        returns the kernel-weighted averages ``[N, C]``.
        """
        check_kernel(kernel)
        p = consistency_values(self.index, values)
        m = self.statistics.cross_moment(p, kernel)
        s = self.statistics.weighted_sum(kernel)

        def rows_consistency(rows: Rows) -> np.ndarray:
            w, pr = rows.weights(kernel), rows.slice(p)
            dist = np.empty(len(rows), dtype=np.float64)
            avg_all = np.empty((len(rows), p.shape[1]), dtype=np.float64) if return_average else None
            for start, end, fb in moments.row_blocks(rows.features):
                pb = np.asarray(pr[start:end], dtype=np.float64)
                num, den = fb @ m, fb @ s
                if not include_self:
                    self_w = np.einsum("ij,ij->i", fb, fb) * (1.0 if w is None else w[start:end])
                    num -= self_w[:, None] * np.nan_to_num(pb)
                    den -= self_w
                with np.errstate(divide="ignore", invalid="ignore"):
                    avg = num / np.where(den != 0, den, np.nan)[:, None]
                dist[start:end] = np.linalg.norm(pb - avg, axis=1)
                if avg_all is not None:
                    avg_all[start:end] = avg
            dist = rows.nan_where_invalid(dist)
            if avg_all is None:
                return dist
            return np.concatenate([dist[:, None], rows.nan_where_invalid(avg_all)], 1)

        out = self.map_rows(rows_consistency, "gathering consistencies")
        return (np.ascontiguousarray(out[:, 0]), np.ascontiguousarray(out[:, 1:])) if return_average else out


def consistency_values(index, values=None) -> Any:
    """What :meth:`DatasetQueries.consistency` averages: ``values`` ([N, C] numbers) if
    given, else the index's stored probabilities, else its outputs, else one-hot predictions."""
    if values is not None:
        if isinstance(values, torch.Tensor):
            values = values.detach().cpu().numpy()
        values = np.asarray(values)
        if values.ndim == 1:
            values = values[:, None]
        if values.ndim != 2 or len(values) != len(index) or not np.issubdtype(values.dtype, np.number):
            raise InputError(f"values must be numbers [N={len(index)}, C], got {values.dtype} {list(values.shape)}")
        return values
    for col in (index.probabilities, index.outputs):
        if col is not None:
            return col
    if index.predictions is not None:
        return _OneHot(index.predictions)
    raise DataError(
        "consistency() needs the model's predictions, and this index stores none (no probabilities, outputs or "
        "predictions); pass values=[N, C] yourself"
    )


class _OneHot:
    """One-hot rows of integer predictions, made block by block on slicing."""

    def __init__(self, predictions: np.ndarray):
        self.predictions = predictions
        self.shape = (len(predictions), int(np.max(predictions)) + 1 if len(predictions) else 0)

    def __len__(self) -> int:
        return self.shape[0]

    def __getitem__(self, rows: slice) -> np.ndarray:
        pred = np.asarray(self.predictions[rows])
        out = np.zeros((len(pred), self.shape[1]))
        out[np.arange(len(pred)), pred] = 1.0
        return out
