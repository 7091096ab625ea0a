"""The audit's thresholds: documented defaults, all configurable.

Every default below was calibrated on scikit-learn's digits with a small CNN (see
``benchmarks/bench_label_issues.py`` and the histograms in each ``report.html``, which
draw the thresholds so that users can recalibrate them on their own data).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields
from typing import Any, Dict, Optional

from ..errors import InputError


@dataclass(frozen=True)
class Thresholds:
    """When a sample is flagged.

    Attributes:
        label_issue: flag a label when at least this share of the similarity-weighted
            neighbour label mass lies on *other* labels (``label_issue_score >= label_issue``)
            and the neighbours' majority label differs from it. 0.5 means "most of what
            the network sees as similar carries another label".
        duplicate: near-duplicates are pairs whose similarity is at least this (absolute
            cosine between gradients). 0.995 sits above the 99th percentile of the nearest
            neighbour similarities of clean digits and below what a copy with 1% pixel noise
            gets.
        duplicate_quantile: if set (e.g. 0.99), the duplicate threshold is instead this
            quantile of every sample's nearest-neighbour similarity (relative to the
            distribution) and ``duplicate`` is ignored.
        outlier_z: flag a sample as an outlier (rare for the network) when its mean
            similarity to its k nearest neighbours lies more than ``outlier_z`` robust
            standard deviations (1.4826 x MAD) below the median.
        outlier_quantile: if set (e.g. 0.01), flag instead that share of samples with the
            lowest mean neighbour similarity.
    """

    label_issue: float = 0.5
    duplicate: float = 0.995
    duplicate_quantile: Optional[float] = None
    outlier_z: float = 3.5
    outlier_quantile: Optional[float] = None

    def __post_init__(self):
        def check(name, value, low, high):
            if value is not None and not (low <= value <= high):
                raise InputError(f"Thresholds.{name} must lie in [{low}, {high}], got {value}")

        check("label_issue", self.label_issue, 0.0, 1.0)
        check("duplicate", self.duplicate, -1.0, 1.0)
        check("duplicate_quantile", self.duplicate_quantile, 0.0, 1.0)
        check("outlier_quantile", self.outlier_quantile, 0.0, 1.0)
        if self.outlier_z <= 0:
            raise InputError(f"Thresholds.outlier_z must be positive, got {self.outlier_z}")

    def to_dict(self) -> Dict[str, Any]:
        return asdict(self)

    @classmethod
    def make(cls, value: "Optional[Thresholds | Dict[str, Any]]") -> "Thresholds":
        """``None`` (defaults), a :class:`Thresholds`, or a dict of some of its fields."""
        if value is None:
            return cls()
        if isinstance(value, cls):
            return value
        if isinstance(value, dict):
            known = {f.name for f in fields(cls)}
            unknown = sorted(set(value) - known)
            if unknown:
                raise InputError(f"unknown threshold(s) {unknown}; the thresholds are {sorted(known)}")
            return cls(**value)
        raise InputError(f"thresholds must be None, a dict or a Thresholds, got {type(value).__name__}")
