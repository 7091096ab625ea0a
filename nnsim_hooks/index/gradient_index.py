"""``GradientIndex``: stored features of a dataset and the paper's dataset-scale queries.

The class is assembled from three parts, one module each:

- :mod:`.columns`: the per-sample columns, the pandas table, the fingerprint;
- :mod:`.search`: the FAISS index, k-nearest-neighbour and range search;
- :mod:`.queries`: density, counts, effective neighbours, denoising, consistency
  (written once for one index or its shares; this class is their one-process host);

and :mod:`.folder.persist` writes and reads index folders (below this module: it hands
back columns and manifests, and this module makes the index of them: ``save``,
``from_features``, ``from_store``, :func:`load_index`).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Callable, Dict, Optional, Union

import numpy as np

from .columns import IndexColumns
from .folder import persist
from .folder.integrity import check_index_file_size
from .folder.index_file import index_file_path
from .folder.store import Store
from .queries import DatasetQueries
from .search import FaissSearch
from .statistics import Rows, Statistics

PathLike = Union[str, "os.PathLike[str]"]


class GradientIndex(DatasetQueries, FaissSearch, IndexColumns):
    """Per-sample features, their FAISS index and what was stored beside them.

    Made by :meth:`nnsim_hooks.Handle.build_index`, :func:`load_index` or
    :meth:`GradientIndex.from_features`. Columns are read-only numpy arrays (memory-mapped
    when the index lives in a folder): ``features``, ``ids``, ``valid``, ``norms`` and, when
    available, ``labels``, ``predictions``, ``probabilities``, ``outputs``.
    """

    # -- the queries' host (see nnsim_hooks.index.queries): every row, in this process --

    @property
    def index(self) -> "GradientIndex":
        """The index the queries read: this one."""
        return self

    @property
    def statistics(self) -> Statistics:
        """Sums over every row (``S``, ``C``, ``M``, pair sums), cached with the index."""
        if "statistics" not in self._cache:
            self._cache["statistics"] = Statistics(self, device=lambda: self._device)
        return self._cache["statistics"]

    def map_rows(self, fn: Callable[[Rows], np.ndarray], step: str) -> np.ndarray:
        """``fn`` of all the rows (one process holds them all; ``step`` names it for logs)."""
        return fn(Rows(self))

    def nearest(self, queries: np.ndarray, k: int, exclude) -> tuple:
        """:meth:`search` (FAISS)."""
        return self.search(queries, k, exclude=exclude)

    @property
    def range_search_available(self) -> bool:
        return self.backend.supports_range_search

    # -- folders -------------------------------------------------------------------------

    def save(self, path: PathLike, *, overwrite: bool = False) -> Path:
        """Write the index to the folder ``path`` (atomically: a reader sees the old folder or
        the complete new one). Returns the path."""
        return persist.save_index(self, path, overwrite=overwrite)

    @classmethod
    def from_features(cls, features, labels=None, predictions=None, probabilities=None, norms=None, outputs=None, *,
                      index: str = "flat", index_options: Optional[Dict[str, Any]] = None,
                      path: Optional[PathLike] = None, overwrite: bool = False, normalize: bool = False,
                      gpu: Optional[bool] = None, progress: bool = False) -> "GradientIndex":
        """An index of given feature rows, without a model (benchmarks, tests, features
        computed elsewhere).

        ``features``: float32 ``[N, D]`` unit rows (``normalize=True`` normalizes them);
        NaN or all-zero rows mark samples without a gradient direction. ``labels``,
        ``predictions`` (int [N]), ``probabilities`` ([N, C]; predictions default to their
        argmax), ``norms`` ([N], default 1: then the raw kernel equals the cosine) and
        ``outputs`` ([N, d]) are stored beside them. Written to the folder ``path`` if given.
        """
        store, backend = persist.index_from_features(
            features, labels, predictions, probabilities, norms, outputs, index=index, index_options=index_options,
            path=path, overwrite=overwrite, normalize=normalize, progress=progress)
        return cls._of_finished_store(store, backend, gpu)

    @classmethod
    def from_store(cls, store: Store, index: str, index_options: Optional[Dict[str, Any]], *,
                   gpu: Optional[bool], progress: bool) -> "GradientIndex":
        """The index of a fully extracted store (a build's, a merge's): its FAISS index
        built, or reused when the store has the same one (see :func:`.folder.persist.finish`)."""
        return cls._of_finished_store(store, persist.finish(store, index, index_options, progress=progress), gpu)

    @classmethod
    def _of_finished_store(cls, store: Store, backend, gpu: Optional[bool]) -> "GradientIndex":
        idx = cls(store.arrays(), store.manifest, store.path, gpu=gpu, backend=backend)
        if backend is not None:
            idx._move_to_gpu()
        return idx


def load_index(path: PathLike, *, handle=None, gpu: Optional[bool] = None, mmap: bool = True) -> GradientIndex:
    """Open an index folder written by ``build_index(..., path)``, ``from_features(..., path=)``
    or :meth:`GradientIndex.save`.

    Columns are memory-mapped read-only (``mmap=False`` reads them into memory). With
    ``handle``, its fingerprint is checked against the stored one
    (:class:`~nnsim_hooks.errors.IndexMismatchError` says what differs). ``gpu``: put the
    FAISS index on GPU (None: if FAISS has GPUs).

    What is checked (each failure a :class:`~nnsim_hooks.errors.StoreError` naming the file):
    every field of the manifest, typed and bounded (:mod:`.folder.manifest_fields`); that
    every column file holds exactly ``count`` rows; ``ids.bin``, ``valid.bin`` and
    ``index.faiss`` against their records (:mod:`.folder.integrity`). Non-finite feature rows are marked not valid, with a
    warning. A folder still being written is refused, naming the writer.
    """
    path = Path(path)
    columns, manifest = persist.read_index_folder(path, mmap=mmap)
    idx = GradientIndex(columns, manifest, path, gpu=gpu)
    if not idx.spec.exact:
        check_index_file_size(index_file_path(path, manifest), manifest.get("index_file"), idx.n_valid, idx.dim)
    if handle is not None:
        idx.check_handle(handle)
    return idx
