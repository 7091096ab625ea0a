"""Dataset-scale similarity: stored features, a FAISS index and the paper's queries.

    >>> with nnsim_hooks.attach(model.eval()) as h:
    ...     idx = h.build_index(dataset, "features/")      # resumable, memory-mapped
    >>> scores, ids = idx.search(h.features(x), k=10)      # nearest neighbours
    >>> density = idx.density()                            # soft neighbour counts, O(N D)
    >>> n_eff = idx.effective_neighbors()                  # denoising, O(N D^2)
    >>> idx = nnsim_hooks.load_index("features/")          # later, elsewhere

Modules: :mod:`.build` (extraction), :mod:`.data` (batches), :mod:`.store` (folder
format), :mod:`.backend` (FAISS), :mod:`.gradient_index` (the index class, assembled from
:mod:`.columns`, :mod:`.search` and :mod:`.queries`), :mod:`.persist` (folders),
:mod:`.lock` (one writer per folder), :mod:`.moments` and :mod:`.exact` (the computations);
several processes: :mod:`.sharded_build` (torchrun, ``shard=(i, n)``), :mod:`.shards`
(layout, checks, merge), :mod:`.sharded_queries`, :mod:`.distributed` (process groups).
"""

from .backend import INDEX_KINDS
from .build import build_index
from .gradient_index import GradientIndex
from .persist import load_index
from .sharded_queries import ShardedQueries
from .shards import merge_shards

__all__ = ["build_index", "load_index", "merge_shards", "GradientIndex", "ShardedQueries", "INDEX_KINDS"]
