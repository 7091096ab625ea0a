"""Near-duplicates: groups of samples linked by a similarity above a threshold (the
network cannot change its output on one without the other), one representative each."""

from __future__ import annotations

from typing import Any, Dict, List, Optional

import numpy as np

from .arrays import usable_neighbors
from .check import FLAG, GROUP, Check, CheckInputs, Column, ThresholdSpec
from .rare_samples import knn_similarity

#: How much the report's gallery shows (the table has everything).
MAX_DUPLICATE_GROUPS = 20
MAX_GROUP_MEMBERS = 8


def duplicate_threshold(top1: np.ndarray, absolute: float, quantile: Optional[float]) -> float:
    """The similarity above which two samples count as near-duplicates: ``absolute``, or,
    when ``quantile`` is given, that quantile of the nearest-neighbour similarities."""
    finite = top1[np.isfinite(top1)]
    if quantile is None or finite.size == 0:
        return float(absolute)
    return float(np.quantile(finite, quantile))


def duplicate_groups(ids: np.ndarray, sims: np.ndarray, threshold: float) -> np.ndarray:
    """Connected components of the graph whose edges are neighbour pairs with
    ``sim >= threshold``. Returns ``[N]`` group ids, -1 for samples in no group; groups
    are numbered 0, 1, ... by decreasing size, then by their smallest member."""
    n = ids.shape[0]
    parent = np.arange(n)

    def find(x: int) -> int:
        root = x
        while parent[root] != root:
            root = parent[root]
        while parent[x] != root:  # path compression
            parent[x], x = root, parent[x]
        return root

    ok = usable_neighbors(ids, sims) & (np.nan_to_num(sims, nan=-np.inf) >= threshold)
    for i, j in zip(*np.nonzero(ok)):
        a, b = find(int(i)), find(int(ids[i, j]))
        if a != b:
            parent[max(a, b)] = min(a, b)
    roots = np.array([find(i) for i in range(n)], dtype=np.int64)
    groups = np.full(n, -1, dtype=np.int64)
    if n == 0:
        return groups
    uniq, first, inverse, counts = np.unique(roots, return_index=True, return_inverse=True, return_counts=True)
    multi = np.flatnonzero(counts >= 2)
    order = multi[np.lexsort((first[multi], -counts[multi]))]  # by size, then smallest member
    numbering = np.full(len(uniq), -1, dtype=np.int64)
    numbering[order] = np.arange(len(order))
    return numbering[inverse.reshape(-1)]


def group_representatives(groups: np.ndarray, preference: np.ndarray) -> np.ndarray:
    """``[N]`` bool: one member per duplicate group to keep, the one with the lowest
    ``preference`` (ties: the smallest id)."""
    keep = np.zeros(len(groups), dtype=bool)
    pref = np.nan_to_num(np.asarray(preference, dtype=np.float64), nan=np.inf)
    members = np.flatnonzero(groups >= 0)
    if members.size:
        ordered = members[np.lexsort((members, pref[members], groups[members]))]
        first = np.r_[True, groups[ordered][1:] != groups[ordered][:-1]]
        keep[ordered[first]] = True
    return keep


class NearDuplicates(Check):
    name = "near_duplicates"
    columns = (
        Column("duplicate_group", GROUP, "the sample's near-duplicate group (-1: none)"),
        Column("duplicate_representative", FLAG, "the member of its group suggested to keep"),
    )
    thresholds = (
        ThresholdSpec(
            "duplicate", 0.995,
            "near-duplicates are pairs whose similarity is at least this (absolute cosine between gradients). "
            "0.995 sits above the 99th percentile of the nearest neighbour similarities of clean digits and below "
            "what a copy with 1% pixel noise gets.",
            "absolute similarity for near-duplicates",
            low=-1.0, high=1.0,
        ),
        ThresholdSpec(
            "duplicate_quantile", None,
            "if set (e.g. 0.99), the duplicate threshold is instead this quantile of every sample's "
            "nearest-neighbour similarity (relative to the distribution) and ``duplicate`` is ignored.",
            "if set: use this quantile of nearest-neighbour similarities instead",
            low=0.0, high=1.0,
        ),
    )
    needs = ("label_issue_score",)
    class_headers = ("in dup. groups",)

    def compute(self, inputs: CheckInputs) -> Dict[str, np.ndarray]:
        sims = inputs.sims
        top1 = sims[:, 0] if sims.shape[1] else np.full(len(sims), np.nan)
        limit = duplicate_threshold(top1, inputs.thresholds.duplicate, inputs.thresholds.duplicate_quantile)
        groups = duplicate_groups(inputs.ids, sims, limit)
        # keep the member whose label is least suspect, then the most typical one
        preference = (np.nan_to_num(inputs.columns["label_issue_score"], nan=0.0)
                      - 1e-3 * np.nan_to_num(knn_similarity(inputs.ids, sims), nan=0.0))
        inputs.info["duplicate_threshold"] = limit
        inputs.info["top1_similarity"] = top1
        return {"duplicate_group": groups, "duplicate_representative": group_representatives(groups, preference)}

    def summary(self, table, info, num_classes) -> Dict[str, Any]:
        groups = table["duplicate_group"].to_numpy()
        in_groups = int((groups >= 0).sum())
        n_groups = int(groups.max() + 1) if in_groups else 0
        return {
            "duplicate_groups": n_groups,
            "samples_in_duplicate_groups": in_groups,
            "removable_duplicates": in_groups - n_groups,
            "thresholds": {"duplicate_similarity_used": info.get("duplicate_threshold")},
        }

    def per_class(self, rows) -> Dict[str, Any]:
        return {"in_duplicate_groups": int((rows["duplicate_group"] >= 0).sum())}

    def headline(self, summary) -> Optional[str]:
        return f"{summary.get('duplicate_groups')} duplicate groups"

    def summary_lines(self, summary) -> List[str]:
        return [f"  near-duplicates   {summary['duplicate_groups']:,} groups "
                f"({summary['samples_in_duplicate_groups']:,} samples)"]

    def cards(self, summary):
        count = summary["duplicate_groups"]
        return [(f"{count:,}", f"near-duplicate groups ({summary['samples_in_duplicate_groups']:,} samples)",
                 "warn" if count else "good")]

    def class_cells(self, row, summary) -> List[str]:
        from ..presentation import num

        return [f'<td>{num(row["in_duplicate_groups"])}</td>']

    def section(self, result, pictures, names) -> str:
        from ..presentation import num

        dups = result.duplicates()
        s = result.summary
        limit = s["thresholds"].get("duplicate_similarity_used")
        if len(dups) == 0:
            body = '<p class="muted">No pair of samples above the duplicate threshold.</p>'
        else:
            blocks = []
            for g, members in list(dups.groupby("duplicate_group", sort=True))[:MAX_DUPLICATE_GROUPS]:
                figs = []
                for pos, r in members.head(MAX_GROUP_MEMBERS).iterrows():
                    keep = bool(r["duplicate_representative"])
                    caption = f'{pictures.name(pos)} · {names(r["label"])}{" · keep" if keep else ""}'
                    figs.append(pictures.figure(pos, caption, "small", "keep" if keep else ""))
                labels = set(members["label"].dropna().tolist())
                note = ' · <span class="lab bad">labels differ</span>' if len(labels) > 1 else ""
                more = f" (+{len(members) - MAX_GROUP_MEMBERS} more)" if len(members) > MAX_GROUP_MEMBERS else ""
                blocks.append(f'<div class="group"><b>group {g}</b> · {len(members)} samples{more}{note}'
                              f'<div class="members">{"".join(figs)}</div></div>')
            n_groups = s["duplicate_groups"]
            more = (f'<p class="muted">… and {n_groups - MAX_DUPLICATE_GROUPS} more groups in '
                    '<a href="#explorer">All samples</a> below (check: duplicate; sort by duplicate_group).</p>'
                    ) if n_groups > MAX_DUPLICATE_GROUPS else ""
            body = f'<div class="groups">{"".join(blocks)}</div>{more}'
        return (f'<section><h2>Near-duplicate groups ({s["duplicate_groups"]:,})</h2><p class="lead">Samples linked by '
                f'a similarity ≥ {num(limit, 4)} (the network cannot change its output on one without the other). The '
                f'green-framed member is the suggested one to keep.</p>{body}</section>')

    def plots(self, result):
        from .. import plots
        from ..presentation import num

        t = result.table
        limit = result.summary["thresholds"].get("duplicate_similarity_used")
        return [plots.histogram(t["similarity_1"] if "similarity_1" in t else [], "Similarity to the nearest neighbour",
                                "cosine similarity of gradients",
                                [(limit, f"duplicate ≥ {num(limit, 4)}", plots.FLAG_COLOUR)], log_y=True)]


CHECK = NearDuplicates()
