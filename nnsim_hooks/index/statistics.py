"""What the dataset queries (:mod:`.queries`) are written against: rows of an index, and
sums over all of its rows.

- :class:`Rows`: the rows ``[start, stop)`` of an index, its public columns sliced (a
  whole index, or the share of it that one process answers for);
- :class:`Statistics`: the additive statistics of the paper, §2-3 over *every* row
  (:mod:`.moments`: ``S = sum_j w_j f_j``, ``C = sum_j w_j^2 f_j f_j^T``,
  ``M = sum_j w_j f_j p_j^T``) and sums over all pairs ``sum_j r(k_ij)``. Built from the
  parts of the rows this process holds, summed, then all-reduced when several processes
  share the index.

With one part covering every row and no all-reduce, this is one index in one process;
:class:`~nnsim_hooks.index.ShardedQueries` passes its shares and its process group.
"""

from __future__ import annotations

from typing import Any, Callable, List, Optional, Sequence, Tuple

import numpy as np
import torch

from ..data.batching import chunks
from ..errors import InputError
from . import moments, pairwise

#: ``"cosine"``: k_ij = f_i . f_j; ``"raw"``: K_ij = |g_i| |g_j| k_ij with the stored norms
KERNELS = ("cosine", "raw")
# Largest moment matrix kept between calls (C is D x D float64: 8 MB at D = 1024).
MAX_CACHED_BYTES = 256 << 20


def check_kernel(kernel: str) -> str:
    if kernel not in KERNELS:
        raise InputError(f"kernel must be one of {KERNELS}, got {kernel!r}")
    return kernel


class Rows:
    """The rows ``[start, stop)`` of ``index`` (a :class:`~nnsim_hooks.index.GradientIndex`):
    its columns sliced, ids ``start..stop-1``."""

    def __init__(self, index, start: int = 0, stop: Optional[int] = None):
        self.index = index
        self.start = int(start)
        self.stop = len(index) if stop is None else int(stop)

    def __len__(self) -> int:
        return self.stop - self.start

    @property
    def whole(self) -> bool:
        """Whether these are all the rows of the index."""
        return self.start == 0 and self.stop == len(self.index)

    def slice(self, column: Any) -> Any:
        """``column[start:stop]`` (the column itself for the whole index; None stays None)."""
        if column is None or self.whole:
            return column
        return column[self.start : self.stop]

    features = property(lambda r: r.slice(r.index.features))
    valid = property(lambda r: r.slice(r.index.valid))
    norms = property(lambda r: r.slice(r.index.norms))
    ids = property(lambda r: r.slice(r.index.ids))

    def weights(self, kernel: str) -> Optional[np.ndarray]:
        """The kernel's per-row weights ``w_j``: None for the cosine (all 1), the stored
        gradient norms for the raw kernel (0 where not valid)."""
        if check_kernel(kernel) == "cosine":
            return None
        return np.where(np.asarray(self.valid), np.asarray(self.norms, dtype=np.float64), 0.0)

    def nan_where_invalid(self, values: np.ndarray) -> np.ndarray:
        """``values`` (one per row, first axis) with NaN for samples without a gradient direction."""
        values[~np.asarray(self.valid)] = np.nan
        return values


class Statistics:
    """Sums over every row of ``index``, from the ``parts`` (``(start, stop)`` row ranges,
    default: all rows) this process holds, passed through ``all_reduce`` (a sum over
    processes; None: this process holds every part). Float64; ``S`` and ``C`` are cached.

    ``device`` (a function returning a torch device) runs the pair sums; their progress
    bars show only where ``show_progress`` (one rank of several, say)."""

    def __init__(self, index, parts: Optional[Sequence[Tuple[int, int]]] = None,
                 all_reduce: Optional[Callable[[np.ndarray], np.ndarray]] = None,
                 device: Callable[[], torch.device] = lambda: torch.device("cpu"), show_progress: bool = True):
        self.index = index
        self.parts: List[Tuple[int, int]] = [(0, len(index))] if parts is None else list(parts)
        self.all_reduce = all_reduce
        self.device = device
        self.show_progress = show_progress
        self._cache: dict = {}

    @property
    def in_one_process(self) -> bool:
        """Whether this process holds every row in one part (then whole-index shortcuts apply)."""
        return self.all_reduce is None and self.parts == [(0, len(self.index))]

    def _summed(self, part_sum: Callable[[Rows], np.ndarray]) -> np.ndarray:
        if self.in_one_process:
            return part_sum(Rows(self.index))
        total = sum(part_sum(Rows(self.index, a, b)) for a, b in self.parts)
        total = np.asarray(total, dtype=np.float64)
        return total if self.all_reduce is None else self.all_reduce(total)

    def _cached(self, key, compute: Callable[[], np.ndarray]) -> np.ndarray:
        if key in self._cache:
            return self._cache[key]
        value = compute()
        if value.nbytes <= MAX_CACHED_BYTES:
            self._cache[key] = value
        return value

    def weighted_sum(self, kernel: str) -> np.ndarray:
        """``S_w = sum_j w_j f_j`` ([D])."""
        check_kernel(kernel)
        return self._cached(("sum", kernel),
                            lambda: self._summed(lambda r: moments.weighted_sum(r.features, r.weights(kernel))))

    def second_moment(self, kernel: str) -> np.ndarray:
        """``C_w = sum_j w_j^2 f_j f_j^T`` ([D, D])."""
        check_kernel(kernel)
        return self._cached(("second", kernel),
                            lambda: self._summed(lambda r: moments.second_moment(r.features, r.weights(kernel))))

    def cross_moment(self, values: Any, kernel: str) -> np.ndarray:
        """``M_w = sum_j w_j f_j p_j^T`` ([D, C]) of per-sample ``values`` ``p`` ([N, C], all rows)."""
        check_kernel(kernel)
        return self._summed(lambda r: moments.cross_moment(r.features, r.slice(values), r.weights(kernel)))

    def squared_sums(self, rows: Rows, kernel: str, budget: int) -> np.ndarray:
        """``sum_j K_ij^2`` for every row ``i`` of ``rows``. For the whole index in one
        process, whichever is cheaper within ``budget`` bytes: the N x N Gram in blocks when
        D > N, else the D x D second moment (whole, or in column chunks when it does not
        fit). For a share of the rows: the summed second moment (the Gram of a share would
        see only its own columns)."""
        f, w = rows.features, rows.weights(kernel)
        if not (rows.whole and self.in_one_process):
            return moments.quadratic_forms(f, self.second_moment(kernel))
        n, dim = f.shape
        if dim > n:
            return moments.gram_squares(f, w, budget)
        if ("second", kernel) in self._cache or moments.second_moment_fits(dim, budget):
            return moments.quadratic_forms(f, self.second_moment(kernel))
        return moments.chunked_quadratic_forms(f, w, budget)

    def pair_sums(self, rows: Rows, reduce: Callable[[torch.Tensor], torch.Tensor], *, include_self: bool,
                  progress: bool = False, desc: str = "pairs") -> np.ndarray:
        """``sum_j reduce(k_ij)`` over every valid stored row ``j``, for each row ``i`` of
        ``rows`` (float64): exact, blocked torch products (:mod:`.pairwise`), O(len(rows) N D)."""
        from tqdm.auto import tqdm

        index = self.index
        out = np.zeros(len(rows), dtype=np.float64)
        for start, end in tqdm(list(chunks(len(rows), pairwise.QUERY_BLOCK)), desc=desc, unit="block",
                               disable=not (progress and self.show_progress), leave=False):
            own = None if include_self else np.arange(rows.start + start, rows.start + end)
            query = np.asarray(index.features[rows.start + start : rows.start + end])
            out[start:end] = pairwise.pairwise_reduce(index.features, index.valid, query, reduce,
                                                      device=self.device(), exclude_rows=own)
        return out
