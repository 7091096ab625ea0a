"""The suspects' order: label-issue score, then the secondary keys, against a sort in plain Python."""

import math

import numpy as np
import pandas as pd

from nnsim_hooks.audit.ranking import prediction_disagrees, suspicion_order
from nnsim_hooks.audit.result import AuditResult
from nnsim_hooks.audit.thresholds import Thresholds


def _table(n=300, seed=0):
    rng = np.random.default_rng(seed)
    labels = rng.integers(-1, 3, n)
    preds = rng.integers(-1, 3, n)
    return pd.DataFrame({
        "label": pd.array(np.where(labels < 0, None, labels), dtype="Int64"),
        "prediction": pd.array(np.where(preds < 0, None, preds), dtype="Int64"),
        "label_issue_score": rng.choice([1.0, 1.0, 0.75, 0.5, np.nan], n),  # many ties at 1.0
        "label_probability": rng.choice([0.1, 0.2, 0.2, np.nan], n),
        "knn_similarity": rng.choice([0.9, 0.95, np.nan], n),
        "is_label_issue": rng.random(n) < 0.6,
    })


def _oracle(table):
    def last(x, sign):  # NaN last, else ascending in sign * x
        return (1, 0.0) if x is None or (isinstance(x, float) and math.isnan(x)) else (0, sign * x)

    rows = []
    for i, r in enumerate(table.to_dict("records")):
        lab, pred = r["label"], r["prediction"]
        known = not (pd.isna(lab) or pd.isna(pred))
        disagree = float(lab != pred) if known else None
        rows.append((last(r["label_issue_score"], -1), last(disagree, -1), last(r["label_probability"], 1),
                     last(r["knn_similarity"], -1), i))
    return [row[-1] for row in sorted(rows)]


def test_order_matches_a_plain_sort_with_ties():
    t = _table()
    assert suspicion_order(t).tolist() == _oracle(t)


def test_ties_on_the_score_are_broken_by_the_prediction_then_the_probability():
    t = pd.DataFrame({
        "label": pd.array([0, 0, 0, 0], dtype="Int64"),
        "prediction": pd.array([0, 1, 1, 1], dtype="Int64"),
        "label_issue_score": [1.0, 1.0, 1.0, 1.0],
        "label_probability": [0.01, 0.3, 0.05, 0.05],
        "knn_similarity": [0.9, 0.9, 0.8, 0.95],
    })
    # 0 agrees with its prediction: last; 2 and 3 tie on probability: the closer neighbours (3) first
    assert suspicion_order(t).tolist() == [3, 2, 1, 0]


def test_missing_columns_are_skipped():
    t = pd.DataFrame({"label_issue_score": [0.5, np.nan, 0.9]})
    assert suspicion_order(t).tolist() == [2, 0, 1]
    assert np.isnan(prediction_disagrees(t)).all()
    assert suspicion_order(t.iloc[:0]).tolist() == []


def test_label_issues_uses_the_order():
    t = _table(seed=1)
    t.index.name = "sample"
    result = AuditResult(table=t, summary={}, per_class=None, thresholds=Thresholds())
    flagged = t[t["is_label_issue"]]
    expected = flagged.index[_oracle(flagged)].tolist()
    assert result.label_issues().index.tolist() == expected
