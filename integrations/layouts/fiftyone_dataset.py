"""The FiftyOne layout: the samples of a FiftyOne dataset (``--data fiftyone:NAME``, or a
``fiftyone`` Dataset or view given to ``load_dataset``), read as the files they are.

FiftyOne keeps each sample's file in its ``filepath`` field and a classification in an
embedded label (``ground_truth.label`` by default; ``--label-column`` names another field,
e.g. ``label`` or ``predictions``), so the samples are listed through its documented
aggregation ``values(field)`` in the collection's order and read by the file readers; the
audit's table names them by their absolute file path, the key :func:`export_to_fiftyone`
matches them by. Class names: ``classes=``, else the dataset's ``default_classes``, else
the label strings in sorted order (see :mod:`..labels`).

FiftyOne needs its MongoDB: where that database cannot start (the sandbox this package
was built in has no ``mongod`` for it), this code is tested against a stand-in that has
the same methods, not against FiftyOne itself.
"""

from __future__ import annotations

import logging
import math
import os
from typing import Any, Dict, List, Optional, Sequence

from nnsim_hooks.errors import DataError, InputError
from nnsim_hooks.optional import require

from ..labels import parse_labels
from ..listing import Layout, Listing, check_exist

logger = logging.getLogger(__name__)

PREFIX = "fiftyone:"
DEFAULT_LABEL_FIELD = "ground_truth"
#: the audit table's columns that are not exported (the row's own position and file)
NOT_EXPORTED = ("sample", "path")


def is_fiftyone_name(path: str) -> bool:
    return str(path).startswith(PREFIX) and len(str(path)) > len(PREFIX)


def is_fiftyone_collection(obj: Any) -> bool:
    """A FiftyOne Dataset or view (told by its type's module: ``fiftyone`` is not imported to ask)."""
    return any(t.__module__.startswith("fiftyone.") for t in type(obj).__mro__) and hasattr(obj, "values")


def load_collection(name: str):
    """``fiftyone.load_dataset(name)`` for ``fiftyone:name``."""
    fo = require("fiftyone", "reading FiftyOne datasets")
    name = str(name)[len(PREFIX):] if is_fiftyone_name(name) else str(name)
    try:
        return fo.load_dataset(name)
    except ValueError as exc:  # FiftyOne's DatasetNotFoundError is a ValueError
        raise DataError(f"no FiftyOne dataset '{name}' ({exc}); fiftyone.list_datasets() lists them") from exc


def _label_path(collection, field: Optional[str]) -> Optional[str]:
    """The path of the label strings: ``field.label`` for an embedded Classification, or
    ``field`` itself for a plain string/int field; None when the default is absent."""
    name = field or DEFAULT_LABEL_FIELD
    if not collection.has_field(name):
        if field is None:
            return None
        schema = list(collection.get_field_schema())
        raise InputError(f"the FiftyOne dataset has no field {field!r} (--label-column); its fields are {schema}")
    return f"{name}.label" if collection.has_field(f"{name}.label") else name


def list_fiftyone(source: Any, classes: Optional[Sequence[str]] = None, *, label_column: Optional[str] = None
                  ) -> Listing:
    """The samples' files and labels, in the collection's order (see the module docstring)."""
    collection = load_collection(source) if isinstance(source, str) else source
    where = f"the FiftyOne dataset '{getattr(collection, 'name', '')}'"
    paths = [os.fspath(p) for p in collection.values("filepath")]
    label_path = _label_path(collection, label_column)
    if label_path is None:
        labels, names = [-1] * len(paths), list(classes) if classes is not None else []
    else:
        raw = collection.values(label_path)
        known = classes if classes is not None else (list(getattr(collection, "default_classes", None) or []) or None)
        labels, names = parse_labels(raw, paths, f"{where}, field {label_path!r}", known)
    check_exist(paths, where)
    return Listing(paths, labels, names, layout="fiftyone")


def _plain(value: Any) -> Any:
    """A value FiftyOne stores in a plain field: Python int/float/bool/str, None for missing."""
    if value is None:
        return None
    if hasattr(value, "item") and not isinstance(value, (str, bytes)):
        value = value.item()
    if isinstance(value, float) and math.isnan(value):
        return None
    if isinstance(value, (bool, int, float, str)):
        return value
    try:  # pandas' <NA>
        import pandas as pd

        if pd.isna(value):
            return None
    except (TypeError, ValueError):
        pass
    return str(value)


def column_values(table, root: Optional[str] = None, columns: Optional[Sequence[str]] = None,
                  prefix: str = "nnsim_") -> Dict[str, Dict[str, Any]]:
    """``{field: {filepath: value}}`` for :func:`export_to_fiftyone`: each column of the audit's
    ``table`` (``audit(...).table`` or its ``table.csv`` read back) keyed by the sample's
    absolute file path (``path`` column, relative paths taken from ``root``)."""
    if "path" not in table:
        raise InputError("the audit table has no 'path' column: only audits of files can be matched to FiftyOne "
                         "samples (by their filepath)")
    chosen = [c for c in table.columns if c not in NOT_EXPORTED] if columns is None else list(columns)
    missing = [c for c in chosen if c not in table]
    if missing:
        raise InputError(f"the audit table has no column(s) {missing}; its columns are {list(table.columns)}")
    keys = []
    for path in table["path"].tolist():
        if path is None or (isinstance(path, float) and math.isnan(path)):
            keys.append(None)
            continue
        path = str(path)
        keys.append(os.path.abspath(path if os.path.isabs(path) or root is None else os.path.join(root, path)))
    fields = {}
    for column in chosen:
        name = prefix + column.replace(".", "_")
        fields[name] = {k: _plain(v) for k, v in zip(keys, table[column].tolist()) if k is not None}
    return fields


def export_to_fiftyone(table, collection, *, root: Optional[str] = None, columns: Optional[Sequence[str]] = None,
                   prefix: str = "nnsim_") -> List[str]:
    """Write the audit's columns into sample fields of a FiftyOne dataset (or view),
    ``<prefix><column>`` (``nnsim_label_issue_score``...), matched by ``filepath`` with
    FiftyOne's ``set_values(field, {filepath: value}, key_field="filepath")``. Rows
    without a file, and FiftyOne samples the audit did not see, are left as they are.

    Args:
        table: ``audit(...).table``, or ``pandas.read_csv("table.csv")``.
        collection: a ``fiftyone`` Dataset or view, or ``"fiftyone:NAME"``.
        root: the folder the table's relative paths are relative to (the audit's
            ``--data`` folder); the paths of audits read from FiftyOne are absolute.
        columns: the columns to export (default: all but ``sample`` and ``path``).
    Returns the field names written."""
    if isinstance(collection, str):
        collection = load_collection(collection)
    fields = column_values(table, root=root, columns=columns, prefix=prefix)
    present = set(os.path.abspath(p) for p in collection.values("filepath"))
    matched = len(present & set(next(iter(fields.values()), {})))
    if fields and matched == 0:
        raise InputError("none of the audit's sample paths is the filepath of a sample of the FiftyOne dataset; "
                         "pass root= (the audit's --data folder) when the table's paths are relative")
    for name, values in fields.items():
        collection.set_values(name, {k: v for k, v in values.items() if k in present}, key_field="filepath")
    logger.info("exported %d audit columns to %d FiftyOne samples", len(fields), matched)
    return list(fields)


LAYOUT = Layout(
    name="fiftyone",
    recognises=is_fiftyone_name,
    what="a FiftyOne dataset (fiftyone:NAME)",
    help="a FiftyOne dataset (fiftyone:NAME)",
    list_samples=list_fiftyone,
    options=("label_column",),
    patterns=True,
)
