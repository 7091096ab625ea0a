"""FAISS glue of a :class:`~nnsim_hooks.index.GradientIndex`: the backend index, its
options and rebuilds, k-nearest-neighbour and range search (exact torch code where a GPU
index cannot answer)."""

from __future__ import annotations

import logging
from typing import Tuple

import numpy as np
import torch

from . import pairwise
from ..atomic import write_json_atomic
from ..errors import StoreError
from .backend import FaissIndex, gpu_available, make_spec
from .arguments import as_float32_rows, check_finite_queries, check_k, defined_rows, exclusion_table, first_k_not_excluded
from .folder.index_file import check_index_files, index_file_path, remove_other_index_files, write_index_file
from .folder.integrity import read_index_file
from .folder.lock import FolderLock
from .folder.manifest import MANIFEST, now

logger = logging.getLogger(__name__)

# Results per FAISS range-search call: bounds its memory (12 bytes per result).
_RANGE_RESULTS_PER_CALL = 5_000_000


class FaissSearch:
    """Neighbour search over the stored feature rows (mixed into ``GradientIndex``)."""

    @property
    def backend(self) -> FaissIndex:
        """The FAISS index (built, or read from the folder, on first use)."""
        if self._backend is None:
            file = index_file_path(self.path, self.manifest)
            if file is not None and not self.spec.exact and file.is_file():
                self._backend = self._read_or_build(file)
            else:
                if file is not None and not self.spec.exact:
                    logger.warning("%s is missing; rebuilding the %s index from the stored features", file, self.kind)
                self._backend = FaissIndex.build(self.features, self.valid, self.spec)
            self._move_to_gpu()
        return self._backend

    def _read_or_build(self, file) -> FaissIndex:
        try:
            return read_index_file(file, self.spec, self.dim, self.n_valid, self.manifest.get("index_file"))
        except StoreError:
            if file.exists():
                raise
            # a rebuild by another process committed a new file and deleted this one after we
            # read the manifest: the stored features are the same, build from them
            logger.info("%s was replaced by a rebuild meanwhile; building the %s index from the stored features",
                        file, self.kind)
            return FaissIndex.build(self.features, self.valid, self.spec)

    def _move_to_gpu(self) -> None:
        if self._gpu is not False and gpu_available():
            self._backend.to_gpu()

    @property
    def _device(self) -> torch.device:
        """Where exact torch fallbacks run: the GPU when the FAISS index is there."""
        on_gpu = self._backend is not None and self._backend.on_gpu
        return torch.device("cuda") if on_gpu and torch.cuda.is_available() else torch.device("cpu")

    def tune(self, **options: int) -> "FaissSearch":
        """Change search-time options: ``nprobe=`` (IVF), ``ef_search=`` (HNSW)."""
        self.backend.tune(**options)
        self.manifest["index"] = self.spec.to_dict()
        return self

    def rebuild_index(self, index: str = "flat", *, progress: bool = True, **options) -> "FaissSearch":
        """Replace the FAISS index by another type (same stored features); written to the
        folder when the index has one."""
        spec = make_spec(index, self.n_valid, options)
        if self.path is not None:
            with FolderLock(self.path, "rebuild_index"):  # fails early (read-only folder, another writer)
                backend = self._build_and_write(spec, progress)
        else:
            self._backend = None
            backend = FaissIndex.build(self.features, self.valid, spec, progress=progress)
            self.manifest["index"] = spec.to_dict()
        self.spec, self._backend = spec, backend
        self._move_to_gpu()
        return self

    def _build_and_write(self, spec, progress: bool) -> FaissIndex:
        """The new FAISS file under a new name, the manifest naming it committed, then the
        old file deleted (:mod:`.folder.index_file`): a kill anywhere leaves old or new."""
        check_index_files(self.path)
        self._backend = None  # release the old one first: both may not fit in memory
        backend = FaissIndex.build(self.features, self.valid, spec, progress=progress)
        record = None if spec.exact else write_index_file(self.path, backend)
        manifest = dict(self.manifest, index=spec.to_dict(), index_file=record, updated=now())
        write_json_atomic(self.path / MANIFEST, manifest)
        self.manifest = manifest
        remove_other_index_files(self.path, manifest)
        return backend

    # -- neighbour search -----------------------------------------------------------------

    def search(self, queries, k: int, *, exclude=None) -> Tuple[np.ndarray, np.ndarray]:
        """The ``k`` stored samples most similar to each query.

        Args:
            queries: float32 feature rows ``[Q, D]`` (numpy or torch; ``[D]`` for one).
                Float64 is refused, not cast. Rows that are entirely NaN (samples without a
                gradient direction) or zero get no results; a row with an Inf, or a NaN among
                finite values, is an :class:`~nnsim_hooks.errors.InputError`.
            k: number of neighbours; more than the samples in the index is clamped to
                their number, with a warning.
            exclude: ids to leave out, per query: ``[Q]`` (e.g. each query's own id) or
                ``[Q, m]`` or a list of lists. Exclusion is by id, so an exact duplicate
                of the query is kept while the query itself is dropped.

        Returns:
            ``(scores float32 [Q, k], ids int64 [Q, k])``, best first; scores are inner
            products (cosine similarities for unit rows). Missing results (fewer than k
            valid samples) are ``(NaN, -1)``. Approximate index types may miss some
            true neighbours.
        """
        q = check_finite_queries(as_float32_rows(queries, self.dim, "queries"))
        k = check_k(k, len(self))
        table = exclusion_table(exclude, len(q))
        scores = np.full((len(q), k), np.nan, dtype=np.float32)
        ids = np.full((len(q), k), -1, dtype=np.int64)
        ok = defined_rows(q)
        if not ok.any() or self.n_valid == 0:
            return scores, ids
        width = table.shape[1] if table is not None else 0
        wanted = min(k + width, self.n_valid)
        raw_scores, raw_ids = self._raw_search(q[ok], wanted)
        scores[ok], ids[ok] = first_k_not_excluded(raw_scores, raw_ids, table[ok] if table is not None else None, k)
        return scores, ids

    def _raw_search(self, q: np.ndarray, k: int) -> Tuple[np.ndarray, np.ndarray]:
        backend = self.backend
        if backend.max_k is not None and k > backend.max_k:
            # FAISS-GPU caps k; exact search in torch instead
            return pairwise.topk(self.features, self.valid, q, k, device=self._device)
        return backend.search(q, k)

    def search_inputs(self, handle, inputs, k: int, *, targets=None, exclude=None) -> Tuple[np.ndarray, np.ndarray]:
        """:meth:`search` with the features of raw ``inputs`` computed by ``handle`` (which
        must match the index's model and sketch recipe)."""
        features = handle.features(inputs, targets).detach()
        self.check_handle(handle)
        return self.search(features.float().cpu(), k, exclude=exclude)

    def range_counts(self, threshold: float, rows=None, *, include_self: bool = True,
                     progress: bool = True) -> np.ndarray:
        """``#{j : k_ij > threshold}`` by FAISS range search, for each of ``rows`` (a
        :class:`~nnsim_hooks.index.statistics.Rows`; None: every row), float64, 0 where not
        valid. Query batches are sized to bound the results held at once."""
        from tqdm.auto import tqdm

        t = float(threshold)
        backend = self.backend
        lo, hi = (0, len(self)) if rows is None else (rows.start, rows.stop)
        counts = np.zeros(hi - lo, dtype=np.float64)
        valid_rows = lo + np.flatnonzero(np.asarray(self.valid[lo:hi]))
        bar = tqdm(total=len(valid_rows), desc="range search", unit="query", disable=not progress, leave=False)
        step, pos = 64, 0
        while pos < len(valid_rows):
            batch = valid_rows[pos : pos + step]
            q = np.ascontiguousarray(self.features[batch[0] : batch[-1] + 1][batch - batch[0]])
            lims, _, hit_ids = backend.range_search(q, t)
            lims = lims.astype(np.int64)
            per_query = np.diff(lims).astype(np.float64)
            if not include_self:
                owner = np.repeat(np.arange(len(batch)), np.diff(lims))
                per_query -= np.bincount(owner[hit_ids == batch[owner]], minlength=len(batch))
            counts[batch - lo] = per_query
            pos += len(batch)
            bar.update(len(batch))
            mean_hits = max(1.0, lims[-1] / len(batch))
            step = int(np.clip(_RANGE_RESULTS_PER_CALL / mean_hits, 16, 8192))
        bar.close()
        return counts

