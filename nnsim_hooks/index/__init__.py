"""Dataset-scale similarity: stored features, a FAISS index and the paper's queries.

    >>> with nnsim_hooks.attach(model.eval()) as h:
    ...     idx = h.build_index(dataset, "features/")      # resumable, memory-mapped
    >>> scores, ids = idx.search(h.features(x), k=10)      # nearest neighbours
    >>> density = idx.density()                            # soft neighbour counts, O(N D)
    >>> n_eff = idx.effective_neighbors()                  # denoising, O(N D^2)
    >>> idx = nnsim_hooks.load_index("features/")          # later, elsewhere

Modules: :mod:`.build` (extraction; batches come from :mod:`nnsim_hooks.data`),
:mod:`.backend` (FAISS), :mod:`.gradient_index` (the index class and ``load_index``,
assembled from :mod:`.columns`, :mod:`.search` and :mod:`.queries`); :mod:`.queries` (the
paper's dataset queries, written once against :mod:`.statistics`: rows and additive
statistics, on one index or on shares), :mod:`.moments` and :mod:`.pairwise` (the
computations), :mod:`.arguments` (checks on what is passed in); :mod:`.folder` is the
on-disk format (store, manifest, lock, integrity, writing and reading folders), below the
index class; :mod:`.sharded` is several processes (torchrun and ``shard=(i, n)`` builds,
shard folders and their merge, sharded queries, process groups).
"""

from .backend import INDEX_KINDS
from .build import build_index
from .gradient_index import GradientIndex, load_index
from .sharded.queries import ShardedQueries
from .sharded.shards import merge_shards

__all__ = ["build_index", "load_index", "merge_shards", "GradientIndex", "ShardedQueries", "INDEX_KINDS"]
