"""The per-sample columns of a :class:`~nnsim_hooks.index.GradientIndex`: accessors,
the pandas table, and the fingerprint the features were made with."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Dict, Optional

import numpy as np

from ..errors import InputError
from .backend import FaissIndex, IndexSpec, gpu_available, make_spec
from .folder.manifest import check_fingerprint


class IndexColumns:
    """Read-only numpy columns (memory-mapped when the index lives in a folder) and the
    manifest that describes them."""

    def __init__(self, columns: Dict[str, np.ndarray], manifest: Dict[str, Any], path: Optional[Path] = None,
                 *, gpu: Optional[bool] = None, backend: Optional[FaissIndex] = None):
        if gpu and not gpu_available():
            raise InputError("gpu=True but this FAISS has no GPU support: install faiss-gpu (conda) or pass gpu=False")
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
    norms = property(lambda self: self._columns["norms"], doc="float32 [N] estimated gradient norms (NaN: the input or gradient held NaN or Inf)")
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
        from ..optional import require

        pd = require("pandas", "GradientIndex.table()")
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

    def check_handle(self, handle) -> None:
        """Raise :class:`~nnsim_hooks.errors.IndexMismatchError` if ``handle`` computes features
        differently from the ones stored (model weights, output, layers, sketch recipe)."""
        check_fingerprint(self.fingerprint, handle.fingerprint(), self.path or "<in memory>",
                          unresolved_output=handle.output_name == "auto")
