"""Suspected label errors: the similarity-weighted vote of each sample's neighbours on
its label (the paper, §3: the network's kernel average of the others' labels)."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Dict, List, Optional

import numpy as np

from .arrays import agreement, class_column, usable_neighbors
from .check import CLASS, FLAG, FLOAT, Check, CheckInputs, Column, ThresholdSpec, warnings_of

#: How much the report's gallery shows (the table has everything).
MAX_LABEL_ISSUES = 36
MAX_NEIGHBOURS_SHOWN = 6


@dataclass
class LabelVote:
    """The similarity-weighted vote of each sample's neighbours on its label."""

    votes: np.ndarray  # [N, C], rows sum to 1 (NaN rows: no voting neighbour)
    score: np.ndarray  # [N], 1 - votes[i, label_i]; NaN without a label or a vote
    suggested: np.ndarray  # [N], argmax of the vote; -1 without a vote
    flagged: np.ndarray  # [N] bool


def neighbor_label_vote(
    ids: np.ndarray, sims: np.ndarray, labels: np.ndarray, num_classes: int, threshold: float = 0.5
) -> LabelVote:
    """Label-issue score: how much of what the network sees as similar carries another label.

    Each neighbour j of sample i votes for its own label with weight ``max(sim_ij, 0)``
    (dissimilar or opposed samples do not vote; unlabelled neighbours do not vote):

        votes[i, c] = sum_j w_ij [y_j = c] / sum_j w_ij,   score_i = 1 - votes[i, y_i].

    This is the paper's kernel average of neighbours' labels (the paper, §3)
    restricted to the k nearest neighbours, without sample i itself, i.e. what the
    network would predict for i from the others' labels. Because the similarities come
    from the gradient of the *predicted* class, the score does not use i's label to
    decide who its neighbours are, so a memorised wrong label cannot hide itself.

    A sample is flagged when ``score >= threshold`` and the vote's winner differs from
    its label.
    """
    n = len(labels)
    labels = np.asarray(labels, dtype=np.int64)
    ok = usable_neighbors(ids, sims)
    safe_ids = np.where(ok, ids, 0)
    neighbor_labels = np.where(ok, labels[safe_ids], -1) if n else np.zeros_like(ids)
    weight = np.where(ok & (neighbor_labels >= 0), np.clip(np.nan_to_num(sims), 0.0, None), 0.0)
    votes = np.zeros((n, num_classes), dtype=np.float64)
    rows = np.repeat(np.arange(n), ids.shape[1]) if ids.size else np.zeros(0, dtype=np.int64)
    cols = neighbor_labels.reshape(-1)
    keep = (cols >= 0) & (cols < num_classes)
    np.add.at(votes, (rows[keep], cols[keep]), weight.reshape(-1)[keep])
    total = votes.sum(1, keepdims=True)
    has_vote = total[:, 0] > 0
    votes = np.divide(votes, total, out=np.full_like(votes, np.nan), where=total > 0)
    labelled = (labels >= 0) & (labels < num_classes)
    score = np.full(n, np.nan)
    both = labelled & has_vote
    score[both] = 1.0 - votes[both, labels[both]]
    suggested = np.full(n, -1, dtype=np.int64)
    suggested[has_vote] = np.argmax(votes[has_vote], 1)
    flagged = both & (np.nan_to_num(score, nan=-1.0) >= threshold) & (suggested != labels)
    return LabelVote(votes, score, suggested, flagged)


def label_noise_rate(table) -> float:
    """Share of the scored labels that are flagged (NaN when none is scored): the
    audit's estimate of the label noise."""
    scored = table["label_issue_score"].notna().to_numpy()
    flagged = table["is_label_issue"].to_numpy(dtype=bool)
    return float(flagged.sum() / scored.sum()) if scored.any() else float("nan")


class LabelIssues(Check):
    name = "label_issues"
    columns = (
        Column("label_issue_score", FLOAT, "share of the neighbours' similarity-weighted labels that are not the "
               "sample's own (NaN without a label or a voting neighbour)"),
        Column("is_label_issue", FLAG, "the label is suspected wrong"),
        Column("suggested_label", CLASS, "the neighbours' majority label"),
    )
    thresholds = (
        ThresholdSpec(
            "label_issue", 0.5,
            "flag a label when at least this share of the similarity-weighted neighbour label mass lies on "
            "*other* labels (``label_issue_score >= label_issue``) and the neighbours' majority label differs "
            "from it. 0.5 means \"most of what the network sees as similar carries another label\".",
            "flag when this share of the neighbours' similarity-weighted labels is on other labels",
            low=0.0, high=1.0,
        ),
    )
    class_headers = ("label issues", "issue rate")

    def compute(self, inputs: CheckInputs) -> Dict[str, np.ndarray]:
        vote = neighbor_label_vote(inputs.ids, inputs.sims, inputs.labels, max(inputs.num_classes, 1),
                                   inputs.thresholds.label_issue)
        return {"label_issue_score": vote.score, "is_label_issue": vote.flagged, "suggested_label": vote.suggested}

    def summary(self, table, info, num_classes) -> Dict[str, Any]:
        labels, preds = class_column(table, "label"), class_column(table, "prediction")
        flagged = table["is_label_issue"].to_numpy(dtype=bool)
        return {
            "label_issues": int(flagged.sum()),
            "label_issue_rate": label_noise_rate(table),
            "scored_labels": int(table["label_issue_score"].notna().sum()),
            "agreement": {
                "prediction_vs_kept_labels": agreement(preds, labels, ~flagged),
                "prediction_vs_neighbor_vote": agreement(preds, class_column(table, "suggested_label")),
            },
        }

    def per_class(self, rows) -> Dict[str, Any]:
        return {"label_issues": int(rows["is_label_issue"].sum()), "label_issue_rate": label_noise_rate(rows)}

    def headline(self, summary) -> Optional[str]:
        return f"{summary.get('label_issues')} label issues"

    def summary_lines(self, summary) -> List[str]:
        from ..presentation import plain_pct

        return [f"  label issues      {summary['label_issues']:,} ({plain_pct(summary.get('label_issue_rate'))} of labels)"]

    def cards(self, summary):
        from ..presentation import pct

        count = summary["label_issues"]
        label = f"suspected label errors ({pct(summary.get('label_issue_rate'))} of labels)"
        if warnings_of(summary):  # green only when the audit could have found them
            return [(f"{count:,}", label + "; see the warnings at the top", "warn")]
        return [(f"{count:,}", label, "bad" if count else "good")]

    def class_cells(self, row, summary) -> List[str]:
        from ..presentation import num, pct

        overall = summary.get("label_issue_rate") or 0.0
        rate = row["label_issue_rate"]
        # a class whose labels are flagged far more often than the others' stands out
        hot = ' class="hot"' if isinstance(rate, float) and math.isfinite(rate) and rate > max(2 * overall, 0.05) \
            and row["class"] != "all" else ""
        return [f'<td>{num(row["label_issues"])}</td>', f"<td{hot}>{pct(rate)}</td>"]

    def section(self, result, pictures, names) -> str:
        import pandas as pd

        issues = result.label_issues()
        total = len(issues)
        if total == 0 and warnings_of(result.summary):
            body = ('<p class="muted">No label is flagged, but that is no evidence that the labels are clean: the '
                    'warnings at the top of the page say why.</p>')
        elif total == 0:
            body = '<p class="muted">No label is contradicted by the samples the network sees as similar.</p>'
        else:
            cards = []
            for pos, r in issues.head(MAX_LABEL_ISSUES).iterrows():
                own = r["label"]
                main = pictures.figure(
                    pos,
                    f'{pictures.name(pos)} · label <span class="lab bad">{names(own)}</span> → '
                    f'<span class="lab good">{names(r["suggested_label"])}</span><br>score {r["label_issue_score"]:.2f}'
                    f' · predicted {names(r["prediction"])}',
                    "main",
                )
                nbrs = []
                for j in range(1, min(result.k, MAX_NEIGHBOURS_SHOWN) + 1):
                    nid = int(r.get(f"neighbor_{j}", -1))
                    if nid < 0:
                        continue
                    nlab = result.table.at[nid, "label"]
                    known = nlab is not pd.NA and nlab == nlab
                    cls = ("good" if known and nlab == r["suggested_label"] else
                           "bad" if known and nlab == own else "other")
                    nbrs.append(pictures.figure(nid, f'<span class="lab {cls}">{names(nlab)}</span> · '
                                                     f'{r[f"similarity_{j}"]:.3f}'))
                cards.append(f'<div class="issue">{main}<div class="nbrs">{"".join(nbrs)}</div></div>')
            more = (f'<p class="muted">… and {total - MAX_LABEL_ISSUES} more, in the same order, in '
                    '<a href="#explorer">All samples</a> below (check: label issue).</p>'
                    if total > MAX_LABEL_ISSUES else "")
            body = f'<div class="gallery">{"".join(cards)}</div>{more}'
        return (f'<section><h2>Suspected label errors ({total:,})</h2><p class="lead">Most suspicious first (by score; ties '
                'broken by the prediction\'s disagreement with the label, then the model\'s probability of the label). '
                'Each sample (left) with its '
                'nearest neighbours as the network sees them (right: their label · similarity; green: the neighbours\' '
                'majority label, red: the sample\'s own label). The score is the share of the similarity-weighted '
                'neighbour labels that disagree with the sample\'s label; the arrow shows their majority. Flagged at '
                f'score ≥ {result.thresholds.label_issue:g}.</p>{body}</section>')

    def plots(self, result):
        from .. import plots

        limit = result.thresholds.label_issue
        return [plots.histogram(result.table["label_issue_score"], "Label-issue score",
                                "share of neighbour label mass on other labels",
                                [(limit, f"flag ≥ {limit:g}", plots.FLAG_COLOUR)], log_y=True)]


CHECK = LabelIssues()
