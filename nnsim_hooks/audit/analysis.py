"""``analyse(index)``: every check of the audit on a built gradient index (no model)."""

from __future__ import annotations

import logging
from typing import Any, Dict, Optional, Sequence

import numpy as np

from ..errors import DataError
from ..index.all_neighbors import DEFAULT_RECALL, all_neighbors, check_recall
from . import checks
from .checks.arrays import usable_neighbors
from .checks.check import CLASS, FLAG, FLOAT, GROUP, CheckInputs, check_registry
from .output_choice import DEFAULT_K
from .result import AuditResult
from .sample_names import add_name_columns, path_column
from .thresholds import Thresholds

logger = logging.getLogger(__name__)


def analyse(
    index,
    *,
    positions: Optional[np.ndarray] = None,
    n_total: Optional[int] = None,
    k: int = DEFAULT_K,
    thresholds: Optional[Thresholds] = None,
    num_classes: Optional[int] = None,
    progress: bool = False,
    denoise_index=None,
    density: Optional[np.ndarray] = None,
    dataset=None,
    paths: Optional[Sequence[Optional[str]]] = None,
    class_names: Optional[Sequence[str]] = None,
    non_finite: Optional[Sequence[int]] = None,
    recall: float = DEFAULT_RECALL,
    exact_neighbors: Optional[bool] = None,
    max_memory: Optional[int] = None,
    neighbor_state=None,
    neighbors: Optional[tuple] = None,
    predictions: Optional[np.ndarray] = None,
    probabilities: Optional[np.ndarray] = None,
    context: Optional[Dict[str, Any]] = None,
) -> AuditResult:
    """Every check on a built :class:`~nnsim_hooks.index.GradientIndex` (no model needed).

    ``positions[i]`` is the dataset position of the index's sample ``i`` (default: the
    same); ``n_total`` the dataset's length (rows not in the index were skipped: unreadable,
    or, for the dataset positions in ``non_finite``, holding NaN or Inf values).
    ``denoise_index`` (same samples, another output) gives the density, N_eff and
    consistency columns instead of ``index``. ``density`` (``[N]``, e.g. the exact
    :meth:`~nnsim_hooks.Handle.density` of the same samples) replaces the sketched one; the
    summary's ``"density"`` says which was used (``"exact"`` or ``"sketched, D=..."``).
    ``dataset`` (the audited one, indexed by dataset position) is for checks that look at
    the samples themselves. ``paths`` (one per dataset position, None where a sample has
    no file) fill the table's ``path`` column; ``class_names`` (index = class) its
    ``<class column>_name`` columns (see :mod:`nnsim_hooks.audit.sample_names`).
    ``neighbors`` (``(ids [N, k], sims [N, k])`` in index rows), ``predictions`` and
    ``probabilities`` replace the index's own: the cross-fitted ones of
    :mod:`nnsim_hooks.audit.cross_fit`, each sample seen by a model that never trained on it.
    ``context`` (``{"neighbor_layers": ..., "cross_fitted": folds}``) tells the checks how
    the audit looked (:attr:`~nnsim_hooks.audit.checks.check.CheckInputs.context`).

    The neighbour lists come from :func:`nnsim_hooks.index.all_neighbors.all_neighbors`:
    exact for small N or ``exact_neighbors=True`` (or ``recall=1``), else a partition search
    whose ``nprobe`` reaches the target ``recall`` (at k) on held-out exact queries; the
    summary's ``"neighbors"`` records the method and the recall measured. ``max_memory``
    (bytes) bounds one block of that search; ``neighbor_state`` (a folder) makes it resumable.

    The checks are those of :data:`nnsim_hooks.audit.checks.CHECKS`, run in order.
    """
    import pandas as pd

    check_registry(checks.CHECKS)  # checks may be registered at run time too
    limits = thresholds or Thresholds()
    n = len(index)
    positions = np.arange(n) if positions is None else np.asarray(positions, dtype=np.int64)
    n_total = n if n_total is None else int(n_total)
    labels = _classes(index.labels, n)
    predictions = _classes(index.predictions if predictions is None else predictions, n)
    if probabilities is None:
        probabilities = index.probabilities
    probs = np.asarray(probabilities, dtype=np.float64) if probabilities is not None else None
    if probs is not None and probs.shape[0] != n:
        raise DataError(f"probabilities has {probs.shape[0]} rows but the index holds {n} samples")
    if num_classes is None:
        if probs is not None:
            num_classes = probs.shape[1]
        else:
            num_classes = int(max(labels.max(initial=-1), predictions.max(initial=-1)) + 1)
    out_of_range = labels >= num_classes
    if out_of_range.any():
        bad = np.flatnonzero(out_of_range)[:5]
        raise DataError(
            f"labels {labels[bad].tolist()} (samples {positions[bad].tolist()}) are not below the model's "
            f"{num_classes} classes; pass labels that index the model's outputs"
        )
    if paths is not None and len(paths) != n_total:
        raise DataError(f"paths has {len(paths)} entries but the dataset {n_total} samples; give one per sample")
    paper = index if denoise_index is None else denoise_index
    if len(paper) != n:
        raise DataError(f"denoise_index holds {len(paper)} samples but the index {n}; build both from the same data")
    if density is not None:
        density = np.asarray(density, dtype=np.float64)
        if density.shape != (n,):
            raise DataError(f"density has shape {list(density.shape)} but the index holds {n} samples")

    check_recall(recall)
    if neighbors is None:
        ids, sims, plan = _neighbours(index, n, k, progress, recall=recall, exact=exact_neighbors,
                                      max_memory=max_memory, state_dir=neighbor_state)
    else:
        ids, sims = (np.asarray(a) for a in neighbors)
        if ids.shape != sims.shape or ids.ndim != 2 or ids.shape[0] != n:
            raise DataError(f"neighbors must be two [N={n}, k] arrays (ids, similarities); got shapes "
                            f"{list(ids.shape)} and {list(sims.shape)}")
        ok = usable_neighbors(ids, sims)
        ids, sims = np.where(ok, ids, -1).astype(np.int64), np.where(ok, sims, np.nan).astype(np.float64)
        k = ids.shape[1]
        plan = {"method": "given", "k": k, "rows": n}
    inputs = CheckInputs(labels=labels, predictions=predictions, probabilities=probs, num_classes=num_classes,
                         ids=ids, sims=sims, index=index, paper_index=paper, exact_density=density, thresholds=limits,
                         positions=positions, dataset=dataset, context=dict(context or {}))
    for check in checks.CHECKS:
        computed = check.compute(inputs)
        missing = [c.name for c in check.columns if c.name not in computed]
        if missing:
            raise ValueError(f"audit check {check.name!r} did not compute its columns {missing}")
        inputs.columns.update({c.name: np.asarray(computed[c.name]) for c in check.columns})

    # One row per dataset sample; unreadable ones keep NaN / missing values.
    # Samples the index build skipped (NaN or Inf input or gradient) are shown as skipped files are.
    skipped = positions[skipped_rows(index, paper)]
    non_finite = np.union1d(np.asarray(non_finite if non_finite is not None else [], np.int64), skipped)
    table = pd.DataFrame(index=pd.Index(np.arange(n_total), name="sample"))
    table["finite"] = ~np.isin(np.arange(n_total), non_finite)
    table["readable"] = np.isin(np.arange(n_total), positions) & table["finite"].to_numpy()
    table["valid"] = False
    table.loc[positions, "valid"] = np.asarray(index.valid, dtype=bool)
    table["path"] = path_column(paths, n_total)
    keep = ~np.isin(positions, skipped)
    put = _Writer(table, positions[keep], n_total, keep)
    put(CLASS, "label", labels)
    put(CLASS, "prediction", predictions)
    if probs is not None:
        p_label = np.full(n, np.nan)
        has = labels >= 0
        p_label[has] = probs[has, labels[has]]
        put(FLOAT, "label_probability", p_label)
        put(FLOAT, "confidence", probs.max(1))
    for check in checks.CHECKS:
        for column in check.columns:
            put(column.kind, column.name, inputs.columns[column.name])
    put(FLOAT, "gradient_norm", np.asarray(index.norms, dtype=np.float64))
    mapped = np.where(ids >= 0, positions[np.clip(ids, 0, None)], -1)
    for j in range(ids.shape[1]):
        put(GROUP, f"neighbor_{j + 1}", mapped[:, j])
    for j in range(ids.shape[1]):
        put(FLOAT, f"similarity_{j + 1}", sims[:, j])

    class_columns = ["label", "prediction"] + [c.name for check in checks.CHECKS for c in check.columns if c.kind == CLASS]
    names = None if class_names is None else [str(c) for c in class_names]
    add_name_columns(table, class_columns, names)

    result = AuditResult.build(table, index=index, thresholds=limits, k=k, num_classes=num_classes, info=inputs.info)
    result.class_names = names
    result.summary["class_names"] = names  # AuditResult.load gives them back
    result.summary["neighbors"] = plan
    result.denoise_index = denoise_index
    return result


def _classes(values, n: int) -> np.ndarray:
    """Class indices as int64, -1 where missing or unknown."""
    if values is None:
        return np.full(n, -1, np.int64)
    values = np.asarray(values, dtype=np.int64)
    return np.where(values >= 0, values, -1)


def _neighbours(index, n: int, k: int, progress: bool, **options):
    """``(ids, sims, plan)``: ``[N, k]`` in index rows, -1 / NaN where there is no neighbour,
    and how they were searched (with the recall measured)."""
    if n >= 2:
        sims, ids, plan = all_neighbors(index.features, index.valid, k, progress=progress, **options)
        sims = sims.astype(np.float64)
        plan = plan.to_dict()
    else:
        sims, ids = np.full((n, k), np.nan), np.full((n, k), -1, dtype=np.int64)
        plan = {"method": "exact", "k": k, "rows": n, "recall_measured": 1.0}
    ok = usable_neighbors(ids, sims)
    return np.where(ok, ids, -1), np.where(ok, sims, np.nan), plan


class _Writer:
    """Puts index-row values into the table's dataset rows, with each kind's filler."""

    FILL: Dict[str, tuple] = {FLOAT: (np.nan, np.float64), FLAG: (False, bool), GROUP: (-1, np.int64),
                              CLASS: (-1, np.int64)}

    def __init__(self, table, positions: np.ndarray, n_total: int, keep: np.ndarray):
        """``positions``: the dataset positions written, of the index rows where ``keep``."""
        self.table, self.positions, self.n_total, self.keep = table, positions, n_total, keep

    def __call__(self, kind: str, name: str, values) -> None:
        import pandas as pd

        fill, dtype = self.FILL[kind]
        col = np.full(self.n_total, fill, dtype=dtype)
        col[self.positions] = np.asarray(values)[self.keep]
        if kind == CLASS:  # nullable ints: missing classes read as <NA>, not -1
            arr = pd.array(col, dtype="Int64")
            arr[col < 0] = pd.NA
            self.table[name] = arr
        else:
            self.table[name] = col


def skipped_rows(*indexes) -> np.ndarray:
    """``[N]`` bool: index rows that the build skipped for a NaN or Inf input or gradient
    (stored with a NaN gradient norm: see :mod:`nnsim_hooks.index.nonfinite_samples`), in
    any of ``indexes`` (the same samples)."""
    bad = np.zeros(len(indexes[0]), dtype=bool)
    for index in indexes:
        bad |= np.isnan(np.asarray(index.norms, dtype=np.float64))
    return bad
