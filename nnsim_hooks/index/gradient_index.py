"""``GradientIndex``: stored features of a dataset and the paper's dataset-scale queries.

Conventions for every per-sample result (arrays ``[N]`` in id order):

- the kernel is the cosine ``k_ij = f_i . f_j`` of the unit feature rows (the sketched
  estimate of the paper's similarity; ``Tr(K_C)/d`` for d outputs);
- sums over j include j = i (``k_ii = 1``) unless ``include_self=False``;
- samples without a gradient direction (``valid`` False) are never anyone's neighbour,
  and their own results are NaN.
"""

from __future__ import annotations

import logging
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any, Dict, Optional, Tuple, Union

import numpy as np
import torch

from ..errors import DataError, InputError, StoreError
from . import exact, moments
from .atomic import store_errors, write_json_atomic
from .backend import FaissIndex, IndexSpec, gpu_available, make_spec
from .checks import (
    UNIT_TOLERANCE,
    as_float32_rows,
    check_k,
    check_threshold,
    defined_rows,
    exclusion_table,
    first_k_not_excluded,
)
from .manifest import MANIFEST, check_fingerprint, new_manifest, now, read_manifest
from .store import INDEX_FILE, ColumnSpec, Store, is_store, open_columns, prepare_folder, write_column

logger = logging.getLogger(__name__)

PathLike = Union[str, "os.PathLike[str]"]
KERNELS = ("cosine", "raw")
# Results per FAISS range-search call: bounds its memory (12 bytes per result).
_RANGE_RESULTS_PER_CALL = 5_000_000


class GradientIndex:
    """Per-sample features, their FAISS index and what was stored beside them.

    Made by :meth:`nnsim_hooks.Handle.build_index`, :func:`load_index` or
    :meth:`GradientIndex.from_features`. Columns are read-only numpy arrays (memory-mapped
    when the index lives in a folder): ``features``, ``ids``, ``valid``, ``norms`` and, when
    available, ``labels``, ``predictions``, ``probabilities``, ``outputs``.
    """

    def __init__(self, columns: Dict[str, np.ndarray], manifest: Dict[str, Any], path: Optional[Path] = None,
                 *, gpu: Optional[bool] = None, backend: Optional[FaissIndex] = None):
        self._columns = columns
        self.manifest = manifest
        self.path = Path(path) if path is not None else None
        self._gpu = gpu
        self._backend = backend
        self._cache: Dict[Any, np.ndarray] = {}
        spec = manifest.get("index") or {"kind": "flat"}
        self.spec = IndexSpec.from_dict(spec) if "factory" in spec else make_spec(spec["kind"], self.n_valid)

    # -- columns --------------------------------------------------------------------------

    def __len__(self) -> int:
        return int(self.manifest["count"])

    @property
    def dim(self) -> int:
        """Feature dimension."""
        return int(self.features.shape[1])

    @property
    def fingerprint(self) -> Optional[Dict[str, Any]]:
        """Model, output, layers and sketch recipe the features were made with (None for
        synthetic features)."""
        return self.manifest.get("fingerprint")

    @property
    def kind(self) -> str:
        return self.spec.kind

    def column(self, name: str) -> Optional[np.ndarray]:
        return self._columns.get(name)

    features = property(lambda self: self._columns["features"], doc="float32 [N, D] unit rows (zero rows where not valid)")
    ids = property(lambda self: self._columns["ids"], doc="int64 [N] ids (dataset positions)")
    valid = property(lambda self: self._columns["valid"], doc="bool [N]: False where the gradient had no direction")
    norms = property(lambda self: self._columns["norms"], doc="float32 [N] estimated gradient norms")
    labels = property(lambda self: self._columns.get("labels"), doc="int64 [N] class labels, or None")
    predictions = property(lambda self: self._columns.get("predictions"), doc="int64 [N] predicted classes, or None")
    probabilities = property(lambda self: self._columns.get("probabilities"), doc="float32 [N, C] softmax outputs, or None")
    outputs = property(lambda self: self._columns.get("outputs"), doc="float32 [N, d] raw outputs (non-classifiers), or None")

    @property
    def undefined(self) -> np.ndarray:
        return ~np.asarray(self.valid)

    @property
    def n_valid(self) -> int:
        if "n_valid" not in self._cache:
            self._cache["n_valid"] = int(np.count_nonzero(self.valid))
        return self._cache["n_valid"]

    def table(self, *, probabilities: bool = False):
        """A pandas DataFrame of the per-sample columns, indexed by id (``probabilities=True``
        adds one column ``p_<class>`` per class)."""
        try:
            import pandas as pd
        except ImportError as exc:
            raise ImportError("GradientIndex.table() needs pandas: pip install 'nnsim_hooks[audit]'") from exc
        data = {"valid": np.asarray(self.valid), "norm": np.asarray(self.norms)}
        for name, col in (("label", self.labels), ("prediction", self.predictions)):
            if col is not None:
                data[name] = np.asarray(col)
        if self.probabilities is not None:
            probs = np.asarray(self.probabilities)
            data["confidence"] = probs.max(1)
            if probabilities:
                for c in range(probs.shape[1]):
                    data[f"p_{c}"] = probs[:, c]
        if self.outputs is not None and self.outputs.shape[1] <= 16:
            for c in range(self.outputs.shape[1]):
                data[f"output_{c}"] = np.asarray(self.outputs[:, c])
        return pd.DataFrame(data, index=pd.Index(np.asarray(self.ids), name="id"))

    def __repr__(self) -> str:
        where = f" at '{self.path}'" if self.path else " in memory"
        return f"<GradientIndex {len(self)} x {self.dim} ({self.n_valid} valid), {self.spec.factory}{where}>"

    # -- FAISS ----------------------------------------------------------------------------

    @property
    def backend(self) -> FaissIndex:
        """The FAISS index (built, or read from the folder, on first use)."""
        if self._backend is None:
            file = self.path / INDEX_FILE if self.path is not None else None
            if file is not None and not self.spec.exact and file.is_file():
                self._backend = FaissIndex.read(file, self.spec, self.dim)
            else:
                if file is not None and not self.spec.exact:
                    logger.warning("%s is missing; rebuilding the %s index from the stored features", file, self.kind)
                self._backend = FaissIndex.build(self.features, self.valid, self.spec)
            self._move_to_gpu()
        return self._backend

    def _move_to_gpu(self) -> None:
        if self._gpu is False:
            return
        if self._gpu and not gpu_available():
            raise InputError("gpu=True but this FAISS has no GPU support: install faiss-gpu (conda) or pass gpu=False")
        if gpu_available():
            self._backend.to_gpu()

    @property
    def _device(self) -> torch.device:
        """Where exact torch fallbacks run: the GPU when the FAISS index is there."""
        on_gpu = self._backend is not None and self._backend.on_gpu
        return torch.device("cuda") if on_gpu and torch.cuda.is_available() else torch.device("cpu")

    def tune(self, **options: int) -> "GradientIndex":
        """Change search-time options: ``nprobe=`` (IVF), ``ef_search=`` (HNSW)."""
        self.backend.tune(**options)
        self.manifest["index"] = self.spec.to_dict()
        return self

    def rebuild_index(self, index: str = "flat", *, progress: bool = True, **options) -> "GradientIndex":
        """Replace the FAISS index by another type (same stored features); written to the
        folder when the index has one."""
        spec = make_spec(index, self.n_valid, options)
        backend = FaissIndex.build(self.features, self.valid, spec, progress=progress)
        if self.path is not None:
            if not spec.exact:
                backend.write(self.path / INDEX_FILE)
            manifest = dict(self.manifest, index=spec.to_dict(), updated=now())
            write_json_atomic(self.path / MANIFEST, manifest)
            if spec.exact:
                with store_errors("deleting", self.path / INDEX_FILE):
                    (self.path / INDEX_FILE).unlink(missing_ok=True)
            self.manifest = manifest
        else:
            self.manifest["index"] = spec.to_dict()
        self.spec, self._backend = spec, backend
        self._move_to_gpu()
        return self

    # -- neighbour search -----------------------------------------------------------------

    def search(self, queries, k: int, *, exclude=None) -> Tuple[np.ndarray, np.ndarray]:
        """The ``k`` stored samples most similar to each query.

        Args:
            queries: float32 feature rows ``[Q, D]`` (numpy or torch; ``[D]`` for one).
                Float64 is refused, not cast. NaN or zero rows get no results.
            k: number of neighbours.
            exclude: ids to leave out, per query: ``[Q]`` (e.g. each query's own id) or
                ``[Q, m]`` or a list of lists. Exclusion is by id, so an exact duplicate
                of the query is kept while the query itself is dropped.

        Returns:
            ``(scores float32 [Q, k], ids int64 [Q, k])``, best first; scores are inner
            products (cosine similarities for unit rows). Missing results (fewer than k
            valid samples) are ``(NaN, -1)``. Approximate index types may miss some
            true neighbours.
        """
        q = as_float32_rows(queries, self.dim, "queries")
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
            return exact.topk(self.features, self.valid, q, k, device=self._device)
        return backend.search(q, k)

    def search_inputs(self, handle, inputs, k: int, *, targets=None, exclude=None) -> Tuple[np.ndarray, np.ndarray]:
        """:meth:`search` with the features of raw ``inputs`` computed by ``handle`` (which
        must match the index's model and sketch recipe)."""
        features = handle.features(inputs, targets).detach()
        self.check_handle(handle)
        return self.search(features.float().cpu(), k, exclude=exclude)

    def check_handle(self, handle) -> None:
        """Raise :class:`~nnsim_hooks.errors.IndexMismatchError` if ``handle`` computes features
        differently from the ones stored (model weights, output, layers, sketch recipe)."""
        check_fingerprint(self.fingerprint, handle.fingerprint(), self.path or "<in memory>",
                          unresolved_output=handle.output_name == "auto")

    def neighbors(self, k: int, *, exclude_self: bool = True, batch_size: int = 4096,
                  progress: bool = True) -> Tuple[np.ndarray, np.ndarray]:
        """The ``k`` nearest stored samples of every stored sample: ``(scores [N, k], ids [N, k])``
        (rows of non-valid samples are ``(NaN, -1)``), searched ``batch_size`` at a time."""
        k = check_k(k, len(self))
        from tqdm.auto import tqdm

        n = len(self)
        scores = np.full((n, k), np.nan, dtype=np.float32)
        ids = np.full((n, k), -1, dtype=np.int64)
        for start, end in tqdm(list(exact.blocks(n, batch_size)), desc="neighbours", unit="batch",
                               disable=not progress, leave=False):
            exclude = np.asarray(self.ids[start:end]) if exclude_self else None
            scores[start:end], ids[start:end] = self.search(np.asarray(self.features[start:end]), k, exclude=exclude)
        return scores, ids

    # -- density (PAPER §2) ----------------------------------------------------------------

    def _moment(self, name: str, kernel: str) -> np.ndarray:
        key = (name, kernel)
        if key not in self._cache:
            w = self._weights(kernel)
            f = self.features
            self._cache[key] = moments.weighted_sum(f, w) if name == "sum" else moments.second_moment(f, w)
        return self._cache[key]

    def _weights(self, kernel: str) -> Optional[np.ndarray]:
        if kernel not in KERNELS:
            raise InputError(f"kernel must be one of {KERNELS}, got {kernel!r}")
        if kernel == "cosine":
            return None
        return np.where(np.asarray(self.valid), np.asarray(self.norms, dtype=np.float64), 0.0)

    def _nan_where_invalid(self, values: np.ndarray) -> np.ndarray:
        values[~np.asarray(self.valid)] = np.nan
        return values

    def density(self, *, include_self: bool = True) -> np.ndarray:
        """The paper's soft neighbour count ``sum_j k(x_i, x_j)`` (float64 [N]), in O(N D)
        through the sum vector ``S = sum_j f_j``. Includes ``k_ii = 1`` unless
        ``include_self=False``. Negative similarities cancel positive ones."""
        out = moments.apply_rows(self.features, self._moment("sum", "cosine"))
        if not include_self:
            out -= moments.squared_norms(self.features)
        return self._nan_where_invalid(out)

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

    def _range_counts(self, t: float, include_self: bool, progress: bool) -> np.ndarray:
        from tqdm.auto import tqdm

        backend = self.backend
        n = len(self)
        counts = np.zeros(n, dtype=np.float64)
        valid_rows = np.flatnonzero(np.asarray(self.valid))
        bar = tqdm(total=len(valid_rows), desc="range search", unit="query", disable=not progress, leave=False)
        step, pos = 64, 0
        while pos < len(valid_rows):
            rows = valid_rows[pos : pos + step]
            q = np.ascontiguousarray(self.features[rows[0] : rows[-1] + 1][rows - rows[0]])
            lims, _, hit_ids = backend.range_search(q, t)
            lims = lims.astype(np.int64)
            per_query = np.diff(lims).astype(np.float64)
            if not include_self:
                owner = np.repeat(np.arange(len(rows)), np.diff(lims))
                per_query -= np.bincount(owner[hit_ids == rows[owner]], minlength=len(rows))
            counts[rows] = per_query
            pos += len(rows)
            bar.update(len(rows))
            mean_hits = max(1.0, lims[-1] / len(rows))
            step = int(np.clip(_RANGE_RESULTS_PER_CALL / mean_hits, 16, 8192))
        bar.close()
        return counts

    # -- denoising (PAPER §3) -------------------------------------------------------------

    def effective_neighbors(self, kernel: str = "cosine", *, include_self: bool = True) -> np.ndarray:
        """``N_eff(x_i) = (sum_j k_ij)^2 / sum_j k_ij^2`` (float64 [N]), the number of equal
        neighbours that would average label noise as much (PAPER §3).

        O(N D^2), never O(N^2): ``sum_j k_ij^2 = f_i^T C f_i`` with the D x D second
        moment ``C = sum_j f_j f_j^T``. ``kernel="raw"`` uses ``K_ij = |g_i| |g_j| k_ij``
        with the stored gradient norms (the paper's raw kernel; for d > 1 outputs its
        scalar trace version). NaN where the denominator is 0.
        """
        w = self._weights(kernel)
        f = self.features
        num = moments.apply_rows(f, self._moment("sum", kernel))
        den = moments.quadratic_forms(f, self._moment("second", kernel))
        if not include_self:
            sq = moments.squared_norms(f)
            wi = w if w is not None else 1.0
            num -= wi * sq
            den -= (wi * sq) ** 2
        with np.errstate(divide="ignore", invalid="ignore"):
            out = np.where(den > 0, num**2 / np.where(den > 0, den, 1.0), np.nan)
        return self._nan_where_invalid(out)

    def denoising_factor(self, kernel: str = "cosine", *, include_self: bool = True) -> np.ndarray:
        """``1 / N_eff``: the factor by which the network divides the variance of i.i.d.
        label noise at each sample (PAPER §3)."""
        with np.errstate(divide="ignore"):
            return 1.0 / self.effective_neighbors(kernel, include_self=include_self)

    def consistency(self, kernel: str = "raw", *, include_self: bool = True, values=None,
                    return_average: bool = False):
        """The label-free check of the averaging hypothesis (PAPER §3):
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
        m = moments.cross_moment(f, p, w)
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

    # -- files ----------------------------------------------------------------------------

    def save(self, path: PathLike, *, overwrite: bool = False) -> Path:
        """Write the index to the folder ``path`` (atomically: a reader sees the old folder or
        the complete new one). Returns the path."""
        path = Path(path)
        if self.path is not None and path.resolve() == self.path.resolve():
            return path  # already there: every change is written as it is made
        if path.exists() and not path.is_dir():
            raise StoreError(f"'{path}' is a file; an index needs a folder path")
        if path.is_dir() and any(path.iterdir()):
            if not is_store(path):
                raise StoreError(f"'{path}' is not empty and is not an nnsim_hooks index; choose a new or empty folder")
            if not overwrite:
                raise StoreError(f"'{path}' already holds an index; pass overwrite=True to replace it")
        with store_errors("creating", path.parent):
            path.parent.mkdir(parents=True, exist_ok=True)
            tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent))
        try:
            for name, col in self._columns.items():
                write_column(tmp / ColumnSpec(name, col.dtype.name, col.shape[1:]).file, col)
            if not self.spec.exact:
                self.backend.write(tmp / INDEX_FILE)
            manifest = dict(self.manifest, updated=now(), index=self.spec.to_dict(), complete=True)
            write_json_atomic(tmp / MANIFEST, manifest)
            _swap_in(tmp, path)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        return path

    # -- construction ---------------------------------------------------------------------

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
        feats = as_float32_rows(features, None, "features")
        n = len(feats)
        if n == 0:
            raise DataError("from_features() got no rows: an index needs at least one sample")
        valid = defined_rows(feats)
        feats = np.where(valid[:, None], feats, np.float32(0))
        lengths = np.linalg.norm(feats[valid], axis=1)
        if normalize:
            feats[valid] /= lengths[:, None]
        elif len(lengths) and np.abs(lengths - 1).max() > UNIT_TOLERANCE:
            worst = int(np.flatnonzero(valid)[np.abs(lengths - 1).argmax()])
            raise InputError(
                f"feature rows must have unit norm (row {worst} has norm {np.linalg.norm(feats[worst]):.4g}); "
                "pass normalize=True, or features from handle.features()"
            )
        columns: Dict[str, np.ndarray] = {
            "features": feats.astype(np.float32, copy=False),
            "ids": np.arange(n, dtype=np.int64),
            "valid": valid,
            "norms": _column(norms, n, "norms", np.float32) if norms is not None else valid.astype(np.float32),
        }
        if labels is not None:
            columns["labels"] = _column(labels, n, "labels", np.int64)
        if probabilities is not None:
            columns["probabilities"] = _column(probabilities, n, "probabilities", np.float32, ndim=2)
            if predictions is None:
                predictions = columns["probabilities"].argmax(1)
        if predictions is not None:
            columns["predictions"] = _column(predictions, n, "predictions", np.int64)
        if outputs is not None:
            columns["outputs"] = _column(outputs, n, "outputs", np.float32, ndim=2)
        manifest = new_manifest(None, {"data": "from_features"})
        task = "classification" if probabilities is not None or predictions is not None else (
            "regression" if outputs is not None else None)
        manifest.update(feature_dim=int(feats.shape[1]), task=task)
        store = Store.create(Path(path) if path is not None else None, manifest, overwrite=overwrite)
        store.define_columns([ColumnSpec(k, v.dtype.name, v.shape[1:]) for k, v in columns.items()])
        block = max(1, (64 << 20) // max(1, feats[:1].nbytes))
        for start in range(0, n, block):
            store.append({k: v[start : start + block] for k, v in columns.items()})
        store.commit(extraction_complete=True)
        store.close()
        return finish(store, index, index_options, gpu=gpu, progress=progress)


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


def _column(x, n: int, name: str, dtype, ndim: int = 1) -> np.ndarray:
    if isinstance(x, torch.Tensor):
        x = x.detach().cpu().numpy()
    x = np.asarray(x)
    if x.ndim == 1 and ndim == 2:
        x = x[:, None]
    if x.ndim != ndim or len(x) != n:
        want = f"[{n}]" if ndim == 1 else f"[{n}, C]"
        raise InputError(f"{name} must have shape {want} (one row per feature row), got {list(x.shape)}")
    if dtype == np.int64 and not np.issubdtype(x.dtype, np.integer):
        raise InputError(f"{name} must be integers, got {x.dtype}")
    return np.ascontiguousarray(x, dtype=dtype)


def _swap_in(tmp: Path, path: Path) -> None:
    """Move the finished folder ``tmp`` to ``path``, replacing an old index there."""
    with store_errors("moving the new index to", path):
        if path.is_dir() and any(path.iterdir()):
            old = path.with_name(f".{path.name}.old-{os.getpid()}")
            os.replace(path, old)
            os.replace(tmp, path)
            shutil.rmtree(old, ignore_errors=True)
        else:
            if path.is_dir():
                path.rmdir()
            os.replace(tmp, path)


def finish(store: Store, index: str, index_options: Optional[Dict[str, Any]], *, gpu: Optional[bool],
           progress: bool) -> GradientIndex:
    """Build (or reuse) the FAISS index of a fully extracted store and mark it complete."""
    arrays = store.arrays()
    manifest = store.manifest
    n_valid = int(np.count_nonzero(arrays["valid"]))
    spec = make_spec(index, n_valid, index_options)
    stored = manifest.get("index")
    file = store.path / INDEX_FILE if store.path is not None else None
    reuse = (
        manifest.get("complete")
        and stored is not None
        and IndexSpec.from_dict(stored).factory == spec.factory
        and (spec.exact or (file is not None and file.is_file()))
        and not index_options
    )
    backend = None
    if not reuse:
        backend = FaissIndex.build(arrays["features"], arrays["valid"], spec, progress=progress)
        if file is not None and not spec.exact:
            backend.write(file)
        elif file is not None:
            file.unlink(missing_ok=True)
        store.commit(index=spec.to_dict(), complete=True)
    else:
        spec = IndexSpec.from_dict(stored)
    idx = GradientIndex(arrays, store.manifest, store.path, gpu=gpu, backend=backend)
    idx.spec = spec
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
    """
    path = Path(path)
    manifest = read_manifest(path)
    if not manifest.get("complete"):
        raise StoreError(
            f"the index at '{path}' is incomplete ({manifest['count']} samples stored so far): its build was "
            "interrupted. Run handle.build_index(data, path) again with the same data to finish it"
        )
    columns = open_columns(path, manifest)
    if not mmap:
        columns = {k: np.array(v) for k, v in columns.items()}
    for needed in ("features", "ids", "valid", "norms"):
        if needed not in columns:
            raise StoreError(f"the index at '{path}' has no '{needed}' column; the folder is corrupt")
    idx = GradientIndex(columns, manifest, path, gpu=gpu)
    if handle is not None:
        idx.check_handle(handle)
    return idx
