"""The paper's dataset-scale queries on a :class:`~nnsim_hooks.index.GradientIndex`:
density and neighbour counts (the paper, §2), effective neighbours, denoising and consistency
(the paper, §3), from additive moments of the feature rows, never the N x N matrix.

Conventions for every per-sample result (arrays ``[N]`` in id order):

- the kernel is the cosine ``k_ij = f_i . f_j`` of the unit feature rows (the sketched
  estimate of the paper's similarity; ``Tr(K_C)/d`` for d outputs);
- sums over j include j = i (``k_ii = 1``) unless ``include_self=False``;
- samples without a gradient direction (``valid`` False) are never anyone's neighbour,
  and their own results are NaN.
"""

from __future__ import annotations

from typing import Any, Optional

import numpy as np
import torch

from ..errors import DataError, InputError
from . import exact, moments
from .arguments import check_threshold

KERNELS = ("cosine", "raw")
# Largest moment matrix kept between calls (C is D x D float64: 8 MB at D = 1024).
_MAX_CACHED_BYTES = 256 << 20


class DatasetQueries:
    """Density, counts, denoising and consistency (mixed into ``GradientIndex``)."""

    def _moment(self, name: str, kernel: str) -> np.ndarray:
        """``S`` (name "sum") or ``C`` ("second") for a kernel, cached unless C is large."""
        key = (name, kernel)
        if key in self._cache:
            return self._cache[key]
        w = self._weights(kernel)
        f = self.features
        value = moments.weighted_sum(f, w) if name == "sum" else moments.second_moment(f, w)
        if value.nbytes <= _MAX_CACHED_BYTES:
            self._cache[key] = value
        return value

    def _weights(self, kernel: str) -> Optional[np.ndarray]:
        if kernel not in KERNELS:
            raise InputError(f"kernel must be one of {KERNELS}, got {kernel!r}")
        if kernel == "cosine":
            return None
        return np.where(np.asarray(self.valid), np.asarray(self.norms, dtype=np.float64), 0.0)

    def _nan_where_invalid(self, values: np.ndarray) -> np.ndarray:
        values[~np.asarray(self.valid)] = np.nan
        return values

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
            out = moments.apply_rows(self.features, self._moment("sum", "cosine"))
            if not include_self:
                out -= moments.squared_norms(self.features)
            self.density_method = f"sketched, D={self.dim}"
            return self._nan_where_invalid(out)
        if handle is None or data is None:
            raise InputError(
                "the exact density needs both handle= (attached to the index's model) and data= (the indexed samples, "
                "in the same order); give neither for the sketched density"
            )
        from .folder.manifest import check_fingerprint

        stored = self.fingerprint
        if stored is not None:
            current = handle.fingerprint()
            unresolved = current.get("output") == "auto"
            check_fingerprint({k: v for k, v in stored.items() if k != "sketch"},
                              {k: v for k, v in current.items() if k != "sketch"},
                              self.path or "(in memory)", unresolved_output=unresolved)
        out = np.asarray(handle.density(data, include_self=include_self, batch_size=batch_size, progress=progress),
                         dtype=np.float64)
        if len(out) != len(self):
            raise InputError(
                f"data= holds {len(out)} samples but the index {len(self)}: give the samples the index was built from, "
                "in the same order"
            )
        self.density_method = "exact"
        return out

    #: how the last :meth:`density` was computed: ``"exact"`` or ``"sketched, D=..."``
    density_method: Optional[str] = None

    def neighbor_counts(self, threshold: float, *, include_self: bool = True, method: str = "auto",
                        progress: bool = True) -> np.ndarray:
        """Hard neighbour counts ``#{j : k(x_i, x_j) > threshold}`` (float64 [N], NaN where
        not valid).

        ``method``: ``"range_search"`` (FAISS range search, query batches sized to bound
        memory; approximate for approximate index types), ``"exact"`` (blocked torch
        products, O(N^2 D) compute, O(block^2) memory), or ``"auto"``: range search unless
        the index is on GPU (which has none).
        """
        t = check_threshold(threshold)
        if method not in ("auto", "range_search", "exact"):
            raise InputError(f"method must be 'auto', 'range_search' or 'exact', got {method!r}")
        if method == "auto":
            method = "range_search" if self.backend.supports_range_search else "exact"
        if method == "exact":
            counts = self._pairwise(exact.count_above(t), include_self, progress, "hard counts")
        else:
            counts = self._range_counts(t, include_self, progress)
        return self._nan_where_invalid(counts)

    def soft_counts(self, power: float = 2, *, include_self: bool = True, progress: bool = True) -> np.ndarray:
        """The "less soft" counts ``sum_j max(k(x_i, x_j), 0) ** power`` (float64 [N]).

        Exact and O(N^2 D): every pair is computed, in blocks (memory O(block^2)), with a
        progress bar. For N in the millions prefer :meth:`density` or :meth:`neighbor_counts`.
        """
        if not isinstance(power, (int, float)) or isinstance(power, bool) or not power > 0:
            raise InputError(f"power must be a positive number (the paper uses 2, 3, 4), got {power!r}")
        counts = self._pairwise(exact.positive_power(float(power)), include_self, progress, f"soft counts ^{power}")
        return self._nan_where_invalid(counts)

    def _pairwise(self, reduce, include_self: bool, progress: bool, desc: str) -> np.ndarray:
        from tqdm.auto import tqdm

        n = len(self)
        out = np.zeros(n, dtype=np.float64)
        for start, end in tqdm(list(exact.blocks(n, exact.QUERY_BLOCK)), desc=desc, unit="block",
                               disable=not progress, leave=False):
            rows = None if include_self else np.arange(start, end)
            out[start:end] = exact.pairwise_reduce(self.features, self.valid, np.asarray(self.features[start:end]),
                                                   reduce, device=self._device, exclude_rows=rows)
        return out

    # -- denoising (the paper, §3) -------------------------------------------------------

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
        ``kernel="raw"`` uses ``K_ij = |g_i| |g_j| k_ij`` with the stored gradient norms (the
        paper's raw kernel; for d > 1 outputs its scalar trace version). NaN where the
        denominator is 0.
        """
        w = self._weights(kernel)
        f = self.features
        budget = moments.memory_budget(max_memory)
        num = moments.apply_rows(f, self._moment("sum", kernel))
        den = self._squared_sums(f, w, kernel, budget)
        if not include_self:
            sq = moments.squared_norms(f)
            wi = w if w is not None else 1.0
            num -= wi * sq
            den -= (wi * sq) ** 2
        with np.errstate(divide="ignore", invalid="ignore"):
            out = np.where(den > 0, num**2 / np.where(den > 0, den, 1.0), np.nan)
        return self._nan_where_invalid(out)

    def _squared_sums(self, f, w, kernel: str, budget: int) -> np.ndarray:
        """``sum_j K_ij^2`` for every row ``i`` of ``f`` (all rows of the index): the N x N
        Gram in blocks when D > N, else the D x D second moment (whole or in column chunks)."""
        n, dim = f.shape
        if dim > n:
            return moments.gram_squares(f, w, budget)
        if ("second", kernel) in self._cache or moments.second_moment_fits(dim, budget):
            return moments.quadratic_forms(f, self._moment("second", kernel))
        return moments.chunked_quadratic_forms(f, w, budget)

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
        p = self._consistency_values(values)
        w = self._weights(kernel)
        f = self.features
        m = self._cross_moment(p, w)
        s = self._moment("sum", kernel)
        dist = np.empty(len(self), dtype=np.float64)
        avg_all = np.empty((len(self), p.shape[1]), dtype=np.float64) if return_average else None
        for start, end, fb in moments.row_blocks(f):
            pb = np.asarray(p[start:end], dtype=np.float64)
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
        dist = self._nan_where_invalid(dist)
        if avg_all is not None:
            avg_all[~np.asarray(self.valid)] = np.nan
            return dist, avg_all
        return dist

    def _cross_moment(self, p, w: Optional[np.ndarray]) -> np.ndarray:
        """``M = sum_j w_j f_j p_j^T`` (a seam: sharded queries substitute the all-reduced sum)."""
        return moments.cross_moment(self.features, p, w)

    def _consistency_values(self, values) -> Any:
        if values is not None:
            if isinstance(values, torch.Tensor):
                values = values.detach().cpu().numpy()
            values = np.asarray(values)
            if values.ndim == 1:
                values = values[:, None]
            if values.ndim != 2 or len(values) != len(self) or not np.issubdtype(values.dtype, np.number):
                raise InputError(f"values must be numbers [N={len(self)}, C], got {values.dtype} {list(values.shape)}")
            return values
        for col in (self.probabilities, self.outputs):
            if col is not None:
                return col
        if self.predictions is not None:
            return _OneHot(self.predictions)
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
