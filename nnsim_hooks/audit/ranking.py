"""The order in which suspects are shown: the label-issue score first, ties broken by
secondary evidence, so that a page of samples all scoring 1.00 still lists the clearest
cases first (the report's table and galleries, :meth:`AuditResult.label_issues`)."""

from __future__ import annotations

import numpy as np

#: The sort keys, most important first: (column, direction), direction +1 ascending,
#: -1 descending. Missing columns and NaN values sort last for their key.
SUSPICION_KEYS = (
    ("label_issue_score", -1),  # share of the neighbours' vote against the label
    ("prediction_disagrees", -1),  # the model's own prediction also contradicts the label
    ("label_probability", +1),  # the model gives the label a low probability
    ("knn_similarity", -1),  # the voting neighbours are close: a vote to trust more
)


def _key(values: np.ndarray, direction: int) -> np.ndarray:
    """A float key sorting ascending in the wanted direction, NaN last."""
    v = np.asarray(values, dtype=np.float64) * direction
    return np.where(np.isnan(v), np.inf, v)


def prediction_disagrees(table) -> np.ndarray:
    """1.0 where the model's prediction differs from the given label, 0.0 where it agrees,
    NaN where either is missing."""
    if "prediction" not in table or "label" not in table:
        return np.full(len(table), np.nan)
    label = table["label"].astype("Float64").to_numpy(dtype=np.float64, na_value=np.nan)
    pred = table["prediction"].astype("Float64").to_numpy(dtype=np.float64, na_value=np.nan)
    known = np.isfinite(label) & np.isfinite(pred) & (label >= 0) & (pred >= 0)
    return np.where(known, (label != pred).astype(np.float64), np.nan)


def suspicion_order(table) -> np.ndarray:
    """Row numbers (0..len-1) of ``table``, most suspicious label first.

    Keys, in order (:data:`SUSPICION_KEYS`): ``label_issue_score`` (high first), whether
    the prediction contradicts the label (yes first), ``label_probability`` (low first),
    ``knn_similarity`` (high first), then the row number. NaN sorts last on each key;
    a column the table lacks is skipped."""
    n = len(table)
    keys = []
    for column, direction in SUSPICION_KEYS:
        if column == "prediction_disagrees":
            values = prediction_disagrees(table)
        elif column in table:
            values = table[column].astype("Float64").to_numpy(dtype=np.float64, na_value=np.nan)
        else:
            continue
        keys.append(_key(values, direction))
    # np.lexsort sorts by the last key first: the row number, then the keys reversed
    return np.lexsort([np.arange(n)] + keys[::-1]) if n else np.zeros(0, dtype=np.int64)
