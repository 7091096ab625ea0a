"""Denoising: how many samples the network averages at each prediction (the paper's
N_eff and 1/N_eff, §3), the label-free consistency check, and the agreement with clean
labels that this predicts."""

from __future__ import annotations

from typing import Any, Dict, List

import numpy as np

from ...errors import DataError
from .arrays import nanstat
from .check import FLOAT, Check, CheckInputs, Column
from .label_issues import label_noise_rate


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
        'predictions (0: the network predicts exactly that average, as the averaging explanation says).'
    )

    def compute(self, inputs: CheckInputs) -> Dict[str, np.ndarray]:
        paper = inputs.paper_index
        try:
            consistency = np.asarray(paper.consistency(), dtype=np.float64)
        except DataError:  # an index without stored outputs
            consistency = np.full(len(paper), np.nan)
        # one O(N D^2) pass: denoising_factor() would compute N_eff again
        n_eff = np.asarray(paper.effective_neighbors(), dtype=np.float64)
        with np.errstate(divide="ignore"):
            factor = 1.0 / n_eff
        return {
            "effective_neighbors": n_eff,
            "denoising_factor": factor,
            "consistency": consistency,
        }

    def summary(self, table, info, num_classes) -> Dict[str, Any]:
        noise_rate = label_noise_rate(table)
        valid = table["valid"].to_numpy(dtype=bool)
        predicted = float("nan")
        if num_classes and valid.any() and np.isfinite(noise_rate):
            p_err = averaging_error_probability(table["effective_neighbors"].to_numpy(dtype=np.float64)[valid],
                                                noise_rate, num_classes)
            predicted = float(1.0 - p_err.mean())
        factors = table["denoising_factor"].to_numpy(dtype=np.float64)
        return {
            "denoising": {
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
        return [f"  denoising         median N_eff {plain_num(den.get('median_effective_neighbors'))}: label-noise "
                f"variance divided by that at a prediction (1/N_eff = {plain_num(den.get('median_denoising_factor'))})"]

    def cards(self, summary):
        from ..presentation import num

        den = summary.get("denoising", {})
        return [
            (num(den.get("median_effective_neighbors")), "median effective neighbours N_eff", ""),
            (num(den.get("median_denoising_factor")), "median 1/N_eff: the share of the label noise's variance left in "
             "a prediction", ""),
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
