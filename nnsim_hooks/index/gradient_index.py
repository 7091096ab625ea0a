"""``GradientIndex``: stored features of a dataset and the paper's dataset-scale queries.

The class is assembled from three parts, one module each:

- :mod:`.columns`: the per-sample columns, the pandas table, the fingerprint;
- :mod:`.search`: the FAISS index, k-nearest-neighbour and range search;
- :mod:`.queries`: density, counts, effective neighbours, denoising, consistency;

and :mod:`.persist` writes and reads index folders (``save``, ``from_features``,
``load_index``).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Dict, Optional, Union

from .columns import IndexColumns
from .queries import DatasetQueries
from .search import FaissSearch

PathLike = Union[str, "os.PathLike[str]"]


class GradientIndex(DatasetQueries, FaissSearch, IndexColumns):
    """Per-sample features, their FAISS index and what was stored beside them.

    Made by :meth:`nnsim_hooks.Handle.build_index`, :func:`load_index` or
    :meth:`GradientIndex.from_features`. Columns are read-only numpy arrays (memory-mapped
    when the index lives in a folder): ``features``, ``ids``, ``valid``, ``norms`` and, when
    available, ``labels``, ``predictions``, ``probabilities``, ``outputs``.
    """

    def save(self, path: PathLike, *, overwrite: bool = False) -> Path:
        """Write the index to the folder ``path`` (atomically: a reader sees the old folder or
        the complete new one). Returns the path."""
        from .folder.persist import save_index

        return save_index(self, path, overwrite=overwrite)

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
        from .folder.persist import index_from_features

        return index_from_features(features, labels, predictions, probabilities, norms, outputs, index=index,
                                   index_options=index_options, path=path, overwrite=overwrite, normalize=normalize,
                                   gpu=gpu, progress=progress)

