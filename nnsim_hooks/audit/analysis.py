"""``analyse(index)``: every check of the audit on a built gradient index (no model)."""

from __future__ import annotations

import logging
from typing import Optional

import numpy as np

from ..errors import DataError
from . import checks
from .output_choice import DEFAULT_K
from .result import AuditResult
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
) -> AuditResult:
    """Every check on a built :class:`~nnsim_hooks.index.GradientIndex` (no model needed).

    ``positions[i]`` is the dataset position of the index's sample ``i`` (default: the
    same); ``n_total`` the dataset's length (rows not in the index are unreadable).
    ``denoise_index`` (same samples, another output) gives the density, N_eff and
    consistency columns instead of ``index``. ``density`` (``[N]``, e.g. the exact
    :meth:`~nnsim_hooks.Handle.density` of the same samples) replaces the sketched one; the
    summary's ``"density"`` says which was used (``"exact"`` or ``"sketched, D=..."``).
    """
    import pandas as pd

    limits = thresholds or Thresholds()
    n = len(index)
    positions = np.arange(n) if positions is None else np.asarray(positions, dtype=np.int64)
    n_total = n if n_total is None else int(n_total)
    valid = np.asarray(index.valid, dtype=bool)
    labels = np.asarray(index.labels, dtype=np.int64) if index.labels is not None else np.full(n, -1, np.int64)
    labels = np.where(labels >= 0, labels, -1)
    predictions = (
        np.asarray(index.predictions, dtype=np.int64) if index.predictions is not None else np.full(n, -1, np.int64)
    )
    probs = np.asarray(index.probabilities, dtype=np.float64) if index.probabilities is not None else None
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

    # Neighbours, in index rows; mapped to dataset positions for the table.
    if n >= 2:
        sims, ids = index.neighbors(k, progress=progress)
        sims = sims.astype(np.float64)
    else:
        sims, ids = np.full((n, k), np.nan), np.full((n, k), -1, dtype=np.int64)
    ok = checks.usable_neighbors(ids, sims)
    ids = np.where(ok, ids, -1)
    sims = np.where(ok, sims, np.nan)

    vote = checks.neighbor_label_vote(ids, sims, labels, max(num_classes, 1), limits.label_issue)
    top1 = sims[:, 0] if sims.shape[1] else np.full(n, np.nan)
    dup_threshold = checks.duplicate_threshold(top1, limits.duplicate, limits.duplicate_quantile)
    groups = checks.duplicate_groups(ids, sims, dup_threshold)
    local = checks.knn_similarity(ids, sims)
    out_threshold = checks.outlier_threshold(local, limits.outlier_z, limits.outlier_quantile, limits.outlier_min_gap)
    is_outlier = checks.flag_below(local, out_threshold)
    preference = np.nan_to_num(vote.score, nan=0.0) - 1e-3 * np.nan_to_num(local, nan=0.0)
    representative = checks.group_representatives(groups, preference)

    paper = index if denoise_index is None else denoise_index
    if len(paper) != n:
        raise DataError(f"denoise_index holds {len(paper)} samples but the index {n}; build both from the same data")
    if density is None:
        density = np.asarray(paper.density(), dtype=np.float64)
        density_method = f"sketched, D={paper.dim}"
    else:
        density = np.asarray(density, dtype=np.float64)
        if density.shape != (n,):
            raise DataError(f"density has shape {list(density.shape)} but the index holds {n} samples")
        density_method = "exact"
    n_eff = np.asarray(paper.effective_neighbors(), dtype=np.float64)
    denoise = np.asarray(paper.denoising_factor(), dtype=np.float64)
    try:
        consistency = np.asarray(paper.consistency(), dtype=np.float64)
    except DataError:
        consistency = np.full(n, np.nan)

    # One row per dataset sample; unreadable ones keep NaN / missing values.
    rows = pd.Index(np.arange(n_total), name="sample")
    table = pd.DataFrame(index=rows)
    table["readable"] = np.isin(np.arange(n_total), positions)
    table["valid"] = False
    table.loc[positions, "valid"] = valid

    def put(name, values, fill=np.nan, dtype=np.float64):
        col = np.full(n_total, fill, dtype=dtype)
        col[positions] = values
        table[name] = col

    def put_class(name, values):
        col = np.full(n_total, -1, dtype=np.int64)
        col[positions] = values
        arr = pd.array(col, dtype="Int64")
        arr[col < 0] = pd.NA
        table[name] = arr

    put_class("label", labels)
    put_class("prediction", predictions)
    if probs is not None:
        p_label = np.full(n, np.nan)
        has = labels >= 0
        p_label[has] = probs[has, labels[has]]
        put("label_probability", p_label, dtype=np.float64)
        put("confidence", probs.max(1), dtype=np.float64)
    put("label_issue_score", vote.score, dtype=np.float64)
    put("is_label_issue", vote.flagged, fill=False, dtype=bool)
    put_class("suggested_label", vote.suggested)
    put("density", density, dtype=np.float64)
    put("knn_similarity", local, dtype=np.float64)
    put("is_outlier", is_outlier, fill=False, dtype=bool)
    put("effective_neighbors", n_eff, dtype=np.float64)
    put("denoising_factor", denoise, dtype=np.float64)
    put("consistency", consistency, dtype=np.float64)
    put("gradient_norm", np.asarray(index.norms, dtype=np.float64), dtype=np.float64)
    put("duplicate_group", groups, fill=-1, dtype=np.int64)
    put("duplicate_representative", representative, fill=False, dtype=bool)
    mapped = np.where(ids >= 0, positions[np.clip(ids, 0, None)], -1)
    for j in range(ids.shape[1]):
        put(f"neighbor_{j + 1}", mapped[:, j], fill=-1, dtype=np.int64)
    for j in range(ids.shape[1]):
        put(f"similarity_{j + 1}", sims[:, j], dtype=np.float64)

    info = {
        "duplicate_threshold": dup_threshold,
        "outlier_threshold": out_threshold,
        "top1_similarity": top1,
    }
    result = AuditResult.build(table, index=index, thresholds=limits, k=k, num_classes=num_classes, info=info)
    result.denoise_index = denoise_index
    result.summary["density"] = density_method
    return result
