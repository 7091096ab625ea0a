"""The audit's thresholds: documented defaults, all configurable.

Each check declares its own (:attr:`nnsim_hooks.audit.checks.check.Check.thresholds`);
:class:`Thresholds` holds one value per threshold of the registered checks. Every
default was calibrated on scikit-learn's digits with a small CNN (see
``benchmarks/bench_label_issues.py`` and the histograms in each ``report.html``, which
draw the thresholds so that users can recalibrate them on their own data).
"""

from __future__ import annotations

from typing import Any, Dict, List, Optional

from ..errors import InputError
from . import checks
from .checks.check import ThresholdSpec


def threshold_specs() -> List[ThresholdSpec]:
    """Every registered check's thresholds, in registry order."""
    return [spec for check in checks.CHECKS for spec in check.thresholds]


class Thresholds:
    """When a sample is flagged: one attribute per threshold of the registered checks,
    immutable. ``Thresholds(label_issue=0.6)`` changes one and keeps the other defaults;
    an unknown name or a value out of range is an :class:`~nnsim_hooks.errors.InputError`.
    The attributes, with their defaults, are listed below (generated from the checks:
    ``help(Thresholds)``, or each check module's ``thresholds``).
    """

    def __init__(self, **values: Any):
        specs = {spec.name: spec for spec in threshold_specs()}
        unknown = sorted(set(values) - set(specs))
        if unknown:
            raise InputError(f"unknown threshold(s) {unknown}; the thresholds are {sorted(specs)}")
        for name, spec in specs.items():
            value = values.get(name, spec.default)
            spec.check(value)
            object.__setattr__(self, name, value)

    def __setattr__(self, name: str, value: Any) -> None:
        raise AttributeError(f"Thresholds are immutable; make new ones: Thresholds(**{{**old.to_dict(), {name!r}: ...}})")

    def to_dict(self) -> Dict[str, Any]:
        return dict(vars(self))

    def __eq__(self, other: Any) -> bool:
        return isinstance(other, Thresholds) and self.to_dict() == other.to_dict()

    def __hash__(self) -> int:
        return hash(tuple(self.to_dict().items()))

    def __repr__(self) -> str:
        return "Thresholds(" + ", ".join(f"{k}={v!r}" for k, v in self.to_dict().items()) + ")"

    @classmethod
    def make(cls, value: "Optional[Thresholds | Dict[str, Any]]") -> "Thresholds":
        """``None`` (defaults), a :class:`Thresholds`, or a dict of some of its fields."""
        if value is None:
            return cls()
        if isinstance(value, cls):
            return value
        if isinstance(value, dict):
            return cls(**value)
        raise InputError(f"thresholds must be None, a dict or a Thresholds, got {type(value).__name__}")


def _document() -> None:
    """List the registered thresholds in the class docstring (``help(Thresholds)``)."""
    entries = [f"        {spec.name}: {spec.doc} Default: {spec.default}." for spec in threshold_specs()]
    Thresholds.__doc__ = (Thresholds.__doc__ or "") + "\n    Attributes:\n" + "\n".join(entries) + "\n"


_document()
