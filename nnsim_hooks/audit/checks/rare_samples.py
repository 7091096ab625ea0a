"""Rare samples: those whose mean similarity to their nearest neighbours is unusually
low (outliers for the network), with the paper's density beside it (the paper, §3)."""

from __future__ import annotations

from typing import Any, Dict, List, Optional

import numpy as np

from .arrays import usable_neighbors
from .check import FLAG, FLOAT, Check, CheckInputs, Column, ThresholdSpec

#: The robust standard deviation of a normal sample is 1.4826 x its median absolute deviation.
MAD_TO_STD = 1.4826
#: Under the density's histogram: why values below 0 are no error (the similarity is a signed cosine).
DENSITY_NOTE = "below 0: opposed to more samples than aligned with"
#: How many of the rarest samples the report shows.
MAX_RARE = 24


def knn_similarity(ids: np.ndarray, sims: np.ndarray) -> np.ndarray:
    """Mean similarity to the k nearest neighbours (NaN without any): a local density.

    Used for outliers rather than the paper's soft count ``sum_j k_ij``, in which
    negative similarities cancel positive ones and the size of the predicted class
    dominates (on digits with planted noise images it ranks outliers with AUROC 0.81,
    this one with 0.99).
    """
    ok = usable_neighbors(ids, sims)
    count = ok.sum(1)
    total = np.where(ok, sims, 0.0).sum(1)
    return np.divide(total, count, out=np.full(len(ids), np.nan), where=count > 0)


def outlier_threshold(values: np.ndarray, z: float, quantile: Optional[float], min_gap: float = 0.0) -> float:
    """Flag values below this: ``median - max(z * 1.4826 * MAD, min_gap)``, or the given
    low quantile."""
    finite = values[np.isfinite(values)]
    if finite.size == 0:
        return float("nan")
    if quantile is not None:
        return float(np.quantile(finite, quantile))
    median = float(np.median(finite))
    mad = float(np.median(np.abs(finite - median)))
    return median - max(z * MAD_TO_STD * mad, min_gap)


def flag_below(values: np.ndarray, threshold: float) -> np.ndarray:
    """``values < threshold``, False where either is NaN."""
    with np.errstate(invalid="ignore"):
        return np.isfinite(values) & (values < threshold)


class RareSamples(Check):
    name = "rare_samples"
    columns = (
        Column("density", FLOAT, "the paper's density: the soft count of similar samples, sum_j k(x_i, x_j); "
               "negative when the sample's gradient opposes more of the others than it aligns with (the "
               "similarity is a signed cosine), which is not an error"),
        Column("knn_similarity", FLOAT, "mean similarity to the k nearest neighbours"),
        Column("is_outlier", FLAG, "the sample is rare for the network"),
    )
    thresholds = (
        ThresholdSpec(
            "outlier_z", 3.5,
            "flag a sample as an outlier (rare for the network) when its mean similarity to its k nearest "
            "neighbours lies more than ``outlier_z`` robust standard deviations (1.4826 x MAD) below the median.",
            "outliers: robust z-score of the mean neighbour similarity below the median",
            low=0, low_inclusive=False,
        ),
        ThresholdSpec(
            "outlier_min_gap", 0.02,
            "with ``outlier_z``, a sample must also lie at least this far (in cosine) below the median: when "
            "similarities are very concentrated (an untrained network, near-identical images) the MAD is tiny and "
            "differences of 0.01 are not outliers.",
            "outliers must also lie this far below the median similarity",
            low=0, high=2,
        ),
        ThresholdSpec(
            "outlier_quantile", None,
            "if set (e.g. 0.01), flag instead that share of samples with the lowest mean neighbour similarity.",
            "if set: flag this share of samples instead",
            low=0.0, high=1.0,
        ),
    )
    class_headers = ("outliers",)

    def compute(self, inputs: CheckInputs) -> Dict[str, np.ndarray]:
        if inputs.exact_density is None:
            density = np.asarray(inputs.paper_index.density(), dtype=np.float64)
            inputs.info["density_method"] = f"sketched, D={inputs.paper_index.dim}"
        else:
            density = np.asarray(inputs.exact_density, dtype=np.float64)
            inputs.info["density_method"] = "exact"
        local = knn_similarity(inputs.ids, inputs.sims)
        limits = inputs.thresholds
        limit = outlier_threshold(local, limits.outlier_z, limits.outlier_quantile, limits.outlier_min_gap)
        inputs.info["outlier_threshold"] = limit
        return {"density": density, "knn_similarity": local, "is_outlier": flag_below(local, limit)}

    def summary(self, table, info, num_classes) -> Dict[str, Any]:
        return {
            "outliers": int(table["is_outlier"].sum()),
            "density": info.get("density_method"),
            "thresholds": {"outlier_knn_similarity_used": info.get("outlier_threshold")},
        }

    def per_class(self, rows) -> Dict[str, Any]:
        return {"outliers": int(rows["is_outlier"].sum())}

    def headline(self, summary) -> Optional[str]:
        return f"{summary.get('outliers')} outliers"

    def summary_lines(self, summary) -> List[str]:
        return [f"  outliers          {summary['outliers']:,}"]

    def cards(self, summary):
        count = summary["outliers"]
        return [(f"{count:,}", "outliers / rare samples", "warn" if count else "good")]

    def class_cells(self, row, summary) -> List[str]:
        from ..presentation import num

        return [f'<td>{num(row["outliers"])}</td>']

    def section(self, result, pictures, names) -> str:
        from ..presentation import num

        t = result.table
        rare = t[t["knn_similarity"].notna()].sort_values("knn_similarity").head(MAX_RARE)
        limit = result.summary["thresholds"].get("outlier_knn_similarity_used")
        figs = []
        for pos, r in rare.iterrows():
            flag = ' · <span class="lab bad">outlier</span>' if r["is_outlier"] else ""
            caption = f'{pictures.name(pos)} · {names(r["label"])}<br>sim {r["knn_similarity"]:.3f}{flag}'
            figs.append(pictures.figure(pos, caption, "main"))
        body = f'<div class="rare">{"".join(figs)}</div>' if figs else '<p class="muted">No sample has neighbours.</p>'
        return (f'<section><h2>Rarest samples ({result.summary["outliers"]:,} flagged as outliers)</h2><p class="lead">'
                f'The {len(figs)} samples least similar to their {result.k} nearest neighbours (mean similarity). '
                f'Flagged below {num(limit, 4)}.</p>{body}</section>')

    def plots(self, result):
        from .. import plots
        from ..presentation import num

        t = result.table
        limit = result.summary["thresholds"].get("outlier_knn_similarity_used")
        return [
            plots.histogram(t["knn_similarity"], f"Mean similarity to the {result.k} nearest neighbours",
                            "mean cosine similarity", [(limit, f"outlier < {num(limit, 4)}", plots.FLAG_COLOUR)],
                            log_y=True),
            plots.histogram(t["density"], "Density: soft count of similar samples, Σⱼ k(xᵢ, xⱼ)",
                            "soft count (similarities are signed cosines: opposed samples subtract)",
                            [(0.0, "0: as much opposed as aligned", "#777777")],
                            note=DENSITY_NOTE),
        ]


CHECK = RareSamples()
