"""What an audit check declares, and what it is given.

A check is one module of :mod:`nnsim_hooks.audit.checks` holding its pure array
functions and one :class:`Check` subclass that says, for each output of the audit:

- **table**: its :attr:`Check.columns` (name, kind, meaning), computed by
  :meth:`Check.compute` from the :class:`CheckInputs` (neighbour lists, labels, the
  indexes, the thresholds, the audited dataset and the columns of the checks registered
  before it);
- **thresholds**: its :attr:`Check.thresholds` (:class:`ThresholdSpec`: name, default,
  meaning, valid range), which become fields of :class:`~nnsim_hooks.audit.Thresholds`,
  ``--threshold NAME=VALUE`` on the command line and rows of the report's threshold table;
- **summary**: its keys of ``summary.json`` (:meth:`Check.summary`), its columns of
  ``per_class.csv`` (:meth:`Check.per_class`), its lines of the printed summary
  (:meth:`Check.summary_lines`) and its count in ``repr(result)`` (:meth:`Check.headline`);
- **report**: its summary cards (:meth:`Check.cards`), its columns of the per-class table
  (:attr:`Check.class_headers`, :meth:`Check.class_cells`), its gallery section
  (:meth:`Check.section`) and its histograms (:meth:`Check.plots`);
- **command line**: flags of its own beyond ``--threshold`` (:meth:`Check.add_cli_arguments`,
  :meth:`Check.thresholds_from_cli`), none by default.

Everything but :meth:`Check.compute` has an empty default, so a check shows only what
it declares.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional, Sequence, Tuple

import numpy as np

from ...errors import InputError

#: Column kinds: how a column is stored, and what rows without a value (unreadable
#: samples) hold.
FLOAT = "float"  # float64, NaN
FLAG = "flag"  # bool, False
CLASS = "class"  # pandas nullable Int64, <NA> (class indices; -1 from compute() means none)
GROUP = "group"  # int64, -1
COLUMN_KINDS = (FLOAT, FLAG, CLASS, GROUP)


@dataclass(frozen=True)
class Column:
    """One column of the audit's table."""

    name: str
    kind: str
    meaning: str

    def __post_init__(self):
        if self.kind not in COLUMN_KINDS:
            raise ValueError(f"column {self.name!r}: kind {self.kind!r} is not one of {COLUMN_KINDS}")


@dataclass(frozen=True)
class ThresholdSpec:
    """One threshold: a field of :class:`~nnsim_hooks.audit.Thresholds`.

    ``None`` is accepted only when the default is ``None`` (an optional threshold);
    otherwise the value must be a number in ``[low, high]`` (``(low, high]`` when
    ``low_inclusive`` is False)."""

    name: str
    default: Optional[float]
    doc: str  # the Thresholds docstring's entry
    meaning: str  # the report's one-line meaning
    low: float = -math.inf
    high: float = math.inf
    low_inclusive: bool = True

    def check(self, value: Any) -> None:
        """Raise :class:`~nnsim_hooks.errors.InputError` unless ``value`` is allowed."""
        where = f"Thresholds.{self.name}"
        if value is None:
            if self.default is None:
                return
            raise InputError(f"{where} needs a number (default {self.default}), got None")
        if isinstance(value, bool) or not isinstance(value, (int, float, np.integer, np.floating)):
            raise InputError(f"{where} must be a number, got {value!r} ({type(value).__name__})")
        below = value < self.low if self.low_inclusive else value <= self.low
        if below or value > self.high or math.isnan(value):
            if not self.low_inclusive and self.low == 0 and self.high == math.inf:
                raise InputError(f"{where} must be positive, got {value}")
            opening = "[" if self.low_inclusive else "("
            raise InputError(f"{where} must lie in {opening}{self.low}, {self.high}], got {value}")


@dataclass
class CheckInputs:
    """What :meth:`Check.compute` reads: one row per sample of the index (not per dataset
    position: unreadable samples have no row here).

    Attributes:
        labels: ``[N]`` int class indices, -1 where missing.
        predictions: ``[N]`` int predicted classes, -1 where unknown.
        probabilities: ``[N, C]`` softmax probabilities, or None.
        num_classes: the model's classes.
        ids, sims: ``[N, k]`` neighbour rows and similarities, best first (-1 / NaN where none).
        index: the :class:`~nnsim_hooks.index.GradientIndex` of the neighbours.
        paper_index: the index of the paper's quantities (density, N_eff): ``index`` or the
            predicted-class index of an audit whose neighbours use another output.
        exact_density: ``[N]`` exact density given to :func:`~nnsim_hooks.audit.analyse`, or None.
        thresholds: the :class:`~nnsim_hooks.audit.Thresholds` in use.
        positions: ``[N]`` the dataset position of each index row.
        dataset: the audited dataset (row i is ``dataset[positions[i]]``;
            :func:`~nnsim_hooks.audit.thumbnails.raw_sample` gives the original file of
            file-backed datasets), or None when an index is analysed on its own: a check
            that needs the samples returns NaN columns then.
        columns: the columns computed by the checks registered before this one.
        info: facts for the summary and report (the thresholds a check derived, say);
            a check adds its own.
        context: how the audit looked, for checks whose advice depends on it:
            ``"neighbor_layers"`` (the summary's description of the layers, ``"all"``)
            and ``"cross_fitted"`` (the number of fold models, 0 for none).
    """

    labels: np.ndarray
    predictions: np.ndarray
    probabilities: Optional[np.ndarray]
    num_classes: int
    ids: np.ndarray
    sims: np.ndarray
    index: Any
    paper_index: Any
    exact_density: Optional[np.ndarray]
    thresholds: Any
    positions: np.ndarray
    dataset: Any = None
    columns: Dict[str, np.ndarray] = field(default_factory=dict)
    info: Dict[str, Any] = field(default_factory=dict)
    context: Dict[str, Any] = field(default_factory=dict)


#: A summary card of the report: (value, label, tone) with tone "", "good", "warn" or "bad".
Card = Tuple[str, str, str]

#: The key of ``summary.json`` that holds the warnings of every check (a list, empty when
#: none fired; checks' lists are concatenated in registry order).
WARNINGS = "warnings"


@dataclass(frozen=True)
class AuditWarning:
    """A state of the model or the data that makes some of the audit's numbers meaningless.

    Saved as a dict in ``summary.json``'s ``warnings`` list; the report shows it in a
    banner at the top and ``nnsim audit`` prints it before the counts."""

    code: str  # machine-readable, snake_case, e.g. "near_chance"
    message: str  # what was seen, with the numbers
    meaning: str  # what the audit's numbers can and cannot tell in this state
    advice: str  # what to do
    values: Dict[str, Any] = field(default_factory=dict)  # the measured numbers and the thresholds

    def to_dict(self) -> Dict[str, Any]:
        return {"code": self.code, "message": self.message, "meaning": self.meaning, "advice": self.advice,
                "values": dict(self.values)}


def warnings_of(summary: Dict[str, Any]) -> List[Dict[str, Any]]:
    """The warnings of a summary (``[]`` for none, or for a summary saved before warnings existed)."""
    return list(summary.get(WARNINGS) or [])


class Check:
    """One audit check; subclass it in its own module and add an instance to
    :data:`nnsim_hooks.audit.checks.CHECKS`. See the module docstring for what each
    attribute and method feeds."""

    #: Short identifier (snake_case), unique in the registry.
    name: str = ""
    #: Table columns computed by :meth:`compute`, in table order.
    columns: Tuple[Column, ...] = ()
    #: Thresholds read by :meth:`compute` (``inputs.thresholds.<name>``).
    thresholds: Tuple[ThresholdSpec, ...] = ()
    #: Columns of checks registered earlier that this check reads (in :meth:`compute` or
    #: :meth:`summary`): the registry refuses an order that computes them later.
    needs: Tuple[str, ...] = ()
    #: Headers of this check's columns in the report's per-class table.
    class_headers: Tuple[str, ...] = ()
    #: What those columns mean, appended to the per-class table's explanation (HTML).
    class_note: str = ""

    def compute(self, inputs: CheckInputs) -> Dict[str, np.ndarray]:
        """Every column of :attr:`columns`, one value per index row."""
        raise NotImplementedError(f"{type(self).__name__} must compute its columns {[c.name for c in self.columns]}")

    def summary(self, table, info: Dict[str, Any], num_classes: Optional[int]) -> Dict[str, Any]:
        """This check's keys of ``summary.json`` (nested dicts merge with other checks')."""
        return {}

    def per_class(self, rows) -> Dict[str, Any]:
        """This check's columns of ``per_class.csv`` for the table rows of one class."""
        return {}

    def headline(self, summary: Dict[str, Any]) -> Optional[str]:
        """A few words for ``repr(result)``, e.g. ``"12 label issues"``."""
        return None

    def summary_lines(self, summary: Dict[str, Any]) -> List[str]:
        """This check's lines of the summary ``nnsim audit`` prints."""
        return []

    def cards(self, summary: Dict[str, Any]) -> List[Card]:
        """This check's cards at the top of the report."""
        return []

    def class_cells(self, row: Dict[str, Any], summary: Dict[str, Any]) -> List[str]:
        """The ``<td>`` cells under :attr:`class_headers` for one row of ``per_class``."""
        return []

    def section(self, result, pictures, names) -> str:
        """This check's section of the report (a gallery), as HTML; "" for none.
        ``pictures`` and ``names`` are :class:`~nnsim_hooks.audit.presentation.Pictures`
        and :class:`~nnsim_hooks.audit.presentation.ClassNames`."""
        return ""

    def plots(self, result) -> List[Optional[str]]:
        """Histograms for the report's distributions section (:func:`~nnsim_hooks.audit.plots.histogram`)."""
        return []

    def add_cli_arguments(self, group) -> None:
        """Flags of ``nnsim audit`` beyond ``--threshold NAME=VALUE`` (an argparse group)."""

    def thresholds_from_cli(self, args) -> Dict[str, Any]:
        """Threshold values set by this check's own flags (none given: {})."""
        return {}


def check_registry(checks: Sequence[Check]) -> None:
    """Refuse a registry whose checks clash (names, columns, thresholds) or read a
    column that no earlier check computes: the mistake shows at import, not mid-audit."""
    seen_names, seen_columns, seen_thresholds = set(), set(CORE_COLUMNS), set()
    for check in checks:
        where = f"audit check {type(check).__name__} ({check.name!r})"
        if not check.name or check.name in seen_names:
            raise ValueError(f"{where}: its name is empty or taken; give each check its own name")
        seen_names.add(check.name)
        missing = [c for c in check.needs if c not in seen_columns]
        if missing:
            raise ValueError(f"{where} reads columns {missing} that no check before it computes; register it after "
                             "the check that does")
        for column in check.columns:
            # a class column brings its name column (nnsim_hooks.audit.sample_names)
            taken = [column.name] + ([column.name + "_name"] if column.kind == CLASS else [])
            if any(name in seen_columns for name in taken):
                clash = next(name for name in taken if name in seen_columns)
                raise ValueError(f"{where}: column {clash!r} is already computed elsewhere; rename it")
            seen_columns.update(taken)
        for spec in check.thresholds:
            if spec.name in seen_thresholds:
                raise ValueError(f"{where}: threshold {spec.name!r} is already declared by another check")
            seen_thresholds.add(spec.name)
            spec.check(spec.default)
        if len(check.class_headers) and type(check).class_cells is Check.class_cells:
            raise ValueError(f"{where} declares per-class headers {list(check.class_headers)} but no class_cells()")


#: The columns the analysis itself writes (not a check's), in table order: before the
#: checks' columns ``readable`` ... ``confidence``, after them ``gradient_norm`` and the
#: neighbour lists ``neighbor_1..k``, ``similarity_1..k``. Every class column (``kind``
#: CLASS, a check's too) is followed by ``<name>_name``, the class's name
#: (:mod:`nnsim_hooks.audit.sample_names`).
CORE_COLUMNS = ("readable", "valid", "path", "label", "label_name", "prediction", "prediction_name",
                "label_probability", "confidence", "gradient_norm")
