"""The audit's checks: one module each, run in the order of :data:`CHECKS`.

A check module holds its pure array functions (no model, no index, no I/O; tested
against independent oracles) and one :class:`~.base.Check` that declares its table
columns, thresholds, summary keys and lines, report section and command-line flags
(see :mod:`.base`). :func:`~nnsim_hooks.audit.analyse`, :class:`~nnsim_hooks.audit.AuditResult`,
the report, :class:`~nnsim_hooks.audit.Thresholds` and ``nnsim audit`` iterate
:data:`CHECKS`; adding a check is its module plus one line below. The order is the
order of the table's columns, the summary, the report's sections and the printed lines;
a check reads the columns of the checks before it.
"""

from __future__ import annotations

from typing import List

from . import denoising, image_quality, label_issues, model_state, near_duplicates, rare_samples
from .check import Check, check_registry

CHECKS: List[Check] = [
    label_issues.CHECK,
    near_duplicates.CHECK,
    rare_samples.CHECK,
    denoising.CHECK,
    model_state.CHECK,
    image_quality.CHECK,
]

check_registry(CHECKS)

__all__ = ["CHECKS", "Check"]
