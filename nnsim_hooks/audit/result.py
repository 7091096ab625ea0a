"""``AuditResult``: the per-sample table, the summary, and how they are saved.

Saved folder layout (``AuditResult.save(dir)``)::

    report.html        the self-contained report (pictures inline, a table of every sample), readable offline
    table.csv          one row per sample, in dataset order (also table.parquet)
    per_class.csv      the health summary per class
    summary.json       counts, thresholds, denoising, agreements (JSON)
    knn_graph.npz      the k-NN graph in cleanlab's format (scipy.sparse.save_npz)
    index/             the gradient index of the neighbours (nnsim_hooks.index.load_index(dir / "index"))
    index-denoising/   the predicted-class index of density and denoising, when the
                       neighbours use another output (output="full", the default up to 16 classes)
    nnsim-audit.json   the folder's marker (state, configuration)

Table columns: the index ``sample`` (the dataset position), ``readable``, ``finite`` (False:
the sample's file, input or per-sample gradient holds NaN or Inf values, and it was skipped
like an unreadable file), ``valid`` (the
sample has a gradient direction), ``path`` (the sample's file relative to the dataset's
root; empty without files), ``label``, ``label_name``, ``prediction``, ``prediction_name``
(nullable ints and the class names beside them), ``label_probability``, ``confidence``,
then each check's columns in the order of :data:`nnsim_hooks.audit.checks.CHECKS` (built in:
``label_issue_score``, ``is_label_issue``, ``suggested_label``, ``suggested_label_name``;
``duplicate_group`` (-1: none), ``duplicate_representative``; ``density``, ``knn_similarity``, ``is_outlier``;
``effective_neighbors``, ``denoising_factor``, ``consistency``, ``prediction_spread``), then ``gradient_norm``,
``neighbor_1..k`` (dataset positions, -1: none) and ``similarity_1..k``.

``summary.json`` and ``per_class.csv`` likewise hold the core counts and each check's
own keys (:meth:`nnsim_hooks.audit.checks.check.Check.summary` and ``per_class``).
``summary.json``'s ``warnings`` is a list (empty when all is well) of
:class:`~nnsim_hooks.audit.checks.check.AuditWarning` dicts: states of the model or data
that make some numbers meaningless (:mod:`nnsim_hooks.audit.checks.model_state`).
"""

from __future__ import annotations

import io
import json
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Union

import numpy as np

from ..atomic import write_bytes_atomic, write_text_atomic
from ..errors import StoreError
from . import checks
from .checks.arrays import agreement, class_column
from .checks.check import WARNINGS, warnings_of
from .output_folder import clean_json, mark_done, prepare_out_dir, read_marker, write_json
from .thresholds import Thresholds, threshold_specs

logger = logging.getLogger(__name__)

#: Cosine distance given to filler slots of the cleanlab graph (samples with fewer than k
#: neighbours: unreadable, no gradient direction, tiny datasets): the largest possible.
FILLER_DISTANCE = 2.0


@dataclass
class AuditResult:
    """What :func:`nnsim_hooks.audit` returns.

    Attributes:
        table: pandas DataFrame, one row per sample in dataset order (columns in the
            module docstring).
        summary: JSON-able dict of counts, thresholds, denoising and agreements.
        per_class: pandas DataFrame, the health summary per class.
        thresholds: the :class:`Thresholds` used.
        index: the :class:`~nnsim_hooks.index.GradientIndex` (None after :meth:`load`).
        k: neighbours per sample.
        dataset: the audited dataset (for the report's pictures; not saved).
    """

    table: Any
    summary: Dict[str, Any]
    per_class: Any
    thresholds: Thresholds
    index: Any = None
    k: int = 10
    dataset: Any = None
    thumbnail: Optional[Callable] = None
    class_names: Optional[List[str]] = None
    info: Dict[str, Any] = field(default_factory=dict, repr=False)
    denoise_index: Any = None

    # -- construction ---------------------------------------------------------------------

    @classmethod
    def build(cls, table, *, index, thresholds: Thresholds, k: int, num_classes: Optional[int], info) -> "AuditResult":
        result = cls(table=table, summary={}, per_class=None, thresholds=thresholds, index=index, k=k, info=info)
        result.per_class = result._per_class(num_classes)
        result.summary = result._summary(num_classes)
        return result

    def _summary(self, num_classes: Optional[int]) -> Dict[str, Any]:
        t = self.table
        labels, preds = class_column(t, "label"), class_column(t, "prediction")
        finite = t["finite"].to_numpy(dtype=bool) if "finite" in t else np.ones(len(t), bool)
        unreadable = np.flatnonzero(~t["readable"].to_numpy(dtype=bool) & finite)
        non_finite = np.flatnonzero(~finite)
        summary = {
            "samples": len(t),
            "readable": int(t["readable"].sum()),
            "unreadable": len(unreadable),
            "unreadable_samples": unreadable[:1000].tolist(),
            "non_finite": len(non_finite),
            "non_finite_samples": non_finite[:1000].tolist(),
            "valid": int(t["valid"].sum()),
            "labelled": int((labels >= 0).sum()),
            "missing_labels": int(((labels < 0) & t["readable"].to_numpy(dtype=bool)).sum()),
            "num_classes": num_classes,
            "k": self.k,
            "thresholds": self.thresholds.to_dict(),
            "agreement": {"prediction_vs_label": agreement(preds, labels)},
            WARNINGS: [],
        }
        for check in checks.CHECKS:
            _merge(summary, check.summary(t, self.info, num_classes), check.name)
        return clean_json(summary)

    def _per_class(self, num_classes: Optional[int]):
        import pandas as pd

        t = self.table[self.table["readable"]]
        labels, preds = class_column(t, "label"), class_column(t, "prediction")
        classes = sorted(set(labels[labels >= 0].tolist()) | set(range(num_classes or 0)))
        rows = []
        groups = [(c, labels == c) for c in classes]
        if (labels < 0).any():
            groups.append((-1, labels < 0))
        groups.append((None, np.ones(len(t), dtype=bool)))
        for c, mask in groups:
            row = {
                "class": "all" if c is None else ("(no label)" if c < 0 else int(c)),
                "samples": int(mask.sum()),
                "predicted_as": int((preds == c).sum()) if c is not None and c >= 0 else None,
                "agreement": agreement(preds[mask], labels[mask]),
            }
            for check in checks.CHECKS:
                _merge(row, check.per_class(t[mask]), check.name)
            rows.append(row)
        table = pd.DataFrame(rows)
        table["predicted_as"] = table["predicted_as"].astype("Int64")
        return table

    # -- views ----------------------------------------------------------------------------

    def neighbor_arrays(self):
        """``(ids [N, k], sims [N, k])`` in dataset positions (-1 / NaN where none)."""
        k = self.k
        cols = [c for c in (f"neighbor_{j + 1}" for j in range(k)) if c in self.table]
        ids = self.table[cols].to_numpy(dtype=np.int64) if cols else np.zeros((len(self.table), 0), np.int64)
        sims = self.table[[c.replace("neighbor", "similarity") for c in cols]].to_numpy(dtype=np.float64) if cols else (
            np.zeros((len(self.table), 0))
        )
        return ids, sims

    def label_issues(self):
        """The flagged samples, most suspicious first: by ``label_issue_score``, ties broken
        by the prediction's disagreement, then ``label_probability``, then the closeness of
        the neighbours (:func:`~nnsim_hooks.audit.ranking.suspicion_order`)."""
        from .ranking import suspicion_order

        flagged = self.table[self.table["is_label_issue"].to_numpy(dtype=bool)]
        return flagged.iloc[suspicion_order(flagged)]

    def duplicates(self):
        """Members of near-duplicate groups, by group."""
        t = self.table
        return t[t["duplicate_group"] >= 0].sort_values(["duplicate_group", "duplicate_representative"],
                                                        ascending=[True, False])

    def outliers(self):
        """The flagged outliers, rarest first."""
        t = self.table
        return t[t["is_outlier"]].sort_values("knn_similarity")

    def knn_graph(self):
        """The k-NN graph as cleanlab's ``Datalab.find_issues(knn_graph=...)`` and
        ``cleanlab.outlier``/``near_duplicate`` checks accept it: a scipy CSR matrix
        ``[N, N]`` with exactly k stored entries per row, the cosine *distances*
        ``1 - similarity`` (clipped to [0, 2]) in ascending order, no self-loops, exact
        duplicates as explicit zeros. Rows with fewer than k neighbours (unreadable
        samples, no gradient direction) are filled with distance 2 to other samples."""
        from scipy.sparse import csr_matrix

        ids, sims = self.neighbor_arrays()
        n = len(ids)
        k = min(ids.shape[1], max(n - 1, 0))
        ids, sims = ids[:, :k], sims[:, :k]
        ok = (ids >= 0) & np.isfinite(sims)
        data = np.clip(1.0 - np.where(ok, sims, -1.0), 0.0, 2.0)  # rows are sorted by similarity already
        cols = ids.copy()
        for i in np.flatnonzero(~ok.all(1)):  # rare: rows with missing neighbours
            row_ids = list(ids[i][ok[i]])
            taken = set(row_ids) | {i}
            filler = (c for c in range(n) if c not in taken)
            row_ids += [next(filler) for _ in range(k - len(row_ids))]
            row_d = list(data[i][ok[i]]) + [FILLER_DISTANCE] * (k - int(ok[i].sum()))
            order = np.argsort(row_d, kind="stable")
            data[i], cols[i] = np.asarray(row_d)[order], np.asarray(row_ids)[order]
        order = np.argsort(data, axis=1, kind="stable")  # approximate indexes may return rows out of order
        data, cols = np.take_along_axis(data, order, 1), np.take_along_axis(cols, order, 1)
        indptr = np.arange(0, n * k + 1, k) if k else np.zeros(n + 1, dtype=np.int64)
        return csr_matrix((data.reshape(-1), cols.reshape(-1), indptr), shape=(n, n))

    # -- files ----------------------------------------------------------------------------

    def report_html(self) -> str:
        """The report as one self-contained HTML page."""
        from .report import render

        return render(self)

    def save(self, out_dir: Union[str, Path], *, overwrite: bool = False, _finish: bool = False,
             copy_index: bool = True) -> Path:
        """Write the folder described in the module docstring; returns its path.

        An existing folder is refused unless it is empty, or holds an audit and
        ``overwrite=True`` (see :mod:`nnsim_hooks.audit.output_folder`). ``copy_index=False``
        leaves the index folders where they are (an audit of a stored index refers to them)."""
        from scipy.sparse import save_npz

        out = Path(out_dir)
        if not _finish:
            marker = read_marker(out) if out.is_dir() else None
            same_run = marker is not None and self.index is not None and getattr(self.index, "path", None) is not None \
                and Path(self.index.path).resolve() == (out / "index").resolve()
            if not same_run:
                prepare_out_dir(out, {"saved_result": True}, overwrite=overwrite)
        if self.index is not None and copy_index:
            self.index.save(out / "index", overwrite=True)
        if self.denoise_index is not None and copy_index:
            self.denoise_index.save(out / "index-denoising", overwrite=True)
        table = self.table
        write_text_atomic(out / "table.csv", table.to_csv())
        buf = io.BytesIO()
        try:
            table.to_parquet(buf)
            write_bytes_atomic(out / "table.parquet", buf.getvalue())
        except ImportError as exc:
            logger.warning("table.parquet not written (%s); pip install pyarrow", exc)
        write_text_atomic(out / "per_class.csv", self.per_class.to_csv(index=False))
        write_json(out / "summary.json", clean_json(self.summary))
        buf = io.BytesIO()
        save_npz(buf, self.knn_graph(), compressed=True)
        write_bytes_atomic(out / "knn_graph.npz", buf.getvalue())
        write_text_atomic(out / "report.html", self.report_html())
        mark_done(out, self.summary)
        logger.info("audit saved to %s", out)
        return out

    @classmethod
    def load(cls, out_dir: Union[str, Path]) -> "AuditResult":
        """Read a saved audit back (table, per-class table, summary; the index lazily
        through :func:`nnsim_hooks.index.load_index` if present). No dataset: a report
        rendered from it has no pictures."""
        import pandas as pd

        out = Path(out_dir)
        try:
            table = pd.read_parquet(out / "table.parquet") if (out / "table.parquet").exists() else pd.read_csv(
                out / "table.csv", index_col="sample"
            )
            summary = json.loads((out / "summary.json").read_text())
            per_class = pd.read_csv(out / "per_class.csv")
        except (OSError, ValueError) as exc:
            raise StoreError(f"{out} does not hold a complete saved audit: {exc}") from exc
        for column in table.columns:  # a CSV reads names like "3" as numbers: text again
            if column == "path" or str(column).endswith("_name"):
                table[column] = table[column].astype("string")
        from ..index import load_index

        index = load_index(out / "index") if (out / "index").is_dir() else None
        denoise_index = load_index(out / "index-denoising") if (out / "index-denoising").is_dir() else None
        known = {spec.name for spec in threshold_specs()}
        thresholds = {k: v for k, v in summary.get("thresholds", {}).items() if k in known}
        return cls(table=table, summary=summary, per_class=per_class, thresholds=Thresholds(**thresholds),
                   index=index, k=int(summary.get("k", 10)), denoise_index=denoise_index,
                   class_names=summary.get("class_names"))

    def __repr__(self) -> str:
        s = self.summary
        counts = [words for words in (check.headline(s) for check in checks.CHECKS) if words]
        codes = [w.get("code", "?") for w in warnings_of(s)]
        warned = f" ({len(codes)} warning{'s' if len(codes) > 1 else ''}: {', '.join(codes)})" if codes else ""
        return f"<AuditResult {s.get('samples')} samples{warned}: {', '.join(counts)}>"


def _merge(into: Dict[str, Any], part: Dict[str, Any], check: str) -> None:
    """Add a check's keys to the summary (nested dicts merge); a key set twice is a bug."""
    for key, value in part.items():
        if isinstance(value, dict) and isinstance(into.get(key), dict):
            _merge(into[key], value, check)
        elif key == WARNINGS and isinstance(value, list):  # every check may add warnings
            into[key] = list(into.get(key) or []) + value
        elif key in into:
            raise ValueError(f"audit check {check!r} sets the summary key {key!r}, which is already set; rename it")
        else:
            into[key] = value
