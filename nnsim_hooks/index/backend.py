"""FAISS behind a small interface: build, search, range search, save, load.

Features are unit rows, so the inner product is the cosine similarity and every index
uses ``METRIC_INNER_PRODUCT``. Index types (``index=``):

- ``"flat"`` (default): exact search, ``IndexFlatIP``. Fine up to a few million rows on
  CPU; the cost is one matrix product per query batch.
- ``"ivf"``: ``IVF{nlist},Flat``, a k-means partition; a query scans ``nprobe`` lists.
  Defaults ``nlist = round(sqrt(N))``, ``nprobe = max(8, nlist // 16)``.
- ``"hnsw"``: ``HNSW{M},Flat`` graph. Defaults ``M = 32``, ``ef_construction = 80``,
  ``ef_search = 128``. No training; slow to build.
- ``"sq8"``: exhaustive scan over 8-bit scalar-quantised codes (4x less memory than flat).
- ``"ivf_sq8"``: both.
- any other FAISS factory string (``"IVF4096,PQ64"``...), at your own risk: product
  quantisation distorts similarities enough to make thresholds meaningless.

Only valid rows go into FAISS (an ``IndexIDMap`` over the inner index keeps their ids),
so samples without a gradient direction never appear in search results.

GPU: with ``gpu=True`` (or ``None`` and a faiss build with GPUs), the index is copied to
GPU 0 with ``faiss.index_cpu_to_gpu`` (HNSW stays on CPU). FAISS-GPU has no range search
and caps k at 2048; :class:`~nnsim_hooks.index.GradientIndex` answers those with exact
torch code instead. The index is always built and saved on CPU.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, Optional, Tuple

import numpy as np

from ..errors import InputError, StoreError
from ..safe_files import rename_into_place, write_faiss_index

logger = logging.getLogger(__name__)

INDEX_KINDS = ("flat", "ivf", "hnsw", "sq8", "ivf_sq8")
# Options each kind understands (search-time ones can be changed later with tune()).
OPTIONS_BY_KIND = {
    "flat": set(),
    "ivf": {"nlist", "nprobe", "train_size", "niter"},
    "hnsw": {"M", "ef_construction", "ef_search"},
    "sq8": {"train_size"},
    "ivf_sq8": {"nlist", "nprobe", "train_size", "niter"},
    "factory": {"nprobe", "ef_search", "train_size"},
}
SEARCH_OPTIONS = {"nprobe", "ef_search"}
GPU_MAX_K = 2048
_ADD_BLOCK = 65536


@dataclass
class IndexSpec:
    """An index type and its options, as stored in the manifest."""

    kind: str
    options: Dict[str, Any] = field(default_factory=dict)
    factory: str = "Flat"

    def to_dict(self) -> Dict[str, Any]:
        return {"kind": self.kind, "options": dict(self.options), "factory": self.factory}

    @classmethod
    def from_dict(cls, d: Dict[str, Any]) -> "IndexSpec":
        return cls(d["kind"], dict(d.get("options", {})), d.get("factory", "Flat"))

    @property
    def exact(self) -> bool:
        return self.kind == "flat"


def make_spec(index: str, n_valid: int, options: Optional[Dict[str, Any]] = None) -> IndexSpec:
    """Resolve ``index=`` and its options (defaults depend on the number of valid rows)."""
    if not isinstance(index, str) or not index:
        raise InputError(f"index must be one of {INDEX_KINDS} or a FAISS factory string, got {index!r}")
    options = dict(options or {})
    kind = index.lower() if index.lower() in INDEX_KINDS else "factory"
    unknown = set(options) - OPTIONS_BY_KIND[kind]
    if unknown:
        allowed = sorted(OPTIONS_BY_KIND[kind]) or "none"
        raise InputError(f"index='{index}' does not take option(s) {sorted(unknown)}; it takes: {allowed}")
    for name, value in options.items():
        if not isinstance(value, (int, np.integer)) or isinstance(value, bool) or value < 1:
            raise InputError(f"index option {name} must be a positive integer, got {value!r}")
        options[name] = int(value)
    if kind in ("ivf", "ivf_sq8"):
        nlist = options.setdefault("nlist", max(1, int(round(math.sqrt(max(n_valid, 1))))))
        if nlist > max(n_valid, 1):
            raise InputError(
                f"index='{kind}' with nlist={nlist} needs at least {nlist} valid samples, the index has {n_valid}; "
                "lower nlist or use index='flat'"
            )
        options.setdefault("nprobe", min(nlist, max(8, nlist // 16)))
        options.setdefault("train_size", max(64 * nlist, 10_000))
        options.setdefault("niter", 10)
        factory = f"IVF{nlist},{'Flat' if kind == 'ivf' else 'SQ8'}"
    elif kind == "hnsw":
        options.setdefault("M", 32)
        options.setdefault("ef_construction", 80)
        options.setdefault("ef_search", 128)
        factory = f"HNSW{options['M']},Flat"
    elif kind == "sq8":
        options.setdefault("train_size", 100_000)
        factory = "SQ8"
    elif kind == "flat":
        factory = "Flat"
    else:
        options.setdefault("train_size", 100_000)
        factory = index
    return IndexSpec(kind, options, factory)


def _faiss():
    try:
        import faiss
    except ImportError as exc:  # pragma: no cover - faiss-cpu is a core dependency
        raise ImportError("nnsim_hooks.index needs FAISS: pip install faiss-cpu (or faiss-gpu)") from exc
    _warn_two_builds()
    return faiss


_CHECKED_BUILDS = False


def installed_faiss_builds() -> list:
    """The FAISS distributions pip installed (``faiss-cpu``, ``faiss-gpu``, ``faiss-gpu-cu12``...)."""
    from importlib import metadata

    names = set()
    for dist in metadata.distributions():
        name = (dist.metadata.get("Name") or "").lower()
        if name.startswith("faiss-cpu") or name.startswith("faiss-gpu") or name == "faiss-cuda":
            names.add(name)
    return sorted(names)


def _warn_two_builds() -> None:
    """Two FAISS builds share one ``faiss`` package folder: whichever was installed last
    wins file by file, which can break both. Say how to keep one."""
    global _CHECKED_BUILDS
    if _CHECKED_BUILDS:
        return
    _CHECKED_BUILDS = True
    builds = installed_faiss_builds()
    if len(builds) > 1:
        import warnings

        gpu = next((b for b in builds if b != "faiss-cpu"), builds[-1])
        warnings.warn(
            f"nnsim_hooks: several FAISS builds are installed ({', '.join(builds)}); they overwrite each other's "
            f"files. Keep one: pip uninstall -y {' '.join(builds)} && pip install --no-deps {gpu}",
            RuntimeWarning,
            stacklevel=3,
        )


def _faiss_reason(exc: Exception) -> str:
    """The human part of a FAISS C++ error ("Error in void faiss::... failed: Number of ...")."""
    text = " ".join(str(exc).split())
    return text.rpartition("failed: ")[2] if "failed: " in text else text[-300:]


def gpu_available() -> bool:
    faiss = _faiss()
    return hasattr(faiss, "StandardGpuResources") and hasattr(faiss, "get_num_gpus") and faiss.get_num_gpus() > 0


class FaissIndex:
    """A FAISS index of unit rows keyed by sample id; inner product = cosine."""

    def __init__(self, index, spec: IndexSpec, dim: int):
        self._cpu = index
        self._index = index
        self._gpu_resources = None
        self.spec = spec
        self.dim = dim
        self.tune(**{k: v for k, v in spec.options.items() if k in SEARCH_OPTIONS})

    # -- building -------------------------------------------------------------------------

    @classmethod
    def build(cls, features: np.ndarray, valid: np.ndarray, spec: IndexSpec, *, progress: bool = False) -> "FaissIndex":
        """Train (if needed) and fill an index from the valid rows of ``features``."""
        faiss = _faiss()
        dim = int(features.shape[1])
        try:
            inner = faiss.index_factory(dim, spec.factory, faiss.METRIC_INNER_PRODUCT)
        except RuntimeError as exc:
            raise InputError(
                f"FAISS cannot make an index from '{spec.factory}' for dimension {dim}: {str(exc).splitlines()[0]}. "
                f"Use one of {INDEX_KINDS}"
            ) from exc
        if spec.kind == "hnsw":
            faiss.downcast_index(inner).hnsw.efConstruction = spec.options["ef_construction"]
        if spec.kind in ("ivf", "ivf_sq8"):
            faiss.extract_index_ivf(inner).cp.niter = spec.options["niter"]
        valid_ids = np.flatnonzero(np.asarray(valid))
        if not inner.is_trained:
            size = min(len(valid_ids), spec.options.get("train_size", 100_000))
            rng = np.random.default_rng(0)
            rows = np.sort(rng.choice(valid_ids, size=size, replace=False)) if size < len(valid_ids) else valid_ids
            logger.info("training FAISS %s on %d vectors", spec.factory, len(rows))
            try:
                inner.train(np.ascontiguousarray(features[rows], dtype=np.float32))
            except RuntimeError as exc:  # e.g. more IVF lists or PQ centroids than training rows
                raise InputError(
                    f"FAISS cannot train the index '{spec.factory}' on the {len(rows)} valid rows available "
                    f"({_faiss_reason(exc)}): an IVF index needs at least as many rows as lists, "
                    f"PQ and SQ codes need enough rows per centroid. Use fewer lists (a smaller number after IVF), "
                    f"index='flat', or more data"
                ) from exc
        index = faiss.IndexIDMap(inner)
        from tqdm.auto import tqdm

        bar = tqdm(total=len(valid_ids), desc=f"FAISS {spec.factory}", unit="vec", disable=not progress, leave=False)
        for start in range(0, len(valid_ids), _ADD_BLOCK):
            ids = valid_ids[start : start + _ADD_BLOCK]
            block = features[ids[0] : ids[-1] + 1][ids - ids[0]]
            index.add_with_ids(np.ascontiguousarray(block, dtype=np.float32), ids.astype(np.int64))
            bar.update(len(ids))
        bar.close()
        return cls(index, spec, dim)

    def to_gpu(self) -> bool:
        """Move the index to GPU 0 if FAISS has GPUs; return whether it moved."""
        faiss = _faiss()
        if not gpu_available():
            return False
        if self.spec.kind == "hnsw":
            logger.info("FAISS has no GPU HNSW; the index stays on CPU")
            return False
        try:
            self._gpu_resources = faiss.StandardGpuResources()
            self._index = faiss.index_cpu_to_gpu(self._gpu_resources, 0, self._cpu)
        except RuntimeError as exc:  # an index type without a GPU version
            logger.warning("could not move the FAISS index to GPU (%s); it stays on CPU", str(exc).splitlines()[0])
            self._index, self._gpu_resources = self._cpu, None
            return False
        self.tune(**{k: v for k, v in self.spec.options.items() if k in SEARCH_OPTIONS})
        return True

    # -- properties -----------------------------------------------------------------------

    @property
    def on_gpu(self) -> bool:
        return self._gpu_resources is not None

    @property
    def ntotal(self) -> int:
        return int(self._index.ntotal)

    @property
    def supports_range_search(self) -> bool:
        return not self.on_gpu

    @property
    def max_k(self) -> Optional[int]:
        return GPU_MAX_K if self.on_gpu else None

    def tune(self, **options: int) -> None:
        """Set search-time options (``nprobe`` for IVF, ``ef_search`` for HNSW)."""
        faiss = _faiss()
        unknown = set(options) - SEARCH_OPTIONS
        if unknown:
            raise InputError(f"unknown search option(s) {sorted(unknown)}; known: {sorted(SEARCH_OPTIONS)}")
        names = {"nprobe": "nprobe", "ef_search": "efSearch"}
        space = faiss.GpuParameterSpace() if self.on_gpu else faiss.ParameterSpace()
        for name, value in options.items():
            if not isinstance(value, (int, np.integer)) or isinstance(value, bool) or value < 1:
                raise InputError(f"{name} must be a positive integer, got {value!r}")
            try:
                space.set_index_parameter(self._index, names[name], int(value))
            except RuntimeError as exc:
                raise InputError(f"the '{self.spec.kind}' index has no option {name}") from exc
            self.spec.options[name] = int(value)

    # -- queries (inputs already checked: float32, C-contiguous, [Q, dim]) ---------------

    def search(self, queries: np.ndarray, k: int) -> Tuple[np.ndarray, np.ndarray]:
        """Top-``k`` inner products; missing results have id -1."""
        scores, ids = self._index.search(queries, k)
        return scores, ids

    def range_search(self, queries: np.ndarray, threshold: float) -> Tuple[np.ndarray, np.ndarray, np.ndarray]:
        """All stored rows with inner product strictly above ``threshold``: ``(lims, scores, ids)``,
        results of query q in ``[lims[q], lims[q+1])``."""
        if not self.supports_range_search:
            raise InputError("this FAISS index lives on GPU, which has no range search")
        return self._index.range_search(queries, float(threshold))

    # -- files ----------------------------------------------------------------------------

    @property
    def cpu_index(self):
        """The FAISS index on the CPU (what is written to files)."""
        return self._cpu

    def write(self, path: Path) -> None:
        """Write the (CPU) index to ``path`` atomically (never through a link; index folders
        use :func:`nnsim_hooks.index.folder.index_file.write_index_file` instead, which
        names the file by its contents)."""
        path = Path(path)
        rename_into_place(write_faiss_index(self._cpu, path.parent, path.name), path)

    @classmethod
    def read(cls, path: Path, spec: IndexSpec, dim: int) -> "FaissIndex":
        faiss = _faiss()
        try:
            index = faiss.read_index(str(path))
        except RuntimeError as exc:
            raise StoreError(
                f"cannot read the FAISS index '{path}': {str(exc).splitlines()[0]}. The file is corrupt or from an "
                "incompatible FAISS; delete it and load_index() rebuilds it from the stored features"
            ) from exc
        if index.d != dim:
            raise StoreError(f"the FAISS index '{path}' has dimension {index.d}, the stored features {dim}: corrupt folder")
        return cls(index, spec, dim)
