"""Denoising: how many samples the network averages at each prediction (the paper's
N_eff and 1/N_eff, §3), the label-free consistency check, and the agreement with clean
labels that this predicts, quoted only where the consistency check says that the
predictions are kernel averages (:func:`averaging_premise`)."""

from __future__ import annotations

import math
from typing import Any, Dict, List, Optional

import numpy as np

from ...errors import DataError
from .arrays import nanstat
from .check import FLOAT, AuditWarning, Check, CheckInputs, Column
from .label_issues import label_noise_rate

#: The averaging premise holds when the median consistency residual is at most this share of
#: the median spread of the predictions: the kernel average then explains at least half of
#: the predictions' variation (1 - ratio^2 >= 1/2) that the plain mean leaves.
PREMISE_LIMIT = 1.0 / math.sqrt(2.0)


def averaging_error_probability(n_eff: np.ndarray, noise_rate: float, num_classes: int) -> np.ndarray:
    """Probability that averaging noisy labels makes a prediction wrong (the paper, §3).

    Model: the prediction at x_i is the average of ``N_eff(x_i)`` independent labels
    (``N_eff`` clipped to >= 1), each wrong with probability ``noise_rate`` and then
    uniform over the other ``C - 1`` classes. The averaged indicator of the true class has
    mean ``1 - p`` and that of another class ``q = p / (C - 1)``; with the normal
    approximation of their difference (multinomial variances and covariance) and a union
    bound over the C - 1 other classes:

        P(error_i) ~= min(1, (C - 1) * Q(margin / sd_i)),
        margin = 1 - p - q,  sd_i^2 = ((1-p) p + q (1-q) + 2 (1-p) q) / N_eff_i.

    Label-free: ``noise_rate`` is estimated by the audit's share of flagged labels. It
    counts only errors caused by label noise, not those of a network that is unsure for
    other reasons, so ``1 - mean(P(error))`` is an upper estimate of accuracy.
    """
    from scipy.stats import norm

    n = np.clip(np.nan_to_num(np.asarray(n_eff, dtype=np.float64), nan=1.0), 1.0, None)
    c = max(int(num_classes), 2)
    p = float(np.clip(noise_rate, 0.0, 1.0)) if np.isfinite(noise_rate) else 0.0
    q = p / (c - 1)
    margin = 1.0 - p - q
    sd = np.sqrt(((1.0 - p) * p + q * (1.0 - q) + 2.0 * (1.0 - p) * q) / n)
    with np.errstate(divide="ignore", invalid="ignore"):
        z = np.where(sd > 0, margin / np.where(sd > 0, sd, 1.0), np.inf)
    return np.minimum(1.0, (c - 1) * norm.sf(z)) if margin > 0 else np.ones_like(n)


def prediction_spread(values, valid: Optional[np.ndarray] = None, block: int = 65536) -> np.ndarray:
    """``|| p_i - mean_j p_j ||`` (float64 [N]): how far each prediction lies from the mean of
    the (``valid``) predictions, which is the kernel average of a kernel that sees every sample
    alike. The scale against which the consistency residual is read. Row blocks, so that a
    memory-mapped ``values`` [N, C] is never read whole; NaN for invalid rows."""
    n = len(values)
    valid = np.ones(n, dtype=bool) if valid is None else np.asarray(valid, dtype=bool)
    total, count = 0.0, 0
    for start in range(0, n, block):
        rows = np.asarray(values[start:start + block], dtype=np.float64)[valid[start:start + block]]
        rows = rows[np.isfinite(rows).all(1)]
        total, count = total + rows.sum(0), count + len(rows)
    out = np.full(n, np.nan)
    if count == 0:
        return out
    mean = total / count
    for start in range(0, n, block):
        rows = np.asarray(values[start:start + block], dtype=np.float64)
        out[start:start + len(rows)] = np.linalg.norm(rows - mean, axis=1)
    out[~valid] = np.nan
    return out


def averaging_premise(consistency, spread, limit: float = PREMISE_LIMIT) -> Dict[str, Any]:
    """The paper's label-free check of the averaging hypothesis (§3), read as a yes or no.

    The denoising factor assumes that each prediction is the kernel-weighted average of the
    others' (``f(x_i) ~ sum_j K_ij f(x_j) / sum_j K_ij``). The residual of that average
    (``consistency``) means something only against how much the predictions vary at all: a
    kernel that sees every sample alike averages to the plain mean, whose residual is the
    ``spread`` (:func:`prediction_spread`). So the check is the ratio of their medians
    (medians: where a sample's similarities cancel, its kernel average, and residual, has no
    bound); the premise holds when it is at most ``limit`` (default ``1/sqrt(2)``: the kernel
    average removes at least half of the spread's square). A ratio near 1 means that the
    kernel average predicts no better than the mean, and the denoising factor does not
    describe this model and data.

    Returns ``{"residual_to_spread": ratio, "limit": limit, "holds": bool or None}`` (None,
    and a NaN ratio, when either has no finite value or the spread is 0).
    """
    c = nanstat(np.median, consistency)
    s = nanstat(np.median, spread)
    ratio = c / s if math.isfinite(c) and math.isfinite(s) and s > 0 else float("nan")
    return {"residual_to_spread": ratio, "limit": float(limit),
            "holds": bool(ratio <= limit) if math.isfinite(ratio) else None}


def premise_warning(premise: Dict[str, Any]) -> AuditWarning:
    """The banner for a model and data where the averaging premise fails."""
    return AuditWarning(
        code="denoising_premise_fails",
        message=f"the similarity-weighted average of the other predictions is {premise['residual_to_spread']:.2f} "
                f"times as far from a prediction as the mean prediction is (medians; at most "
                f"{premise['limit']:.2f} where the premise holds)",
        meaning="the network's predictions are not kernel averages of the others', so N_eff and 1/N_eff do not say "
                "how much it averages label noise, and the predicted agreement with clean labels is not given",
        advice="read the denoising numbers as a description of the gradients only; a network trained further, or "
               "one whose gradients tell the samples apart, may pass the check",
        values=dict(premise),
    )


def below_one_share(effective_neighbors) -> float:
    """Share of the samples with an N_eff (finite) whose N_eff is below 1: there the
    network averages less than one sample's worth of labels (its similarities to the
    others cancel out) and 1/N_eff exceeds 1, without bound. NaN when none has an N_eff."""
    v = np.asarray(effective_neighbors, dtype=np.float64)
    v = v[np.isfinite(v)]
    return float((v < 1.0).mean()) if v.size else float("nan")


class Denoising(Check):
    name = "denoising"
    columns = (
        Column("effective_neighbors", FLOAT, "N_eff: how many samples the network averages at this prediction"),
        Column("denoising_factor", FLOAT, "1/N_eff: the factor on the label-noise variance at this prediction"),
        Column("consistency", FLOAT, "distance between the prediction and the kernel-weighted average of the "
               "others' predictions (0: the averaging hypothesis holds exactly)"),
        Column("prediction_spread", FLOAT, "distance between the prediction and the mean prediction: the scale "
               "against which consistency is read"),
    )
    # the summary estimates the noise rate from the label-issue flags
    needs = ("label_issue_score", "is_label_issue")
    class_headers = ("median N_eff", "median 1/N_eff", "median consistency")
    class_note = (
        '<b>N_eff</b>: how many samples the network averages at each prediction (the paper, §3), so the label '
        'noise\'s variance is divided by N_eff there; medians, because samples whose similarities cancel out have '
        'N_eff near 0 (and 1/N_eff without bound). From the similarity of the gradients of the predicted class\'s '
        'output, one number per sample (the paper\'s d×d factor with d = 1). '
        '<b>consistency</b>: how far a prediction lies from the similarity-weighted average of the others\' '
        'predictions (0: the network predicts exactly that average, as the averaging explanation says); where its '
        'median is comparable to that of the distance to the mean prediction, N_eff describes the gradients only, '
        'not how much label noise is averaged (the report says so above).'
    )

    def compute(self, inputs: CheckInputs) -> Dict[str, np.ndarray]:
        paper = inputs.paper_index
        from ...index.queries import consistency_values

        try:
            consistency = np.asarray(paper.consistency(), dtype=np.float64)
            spread = prediction_spread(consistency_values(paper), np.asarray(paper.valid, dtype=bool))
        except DataError:  # an index without stored outputs
            consistency = spread = np.full(len(paper), np.nan)
        # one O(N D^2) pass: denoising_factor() would compute N_eff again
        n_eff = np.asarray(paper.effective_neighbors(), dtype=np.float64)
        with np.errstate(divide="ignore"):
            factor = 1.0 / n_eff
        return {
            "effective_neighbors": n_eff,
            "denoising_factor": factor,
            "consistency": consistency,
            "prediction_spread": spread,
        }

    def summary(self, table, info, num_classes) -> Dict[str, Any]:
        noise_rate = label_noise_rate(table)
        valid = table["valid"].to_numpy(dtype=bool)
        premise = averaging_premise(table["consistency"], table["prediction_spread"])
        predicted = float("nan")
        # Only where the premise is not known to fail: else the number would be read as a prediction.
        if num_classes and valid.any() and np.isfinite(noise_rate) and premise["holds"] is not False:
            p_err = averaging_error_probability(table["effective_neighbors"].to_numpy(dtype=np.float64)[valid],
                                                noise_rate, num_classes)
            predicted = float(1.0 - p_err.mean())
        factors = table["denoising_factor"].to_numpy(dtype=np.float64)
        return {
            "warnings": [premise_warning(premise).to_dict()] if premise["holds"] is False else [],
            "denoising": {
                # False: the predictions are not kernel averages, the factors below do not apply
                "estimate_applies": premise["holds"],
                "averaging_premise": premise,
                "estimated_noise_rate": noise_rate,
                "predicted_agreement_with_clean_labels": predicted,
                "median_effective_neighbors": nanstat(np.median, table["effective_neighbors"]),
                # robust statistics only: 1/N_eff is unbounded where a sample's similarities
                # cancel (N_eff near 0), so a mean is ruled by a few such samples
                "median_denoising_factor": nanstat(np.median, factors),
                "denoising_factor_quartiles": [nanstat(lambda v: np.quantile(v, 0.25), factors),
                                               nanstat(lambda v: np.quantile(v, 0.75), factors)],
                "share_below_one_effective_neighbor": below_one_share(table["effective_neighbors"]),
                "mean_consistency": nanstat(np.mean, table["consistency"]),
                "median_consistency": nanstat(np.median, table["consistency"]),
                "median_prediction_spread": nanstat(np.median, table["prediction_spread"]),
            }
        }

    def per_class(self, rows) -> Dict[str, Any]:
        return {
            "median_effective_neighbors": nanstat(np.median, rows["effective_neighbors"]),
            "median_denoising_factor": nanstat(np.median, rows["denoising_factor"]),
            "share_below_one_effective_neighbor": below_one_share(rows["effective_neighbors"]),
            "median_consistency": nanstat(np.median, rows["consistency"]),
        }

    def summary_lines(self, summary) -> List[str]:
        from ..presentation import plain_num

        den = summary.get("denoising", {})
        premise = den.get("averaging_premise") or {}
        check = (f"consistency check: residual {plain_num(premise.get('residual_to_spread'))} of the predictions' "
                 f"spread, at most {plain_num(premise.get('limit'))} where it holds")
        if den.get("estimate_applies") is False:
            return [f"  denoising         does not apply to this model and data ({check}); median N_eff "
                    f"{plain_num(den.get('median_effective_neighbors'))} describes the gradients only"]
        return [f"  denoising         median N_eff {plain_num(den.get('median_effective_neighbors'))}: label-noise "
                f"variance divided by that at a prediction (1/N_eff = {plain_num(den.get('median_denoising_factor'))})",
                f"                    {check}"]

    def cards(self, summary):
        from ..presentation import num

        den = summary.get("denoising", {})
        ratio = (den.get("averaging_premise") or {}).get("residual_to_spread")
        if den.get("estimate_applies") is False:
            return [("does not apply", "denoising estimate: the predictions are not similarity-weighted averages of "
                     f"the others' (consistency residual {num(ratio)} of the predictions' spread)", "warn")]
        return [
            (num(den.get("median_effective_neighbors")), "median effective neighbours N_eff", ""),
            (num(den.get("median_denoising_factor")), "median 1/N_eff: the share of the label noise's variance left in "
             "a prediction", ""),
            (num(ratio), "consistency residual / spread of the predictions (the denoising estimate applies below "
             f"{num((den.get('averaging_premise') or {}).get('limit'))})", "good" if den.get("estimate_applies") else ""),
        ]

    def class_cells(self, row, summary) -> List[str]:
        from ..presentation import num

        return [f'<td>{num(row["median_effective_neighbors"])}</td>', f'<td>{num(row["median_denoising_factor"])}</td>',
                f'<td>{num(row["median_consistency"])}</td>']

    def plots(self, result):
        from .. import plots

        t = result.table
        return [
            plots.histogram(t["effective_neighbors"], "Effective neighbours N_eff", "N_eff", log_x=True,
                            note="label-noise variance ÷ N_eff"),
            plots.histogram(t["consistency"], "Consistency check (label-free)",
                            "‖p_i − kernel average of the p_j‖", log_x=True,
                            note="0: prediction = average of the others'"),
        ]


CHECK = Denoising()
